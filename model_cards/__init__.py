"""Jinja templates of the model cards hf_interop writes (shipped in the wheel as `hf_interop.model_cards`).

This file makes the folder a regular package so `importlib.resources.files("hf_interop.model_cards")` finds the
templates in editable installs as well as in wheels.
"""

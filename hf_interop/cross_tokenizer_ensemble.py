"""Moved to `hf_interop.ensemble.cross_tokenizer`; this path keeps working."""

from .ensemble.cross_tokenizer import CrossTokenizerEnsemble  # noqa: F401

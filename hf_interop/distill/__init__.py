"""Distillation: the config and trainer pairs, collators, the teacher cache, student initialisation."""

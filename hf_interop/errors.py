"""Error types shared by the loaders (kept apart so that every checker can raise them without importing loading)."""


class ModelLoadingError(ValueError):
    """A model or tokenizer could not be loaded; the message names the input and what to do."""

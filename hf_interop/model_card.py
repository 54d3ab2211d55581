"""Moved to `hf_interop.hub.cards`; this path keeps working."""

from .hub.cards import (  # noqa: F401
    BASE_MODEL_RELATIONS,
    CARD_KINDS,
    METADATA_KEYS,
    PROJECT_TAG,
    ModelCardError,
    build_card_data,
    read_card_lineage,
    render_model_card,
    required_fields,
    template_text,
    write_model_card,
)

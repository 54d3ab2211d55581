"""Hub pipelines for hf_interop outputs: lineage manifests, a pre-training access check, and pushing an output folder.

- :func:`write_lineage_manifest` records, next to an output, what it was made from: base model, teachers or members,
  each with the revision asked for and the commit hash it resolved to, plus datasets and library versions
  (`lineage.py`).
- :func:`check_hub_access` is a preflight that trainers call *before training*: valid repo id, a token, a reachable
  Hub, a token that can write to the namespace. A long run never ends in a push that could not have worked.
- :func:`push_output_to_hub` uploads an output folder as one commit, after the same checks. It never modifies the
  local folder, so a failed push loses nothing (`push.py`).
- Model cards, the `README.md` of every output, are rendered in `cards.py`; :func:`write_output_metadata` writes a
  card and a lineage manifest in one call, :func:`update_card_metrics` adds held-out results to a card (`outputs.py`).

The Hub endpoint is read at call time (`huggingface_hub.constants.ENDPOINT`, from `HF_ENDPOINT`), so mirrors and
test servers work.
"""

from .cards import CARD_KINDS, ModelCardError, read_card_lineage, render_model_card, write_model_card
from .lineage import (
    LINEAGE_FILENAME,
    LINEAGE_FORMAT,
    LineageError,
    build_lineage_manifest,
    read_lineage_manifest,
    resolve_source,
    write_lineage_manifest,
)
from .outputs import OutputMetadata, update_card_metrics, write_output_metadata
from .push import (
    DEFAULT_IGNORE_PATTERNS,
    HubAccessError,
    HubPushError,
    check_hub_access,
    check_repo_id,
    push_output_to_hub,
)

__all__ = [
    "CARD_KINDS",
    "DEFAULT_IGNORE_PATTERNS",
    "LINEAGE_FILENAME",
    "LINEAGE_FORMAT",
    "HubAccessError",
    "HubPushError",
    "LineageError",
    "ModelCardError",
    "OutputMetadata",
    "build_lineage_manifest",
    "check_hub_access",
    "check_repo_id",
    "push_output_to_hub",
    "read_card_lineage",
    "read_lineage_manifest",
    "render_model_card",
    "resolve_source",
    "update_card_metrics",
    "write_lineage_manifest",
    "write_model_card",
    "write_output_metadata",
]

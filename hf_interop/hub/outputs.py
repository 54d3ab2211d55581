"""What lands next to every saved output: its model card (`README.md`) and its lineage manifest, in one call.

Every writer of an output folder (trainers, callbacks, adapters, merges, ensembles, the CLI and the demo) goes
through :func:`write_output_metadata`, and re-renders a card with held-out results through
:func:`update_card_metrics`, so a saved folder carries the same files whichever path wrote it.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

from ..logging_utils import get_logger
from . import cards  # looked up at call time, so a patched or wrapped cards.write_model_card is the one used
from .lineage import LINEAGE_FILENAME, write_lineage_manifest

logger = get_logger(__name__)

# The card fields a re-rendered card keeps from the `hf_interop` lineage block of the card it replaces.
_KEPT_CARD_FIELDS = ("teachers", "members", "hyperparameters", "base_model", "combination")


class OutputMetadata(NamedTuple):
    """Paths :func:`write_output_metadata` wrote (`None` for a file it was not asked to write)."""

    card: Path | None
    lineage: Path | None


def write_output_metadata(
    folder: str | os.PathLike,
    kind: str,
    *,
    card: Mapping[str, Any] | None = None,
    lineage: Mapping[str, Any] | None = None,
    link_manifest: bool | None = None,
) -> OutputMetadata:
    """Write the lineage manifest, then the model card, of the output in `folder`.

    Args:
        folder (`str` or `os.PathLike`): the output folder (often the temporary folder of an atomic write: pass
            the final name as `card["model_name"]`, since the card's title defaults to the folder's name).
        kind (`str`): what the output is, for both files (one of :data:`hf_interop.hub.cards.CARD_KINDS`).
        card (`dict`, *optional*): the fields of :func:`hf_interop.write_model_card` (`base_model`, `teachers`,
            `members`, `datasets`, `metrics`, `hyperparameters`, ...). `None` writes no card.
        lineage (`dict`, *optional*): the keyword arguments of :func:`hf_interop.write_lineage_manifest`
            (`base_model`, `teachers`, `members`, `datasets`, `extra`, `strict`, `manifest`). `None` writes no
            manifest.
        link_manifest (`bool`, *optional*): name the manifest in the card (`lineage_manifest`) when the folder holds
            one; defaults to `True` when this call writes the manifest. A `lineage_manifest` in `card` wins.

    Returns:
        `OutputMetadata` with the paths of the card and of the manifest (`None` for a file not written).
    """
    folder = Path(folder)
    manifest_path = None
    if lineage is not None:
        manifest_path = write_lineage_manifest(folder, kind=kind, **lineage)
    card_path = None
    if card is not None:
        fields = dict(card)
        if link_manifest is None:
            link_manifest = lineage is not None
        if link_manifest and (folder / LINEAGE_FILENAME).is_file():
            fields.setdefault("lineage_manifest", LINEAGE_FILENAME)
        card_path = cards.write_model_card(folder, kind, **fields)
    return OutputMetadata(card=card_path, lineage=manifest_path)


def update_card_metrics(
    folder: str | os.PathLike, kind: str, metrics: Mapping[str, Any], datasets: Sequence[str] | str
) -> Path | None:
    """Re-render the card in `folder` with held-out `metrics` and the training `datasets`, keeping its lineage.

    The new card keeps the teachers, members, hyperparameters, base model and combination rule the old card records
    in its `hf_interop` header block. Nothing is written when `folder` has no `README.md`. A card that cannot be
    rendered is logged, not raised: the output it describes is already saved.

    Args:
        folder (`str` or `os.PathLike`): the output folder holding the card.
        kind (`str`): the card kind (one of :data:`hf_interop.hub.cards.CARD_KINDS`).
        metrics (`dict`): metric name -> number, written as the card's `model-index`.
        datasets (`str` or `list[str]`): the training data.

    Returns:
        `Path` of the rewritten `README.md`, or `None` when nothing was written.
    """
    folder = Path(folder)
    if not (folder / "README.md").is_file():
        return None
    recorded = cards.read_card_lineage(folder)
    fields = {key: recorded[key] for key in _KEPT_CARD_FIELDS if recorded.get(key)}
    if "members" in fields:
        fields["members"] = [dict(member) for member in fields["members"]]
    try:
        return cards.write_model_card(folder, kind, datasets=datasets, metrics=metrics, **fields)
    except ValueError as error:  # the output is saved; a card problem must not lose it
        logger.warning(f"could not add the results to the model card in {folder}: {error}")
        return None

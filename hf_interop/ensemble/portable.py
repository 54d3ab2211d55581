"""Saved ensembles that travel: member paths recorded relative to the ensemble folder (or absolute), resolved
against it at load, and self-contained saves that carry their members in `members/<i>/`."""

from __future__ import annotations

import copy
import os
import shutil
from pathlib import Path
from typing import Any

from ..logging_utils import get_logger

logger = get_logger(__name__)

MEMBERS_FOLDER = "members"


def _is_local(spec: dict[str, Any] | None) -> bool:
    return bool(spec) and bool(spec.get("name_or_path")) and os.path.exists(spec["name_or_path"])


def _link_or_copy_tree(source: Path, destination: Path) -> None:
    """Hard-link every file of `source` into `destination` (copy where linking fails, e.g. across filesystems)."""
    if source.is_file():
        destination.mkdir(parents=True, exist_ok=True)
        source, files = source.parent, [source]
    else:
        files = [path for path in source.rglob("*") if path.is_file()]
    for file in files:
        target = destination / file.relative_to(source)
        target.parent.mkdir(parents=True, exist_ok=True)
        if target.exists():
            target.unlink()
        try:
            os.link(file, target)
        except OSError:
            shutil.copy2(file, target)


def _recorded_path(path: str, save_directory: Path) -> tuple[str, bool]:
    """`(recorded, travels)`: relative to the ensemble folder when the member lies inside it or beside it (in its
    parent folder), absolute otherwise (`travels=False`: it resolves only on this machine)."""
    member = Path(path).resolve()
    folder = save_directory.resolve()
    for anchor in (folder, folder.parent):
        if member == anchor or anchor in member.parents:
            return os.path.relpath(member, folder), True
    return str(member), False


def portable_config(config: Any, save_directory: Path, self_contained: bool) -> Any:
    """A copy of `config` whose local members are recorded so that the saved folder loads from anywhere.

    With `self_contained`, local members are hard-linked (or copied) into `save_directory/members/<i>/` first.
    """
    config = copy.deepcopy(config)
    specs: list[tuple[str, dict[str, Any]]] = [(str(i), spec) for i, spec in enumerate(config.members or [])]
    if config.lora_base_model:
        specs.append(("base", config.lora_base_model))
    stuck = []
    for label, spec in specs:
        if not _is_local(spec):
            continue
        source = Path(spec["name_or_path"])
        if self_contained:
            destination = save_directory / MEMBERS_FOLDER / label
            if source.resolve() != destination.resolve():
                _link_or_copy_tree(source, destination)
            inside = destination / source.name if source.is_file() else destination
            spec["name_or_path"] = inside.relative_to(save_directory).as_posix()
            continue
        spec["name_or_path"], travels = _recorded_path(str(source), save_directory)
        if not travels:
            stuck.append(spec["name_or_path"])
    if stuck:
        logger.warning(
            f"members {stuck} lie outside the ensemble folder {str(save_directory)!r} and its parent, so they are "
            "recorded as absolute paths that resolve only on this machine. Save with self_contained=True to copy them "
            "into the folder, or build the ensemble from hub ids."
        )
    return config


def resolve_member_paths(config: Any, ensemble_folder: str | os.PathLike | None) -> None:
    """Resolve relative member paths of a loaded config against the ensemble folder (in place).

    A relative path that does not exist there but exists from the working directory is kept (configs saved before
    paths were recorded relative to the ensemble folder).
    """
    if ensemble_folder is None:
        return
    folder = Path(ensemble_folder)
    specs = [*(config.members or []), *([config.lora_base_model] if config.lora_base_model else [])]
    for spec in specs:
        name = spec.get("name_or_path")
        if not name or os.path.isabs(name):
            continue
        candidate = folder / name
        if candidate.exists():
            spec["name_or_path"] = str(candidate.resolve())


def local_ensemble_folder(
    name_or_path: str | os.PathLike, config: Any, revision: str | None, token: str | bool | None
) -> str | None:
    """The folder member paths are relative to: a local ensemble folder itself, or, for a hub ensemble that carries
    its members (`members/...`), its downloaded snapshot. `None` when there is nothing to resolve against."""
    if os.path.isdir(name_or_path):
        return str(name_or_path)
    carried = [
        spec
        for spec in [*(config.members or []), *([config.lora_base_model] if config.lora_base_model else [])]
        if str(spec.get("name_or_path", "")).startswith(f"{MEMBERS_FOLDER}/")
    ]
    if not carried:
        return None
    from huggingface_hub import snapshot_download

    return snapshot_download(str(name_or_path), revision=revision, token=token)


def check_publishable(config: Any, self_contained: bool) -> None:
    """Refuse to publish an ensemble others could not rebuild: local members (unless carried) or unpinned hub ids."""
    specs = [*(config.members or []), *([config.lora_base_model] if config.lora_base_model else [])]
    local = [spec["name_or_path"] for spec in specs if _is_local(spec)]
    if local and not self_contained:
        raise ValueError(
            f"members {local} are local paths, which nobody who downloads the ensemble has. Pass "
            "push_to_hub(..., self_contained=True) to upload them inside the ensemble repository, or push each "
            "member to the Hub and build the ensemble from their hub ids with pinned revisions."
        )
    unpinned = [spec["name_or_path"] for spec in specs if not _is_local(spec) and not spec.get("revision")]
    if unpinned:
        raise ValueError(
            f"hub members {unpinned} have no pinned revision, so the published ensemble could change under its users. "
            "Build it with revisions=['<commit>', ...] (or {'name_or_path', 'revision'} dicts)."
        )


def _load_saved_tokenizer(name_or_path: str | os.PathLike, revision: str | None) -> Any:
    folder = Path(name_or_path)
    if folder.is_dir() and not any((folder / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json")):
        return None
    try:
        from ..loading import load_tokenizer

        return load_tokenizer(str(name_or_path), revision=revision)
    except (OSError, ValueError):
        return None

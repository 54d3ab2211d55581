"""Lineage manifests: what an hf_interop output was made from, next to the output.

:func:`write_lineage_manifest` records base model, teachers or members, each with the revision asked for and the
commit hash it resolved to, plus datasets and library versions.
"""

from __future__ import annotations

import datetime
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ..utils import atomic_write_json
from .push import _endpoint

LINEAGE_FILENAME = "hf_interop_lineage.json"
LINEAGE_FORMAT = "hf_interop.lineage/1"
_COMMIT_HASH = re.compile(r"^[0-9a-f]{40}$")


class LineageError(ValueError):
    """A source of an output could not be resolved to a commit hash."""


# ----------------------------------------------------------------------------------------------------------------
# Lineage manifests
# ----------------------------------------------------------------------------------------------------------------


def _library_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    versions = {}
    for package in ("hf_interop", "transformers", "torch", "peft", "accelerate", "huggingface_hub", "datasets"):
        try:
            versions[package] = version(package)
        except PackageNotFoundError:
            continue
    return versions


def resolve_source(
    name_or_path: str | os.PathLike, revision: str | None = None, role: str = "source", strict: bool = True
) -> dict[str, Any]:
    """One lineage entry: `{"role", "name_or_path", "revision", "commit_hash"}` (+ `"local_path"` for folders).

    Hub ids are resolved to the commit hash their revision points to (from the cache, or the Hub when online): a
    40-hex `revision` is taken as is. Local folders get `commit_hash=None` and their absolute path; when the folder
    carries its own lineage manifest, it is nested under `"lineage"` so the chain is kept.
    """
    from ..loading import looks_like_hub_id, resolve_commit_hash

    name = os.fspath(name_or_path)
    entry: dict[str, Any] = {"role": role, "name_or_path": name, "revision": revision, "commit_hash": None}
    if os.path.exists(name) or not looks_like_hub_id(name):
        local = Path(name).expanduser().resolve()
        entry["local_path"] = str(local)
        manifest = local / LINEAGE_FILENAME if local.is_dir() else None
        if manifest is not None and manifest.is_file():
            entry["lineage"] = read_lineage_manifest(local)
        return entry
    if revision is not None and _COMMIT_HASH.match(revision):
        entry["commit_hash"] = revision
        return entry
    try:
        entry["commit_hash"] = resolve_commit_hash(name, revision=revision)
    except Exception as error:
        if strict:
            at = f" at revision {revision!r}" if revision else ""
            raise LineageError(
                f"{role} {name!r}{at} could not be resolved to a commit hash ({type(error).__name__}: {error}). Pin "
                "revision=<40-hex commit hash>, make it reachable (cache or Hub), or pass strict=False to record it "
                "unresolved."
            ) from error
        entry["unresolved_reason"] = f"{type(error).__name__}: {error}"
    return entry


def _sources(field: str, sources: Any, role: str, strict: bool) -> list[dict[str, Any]]:
    if sources is None:
        return []
    if isinstance(sources, (str, os.PathLike, Mapping)):
        sources = [sources]
    entries = []
    for index, source in enumerate(sources):
        if isinstance(source, (str, os.PathLike)):
            source = {"name_or_path": source}
        if not isinstance(source, Mapping) or not source.get("name_or_path"):
            raise ValueError(
                f"{field}[{index}] = {source!r} has no 'name_or_path'; pass a name or "
                "{'name_or_path': 'org/name', 'revision': '<commit hash>'}."
            )
        entry = resolve_source(source["name_or_path"], source.get("revision"), role=role, strict=strict)
        for key, value in source.items():
            if key not in ("name_or_path", "revision"):
                entry[key] = value
        entries.append(entry)
    return entries


def build_lineage_manifest(
    *,
    kind: str,
    base_model: Any = None,
    teachers: Any = None,
    members: Any = None,
    datasets: Sequence[str] | str | None = None,
    extra: Mapping[str, Any] | None = None,
    strict: bool = True,
) -> dict[str, Any]:
    """The lineage manifest as a dict (hub ids resolved now); :func:`write_lineage_manifest` writes it."""
    if isinstance(datasets, str):
        datasets = [datasets]
    manifest: dict[str, Any] = {
        "format": LINEAGE_FORMAT,
        "kind": kind,
        "created_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "base_model": _sources("base_model", base_model, "base_model", strict),
        "teachers": _sources("teachers", teachers, "teacher", strict),
        "members": _sources("members", members, "member", strict),
        "datasets": list(datasets or []),
        "library_versions": _library_versions(),
        "hub_endpoint": _endpoint(),
    }
    if extra:
        manifest["extra"] = dict(extra)
    return manifest


def write_lineage_manifest(
    output_dir: str | os.PathLike,
    *,
    kind: str,
    base_model: Any = None,
    teachers: Any = None,
    members: Any = None,
    datasets: Sequence[str] | str | None = None,
    extra: Mapping[str, Any] | None = None,
    strict: bool = True,
    manifest: Mapping[str, Any] | None = None,
) -> Path:
    """Write `output_dir/hf_interop_lineage.json`: what the output was made from, with resolved commit hashes.

    Args:
        output_dir (`str` or `os.PathLike`): the output folder (created if needed).
        kind (`str`): what the output is (`"distilled"`, `"lora"`, `"merged"`, `"ensemble"`, `"finetuned"`, ...).
        base_model, teachers, members: a name/path, a dict `{"name_or_path", "revision", ...}` or a list of them.
            Extra keys (e.g. a member's `"weight"`) are kept.
        datasets (`str` or `list[str]`, *optional*): training data names.
        extra (`dict`, *optional*): anything else worth keeping (e.g. the distillation config).
        strict (`bool`, *optional*, defaults to `True`): raise `LineageError` when a hub id cannot be resolved;
            `False` records it with `commit_hash=None` and the reason.
        manifest (`dict`, *optional*): a manifest already built with :func:`build_lineage_manifest` (resolve once,
            write at every checkpoint); the other arguments except `kind` and `extra` are then ignored.

    Returns:
        `Path` of the manifest (written atomically).
    """
    output_dir = Path(output_dir)
    if output_dir.exists() and not output_dir.is_dir():
        raise ValueError(f"output_dir {str(output_dir)!r} is a file; pass the output folder.")
    if manifest is None:
        manifest = build_lineage_manifest(
            kind=kind,
            base_model=base_model,
            teachers=teachers,
            members=members,
            datasets=datasets,
            extra=extra,
            strict=strict,
        )
    else:
        manifest = {**manifest, "kind": kind}
        if extra:
            manifest["extra"] = {**manifest.get("extra", {}), **extra}
    path = output_dir / LINEAGE_FILENAME
    atomic_write_json(path, manifest)
    return path


def read_lineage_manifest(output_dir: str | os.PathLike) -> dict[str, Any]:
    """The lineage manifest of an output folder (`ValueError` if missing or not an hf_interop manifest)."""
    import json

    path = Path(output_dir) / LINEAGE_FILENAME
    if not path.is_file():
        raise ValueError(f"{str(output_dir)!r} has no {LINEAGE_FILENAME}; write one with write_lineage_manifest.")
    manifest = json.loads(path.read_text(encoding="utf-8"))
    if manifest.get("format") != LINEAGE_FORMAT:
        raise ValueError(f"{str(path)!r} is not an hf_interop lineage manifest (format {manifest.get('format')!r}).")
    return manifest

"""Hub pipelines for hf_interop outputs: lineage manifests, a pre-training access check, and pushing an output folder.

- :func:`write_lineage_manifest` records, next to an output, what it was made from: base model, teachers or members,
  each with the revision asked for and the commit hash it resolved to, plus datasets and library versions.
- :func:`check_hub_access` is a preflight that trainers call *before training*: valid repo id, a token, a reachable
  Hub, a token that can write to the namespace. A long run never ends in a push that could not have worked.
- :func:`push_output_to_hub` uploads an output folder as one commit, after the same checks. It never modifies the
  local folder, so a failed push loses nothing.

The Hub endpoint is read at call time (`huggingface_hub.constants.ENDPOINT`, from `HF_ENDPOINT`), so mirrors and
test servers work.
"""

from __future__ import annotations

import datetime
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ..logging_utils import get_logger
from ..utils import atomic_write_json

logger = get_logger(__name__)

LINEAGE_FILENAME = "hf_interop_lineage.json"
LINEAGE_FORMAT = "hf_interop.lineage/1"
_COMMIT_HASH = re.compile(r"^[0-9a-f]{40}$")
# Left out of uploads: hf_interop's own temporary folders (atomic writes), caches and VCS metadata.
DEFAULT_IGNORE_PATTERNS = (".tmp-*", ".old-*", "*/.tmp-*", "__pycache__", "*.pyc", ".git", ".cache")


class HubAccessError(RuntimeError):
    """The Hub cannot be used for this push (no token, unreachable, read-only token, ...); nothing was uploaded."""


class HubPushError(RuntimeError):
    """The upload itself failed; the local output is intact."""


class LineageError(ValueError):
    """A source of an output could not be resolved to a commit hash."""


# ----------------------------------------------------------------------------------------------------------------
# Repo ids and tokens
# ----------------------------------------------------------------------------------------------------------------


def check_repo_id(repo_id: Any) -> str:
    """Validate a Hub repo id (`"namespace/name"` or `"name"`) and return it; `ValueError` naming the problem."""
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    if not isinstance(repo_id, str) or not repo_id:
        raise ValueError(f"repo_id={repo_id!r} is not a Hub repo id; pass 'namespace/name', e.g. 'my-org/my-student'.")
    try:
        validate_repo_id(repo_id)
    except HFValidationError as error:
        raise ValueError(
            f"repo_id={repo_id!r} is not a valid Hub repo id ({error}). Use 'namespace/name' with letters, digits, "
            "'-', '_' or '.', at most 96 characters per part, e.g. 'my-org/my-student'."
        ) from error
    return repo_id


def _resolve_token(token: str | bool | None) -> str | None:
    from huggingface_hub import get_token

    if token is False:
        return None
    if isinstance(token, str) and token:
        return token
    return get_token()


def _endpoint() -> str:
    from huggingface_hub import constants

    return constants.ENDPOINT


def _offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


# ----------------------------------------------------------------------------------------------------------------
# Preflight
# ----------------------------------------------------------------------------------------------------------------


def check_hub_access(repo_id: str, token: str | bool | None = None, revision: str | None = None) -> dict[str, Any]:
    """Check, before any training or upload, that `repo_id` can be pushed to with `token`.

    Checks in order, each failing with a message that names the problem and the fix: the repo id is valid; a token
    is given or stored (`HF_TOKEN`, `hf auth login`); the Hub is not switched off (`HF_HUB_OFFLINE`); the Hub answers;
    the token is accepted and can write; the namespace is the token's user or one of its organisations (when the repo
    does not exist yet); the branch `revision`, if given and the repo exists, exists or can be created.

    Args:
        repo_id (`str`): target repository, `"namespace/name"`.
        token (`str` or `bool`, *optional*): Hub token; defaults to the stored one (`HF_TOKEN` or `hf auth login`).
        revision (`str`, *optional*): branch the push will go to (`"main"` by default).

    Returns:
        `dict` with `user`, `endpoint`, `repo_exists` and `revision_exists`.

    Raises:
        `ValueError`: invalid `repo_id`. `HubAccessError`: any other check.
    """
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError, RepositoryNotFoundError, RevisionNotFoundError

    check_repo_id(repo_id)
    endpoint = _endpoint()
    resolved_token = _resolve_token(token)
    if resolved_token is None:
        raise HubAccessError(
            f"no Hub token to push to {repo_id!r}: pass token=... (CLI: --hub_token), set HF_TOKEN, or run "
            "`hf auth login`. Nothing was uploaded."
        )
    if _offline():
        raise HubAccessError(
            f"cannot push to {repo_id!r}: HF_HUB_OFFLINE is set, so the Hub is switched off. Unset HF_HUB_OFFLINE to "
            "push, or keep the local output and push it later with push_output_to_hub."
        )
    api = HfApi(endpoint=endpoint, token=resolved_token)
    try:
        identity = api.whoami(token=resolved_token, cache=False)
    except HfHubHTTPError as error:
        status = error.response.status_code if error.response is not None else None
        if status == 401:
            raise HubAccessError(
                f"the Hub at {endpoint} rejected the token (401 Unauthorized); create a write token at "
                f"{endpoint}/settings/tokens and pass it as token=... or HF_TOKEN."
            ) from error
        raise HubAccessError(f"the Hub at {endpoint} answered {status} to a token check: {error}") from error
    except Exception as error:  # connection refused, DNS, timeout: the Hub is out of reach
        raise HubAccessError(
            f"the Hub at {endpoint} could not be reached ({type(error).__name__}: {error}). Check the network or "
            "HF_ENDPOINT; the local output is kept and can be pushed later with push_output_to_hub."
        ) from error

    user = identity.get("name")
    role = (((identity.get("auth") or {}).get("accessToken")) or {}).get("role")
    if role == "read":
        raise HubAccessError(
            f"the token of {user!r} is read-only; pushing to {repo_id!r} needs a token with write access "
            f"({endpoint}/settings/tokens)."
        )
    namespaces = [user, *[org.get("name") for org in identity.get("orgs") or []]]

    repo_exists, revision_exists = True, None
    try:
        api.repo_info(repo_id, token=resolved_token)
    except RepositoryNotFoundError:
        repo_exists = False
    except HfHubHTTPError as error:
        raise HubAccessError(f"the Hub at {endpoint} failed to describe {repo_id!r}: {error}") from error
    namespace = repo_id.split("/")[0] if "/" in repo_id else user
    if not repo_exists and namespace not in namespaces:
        raise HubAccessError(
            f"{repo_id!r} does not exist and the token's user {user!r} cannot create it in namespace {namespace!r} "
            f"(it can write to: {', '.join(str(name) for name in namespaces)}). Use one of those namespaces."
        )
    if repo_exists and revision not in (None, "main"):
        try:
            api.repo_info(repo_id, revision=revision, token=resolved_token)
            revision_exists = True
        except RevisionNotFoundError:
            revision_exists = False  # the push creates the branch
    return {"user": user, "endpoint": endpoint, "repo_exists": repo_exists, "revision_exists": revision_exists}


# ----------------------------------------------------------------------------------------------------------------
# Push
# ----------------------------------------------------------------------------------------------------------------


def _files_to_upload(output_dir: Path, ignore_patterns: Sequence[str]) -> list[Path]:
    import fnmatch

    files = []
    for path in sorted(output_dir.rglob("*")):
        if not path.is_file():
            continue
        relative = path.relative_to(output_dir).as_posix()
        parts = relative.split("/")
        if any(fnmatch.fnmatch(part, pattern) for part in parts for pattern in ignore_patterns):
            continue
        if any(fnmatch.fnmatch(relative, pattern) for pattern in ignore_patterns):
            continue
        files.append(path)
    return files


def push_output_to_hub(
    output_dir: str | os.PathLike,
    repo_id: str,
    *,
    revision: str | None = None,
    token: str | bool | None = None,
    commit_message: str | None = None,
    private: bool | None = None,
    ignore_patterns: Sequence[str] | None = None,
) -> dict[str, Any]:
    """Upload an hf_interop output folder (checkpoint, adapter, merged model, ensemble) to the Hub as one commit.

    Everything is checked before the first byte is uploaded (:func:`check_hub_access`: repo id, token, reachability,
    write access). The local folder is only read, never changed, so a failed push loses nothing; run it again.

    Args:
        output_dir (`str` or `os.PathLike`): the folder to upload (its `README.md` card and lineage manifest go along).
        repo_id (`str`): target repository, `"namespace/name"`; created if missing.
        revision (`str`, *optional*): branch to commit to; created from `main` if missing. Defaults to `main`.
        token (`str` or `bool`, *optional*): Hub token; defaults to the stored one.
        commit_message (`str`, *optional*): defaults to "Upload <folder name> with hf_interop".
        private (`bool`, *optional*): visibility of a repository this call creates (an existing one is unchanged).
        ignore_patterns (`list[str]`, *optional*): glob patterns of files to leave out; defaults to
            :data:`DEFAULT_IGNORE_PATTERNS` (temporary folders of atomic writes, caches).

    Returns:
        `dict` with `repo_id`, `revision`, `commit_hash` (pin it: `from_pretrained(repo_id, revision=commit_hash)`),
        `commit_url` and `files` (paths uploaded).

    Raises:
        `ValueError` (bad `output_dir` or `repo_id`), `HubAccessError` (preflight), `HubPushError` (upload failed).
    """
    from huggingface_hub import CommitOperationAdd, HfApi

    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        raise ValueError(f"output_dir {str(output_dir)!r} is not a folder; pass the folder an hf_interop run saved.")
    files = _files_to_upload(
        output_dir, tuple(ignore_patterns) if ignore_patterns is not None else DEFAULT_IGNORE_PATTERNS
    )
    if not files:
        raise ValueError(f"output_dir {str(output_dir)!r} has no files to upload (after ignore_patterns).")
    if not (output_dir / "README.md").is_file():
        logger.warning(
            f"{output_dir} has no README.md model card; write one with hf_interop.write_model_card before pushing."
        )
    branch = revision or "main"
    access = check_hub_access(repo_id, token=token, revision=branch)
    resolved_token = _resolve_token(token)
    api = HfApi(endpoint=access["endpoint"], token=resolved_token)
    operations = [
        CommitOperationAdd(path_in_repo=path.relative_to(output_dir).as_posix(), path_or_fileobj=str(path))
        for path in files
    ]
    try:
        api.create_repo(repo_id, private=private, exist_ok=True, token=resolved_token)
        if branch != "main":
            api.create_branch(repo_id, branch=branch, exist_ok=True, token=resolved_token)
        commit = api.create_commit(
            repo_id,
            operations,
            commit_message=commit_message or f"Upload {output_dir.resolve().name} with hf_interop",
            revision=branch,
            token=resolved_token,
        )
    except Exception as error:
        raise HubPushError(
            f"pushing {str(output_dir)!r} to {repo_id!r} (branch {branch!r}) failed: {error}. The local output is "
            "intact; run push_output_to_hub again."
        ) from error
    logger.info(f"Pushed {output_dir} to {repo_id}@{branch} as commit {commit.oid}")
    return {
        "repo_id": repo_id,
        "revision": branch,
        "commit_hash": commit.oid,
        "commit_url": commit.commit_url,
        "files": [operation.path_in_repo for operation in operations],
    }


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

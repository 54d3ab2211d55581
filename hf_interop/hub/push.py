"""Pushing hf_interop outputs to the Hub, with a preflight access check that trainers run before training.

- :func:`check_hub_access` is a preflight that trainers call *before training*: valid repo id, a token, a reachable
  Hub, a token that can write to the namespace. A long run never ends in a push that could not have worked.
- :func:`push_output_to_hub` uploads an output folder as one commit, after the same checks. It never modifies the
  local folder, so a failed push loses nothing.

The Hub endpoint is read at call time (`huggingface_hub.constants.ENDPOINT`, from `HF_ENDPOINT`), so mirrors and
test servers work.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..logging_utils import get_logger

logger = get_logger(__name__)

# Left out of uploads: hf_interop's own temporary folders (atomic writes), caches and VCS metadata.
DEFAULT_IGNORE_PATTERNS = (".tmp-*", ".old-*", "*/.tmp-*", "__pycache__", "*.pyc", ".git", ".cache")


class HubAccessError(RuntimeError):
    """The Hub cannot be used for this push (no token, unreachable, read-only token, ...); nothing was uploaded."""


class HubPushError(RuntimeError):
    """The upload itself failed; the local output is intact."""


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

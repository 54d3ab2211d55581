"""Hub pipelines for hf_interop outputs: lineage manifests, a pre-training access check, and pushing an output folder."""

from .push import (  # noqa: F401
    DEFAULT_IGNORE_PATTERNS,
    LINEAGE_FILENAME,
    LINEAGE_FORMAT,
    HubAccessError,
    HubPushError,
    LineageError,
    build_lineage_manifest,
    check_hub_access,
    check_repo_id,
    push_output_to_hub,
    read_lineage_manifest,
    resolve_source,
    write_lineage_manifest,
)

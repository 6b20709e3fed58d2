"""Stage: after a build published, measure the call cache and prune what is older than the retention."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import get_run_logger, task

from longreward_core.data.records import CallCacheSize
from longreward_core.models.call_cache import open_call_cache
from longreward_core.pipeline.retention import prune_outputs, retention_cutoff
from tasks.caching import with_cache_password


def call_cache_size(cache_path: str, cache_password_secret: str | None) -> CallCacheSize:
    """The call cache's answers and bytes (for the manifest)."""
    cache = open_call_cache(with_cache_password(cache_path, cache_password_secret))
    try:
        return cache.size()
    finally:
        cache.close()


@task(name="prune", task_run_name="prune-older-than-{days}d")
def prune_retention(
    output_dir: str, cache_path: str, cache_password_secret: str | None, days: int, build_dir: str, started: float
) -> dict[str, Any]:
    """Delete the call cache's answers not used for `days`, and the result records, Qdrant stores
    and spools under `output_dir` older than that (never the build's own, `build_dir`, nor
    anything since it `started`); returns what went, by kind: count and bytes."""
    logger = get_run_logger()
    cutoff = retention_cutoff(days, started)
    cache = open_call_cache(with_cache_password(cache_path, cache_password_secret))
    try:
        pruned = cache.prune(cutoff)
    finally:
        cache.close()
    logger.info("call cache: %d answers not used for %d days removed (%d bytes of text); %s",
                pruned.rows, days, pruned.text_bytes, pruned.space)
    summary: dict[str, Any] = {"call cache answers": {"count": pruned.rows, "bytes": pruned.text_bytes}}
    for removed in prune_outputs(Path(output_dir), cutoff, keep=build_dir):
        entry = summary.setdefault(f"{removed.kind}s", {"count": 0, "bytes": 0})
        entry["count"] += 1
        entry["bytes"] += removed.bytes
    for kind, entry in summary.items():
        logger.info("pruned %s: %d, %d bytes", kind, entry["count"], entry["bytes"])
    return summary

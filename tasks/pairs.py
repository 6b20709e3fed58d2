"""Stage: build preference pairs from every shard's scores."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import get_run_logger, task

from longreward_core.data.pairs import PairConfig
from longreward_core.pipeline.build import merge_pairs
from tasks.caching import CACHE_EXPIRATION, stage_cache_key

VERSION = 1


@task(
    name="build-pairs",
    retries=1,
    cache_key_fn=stage_cache_key(
        "pairs", VERSION, lambda p: [Path(d) / "scores.parquet" for d in p["shard_dirs"]], config=("shard_dirs", "pairs", "out_path")
    ),
    cache_expiration=CACHE_EXPIRATION,
    persist_result=True,
)
def build_pairs(shard_dirs: list[str], pairs: PairConfig, out_path: str) -> dict[str, Any]:
    """The merged pairs file and the count of prompts skipped, by reason."""
    result = merge_pairs([Path(d) for d in shard_dirs], pairs, out_path)
    get_run_logger().info("%d pairs; skipped: %s", result.count, dict(result.skipped) or "none")
    return {"pairs": out_path, "count": result.count, "skipped": dict(result.skipped)}

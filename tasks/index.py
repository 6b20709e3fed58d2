"""Stage: chunk a shard's documents and index their retrieval chunks in Qdrant."""

from __future__ import annotations

from pathlib import Path

from prefect import get_run_logger

from longreward_core.pipeline.build import index_shard
from longreward_core.reward.documents import DocumentConfig
from tasks.caching import shard_stage, with_cache_password

VERSION = 1


@shard_stage("index", VERSION, lambda p: [Path(p["shard_dir"]) / "prompts.parquet"], config=("shard_dir", "scoring"))
def index_documents(
    shard_dir: str, shard_name: str, scoring: DocumentConfig, cache_path: str | None = None,
    cache_password_secret: str | None = None,
) -> int:
    """Chunks embedded for this shard (0 when its documents were already indexed)."""
    cache = with_cache_password(cache_path, cache_password_secret) if cache_path else None
    embedded = index_shard(shard_dir, scoring, cache)
    get_run_logger().info("%s: %d document chunks embedded", shard_name, embedded)
    return embedded

"""Stage: load and validate the inputs, quarantine bad rows, split prompts into shards."""

from __future__ import annotations

from pathlib import Path

from prefect import get_run_logger, task

from longreward_core.pipeline.build import ShardPlan, write_shards
from tasks.caching import CACHE_EXPIRATION, stage_cache_key

VERSION = 1


@task(
    name="load-and-shard",
    retries=1,
    cache_key_fn=stage_cache_key(
        "shard", VERSION, lambda p: [Path(p["prompts"])] + ([Path(p["candidates"])] if p.get("candidates") else []),
        config=("shard_size", "out_dir"),
    ),
    cache_expiration=CACHE_EXPIRATION,
    persist_result=True,
)
def load_and_shard(prompts: str, candidates: str | None, shard_size: int, out_dir: str) -> ShardPlan:
    """Shard folders under out_dir, each with prompts.parquet (and candidates.parquet if given)."""
    plan = write_shards(prompts, candidates, shard_size, out_dir)
    logger = get_run_logger()
    logger.info("%d prompts in %d shards of up to %d", plan.prompts, len(plan.shard_dirs), shard_size)
    if plan.quarantined:
        logger.warning("%d input rows quarantined (reasons in %s)", plan.quarantined, plan.quarantine_path)
    return plan

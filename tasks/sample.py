"""Stage: sample candidate responses for a shard's prompts from the policy model."""

from __future__ import annotations

from pathlib import Path

import polars as pl
from prefect import get_run_logger

from longreward_core.pipeline.build import sample_shard
from longreward_core.pipeline.sampling import PolicyConfig
from tasks.caching import (
    ShardIncomplete,
    shard_stage,
    with_cache_password,
    with_secret_key,
)

VERSION = 2  # 2: sampling.parquet counts unreachable samples; shards cached short by a policy outage sample again


@shard_stage("sample", VERSION, lambda p: [Path(p["shard_dir"]) / "prompts.parquet"], config=("shard_dir", "policy", "policy_key_secret"))
def sample_candidates(
    shard_dir: str, shard_name: str, policy: PolicyConfig, cache_path: str, min_candidates: int,
    policy_key_secret: str | None = None, cache_password_secret: str | None = None,
) -> str:
    """Path of the shard's candidates.parquet. Prompts left with fewer than `min_candidates`
    candidates are reported (they cannot yield a pair), not dropped. Raises ShardIncomplete when
    the policy was unreachable for some samples, so the shard is sampled again rather than cached
    short; a prompt skipped for its length or a request the provider refused is a final outcome."""
    cache = with_cache_password(cache_path, cache_password_secret)
    candidates = sample_shard(shard_dir, with_secret_key(policy, policy_key_secret), cache)
    report = pl.read_parquet(Path(shard_dir) / "sampling.parquet")
    logger = get_run_logger()
    short = report.filter(pl.col("sampled") < min_candidates)
    # A prompt whose document does not fit is skipped (kept_tokens 0, reported with the short ones).
    cut = report.filter((pl.col("kept_tokens") > 0) & (pl.col("kept_tokens") < pl.col("context_tokens")))
    logger.info("%s: %d candidates for %d prompts", shard_name, int(report["sampled"].sum()), report.height)
    if cut.height:
        logger.info("%s: %d documents cut in the middle to fit the policy context", shard_name, cut.height)
    if short.height:
        logger.warning(
            "%s: %d prompts have fewer than %d candidates: %s", shard_name, short.height, min_candidates,
            ", ".join(f"{r['prompt_id']} ({r['sampled']}: {r['error']})" for r in short.head(10).iter_rows(named=True)),
        )
    unreachable = int(report["unreachable"].sum())
    if unreachable:
        raise ShardIncomplete(f"{shard_name}: the policy was unreachable for {unreachable} samples")
    return str(candidates)

"""Stage: score a shard's candidates with LongReward."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

from prefect import get_run_logger
from prefect.concurrency.sync import concurrency

from longreward_core.pipeline.score import score_files
from longreward_core.reward.judge import JudgeConfig
from longreward_core.reward.scorer import ScoringConfig
from tasks.caching import ShardIncomplete, shard_stage, with_secret_key

VERSION = 2  # 2: the summary is a ScoreSummary


@shard_stage(
    "score", VERSION,
    lambda p: [Path(p["shard_dir"]) / "prompts.parquet", Path(p["shard_dir"]) / "candidates.parquet"],
    config=("shard_dir", "judge", "scoring", "judge_key_secret"),
)
def score_shard(
    shard_dir: str,
    shard_name: str,
    judge: JudgeConfig,
    scoring: ScoringConfig,
    cache_path: str,
    judge_slots: str | None = None,
    judge_key_secret: str | None = None,
) -> dict[str, Any]:
    """Scores and accounting of the shard. Holds `judge.concurrency` slots of the Prefect global
    concurrency limit named `judge_slots` (when it exists), so that all shards of all runs stay
    under one judge limit. Raises ShardIncomplete when the judge was unreachable, so the shard is
    retried and never cached half-done; its finished judge calls are in the call cache."""
    shard = Path(shard_dir)
    judge = with_secret_key(judge, judge_key_secret)
    slots = concurrency(judge_slots, occupy=judge.concurrency, strict=False) if judge_slots else contextlib.nullcontext()
    with slots:
        run = score_files(shard / "prompts.parquet", shard / "candidates.parquet", shard, judge, scoring, cache_path=cache_path)
    summary = run.summary
    logger = get_run_logger()
    total = summary.judge["total"]
    logger.info(
        "%s: %d scored, %d failed; %d judge requests, %d cache hits",
        shard_name, summary.scored, summary.failed, total["calls"], total["cache_hits"],
    )
    if summary.unreachable:
        raise ShardIncomplete(f"{shard_name}: the judge was unreachable for {summary.unreachable} candidates")
    return {"shard": shard_name, "scores": str(run.scores_path), "summary": summary}

"""Stage: score a shard's candidates with LongReward."""

from __future__ import annotations

import contextlib
import re
from pathlib import Path
from typing import Any

from prefect import get_run_logger
from prefect.artifacts import create_table_artifact
from prefect.client.orchestration import get_client
from prefect.concurrency.sync import concurrency
from prefect.exceptions import ObjectNotFound

from longreward_core.data.pairs import PairConfig
from longreward_core.pipeline.score_files import score_files
from longreward_core.reward.batch_executor import WaveReport
from longreward_core.reward.judge import JudgeConfig
from longreward_core.reward.scorer import ScoringConfig
from tasks.caching import (
    ServerSetupMissing,
    ShardIncomplete,
    shard_stage,
    with_cache_password,
    with_secret_key,
)

VERSION = 4  # 2: the summary is a ScoreSummary; 3: pair pruning (the pair rules are part of the key); 4: typed accounting


@shard_stage(
    "score", VERSION,
    lambda p: [Path(p["shard_dir"]) / "prompts.parquet", Path(p["shard_dir"]) / "candidates.parquet"],
    config=("shard_dir", "judge", "scoring", "pairs", "judge_key_secret"),
)
def score_shard(
    shard_dir: str,
    shard_name: str,
    judge: JudgeConfig,
    scoring: ScoringConfig,
    cache_path: str,
    judge_slots: str | None = None,
    judge_key_secret: str | None = None,
    judge_limit_strict: bool = False,
    cache_password_secret: str | None = None,
    pairs: PairConfig | None = None,
) -> dict[str, Any]:
    """Scores and accounting of the shard. When the Prefect global concurrency limit named
    `judge_slots` exists, the shard holds min(judge.concurrency, the limit) of its slots and sends
    at most that many judge requests at once, so all shards of all runs together stay under the
    limit (a shard larger than the limit runs narrower, it does not fail). A missing limit fails
    the shard when `judge_limit_strict`, else it is warned about and the judge runs unthrottled.
    Raises ShardIncomplete when the judge was unreachable, so the shard is retried and never cached
    half-done; its finished judge calls are in the call cache."""
    shard = Path(shard_dir)
    judge = with_secret_key(judge, judge_key_secret)
    # Batch mode sends no online request: its shard holds no judge slot while its batches wait.
    limit = judge_limit(judge_slots, judge_limit_strict) if judge_slots and not judge.batch else None
    if limit is None:
        slots = contextlib.nullcontext()
    else:
        # Prefect refuses to grant more slots than the limit holds (every shard would fail), so a
        # wider shard runs narrower. At least one: a limit of 0 then fails with Prefect's message
        # instead of leaving the judge without a request slot.
        held = max(1, min(judge.concurrency, limit))
        judge = judge.model_copy(update={"concurrency": held})
        slots = concurrency(judge_slots, occupy=held, strict=judge_limit_strict)
    with slots:
        run = score_files(shard / "prompts.parquet", shard / "candidates.parquet", shard, judge, scoring,
                          cache_path=with_cache_password(cache_path, cache_password_secret), pair_config=pairs,
                          on_wave=lambda wave: _batches_artifact(shard_name, wave))
    summary = run.summary
    logger = get_run_logger()
    total = summary.judge.total
    logger.info(
        "%s: %d scored, %d failed; %d judge requests, %d cache hits",
        shard_name, summary.scored, summary.failed, total.calls, total.cache_hits,
    )
    if summary.unreachable:
        raise ShardIncomplete(f"{shard_name}: the judge was unreachable for {summary.unreachable} candidates")
    return {"shard": shard_name, "scores": str(run.scores_path), "summary": summary}


def _batches_artifact(shard_name: str, wave: WaveReport) -> None:
    """The shard's batches in the flow run's artifacts (one table per shard, a new version per poll)."""
    rows = [{"wave": wave.wave, "batch": batch_id, "status": status, "lines of the wave": wave.lines,
             "waited (s)": round(wave.elapsed_s)} for batch_id, status in wave.status.items()]
    key = "batches-" + re.sub(r"[^a-z0-9-]+", "-", shard_name.lower())
    create_table_artifact(key=key, table=rows, description=f"Batches of {shard_name}, wave {wave.wave}")


def judge_limit(limit_name: str, strict: bool) -> int | None:
    """Size of the Prefect global concurrency limit `limit_name`. When it does not exist: raises
    ServerSetupMissing if `strict`, else warns and returns None (the judge runs unthrottled)."""
    with get_client(sync_client=True) as client:
        try:
            return client.read_global_concurrency_limit_by_name(limit_name).limit
        except ObjectNotFound:
            message = f"the global concurrency limit '{limit_name}' does not exist: create it with `prefect gcl create {limit_name} --limit N`"
            if strict:
                raise ServerSetupMissing(message) from None
            get_run_logger().warning("%s; the judge runs unthrottled across shards", message)
            return None

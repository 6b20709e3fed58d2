"""File-to-file scoring: what `longreward score` and `longreward pairs` do, callable from anywhere.

`score_files` reads and validates prompts and candidates, quarantines bad rows, scores the rest
and writes `scores.parquet`, `accounting.json` and (when rows were refused) `quarantine.parquet`
into the output folder. The call cache and the local Qdrant index live in the same folder by
default, so re-running the same command makes no judge call and embeds nothing.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import polars as pl

from longreward_core.data.io import (
    atomic_write_bytes,
    load_candidates,
    load_prompts,
    write_parquet_atomic,
    write_quarantine,
)
from longreward_core.data.pairs import PairConfig, PairsResult, build_pairs
from longreward_core.data.records import (
    DIMENSIONS,
    SCORES_SCHEMA,
    CandidateScore,
    ScoreSummary,
)
from longreward_core.models.accounting import RunAccounting
from longreward_core.models.budget import Budget
from longreward_core.models.call_cache import open_call_cache
from longreward_core.models.client import CALL_CACHE_FILE
from longreward_core.models.event_loop import run_async
from longreward_core.models.prefix_share import PrefixShare
from longreward_core.models.tokenizers import load_tokenizer
from longreward_core.reward.judge import Judge, JudgeConfig
from longreward_core.reward.scorer import PruningStats, Scorer, ScoringConfig


@dataclass
class ScoreRun:
    """The files a scoring run wrote and its summary (the content of `accounting.json`)."""

    scores_path: Path
    accounting_path: Path
    quarantine_path: Path | None
    summary: ScoreSummary


def score_files(
    prompts_path: str | Path,
    candidates_path: str | Path,
    out_dir: str | Path,
    judge_config: JudgeConfig,
    scoring_config: ScoringConfig,
    *,
    cache_path: str | Path | None = None,
    on_start: Callable[[int], None] | None = None,
    on_scored: Callable[[CandidateScore], None] | None = None,
    pair_config: PairConfig | None = None,
) -> ScoreRun:
    """Score candidates from files into `out_dir`; see the module docstring for the outputs.
    `pair_config`: the pair rules that pair pruning (`scoring_config.prune`) decides by."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    prompts = load_prompts(prompts_path)
    candidates = load_candidates(candidates_path, {p.id for p in prompts.records})
    quarantined = prompts.quarantined + candidates.quarantined
    quarantine_path = write_quarantine(quarantined, out / "quarantine.parquet") if quarantined else None
    if on_start is not None:
        on_start(len(candidates.records))

    cache = open_call_cache(cache_path or out / CALL_CACHE_FILE)
    accounting = RunAccounting()

    pruning = PruningStats()
    budget = Budget(scoring_config.max_judge_cost_usd, scoring_config.max_judge_tokens)
    not_scored: list[str] = []

    async def run() -> tuple[list[CandidateScore], int, int, float]:
        judge = Judge(judge_config, cache, accounting, PrefixShare(load_tokenizer(scoring_config.tokenizer)), budget)
        scorer = Scorer(judge, scoring_config, index_path=out / "qdrant", pairs=pair_config)
        scorer.pruning = pruning
        try:
            results = await scorer.score(prompts.records, candidates.records, on_scored)
            not_scored.extend(scorer.not_scored)
            index = scorer.index
            embedder = index.embedder
            return results, index.chunks_embedded, embedder.computed - index.chunks_embedded, embedder.busy_seconds
        finally:
            scorer.close()

    try:
        results, chunks_embedded, statements_embedded, embedding_seconds = run_async(run())
    finally:
        cache.close()
    frame = pl.DataFrame([r.to_row() for r in results], schema=SCORES_SCHEMA)
    scores_path = write_parquet_atomic(frame, out / "scores.parquet")

    scored = frame.filter(pl.col("status") == "scored")
    embedded_judge = None
    if judge_config.is_embedded:
        from longreward_core.models.embedded import embedded_stats

        embedded_judge = embedded_stats()
    summary = ScoreSummary(
        prompts=len(prompts.records),
        candidates=len(candidates.records),
        scored=scored.height,
        failed=frame.filter(pl.col("status") == "failed").height,
        pruned=pruning.pruned,
        support_checks_saved=pruning.support_checks_saved,
        budget_reached=budget.reached if not_scored else None,
        not_scored_prompts=sorted(not_scored),
        quarantined=len(quarantined),
        unreachable=sum(1 for r in results if r.unreachable),
        rejected=sum(1 for r in results if r.rejected),
        mean_reward=scored["reward"].mean() if scored.height else None,
        mean_by_dimension={d: scored[d].mean() for d in DIMENSIONS} if scored.height else {},
        chunk_embeddings=chunks_embedded,
        statement_embeddings=statements_embedded,
        embedding_seconds=round(embedding_seconds, 3),
        wall_seconds=round(time.perf_counter() - started, 3),
        judge_model=judge_config.model,
        worker_pid=os.getpid(),
        judge=accounting.to_dict(),
        embedded_judge=embedded_judge,
    )
    accounting_path = atomic_write_bytes(out / "accounting.json", summary.to_json())
    return ScoreRun(scores_path, accounting_path, quarantine_path, summary)


def pairs_files(
    scores_path: str | Path,
    prompts_path: str | Path,
    candidates_path: str | Path,
    out_path: str | Path,
    config: PairConfig,
) -> PairsResult:
    """Build preference pairs from a scores file and write them as Parquet."""
    prompts = load_prompts(prompts_path).records
    candidates = load_candidates(candidates_path, {p.id for p in prompts}).records
    result = build_pairs(pl.read_parquet(scores_path), prompts, candidates, config)
    write_parquet_atomic(result.frame(), out_path)
    return result

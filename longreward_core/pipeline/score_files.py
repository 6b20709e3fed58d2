"""File-to-file scoring: what `longreward score` and `longreward pairs` do, callable from anywhere.

`score_files` reads and validates prompts and candidates, quarantines bad rows, scores the rest
and writes `scores.parquet`, `accounting.json` and (when rows were refused) `quarantine.parquet`
into the output folder. The call cache and the local Qdrant index live in the same folder by
default, so re-running the same command makes no judge call and embeds nothing.

A run's memory does not grow with its input's documents: prompts are validated in a first pass
that keeps only their ids, then read again one at a time as the scorer takes them, and each
prompt's scores are appended to a spool file as they finish (`ScoreSpool`). What is held for the
whole run is the candidates not yet scored, and one small row per score at the end, to write
them in order.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from collections import Counter, defaultdict
from collections.abc import Callable
from contextlib import aclosing
from dataclasses import dataclass
from pathlib import Path

import polars as pl

from longreward_core.data.io import (
    atomic_write_bytes,
    load_candidates,
    load_prompts,
    stream_prompts,
    write_parquet_atomic,
    write_quarantine,
)
from longreward_core.data.pairs import PairConfig, PairsResult, build_pairs
from longreward_core.data.records import (
    DIMENSIONS,
    SCORES_SCHEMA,
    Candidate,
    CandidateScore,
    ScoreSummary,
)
from longreward_core.models.accounting import RunAccounting
from longreward_core.models.budget import Budget
from longreward_core.models.batch import LEDGER_FILE, BatchLedger, BatchTransport, PostgresLedger
from longreward_core.models.call_cache import CALL_CACHE_FILE, is_database_url, open_call_cache
from longreward_core.models.event_loop import run_async
from longreward_core.models.prefix_share import PrefixShare
from longreward_core.models.storage import StorageGuard
from longreward_core.models.tokenizers import load_tokenizer
from longreward_core.reward.batch_executor import (
    BatchExecutor,
    BatchOutcome,
    WaveReport,
    batch_summary,
    score_batched,
)
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
    on_wave: Callable[[WaveReport], None] | None = None,
) -> ScoreRun:
    """Score candidates from files into `out_dir`; see the module docstring for the outputs.
    `pair_config`: the pair rules that pair pruning (`scoring_config.prune`) decides by. With
    `judge_config.batch` the judge is asked through its provider's Batch API in waves
    (`reward.batch_executor`; `on_wave` is told of each); a judge that cannot batch is refused
    (BatchUnsupported) before anything is read."""
    transport = BatchTransport(judge_config) if judge_config.batch else None
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    prompts = stream_prompts(prompts_path)
    candidates = load_candidates(candidates_path, set(prompts.ids))
    quarantined = prompts.quarantined + candidates.quarantined
    quarantine_path = write_quarantine(quarantined, out / "quarantine.parquet") if quarantined else None
    n_candidates = len(candidates.records)
    if on_start is not None:
        on_start(n_candidates)
    by_prompt: dict[str, list[Candidate]] = defaultdict(list)
    positions: dict[str, list[int]] = defaultdict(list)  # each candidate's place in the input
    for position, candidate in enumerate(candidates.records):
        by_prompt[candidate.prompt_id].append(candidate)
        positions[candidate.prompt_id].append(position)
    candidates.records.clear()  # held by prompt from here, and let go as each prompt is scored

    cache = open_call_cache(cache_path or out / CALL_CACHE_FILE)
    ledger = None
    if transport is not None:
        mirror = PostgresLedger(str(cache_path), str(out.resolve())) if is_database_url(cache_path) else None
        ledger = BatchLedger(out / LEDGER_FILE, mirror)
    accounting = RunAccounting()

    pruning = PruningStats()
    budget = Budget(scoring_config.max_judge_cost_usd, scoring_config.max_judge_tokens)
    not_scored: list[str] = []
    failures = Counter[str]()  # candidates that failed because the judge was unreachable / refused

    batch = BatchOutcome()

    async def run(spool: ScoreSpool) -> tuple[int, int, float, StorageGuard]:
        judge = Judge(judge_config, cache, accounting, PrefixShare(load_tokenizer(scoring_config.tokenizer)), budget)
        scorer = Scorer(judge, scoring_config, index_path=out / "qdrant", pairs=pair_config)
        scorer.pruning = pruning
        # The client's guard: a spool that cannot be written stops new requests like a failing cache.
        storage = judge.client.storage
        executor = None
        if transport is not None and ledger is not None:
            executor = BatchExecutor(
                judge, transport, ledger, poll_s=judge_config.batch_poll_s,
                max_lines=judge_config.batch_max_lines, max_bytes=judge_config.batch_max_bytes, on_wave=on_wave,
            )
            executor.outcome = batch
        groups = (
            scorer.score(prompts, by_prompt, on_scored) if executor is None
            else score_batched(scorer, executor, prompts, by_prompt, on_scored, not_scored)
        )
        try:
            async with aclosing(groups) as finished:
                async for group in finished:
                    prompt_id = group[0].prompt_id
                    del by_prompt[prompt_id]
                    where = positions.pop(prompt_id)
                    await storage.use(f"the score spool {spool.path}", lambda: spool.write(group, where))
                    failures.update(unreachable=sum(s.unreachable for s in group), rejected=sum(s.rejected for s in group))
            not_scored.extend(scorer.not_scored)
            index = scorer.index
            embedder = index.embedder
            return index.chunks_embedded, embedder.computed - index.chunks_embedded, embedder.busy_seconds, storage
        finally:
            scorer.close()

    def written(path: Path, write: Callable[[], Path]) -> Path:
        # Every answer is stored by now: a full disk here costs no request, and is retried like one.
        return run_async(storage.use(f"the output file {path}", write))

    with ScoreSpool(out) as spool:
        try:
            chunks_embedded, statements_embedded, embedding_seconds, storage = run_async(run(spool))
        finally:
            cache.close()
            if ledger is not None and ledger.mirror is not None:
                ledger.mirror.close()
        frame = spool.frame()
    scores_path = written(out / "scores.parquet", lambda: write_parquet_atomic(frame, out / "scores.parquet"))

    scored = frame.filter(pl.col("status") == "scored")
    embedded_judge = None
    if judge_config.is_embedded:
        from longreward_core.models.embedded_llm import embedded_stats

        embedded_judge = embedded_stats()
    summary = ScoreSummary(
        prompts=len(prompts.ids),
        candidates=n_candidates,
        scored=scored.height,
        failed=frame.filter(pl.col("status") == "failed").height,
        pruned=pruning.pruned,
        support_checks_saved=pruning.support_checks_saved,
        budget_reached=(batch.budget_reached or budget.reached) if not_scored else None,
        not_scored_prompts=sorted(not_scored),
        quarantined=len(quarantined),
        unreachable=failures["unreachable"],
        rejected=failures["rejected"],
        mean_reward=scored["reward"].mean() if scored.height else None,
        mean_by_dimension={d: scored[d].mean() for d in DIMENSIONS} if scored.height else {},
        chunk_embeddings=chunks_embedded,
        statement_embeddings=statements_embedded,
        embedding_seconds=round(embedding_seconds, 3),
        wall_seconds=round(time.perf_counter() - started, 3),
        judge_model=judge_config.model,
        worker_pid=os.getpid(),
        judge=accounting.record(),
        embedded_judge=embedded_judge,
        batch=batch_summary(batch, transport, ledger, accounting.record()) if transport is not None and ledger is not None else None,
    )
    accounting_path = written(out / "accounting.json", lambda: atomic_write_bytes(out / "accounting.json", summary.to_json()))
    return ScoreRun(scores_path, accounting_path, quarantine_path, summary)


class ScoreSpool:
    """Scores appended to a temporary JSON-lines file in `out` as prompts finish, so a run does not
    hold them; `frame()` reads them back in the candidates' input order. The file is removed on
    exit. (JSON lines, not Parquet: a Parquet writer held open keeps Arrow buffers for the whole run.)"""

    def __init__(self, out: Path):
        self._fd, name = tempfile.mkstemp(dir=out, prefix=".scores.", suffix=".spool.jsonl")
        self.path = Path(name)
        self._size = 0  # bytes of whole groups written

    def write(self, scores: list[CandidateScore], positions: list[int]) -> None:
        """Append a prompt's scores, all or nothing: a write that fails part-way (a full disk) is
        cut back, so the same group can be written again."""
        lines = "".join(
            json.dumps({**score.to_row(), "position": position}, ensure_ascii=False) + "\n"
            for score, position in zip(scores, positions, strict=True)
        )
        # A judge's answer may carry a JSON-escaped lone surrogate into an error text: replaced.
        encoded = lines.encode("utf-8", errors="replace")
        data = memoryview(encoded)
        try:
            while data:
                data = data[os.write(self._fd, data):]
        except OSError:
            os.ftruncate(self._fd, self._size)
            os.lseek(self._fd, self._size, os.SEEK_SET)
            raise
        self._size += len(encoded)

    def frame(self) -> pl.DataFrame:
        """Every score written, in input order."""
        return pl.read_ndjson(self.path, schema=SPOOL_SCHEMA).sort("position").drop("position")

    def __enter__(self) -> ScoreSpool:
        return self

    def __exit__(self, *exc: object) -> None:
        os.close(self._fd)
        self.path.unlink(missing_ok=True)


SPOOL_SCHEMA = pl.Schema({**SCORES_SCHEMA, "position": pl.Int64})


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

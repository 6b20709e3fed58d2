"""File-to-file runs: what `longreward score` and `longreward pairs` do, callable from anywhere.

`score_files` reads and validates prompts and candidates, quarantines bad rows, scores the rest
and writes `scores.parquet`, `accounting.json` and (when rows were refused) `quarantine.parquet`
into the output folder. The judge call cache and the local Qdrant index live in the same folder by
default, so re-running the same command makes no judge call and embeds nothing.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import shutil
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import polars as pl
import pyarrow as pa

from longreward_core.io import atomic_write_bytes, load_candidates, load_prompts, write_parquet_atomic, write_quarantine
from longreward_core.judge import CallCache, JudgeClient, JudgeConfig
from longreward_core.pairs import PairConfig, PairsResult, build_pairs
from longreward_core.records import (
    CANDIDATES_SCHEMA,
    PROMPTS_SCHEMA,
    SCORES_SCHEMA,
    Candidate,
    CandidateScore,
    RunAccounting,
)
from longreward_core.sampling import PolicyConfig, SampleReport, sample_candidates
from longreward_core.scoring import Scorer, ScoringConfig

_loop: asyncio.AbstractEventLoop | None = None
_loop_lock = threading.Lock()


def run_async(coroutine: Any) -> Any:
    """Run a coroutine on this process's one background event loop and wait for its result.

    litellm keeps per-event-loop state (its logging worker); shards scored in parallel threads
    therefore share one loop instead of each starting its own with asyncio.run.
    """
    global _loop
    with _loop_lock:
        if _loop is None or _loop.is_closed():
            _loop = asyncio.new_event_loop()
            threading.Thread(target=_loop.run_forever, name="longreward-io", daemon=True).start()
    return asyncio.run_coroutine_threadsafe(coroutine, _loop).result()


@dataclass
class ScoreRun:
    scores_path: Path
    accounting_path: Path
    quarantine_path: Path | None
    summary: dict[str, Any]


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
) -> ScoreRun:
    """Score candidates from files into `out_dir`; see the module docstring for the outputs."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    prompts = load_prompts(prompts_path)
    candidates = load_candidates(candidates_path, {p.id for p in prompts.records})
    quarantined = prompts.quarantined + candidates.quarantined
    quarantine_path = write_quarantine(quarantined, out / "quarantine.parquet") if quarantined else None
    if on_start is not None:
        on_start(len(candidates.records))

    cache = CallCache(cache_path or out / "judge_cache.sqlite")
    accounting = RunAccounting()

    async def run() -> tuple[list[CandidateScore], int, int, float]:
        judge = JudgeClient(judge_config, cache, accounting)
        scorer = Scorer(judge, scoring_config, index_path=out / "qdrant")
        try:
            results = await scorer.score(prompts.records, candidates.records, on_scored)
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
    summary: dict[str, Any] = {
        "prompts": len(prompts.records),
        "candidates": len(candidates.records),
        "scored": scored.height,
        "failed": frame.height - scored.height,
        "quarantined": len(quarantined),
        "unreachable": sum(1 for r in results if r.unreachable),  # failed because the judge was down
        "mean_reward": scored["reward"].mean() if scored.height else None,
        "mean_by_dimension": {d: scored[d].mean() for d in ("helpfulness", "logicality", "faithfulness", "completeness")}
        if scored.height
        else {},
        "chunk_embeddings": chunks_embedded,
        "statement_embeddings": statements_embedded,
        "embedding_seconds": round(embedding_seconds, 3),
        "wall_seconds": round(time.perf_counter() - started, 3),
        "judge_model": judge_config.model,
        "worker_pid": os.getpid(),  # which process scored this (shards may run on several)
        "judge": accounting.to_dict(),
    }
    if judge_config.is_embedded:
        from longreward_core.embedded import embedded_stats

        summary["embedded_judge"] = embedded_stats()
    accounting_path = atomic_write_bytes(
        out / "accounting.json", json.dumps(summary, indent=2, ensure_ascii=False).encode("utf-8")
    )
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


# ---------------------------------------------------------------------------------------------
# Build stages: the steps of a sharded preference build, each a file-to-file function.


@dataclass
class ShardPlan:
    shard_dirs: list[Path]
    quarantine_path: Path | None
    prompts: int
    candidates: int | None  # None when candidates are to be sampled
    quarantined: int


def write_shards(
    prompts_path: str | Path, candidates_path: str | Path | None, shard_size: int, out_dir: str | Path
) -> ShardPlan:
    """Validate the inputs, quarantine bad rows, and split prompts (with their candidates) into
    `out_dir/shard-NNNN/{prompts,candidates}.parquet` in input order."""
    if shard_size < 1:
        raise ValueError(f"shard_size must be >= 1, got {shard_size}")
    out = Path(out_dir)
    prompts = load_prompts(prompts_path)
    ids = {p.id for p in prompts.records}
    candidates = load_candidates(candidates_path, ids) if candidates_path else None
    quarantined = prompts.quarantined + (candidates.quarantined if candidates else [])
    quarantine_path = write_quarantine(quarantined, out / "quarantine.parquet") if quarantined else None
    by_prompt: dict[str, list[Candidate]] = {}
    for c in candidates.records if candidates else []:
        by_prompt.setdefault(c.prompt_id, []).append(c)
    shard_dirs = []
    for number, start in enumerate(range(0, len(prompts.records), shard_size)):
        shard = out / f"shard-{number:04d}"
        chunk = prompts.records[start : start + shard_size]
        write_parquet_atomic(pl.DataFrame([p.to_row() for p in chunk], schema=PROMPTS_SCHEMA), shard / "prompts.parquet")
        if candidates is not None:
            rows = [c.model_dump() for p in chunk for c in by_prompt.get(p.id, [])]
            write_parquet_atomic(pl.DataFrame(rows, schema=CANDIDATES_SCHEMA), shard / "candidates.parquet")
        shard_dirs.append(shard)
    return ShardPlan(
        shard_dirs=shard_dirs,
        quarantine_path=quarantine_path,
        prompts=len(prompts.records),
        candidates=len(candidates.records) if candidates else None,
        quarantined=len(quarantined),
    )


def index_shard(shard_dir: str | Path, scoring_config: ScoringConfig) -> int:
    """Chunk and index the shard's documents into `shard_dir/qdrant`; returns chunks embedded."""
    from longreward_core.chunking import chunk_document, load_tokenizer
    from longreward_core.retrieval import ChunkIndex, content_hash, make_embedder
    from longreward_core.scoring import retrieval_chunking

    shard = Path(shard_dir)
    prompts = load_prompts(shard / "prompts.parquet").records
    index = ChunkIndex(
        make_embedder(scoring_config.embedding_model, scoring_config.embedding_api_base),
        path=None if scoring_config.qdrant_url else shard / "qdrant",
        url=scoring_config.qdrant_url,
    )
    tokenizer = load_tokenizer(scoring_config.tokenizer)
    chunking = retrieval_chunking(scoring_config)
    try:
        for prompt in prompts:  # retrieval chunks only: completeness chunks are the scorer's
            chunks = chunk_document(prompt.context, tokenizer, scoring_config.retrieval_chunk_tokens)
            index.index_document(content_hash(prompt.context), chunking, chunks)
        return index.chunks_embedded
    finally:
        index.close()


def sample_shard(shard_dir: str | Path, policy_config: PolicyConfig, cache_path: str | Path) -> Path:
    """Sample candidates for the shard's prompts into `shard_dir/candidates.parquet`, with a
    per-prompt report in `shard_dir/sampling.parquet`."""
    shard = Path(shard_dir)
    prompts = load_prompts(shard / "prompts.parquet").records
    cache = CallCache(cache_path)
    accounting = RunAccounting(per_dimension={})

    async def run() -> tuple[list[Candidate], list[SampleReport]]:
        client = JudgeClient(policy_config.client_config(), cache, accounting)
        return await sample_candidates(client, prompts, policy_config)

    try:
        candidates, reports = run_async(run())
    finally:
        cache.close()
    write_parquet_atomic(pl.DataFrame([c.model_dump() for c in candidates], schema=CANDIDATES_SCHEMA), shard / "candidates.parquet")
    write_parquet_atomic(pl.DataFrame([r.model_dump() for r in reports]), shard / "sampling.parquet")
    atomic_write_bytes(shard / "sampling_accounting.json", json.dumps(accounting.to_dict(), indent=2).encode())
    return shard / "candidates.parquet"


def merge_pairs(shard_dirs: list[Path], config: PairConfig, out_path: str | Path) -> PairsResult:
    """Pairs from every shard's scores, written to one Parquet file."""
    pairs: list = []
    skipped: Counter = Counter()
    for shard in shard_dirs:
        result = pairs_files(shard / "scores.parquet", shard / "prompts.parquet", shard / "candidates.parquet", shard / "pairs.parquet", config)
        pairs += result.pairs
        skipped.update(result.skipped)
    merged = PairsResult(pairs=pairs, skipped=skipped)
    write_parquet_atomic(merged.frame(), out_path)
    return merged


def publish_dataset(pairs_path: str | Path, out_dir: str | Path, manifest: dict[str, Any]) -> Path:
    """The pairs as `out_dir/pairs.parquet`, a `datasets.load_from_disk` folder
    `out_dir/dataset`, and `out_dir/manifest.json` (with the pairs file's content hash)."""
    import datasets

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    target = out / "pairs.parquet"
    if Path(pairs_path).resolve() != target.resolve():
        atomic_write_bytes(target, Path(pairs_path).read_bytes())
    staging = Path(tempfile.mkdtemp(dir=out, prefix=".dataset-"))
    # From the Arrow table, not from_parquet: that refuses a file with no rows, and a build
    # where no prompt qualifies for a pair must still publish (an empty dataset).
    table = pl.read_parquet(target).to_arrow()
    if table.num_rows == 0:  # datasets needs at least one (empty) record batch
        table = pa.Table.from_batches([pa.RecordBatch.from_pylist([], schema=table.schema)], schema=table.schema)
    datasets.Dataset(table).save_to_disk(str(staging / "dataset"), num_shards=1 if table.num_rows == 0 else None)
    if (out / "dataset").exists():
        shutil.rmtree(out / "dataset")
    (staging / "dataset").rename(out / "dataset")
    shutil.rmtree(staging, ignore_errors=True)
    manifest = {**manifest, "pairs_sha256": file_hash(target)}
    atomic_write_bytes(out / "manifest.json", json.dumps(manifest, indent=2, ensure_ascii=False, default=str).encode())
    return out / "manifest.json"


def file_hash(path: str | Path) -> str:
    """sha256 of a file's bytes."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()

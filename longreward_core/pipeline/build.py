"""The stages of a sharded preference build, each a file-to-file function.

load and shard -> (per shard) index, sample, score -> pairs -> publish. The Prefect tasks in
`tasks/` wrap these one to one; nothing here knows about Prefect.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from collections import Counter
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

from longreward_core.data.io import (
    atomic_path,
    atomic_write_bytes,
    candidate_rows,
    file_hash,
    load_prompts,
    stream_prompts,
    write_parquet_atomic,
    write_quarantine,
)
from longreward_core.data.pairs import PairConfig
from longreward_core.data.records import (
    CANDIDATES_SCHEMA,
    DIMENSIONS,
    PAIRS_SCHEMA,
    PROMPTS_SCHEMA,
    SAMPLING_SCHEMA,
    BuildCounts,
    BuildManifest,
    BuildModels,
    CallCacheSize,
    Candidate,
    InputFile,
    Prompt,
    QuarantinedRow,
    SampleReport,
    ScoreSummary,
)
from longreward_core.models.accounting import RunAccounting
from longreward_core.models.call_cache import open_call_cache
from longreward_core.models.client import LLMClient
from longreward_core.models.embeddings import EMBEDDED_EMBEDDING
from longreward_core.models.event_loop import run_async
from longreward_core.pipeline.sampling import PolicyConfig, sample_candidates
from longreward_core.pipeline.score_files import pairs_files
from longreward_core.reward.documents import DocumentConfig, open_chunk_index, prepare_document

REWARD_BINS = 10  # unit bins over the 0-10 reward scale


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
    `out_dir/shard-NNNN/{prompts,candidates}.parquet` in input order.

    Both files are streamed: what is held at once is the prompt ids, one shard's rows and a bounded
    buffer of candidates, never the whole input (a nightly's documents can outgrow the memory of
    the process that shards them)."""
    if shard_size < 1:
        raise ValueError(f"shard_size must be >= 1, got {shard_size}")
    out = Path(out_dir)
    prompts = stream_prompts(prompts_path)
    quarantined = list(prompts.quarantined)
    shard_dirs = [out / f"shard-{number:04d}" for number in range(-(-len(prompts.ids) // shard_size))]
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out, prefix=".candidates-") as spool_dir:
        spool = _CandidateSpool(Path(spool_dir), {pid: i for i, pid in enumerate(prompts.ids)}, shard_size)
        if candidates_path:
            for item in candidate_rows(candidates_path, spool.position):
                if isinstance(item, QuarantinedRow):
                    quarantined.append(item)
                else:
                    spool.add(item.record)
            spool.flush()
        number, chunk = 0, []
        for prompt in prompts:
            chunk.append(prompt)
            if len(chunk) == shard_size:
                _write_shard(shard_dirs[number], chunk, spool.shard(number) if candidates_path else None)
                number, chunk = number + 1, []
        if chunk:
            _write_shard(shard_dirs[number], chunk, spool.shard(number) if candidates_path else None)
    quarantine_path = write_quarantine(quarantined, out / "quarantine.parquet") if quarantined else None
    return ShardPlan(
        shard_dirs=shard_dirs,
        quarantine_path=quarantine_path,
        prompts=len(prompts.ids),
        candidates=spool.kept if candidates_path else None,
        quarantined=len(quarantined),
    )


class _CandidateSpool:
    """Valid candidates appended to one JSON-lines file per shard, a bounded batch at a time."""

    BUFFER_ROWS = 10_000

    def __init__(self, folder: Path, position: dict[str, int], shard_size: int):
        self.folder, self.position, self.shard_size = folder, position, shard_size
        self.buffer: dict[int, list[str]] = {}
        self.buffered = self.kept = 0

    def add(self, candidate: Candidate) -> None:
        at = self.position[candidate.prompt_id]
        self.buffer.setdefault(at // self.shard_size, []).append(json.dumps({"at": at, **candidate.model_dump()}) + "\n")
        self.buffered += 1
        self.kept += 1
        if self.buffered >= self.BUFFER_ROWS:
            self.flush()

    def flush(self) -> None:
        for shard, lines in self.buffer.items():
            with open(self.folder / f"{shard}.jsonl", "a", encoding="utf-8") as f:
                f.writelines(lines)
        self.buffer, self.buffered = {}, 0

    def shard(self, number: int) -> pl.DataFrame:
        """The shard's candidates grouped by prompt in prompt order, each prompt's in file order."""
        path = self.folder / f"{number}.jsonl"
        if not path.exists():
            return pl.DataFrame(schema=CANDIDATES_SCHEMA)
        frame = pl.read_ndjson(path, schema={"at": pl.Int64, **CANDIDATES_SCHEMA})
        return frame.sort("at", maintain_order=True).drop("at")


def _write_shard(shard: Path, prompts: list[Prompt], candidates: pl.DataFrame | None) -> None:
    write_parquet_atomic(pl.DataFrame([p.to_row() for p in prompts], schema=PROMPTS_SCHEMA), shard / "prompts.parquet")
    if candidates is not None:
        write_parquet_atomic(candidates, shard / "candidates.parquet")


def index_shard(shard_dir: str | Path, config: DocumentConfig, cache_path: str | Path | None = None) -> int:
    """Index the retrieval chunks of the shard's documents, the way the scorer does, into
    `shard_dir/qdrant` (or the configured Qdrant server); returns chunks embedded. A litellm
    embedding model's answers are kept in the call cache at `cache_path`, as the scorer's are, so
    a shard indexed again does not pay its provider twice."""
    shard = Path(shard_dir)
    prompts = load_prompts(shard / "prompts.parquet").records
    cache = open_call_cache(cache_path) if cache_path and config.embedding_model != EMBEDDED_EMBEDDING else None
    try:
        index = open_chunk_index(config, shard / "qdrant", cache=cache)
        try:
            for prompt in prompts:
                prepare_document(prompt.context, config).index_into(index)
            return index.chunks_embedded
        finally:
            index.close()
    finally:
        if cache is not None:
            cache.close()


def sample_shard(shard_dir: str | Path, policy_config: PolicyConfig, cache_path: str | Path) -> Path:
    """Sample candidates for the shard's prompts into `shard_dir/candidates.parquet`, with a
    per-prompt report in `shard_dir/sampling.parquet`."""
    shard = Path(shard_dir)
    prompts = load_prompts(shard / "prompts.parquet").records
    cache = open_call_cache(cache_path)
    accounting = RunAccounting(per_purpose={})

    async def run() -> tuple[list[Candidate], list[SampleReport]]:
        client = LLMClient(policy_config.client_config(), cache, accounting)
        return await sample_candidates(client, prompts, policy_config)

    try:
        candidates, reports = run_async(run())
    finally:
        cache.close()
    write_parquet_atomic(pl.DataFrame([c.model_dump() for c in candidates], schema=CANDIDATES_SCHEMA), shard / "candidates.parquet")
    write_parquet_atomic(pl.DataFrame([r.model_dump() for r in reports], schema=SAMPLING_SCHEMA), shard / "sampling.parquet")
    atomic_write_bytes(shard / "sampling_accounting.json", json.dumps(accounting.to_dict(), indent=2).encode())
    return shard / "candidates.parquet"


@dataclass
class MergedPairs:
    count: int
    skipped: Counter  # reason -> prompts


def merge_pairs(shard_dirs: list[Path], config: PairConfig, out_path: str | Path) -> MergedPairs:
    """Pairs from every shard's scores (each shard's in its `pairs.parquet`), then merged into one
    Parquet file by polars' streaming sink: the pairs carry their documents, and a night's pairs
    together can outgrow the process that merges them."""
    count, skipped = 0, Counter()
    for shard in shard_dirs:
        result = pairs_files(shard / "scores.parquet", shard / "prompts.parquet", shard / "candidates.parquet",
                             shard / "pairs.parquet", config)
        count += len(result.pairs)
        skipped.update(result.skipped)
    with atomic_path(out_path) as tmp:
        if shard_dirs:
            pl.scan_parquet([shard / "pairs.parquet" for shard in shard_dirs]).sink_parquet(tmp)
        else:
            pl.DataFrame(schema=PAIRS_SCHEMA).write_parquet(tmp)
    return MergedPairs(count, skipped)


def build_manifest(
    plan: ShardPlan,
    shard_summaries: list[ScoreSummary],
    *,
    pairs: int,
    prompts_without_pair: dict[str, int],
    prompts_path: str | Path,
    candidates_path: str | Path | None,
    parameters: dict[str, Any],
    models: BuildModels,
    call_cache: CallCacheSize | None = None,
) -> BuildManifest:
    """The manifest of a build: its inputs with their content hashes, the parameters and models,
    counts over every shard's score summary, the judge accounting summed over the shards, and the
    call cache's size (`call_cache`, measured once the shards are scored). `pairs_sha256` is set
    by `publish_dataset`."""
    accounting = RunAccounting()
    for summary in shard_summaries:
        accounting.add(summary.judge)
    return BuildManifest(
        built_at=datetime.now(timezone.utc).isoformat(),
        inputs={
            "prompts": InputFile(path=str(prompts_path), sha256=file_hash(prompts_path)),
            "candidates": InputFile(path=str(candidates_path), sha256=file_hash(candidates_path)) if candidates_path else None,
        },
        parameters=parameters,
        models=models,
        counts=BuildCounts(
            prompts=plan.prompts,
            quarantined_rows=plan.quarantined,
            shards=len(plan.shard_dirs),
            candidates=sum(s.candidates for s in shard_summaries),
            scored=sum(s.scored for s in shard_summaries),
            failed=sum(s.failed for s in shard_summaries),
            pruned=sum(s.pruned for s in shard_summaries),
            support_checks_saved=sum(s.support_checks_saved for s in shard_summaries),
            rejected=sum(s.rejected for s in shard_summaries),
            pairs=pairs,
            prompts_without_pair=prompts_without_pair,
        ),
        quarantine=str(plan.quarantine_path) if plan.quarantine_path else None,
        judge_accounting=accounting.to_dict(),
        judge_cost_usd=accounting.total.cost_usd,
        batch_ids=[batch_id for s in shard_summaries if s.batch for batch_id in s.batch.batch_ids],
        call_cache=call_cache,
    )


def publish_dataset(pairs_path: str | Path, out_dir: str | Path, manifest: BuildManifest) -> Path:
    """The pairs as `out_dir/pairs.parquet`, a `datasets.load_from_disk` folder
    `out_dir/dataset`, and `out_dir/manifest.json` (with the pairs file's content hash)."""
    import datasets

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    target = out / "pairs.parquet"
    if Path(pairs_path).resolve() != target.resolve():
        with atomic_path(target) as tmp:
            shutil.copyfile(pairs_path, tmp)
    staging = Path(tempfile.mkdtemp(dir=out, prefix=".dataset-"))
    if pq.ParquetFile(target).metadata.num_rows:
        # Read in batches into an Arrow file on disk (memory-mapped), not into memory.
        dataset = datasets.Dataset.from_parquet(str(target), cache_dir=str(staging / "cache"))
        dataset.save_to_disk(str(staging / "dataset"))
    else:
        # from_parquet refuses a file with no rows, and a build where no prompt qualifies for a
        # pair must still publish (an empty dataset, which needs one empty record batch).
        schema = pq.read_schema(target)
        table = pa.Table.from_batches([pa.RecordBatch.from_pylist([], schema=schema)], schema=schema)
        datasets.Dataset(table).save_to_disk(str(staging / "dataset"), num_shards=1)
    if (out / "dataset").exists():
        shutil.rmtree(out / "dataset")
    (staging / "dataset").rename(out / "dataset")
    shutil.rmtree(staging, ignore_errors=True)
    published = manifest.model_copy(update={"pairs_sha256": file_hash(target)})
    atomic_write_bytes(out / "manifest.json", published.model_dump_json(indent=2).encode())
    return out / "manifest.json"


@dataclass
class RewardDistribution:
    """How the scored candidates' rewards and dimension scores are spread."""

    histogram: list[int]  # candidates per unit bin [i, i+1) over 0-10; a reward of 10 counts in the last
    by_dimension: pl.DataFrame  # dimension, mean, p10, median, p90 (quantiles interpolated linearly)

    @property
    def scored(self) -> int:
        return sum(self.histogram)

    def histogram_png(self) -> bytes:
        """The reward histogram as a small PNG (about 10 KB): candidates per unit bin of reward."""
        import io

        # No pyplot: no global state, safe in any thread.
        from matplotlib.figure import Figure

        figure = Figure(figsize=(5, 2.6), dpi=90, layout="constrained")
        axis = figure.subplots()
        axis.bar([i + 0.5 for i in range(REWARD_BINS)], self.histogram, width=0.9, color="#3b6ea8")
        axis.set_xlim(0, REWARD_BINS)
        axis.set_xticks(range(REWARD_BINS + 1))
        axis.set_xlabel("reward")
        axis.set_ylabel("candidates")
        axis.set_title(f"Reward of {self.scored} scored candidates", fontsize=10)
        axis.grid(axis="y", alpha=0.3)
        buffer = io.BytesIO()
        figure.savefig(buffer, format="png")
        return buffer.getvalue()


def reward_distribution(scores: pl.LazyFrame | pl.DataFrame) -> RewardDistribution:
    """The reward histogram and per-dimension statistics of the scored rows of `scores`
    (SCORES_SCHEMA); failed rows are left out. Given `pl.scan_parquet` of the shards' scores, only
    the columns used are read."""
    scored = scores.lazy().filter(pl.col("status") == "scored")
    bins = scored.group_by(pl.col("reward").floor().clip(0, REWARD_BINS - 1).cast(pl.Int64).alias("bin")).len()
    histogram = (
        pl.LazyFrame({"bin": range(REWARD_BINS)}, schema={"bin": pl.Int64})
        .join(bins, on="bin", how="left")
        .sort("bin")
        .collect()["len"]
        .fill_null(0)
        .to_list()
    )
    value = pl.col("value")
    by_dimension = (
        scored.select(DIMENSIONS)
        .unpivot(variable_name="dimension")
        .drop_nulls("value")
        .group_by("dimension", maintain_order=True)
        .agg(
            mean=value.mean(),
            p10=value.quantile(0.1, "linear"),
            median=value.median(),
            p90=value.quantile(0.9, "linear"),
        )
        .collect()
    )
    return RewardDistribution(histogram=histogram, by_dimension=by_dimension)

"""Records that cross a boundary (files, tasks, processes), and their on-disk schemas.

Every Parquet file the project writes is described once here, as a polars schema; readers and
writers use these schemas, so a column is named and typed in exactly one place.
"""

from __future__ import annotations

import json
from typing import Annotated, Any

import polars as pl
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, Strict, computed_field, field_validator
from pydantic_core import PydanticCustomError

DIMENSIONS: tuple[str, ...] = ("helpfulness", "logicality", "faithfulness", "completeness")


def _not_blank(text: str) -> str:
    if not text.strip():
        raise PydanticCustomError("blank", "text is empty or only whitespace")
    return text


# Text a judge or a pair needs: a string (never a number turned into one) with something in it.
Text = Annotated[str, Strict(), AfterValidator(_not_blank)]


class Prompt(BaseModel):
    """A (long document, question) prompt."""

    model_config = ConfigDict(frozen=True)

    id: str = Field(min_length=1)
    context: Text
    query: Text
    metadata: dict[str, Any] = Field(default_factory=dict)

    def to_row(self) -> dict[str, Any]:
        return {"id": self.id, "context": self.context, "query": self.query,
                "metadata": json.dumps(self.metadata, ensure_ascii=False, default=str)}


class Candidate(BaseModel):
    """One sampled response to a prompt."""

    model_config = ConfigDict(frozen=True)

    prompt_id: Text
    candidate_id: Text
    response: Text


class DimensionResult(BaseModel):
    """The outcome of one dimension for one candidate: a score, or the reason there is none."""

    score: float | None = None
    error: str | None = None
    # Faithfulness only: number of distinct factual statements judged.
    statements: int | None = None
    # The judge could not be reached: unfinished work, to be retried, not a judgement.
    transport: bool = False
    # The provider refused the request for good (context length, content filter, ...): final.
    rejected: bool = False

    @property
    def ok(self) -> bool:
        return self.score is not None


class CandidateScore(BaseModel):
    """A candidate's four dimension scores and its reward (mean), or why it has none."""

    prompt_id: str
    candidate_id: str
    language: str
    helpfulness: DimensionResult
    logicality: DimensionResult
    faithfulness: DimensionResult
    completeness: DimensionResult
    # Pair pruning left this candidate unscored: it can be neither chosen nor rejected. Its known
    # scores are kept and its reward lies in [reward_low, reward_high].
    pruned: bool = False
    reward_low: float | None = None
    reward_high: float | None = None

    @property
    def reward(self) -> float | None:
        scores = [getattr(self, d).score for d in DIMENSIONS]
        if any(s is None for s in scores):
            return None
        return sum(scores) / len(scores)

    @property
    def status(self) -> str:
        if self.reward is not None:
            return "scored"
        return "pruned" if self.pruned else "failed"

    @property
    def unreachable(self) -> bool:
        """Some dimension failed because the judge could not be reached."""
        return any(getattr(self, d).transport for d in DIMENSIONS)

    @property
    def rejected(self) -> bool:
        """Some dimension failed because the provider refused its request for good."""
        return any(getattr(self, d).rejected for d in DIMENSIONS)

    @property
    def error(self) -> str | None:
        errors = [f"{d}: {getattr(self, d).error}" for d in DIMENSIONS if getattr(self, d).error]
        return "; ".join(errors) or None

    def to_row(self) -> dict[str, Any]:
        row: dict[str, Any] = {
            "prompt_id": self.prompt_id,
            "candidate_id": self.candidate_id,
            "language": self.language,
        }
        for d in DIMENSIONS:
            row[d] = getattr(self, d).score
        row["faithfulness_statements"] = self.faithfulness.statements
        row["reward"] = self.reward
        row["status"] = self.status
        row["error"] = self.error
        row["reward_low"] = self.reward_low
        row["reward_high"] = self.reward_high
        return row


PROMPTS_SCHEMA = pl.Schema(
    {"id": pl.String, "context": pl.String, "query": pl.String, "metadata": pl.String}  # metadata: JSON
)

CANDIDATES_SCHEMA = pl.Schema({"prompt_id": pl.String, "candidate_id": pl.String, "response": pl.String})

SCORES_SCHEMA = pl.Schema(
    {
        "prompt_id": pl.String,
        "candidate_id": pl.String,
        "language": pl.String,
        "helpfulness": pl.Float64,
        "logicality": pl.Float64,
        "faithfulness": pl.Float64,
        "completeness": pl.Float64,
        "faithfulness_statements": pl.Int64,
        "reward": pl.Float64,
        "status": pl.String,  # "scored" | "failed" | "pruned" (left unscored by pair pruning)
        "error": pl.String,  # "<dimension>: <reason>; ..." when failed
        "reward_low": pl.Float64,  # pruned: the reward's interval given the scores known
        "reward_high": pl.Float64,
    }
)

_MESSAGE = pl.Struct({"role": pl.String, "content": pl.String})

# TRL's conversational preference format plus the provenance of each side.
PAIRS_SCHEMA = pl.Schema(
    {
        "prompt_id": pl.String,
        "prompt": pl.List(_MESSAGE),
        "chosen": pl.List(_MESSAGE),
        "rejected": pl.List(_MESSAGE),
        "chosen_id": pl.String,
        "rejected_id": pl.String,
        "chosen_reward": pl.Float64,
        "rejected_reward": pl.Float64,
        "margin": pl.Float64,
    }
)

QUARANTINE_SCHEMA = pl.Schema(
    {
        "source": pl.String,  # the input file
        "line": pl.Int64,  # 1-based row number in that file
        "row_id": pl.String,  # the row's id when it has one
        "reason": pl.String,
        "raw": pl.String,  # the row as text, for the ops team to fix and resubmit
    }
)


class PreferencePair(BaseModel):
    """One DPO preference pair in TRL's conversational format."""

    prompt_id: str
    prompt: list[dict[str, str]]
    chosen: list[dict[str, str]]
    rejected: list[dict[str, str]]
    chosen_id: str
    rejected_id: str
    chosen_reward: float
    rejected_reward: float

    @property
    def margin(self) -> float:
        return self.chosen_reward - self.rejected_reward

    def to_row(self) -> dict[str, Any]:
        return {**self.model_dump(), "margin": self.margin}


class QuarantinedRow(BaseModel):
    """An input row that was not used, with the reason."""

    source: str
    line: int
    row_id: str | None
    reason: str
    raw: str

    @field_validator("row_id", "reason", "raw")
    @classmethod
    def _writable(cls, text: str | None) -> str | None:
        # A row is often set aside for holding a lone surrogate, which no UTF-8 file accepts: it is
        # kept as its escape (`\\udc80`), so that writing the quarantine file never fails.
        return None if text is None else text.encode("utf-8", "backslashreplace").decode("utf-8")


class TrainingManifest(BaseModel):
    """What a DPO run produced and from what: written as `manifest.json` in the run's output folder."""

    base_model: str = Field(description="Folder of the policy that was trained.")
    ref_model: str = Field(description="Folder of the DPO reference model (the base model when none was given).")
    pairs: str = Field(description="The preference pairs file or dataset folder trained on.")
    pairs_sha256: str = Field(description="sha256 of the pairs data (of each Arrow file's hash, for a dataset folder).")
    dataset_manifest_sha256: str | None = Field(description="sha256 of the build manifest beside the pairs, if any.")
    config: dict[str, Any] = Field(description="The run's TrainConfig, as JSON.")
    dpo_config: dict[str, Any] = Field(description="The TRL DPOConfig values that reproduce the run (and any overrides).")
    lengths: dict[str, int | None] = Field(
        description="The length report without its row lists: pairs, max_length, model_limit, longest, dropped, "
        "truncated, total_tokens."
    )
    quarantined: int = Field(description="Pair rows set aside as malformed (listed in quarantine.jsonl).")
    steps: int = Field(description="Optimiser steps reached.")
    resumed_from: str | None = Field(description="The checkpoint this run continued from, if any.")
    final_metrics: dict[str, Any] = Field(description="The trainer's end-of-training metrics; empty when nothing was left to train.")
    last_log: dict[str, Any] | None = Field(description="The last logged training step (loss, rewards/margins, ...).")
    model_dir: str = Field(description="Folder of the final model and tokenizer.")
    num_processes: int = Field(1, description="Training processes the launch asked for.")
    world_size: int = Field(description="Training processes that trained together (the processes asked for, or the run stops).")
    deepspeed_stage: int | None = Field(None, description="DeepSpeed ZeRO stage the run trained with; None without DeepSpeed.")
    tokens_per_second: float | None = Field(description="Tokens through the policy per second of training.")
    peak_gpu_memory_bytes: int | None = Field(description="Rank 0's peak GPU memory; None on CPU.")
    seconds: float = Field(description="Wall time of the rank-0 process, loading included.")
    versions: dict[str, str] = Field(description="torch, transformers and trl versions.")


class CallAccounting(BaseModel):
    """Model requests for one purpose (a judged dimension, `sampling`, `generation`, ...) or in total:
    counted as a run goes (`models.accounting.RunAccounting`), written in `accounting.json`, the
    build manifest and the evaluation summaries."""

    calls: int = Field(0, description="Requests that reached the model (cache hits excluded).")
    cache_hits: int = Field(0, description="Requests answered from the call cache.")
    coalesced: int = Field(0, description="Requests answered by an identical request already in flight.")
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost_usd: float = Field(0.0, description="0 where litellm does not know the model's price; at cached prices where reported.")
    cached_tokens: int = Field(0, description="Prompt tokens the provider reports served from its prompt cache.")
    tokenized_prompt_tokens: int = Field(0, description="Prompt tokens in the configured tokenizer (where counted).")
    cacheable_tokens: int = Field(0, description="Of those, the prefix shared with an earlier request to the same model.")
    parse_failures: int = Field(0, description="Judge answers without a parseable verdict (judging purposes only).")
    transport_errors: int = Field(0, description="429 / 5xx / timeouts / connection errors, each retried or fatal.")
    rejected: int = Field(0, description="Requests the provider refused for good (4xx: context length, content filter, ...).")
    failed_calls: int = Field(
        0, description="Logical calls that gave up (unreachable, refused, or no verdict after every attempt)."
    )
    batch_calls: int = Field(0, description="Of the requests that reached the model, those answered through a Batch API.")
    batch_failed_lines: int = Field(0, description="Batch lines that came back failed or expired (each asked again or given up).")

    def add(self, other: CallAccounting) -> None:
        for name in type(self).model_fields:
            setattr(self, name, getattr(self, name) + getattr(other, name))

    @computed_field  # type: ignore[prop-decorator]
    @property
    def cacheable_share(self) -> float | None:
        """Share of the prompt tokens a provider's prefix cache could serve (None: nothing counted)."""
        return self.cacheable_tokens / self.tokenized_prompt_tokens if self.tokenized_prompt_tokens else None


class RequestAccounting(BaseModel):
    """Model requests of a run in total and per purpose, as reported (`RunAccounting.record()`)."""

    total: CallAccounting
    per_purpose: dict[str, CallAccounting]


class EmbeddedJudgeStats(BaseModel):
    """How the embedded judge came to its verdicts, over the process's life."""

    requests: int = 0
    verdicts_unaided: int = Field(0, description="The model wrote a valid verdict by itself.")
    verdicts_constrained: int = Field(0, description="The verdict was chosen under the constraint.")
    seconds: float = 0.0


class BatchSummary(BaseModel):
    """What batch mode did in a scoring run (`accounting.json`'s `batch`)."""

    batch_ids: list[str] = Field(description="Every batch of the run's ledger (this run's and those it resumed).")
    waves: int = Field(description="Waves in the ledger.")
    lines_submitted: int = Field(description="Lines of every batch in the ledger.")
    waves_this_run: int = Field(description="Waves this run submitted.")
    lines_submitted_this_run: int = Field(description="Lines this run submitted.")
    requests_by_batch: int = Field(description="Judge answers this run obtained through the Batch API.")
    requests_online: int = Field(description="Judge requests this run sent online.")
    pricing: str = Field(description="How batch answers are priced: the provider's batch prices, or 50% of the online ones.")
    ledger: str = Field(description="The ledger file (`batches.jsonl`).")


class ScoreSummary(BaseModel):
    """What a scoring run did: counts, mean scores, embedding work and judge accounting.

    Written as the run's `accounting.json`; `embedded_judge` is left out unless the judge is the
    embedded model.
    """

    prompts: int = Field(description="Valid prompts read.")
    candidates: int = Field(description="Valid candidates read (each is scored).")
    scored: int = Field(description="Candidates with a reward.")
    failed: int = Field(description="Candidates without a reward (some dimension failed).")
    pruned: int = Field(0, description="Candidates left unscored by pair pruning (they can be neither chosen nor rejected).")
    support_checks_saved: int = Field(0, description="Support checks (logical judge calls) pair pruning did not make.")
    budget_reached: str | None = Field(None, description="Which judge budget was reached, when prompts were left unscored.")
    not_scored_prompts: list[str] = Field(
        default_factory=list, description="Prompts not started because the judge budget was reached (no rows in scores)."
    )
    quarantined: int = Field(description="Input rows refused, with their reason in quarantine.parquet.")
    unreachable: int = Field(description="Failed candidates whose judge could not be reached: work to retry.")
    rejected: int = Field(
        0, description="Failed candidates whose request the provider refused for good (context length, content filter): final."
    )
    mean_reward: float | None = Field(description="Mean reward of the scored candidates; None when none was scored.")
    mean_by_dimension: dict[str, float] = Field(description="Mean score per dimension of the scored candidates.")
    chunk_embeddings: int = Field(description="Document chunks embedded (0 when every document was indexed before).")
    statement_embeddings: int = Field(description="Factual statements embedded for retrieval.")
    embedding_seconds: float = Field(description="Time the embedder was busy, seconds.")
    wall_seconds: float = Field(description="Duration of the run, seconds.")
    judge_model: str = Field(description="litellm model string of the judge.")
    worker_pid: int = Field(description="The process that scored (shards may run on several).")
    judge: RequestAccounting = Field(description="Judge requests in total and per purpose.")
    embedded_judge: EmbeddedJudgeStats | None = Field(None, description="Verdict statistics of the embedded judge.")
    batch: BatchSummary | None = Field(None, description="Batch mode: its batches, waves and lines, and how they were priced.")

    def to_json(self) -> bytes:
        """The summary as `accounting.json` content."""
        exclude = {name for name in ("embedded_judge", "batch") if getattr(self, name) is None} or None
        return self.model_dump_json(indent=2, exclude=exclude).encode("utf-8")


class SampleReport(BaseModel):
    """What sampling did for one prompt; a row of a shard's `sampling.parquet`."""

    prompt_id: str
    context_tokens: int
    kept_tokens: int  # < context_tokens when the document was cut in the middle
    sampled: int
    failed: int
    error: str | None = None
    unreachable: int = 0  # of `failed`, the samples the policy could not be reached for: work to retry


SAMPLING_SCHEMA = pl.Schema(
    {
        "prompt_id": pl.String,
        "context_tokens": pl.Int64,  # the document's length in policy tokens
        "kept_tokens": pl.Int64,
        "sampled": pl.Int64,  # candidates obtained
        "failed": pl.Int64,  # candidates given up on
        "error": pl.String,  # the distinct reasons, "; "-joined
        "unreachable": pl.Int64,  # failed because the policy could not be reached (a retry samples them)
    }
)


class InputFile(BaseModel):
    """An input of a build and its content hash."""

    path: str
    sha256: str


class BuildModels(BaseModel):
    """The models a build used."""

    policy: str | None = Field(description="Policy that sampled the candidates; None when they were given.")
    judge: str
    embedding: str


class BuildCounts(BaseModel):
    """How many of each thing a build saw and made."""

    prompts: int = Field(description="Valid prompts read.")
    quarantined_rows: int = Field(description="Input rows refused (prompts and candidates).")
    shards: int
    candidates: int = Field(description="Candidates scored over all shards.")
    scored: int = Field(description="Candidates with a reward.")
    failed: int = Field(description="Candidates without a reward.")
    pruned: int = Field(0, description="Candidates left unscored by pair pruning.")
    support_checks_saved: int = Field(0, description="Support checks (logical judge calls) pair pruning did not make.")
    rejected: int = Field(0, description="Failed candidates whose request the provider refused for good (see the shards' scores).")
    pairs: int
    prompts_without_pair: dict[str, int] = Field(description="Prompts that yielded no pair, by reason.")


class CallCacheSize(BaseModel):
    """How large a call cache is: its answers and the bytes it takes (file and WAL, or table and indexes)."""

    rows: int
    bytes: int


class BuildManifest(BaseModel):
    """A published preference dataset's `manifest.json`: where it came from and what it holds."""

    built_at: str = Field(description="UTC time of the build, ISO 8601.")
    inputs: dict[str, InputFile | None] = Field(description="`prompts` and `candidates` (None when sampled).")
    parameters: dict[str, Any] = Field(description="The build's parameters as JSON (secrets excluded).")
    models: BuildModels
    counts: BuildCounts
    quarantine: str | None = Field(description="Path of the refused rows, when there were any.")
    judge_accounting: dict[str, Any] = Field(description="Judge requests over all shards (RunAccounting.to_dict()).")
    judge_cost_usd: float
    call_cache: CallCacheSize | None = Field(None, description="The call cache's size once every shard was scored.")
    pairs_sha256: str | None = Field(None, description="Content hash of pairs.parquet, set when published.")
    batch_ids: list[str] = Field(
        default_factory=list, description="Batch mode: the ids of every batch the shards submitted (their ledgers name the lines)."
    )


class PredictionSummary(BaseModel):
    """What predicting one file of a benchmark did (`PredictionRun.summary()`)."""

    file: str = Field(description="The predictions file.")
    examples: int = Field(description="Examples asked for.")
    already_done: int = Field(description="Answers found in the file from an earlier run.")
    generated: int = Field(description="Answers generated in this run.")
    truncated_prompts: int = Field(description="Prompts over the input budget, cut in the middle.")
    not_written: int = Field(description="Empty answers, left out by the benchmark's own rule.")
    failed: int = Field(description="Examples without an answer: the model could not be reached (run again).")
    rejected: int = Field(description="Examples whose request the provider refused for good.")


class EvaluationSummary(BaseModel):
    """One model on one benchmark (`evaluate_benchmark`): the scores, the result file and what the
    result stands on (`cases`, `scored`, `partial`)."""

    model: str = Field(description="The model's label.")
    benchmark: str
    folder: str = Field(description="The model's folder for the benchmark.")
    limit: int | None = Field(description="Examples per dataset at most (quick runs), or None.")
    predictions: list[PredictionSummary]
    scores: dict[str, Any] = Field(description="The result file's scores (per dataset, bucket, or overall).")
    result_path: str
    cases: int = Field(description="Cases the result should stand on.")
    scored: int = Field(description="Cases it stands on.")
    partial: bool = Field(description="Whether some cases are not in the score (refused for good, set aside).")
    quarantined_inputs: int = Field(0, description="Dataset rows quarantined.")
    input_quarantine: str | None = Field(None, description="Their file, with the reasons.")
    quarantined_predictions: int | None = Field(None, description="Prediction rows refused by scoring or judging (LongBench).")
    examples_scored: dict[str, int] | None = Field(None, description="Rows scored per dataset (LongBench, LongBench-E).")
    unscored: dict[str, str] | None = Field(None, description="Datasets without a score, and why (LongBench, LongBench-E).")
    judge: RequestAccounting | None = Field(None, description="Judge requests (judged benchmarks).")
    judge_failed: int | None = Field(None, description="Answers without a verdict, left out of the score (judged benchmarks).")
    generation: RequestAccounting | None = Field(None, description="Requests to a served model (litellm backend).")

"""Records that cross a boundary (files, tasks, processes), and their on-disk schemas.

Every Parquet file the project writes is described once here, as a polars schema; readers and
writers use these schemas, so a column is named and typed in exactly one place.
"""

from __future__ import annotations

import json
from typing import Any

import polars as pl
from pydantic import BaseModel, ConfigDict, Field, field_validator

DIMENSIONS: tuple[str, ...] = ("helpfulness", "logicality", "faithfulness", "completeness")


class Prompt(BaseModel):
    """A (long document, question) prompt."""

    model_config = ConfigDict(frozen=True)

    id: str = Field(min_length=1)
    context: str = Field(min_length=1)
    query: str = Field(min_length=1)
    metadata: dict[str, Any] = Field(default_factory=dict)

    def to_row(self) -> dict[str, Any]:
        return {"id": self.id, "context": self.context, "query": self.query,
                "metadata": json.dumps(self.metadata, ensure_ascii=False, default=str)}


class Candidate(BaseModel):
    """One sampled response to a prompt."""

    model_config = ConfigDict(frozen=True)

    prompt_id: str = Field(min_length=1)
    candidate_id: str = Field(min_length=1)
    response: str


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
    judge: dict[str, Any] = Field(description="Judge requests per purpose and in total (RunAccounting.to_dict()).")
    embedded_judge: dict[str, Any] | None = Field(None, description="Verdict statistics of the embedded judge.")

    def to_json(self) -> bytes:
        """The summary as `accounting.json` content."""
        exclude = {"embedded_judge"} if self.embedded_judge is None else None
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
    pairs_sha256: str | None = Field(None, description="Content hash of pairs.parquet, set when published.")

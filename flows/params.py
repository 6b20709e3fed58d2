"""The flows' parameters: what the Prefect UI's run form and the `longreward` command line fill.

Plain pydantic models over the core's configs (no Prefect import), so the command line takes its
options' defaults and help texts from here without loading the orchestration.
"""

from __future__ import annotations

import re
from datetime import date, datetime, timezone
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from longreward_core.data.form import form_order
from longreward_core.data.pairs import PairConfig
from longreward_core.models.call_cache import CALL_CACHE_FILE, check_cache_url
from longreward_core.pipeline.sampling import PolicyConfig
from longreward_core.reward.judge import JudgeConfig
from longreward_core.reward.scorer import ScoringConfig
from longreward_core.training.config import TrainConfig
from longreward_core.training.launch import LaunchConfig


def refuse_keys(data: Any, secrets: dict[str, str]) -> Any:
    """A `mode="before"` check of a flow's parameters: a key given as parameter data (the run form,
    a deployment's parameters, `--param`) is refused, since the server stores and shows a run's
    parameters in plain text. `secrets` maps each config field that could carry one to the
    parameter naming its Secret block. Config objects built in Python keep their key: they never
    dump it (`api_key` is excluded)."""
    if isinstance(data, dict):
        for field, secret in secrets.items():
            given = data.get(field)
            for value in given if isinstance(given, list) else [given]:
                if isinstance(value, dict) and value.get("api_key"):
                    raise ValueError(
                        f"{field}: api_key is not a parameter (a run's parameters are stored and shown in plain text); "
                        f"name a Prefect Secret block holding the key in {secret}, or set it in the worker's environment"
                    )
    return data


class BuildParams(BaseModel):
    """Parameters of a preference build (the form the Prefect UI shows)."""

    model_config = ConfigDict(json_schema_extra=form_order)  # the form shows required fields first

    prompts: str = Field(description="Prompts file (JSONL or Parquet): id, context, query; or the LongReward release format.")
    output_dir: str = Field("out/builds", description="Root folder: builds go to `<output_dir>/<run_date>`; caches are shared.")
    candidates: str | None = Field(None, description="Candidates file; when empty, candidates are sampled from the policy.")
    run_date: date | None = Field(None, description="Build date (folder name); default: today, UTC.")
    shard_size: int = Field(200, ge=1, le=100_000, description="Prompts per shard (one scoring task each).")
    shards_in_flight: int = Field(4, ge=1, le=256, description="Shards processed at the same time.")
    judge_slots: str | None = Field(
        "longreward-judge",
        description="Prefect global concurrency limit of judge requests in flight across all shards and runs "
        "(create it with `prefect gcl create longreward-judge --limit N`): each shard holds min(judge.concurrency, N) "
        "slots and sends that many requests at once. Empty: no limit across shards.",
    )
    judge_limit_strict: bool = Field(
        False,
        description="Fail the shards when the judge_slots limit does not exist; off: warn and run the judge unthrottled.",
    )
    judge_key_secret: str | None = Field(None, description="Prefect Secret block holding the judge's API key (else the environment).")
    policy_key_secret: str | None = Field(None, description="Prefect Secret block holding the policy's API key (else the environment).")
    cache_url: str | None = Field(
        None,
        description="PostgreSQL URL of a call cache that several hosts share (`postgresql://user@host:5432/db`, no "
        "password: PGPASSWORD on the workers or cache_password_secret). Empty: `call_cache.sqlite` under output_dir.",
    )
    cache_password_secret: str | None = Field(
        None, description="Prefect Secret block holding the cache database's password (else PGPASSWORD or ~/.pgpass)."
    )
    result_storage_block: str | None = Field(
        None,
        description="Prefect filesystem block that keeps the finished stages' results, which a retry or a later run "
        "reads to skip them, as `block-type/block-name`: e.g. `remote-file-system/longreward-results` with basepath "
        "`s3://bucket/results` (every worker must reach it). Empty: `<output_dir>/.prefect-results`, shared when "
        "output_dir is.",
    )
    retention_days: int | None = Field(
        None, ge=1,
        description="After publishing, delete what was not used for this many days: call-cache answers (by last use), "
        "and under output_dir the Prefect result records, Qdrant stores of older builds and spools of killed runs "
        "(never this build's; published datasets stay). Empty: keep everything.",
    )
    task_retries: int = Field(2, ge=0, le=10, description="Retries of each shard task (exponential backoff with jitter).")
    dask_address: str | None = Field(None, description="Dask scheduler address ('tcp://host:8786'); empty: threads in this process.")
    policy: PolicyConfig = Field(default_factory=PolicyConfig, description="Policy model that candidates are sampled from.")
    judge: JudgeConfig = Field(default_factory=JudgeConfig, description="Judge model and its limits (per shard).")
    scoring: ScoringConfig = Field(
        default_factory=ScoringConfig, description="Chunking and retrieval; prompts in flight, the judge budget, pruning."
    )
    pairs: PairConfig = Field(default_factory=PairConfig, description="Preference pair rules.")
    train_deployment: str | None = Field(
        None,
        description="Deployment started after publishing, to train on this build (e.g. 'dpo-train/dpo-train'); "
        "its model goes to `<build>/dpo`. Empty: no training. Use this or an automation trigger, never both.",
    )
    train_base_model: str | None = Field(None, description="Base model the triggered training starts from.")

    @model_validator(mode="before")
    @classmethod
    def _no_keys(cls, data: Any) -> Any:
        return refuse_keys(data, {"judge": "judge_key_secret", "policy": "policy_key_secret"})

    @field_validator("prompts")
    @classmethod
    def _prompts_exist(cls, value: str) -> str:
        if not Path(value).is_file():
            raise ValueError(f"prompts file not found: {value}")
        return value

    @field_validator("candidates")
    @classmethod
    def _candidates_exist(cls, value: str | None) -> str | None:
        if value and not Path(value).is_file():
            raise ValueError(f"candidates file not found: {value}")
        return value or None

    @field_validator("result_storage_block")
    @classmethod
    def _block_slug(cls, value: str | None) -> str | None:
        if value and not re.fullmatch(r"[a-z0-9-]+/[A-Za-z0-9_-]+", value):
            raise ValueError(f"result_storage_block {value!r}: expected block-type/block-name, e.g. remote-file-system/longreward-results")
        return value or None

    @field_validator("cache_url")
    @classmethod
    def _cache_url(cls, value: str | None) -> str | None:
        return check_cache_url(value)

    def build_dir(self) -> Path:
        day = self.run_date or datetime.now(timezone.utc).date()
        return Path(self.output_dir) / day.isoformat()

    def cache_path(self) -> str:
        """Where the call cache is: the database URL, else the SQLite file under output_dir."""
        return self.cache_url or str(Path(self.output_dir) / CALL_CACHE_FILE)

    def results_path(self) -> Path:
        return Path(self.output_dir) / ".prefect-results"


class TrainParams(LaunchConfig, TrainConfig):  # TrainConfig first in the form
    """A DPO run as the Prefect UI shows it: the training config plus how to launch it."""

    model_config = ConfigDict(json_schema_extra=form_order)  # the form shows required fields first

    retries: int = Field(2, ge=0, le=10, description="Relaunches after a failure; each resumes from the last checkpoint.")

    def train_config(self) -> TrainConfig:
        return TrainConfig(**self.model_dump(include=set(TrainConfig.model_fields)))

"""A DPO run's configuration (the LongReward paper's defaults) and the names of its output files."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

CHECKPOINTS = "checkpoints"  # under the output folder: TRL/transformers checkpoint-N folders
MODEL = "model"  # the final model and tokenizer
METRICS = "metrics.jsonl"  # one JSON object per logging step
LENGTHS = "lengths.json"  # the length report, written before training starts
MANIFEST = "manifest.json"
QUARANTINE = "quarantine.jsonl"
RUN_CONFIG = "train_config.json"  # the config the launched processes read
# Set by the launcher in each process it starts: the processes asked for, which must train as one run.
NUM_PROCESSES_ENV = "LONGREWARD_NUM_PROCESSES"
RANKS = "ranks"  # rank-R.jsonl: the pairs each process trained on, step by step

PAIR_COLUMNS = ("prompt", "chosen", "rejected")
# The DPOConfig values a reader of the output manifest needs to reproduce the run.
REPORTED_DPO_FIELDS = (
    "beta", "loss_type", "loss_weights", "learning_rate", "lr_scheduler_type", "warmup_steps",
    "per_device_train_batch_size", "gradient_accumulation_steps", "max_steps", "num_train_epochs",
    "max_length", "truncation_mode", "activation_checkpointing", "bf16", "seed", "save_steps",
)
# DPOConfig settings that TRL's DPOTrainer (1.16) drops or changes under our loss: the run would not
# do what the override says, so it is refused before any process starts.
REFUSED_DPO_OVERRIDES = {
    "padding_free": "TRL's DPOTrainer switches padding_free off with a warning (unavailable since its DPO "
    "refactor), so the batch would be padded all the same",
    "use_liger_kernel": "TRL's DPOTrainer keeps its own fused LM head for the loss and switches Liger's fused "
    "cross-entropy off, so only Liger's layer kernels would change; the option is deprecated there and needs the "
    "liger-kernel package (Triton GPUs)",
}


class TrainConfig(BaseModel):
    """A DPO run: data, models and hyper-parameters. Defaults are the LongReward paper's."""

    model_config = ConfigDict(extra="forbid")

    pairs: Path = Field(description="A build folder, its pairs.parquet, or its `datasets` folder.")
    output_dir: Path = Field(description="Checkpoints, the final model, metrics and the manifest go here.")
    base_model: str | None = Field(
        None, description="Policy to train (a local checkpoint folder). None: the embedded SmolLM2-135M-Instruct."
    )
    ref_model: str | None = Field(None, description="Reference model for DPO. None: the base model.")
    beta: float = Field(0.15, gt=0, description="DPO temperature beta.")
    sft_weight: float = Field(0.1, ge=0, description="Weight lambda of the chosen response's cross-entropy.")
    learning_rate: float = Field(1e-6, gt=0, description="Peak learning rate of the policy.")
    effective_batch_size: int = Field(
        16, ge=1, description="Pairs per optimiser step, over all processes; reached by gradient accumulation."
    )
    per_device_batch_size: int = Field(1, ge=1, description="Pairs per forward pass on one device.")
    max_steps: int = Field(-1, description="Optimiser steps; -1 runs `num_train_epochs` epochs.")
    num_train_epochs: float = Field(1.0, gt=0, description="Passes over the pairs when max_steps is -1.")
    max_length: int | None = Field(
        None, ge=16, description="Longest tokenised prompt + response. None: the longest pair in the data."
    )
    allow_truncation: bool = Field(
        False, description="Train even when max_length drops or truncates pairs (they are still counted)."
    )
    save_steps: int = Field(50, ge=1, description="Checkpoint every N optimiser steps; a retried run resumes there.")
    save_total_limit: int | None = Field(3, ge=1, description="Checkpoints kept; None keeps all.")
    logging_steps: int = Field(1, ge=1, description="Log metrics (to metrics.jsonl) every N optimiser steps.")
    gradient_checkpointing: bool = Field(
        True, description="Recompute activations in the backward pass: long pairs fit in less memory, steps are slower."
    )
    bf16: bool | None = Field(None, description="None: bf16 where the GPU supports it, fp32 otherwise.")
    seed: int = Field(42, description="Random seed of data order, dropout and initialisation.")
    dpo_overrides: dict[str, Any] = Field(
        default_factory=dict, description="Any other TRL DPOConfig field, by name (e.g. warmup_steps)."
    )

    @field_validator("dpo_overrides")
    @classmethod
    def _known_and_effective(cls, overrides: dict[str, Any]) -> dict[str, Any]:
        """Refuse, naming the key, an override that is not a DPOConfig field or that TRL would not apply."""
        if not overrides:
            return overrides
        for key, reason in REFUSED_DPO_OVERRIDES.items():
            if overrides.get(key):
                raise ValueError(f"dpo_overrides: {key}={overrides[key]!r} is refused: {reason}")
        from trl import DPOConfig

        unknown = set(overrides) - set(DPOConfig.__dataclass_fields__)
        if unknown:
            raise ValueError(f"dpo_overrides: not DPOConfig fields: {', '.join(sorted(unknown))}")
        return overrides

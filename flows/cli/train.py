"""`longreward train`: DPO with the LongReward loss under `accelerate launch`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

import typer
from pydantic import ValidationError

from flows.cli.options import console, fail, fmt, option
from flows.params import TrainParams
from longreward_core.data.io import InputError

app = typer.Typer()

_DPO_OVERRIDE_HELP = (
    f"{TrainParams.model_fields['dpo_overrides'].description} As KEY=VALUE, repeatable; VALUE is read as JSON where "
    "it parses (numbers, booleans), as text otherwise."
)


def parse_dpo_overrides(items: list[str]) -> dict[str, Any]:
    """`KEY=VALUE` items as DPOConfig overrides: each value as JSON where it parses (`0.5`, `true`),
    else the text itself (`cosine`). An item without `=` or without a key is a ValueError naming it."""
    overrides: dict[str, Any] = {}
    for item in items:
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"--dpo-override '{item}': expected KEY=VALUE (e.g. max_grad_norm=0.5)")
        try:
            overrides[key.strip()] = json.loads(text)
        except json.JSONDecodeError:
            overrides[key.strip()] = text
    return overrides


@app.command()
def train(
    pairs: Path = option(TrainParams, "pairs", "--pairs"),
    out: Path = option(TrainParams, "output_dir", "--out"),
    base_model: Optional[str] = option(TrainParams, "base_model"),
    ref_model: Optional[str] = option(TrainParams, "ref_model"),
    max_steps: int = option(TrainParams, "max_steps"),
    beta: float = option(TrainParams, "beta"),
    sft_weight: float = option(TrainParams, "sft_weight"),
    learning_rate: float = option(TrainParams, "learning_rate"),
    effective_batch_size: int = option(TrainParams, "effective_batch_size"),
    per_device_batch_size: int = option(TrainParams, "per_device_batch_size"),
    max_length: Optional[int] = option(TrainParams, "max_length"),
    allow_truncation: bool = option(TrainParams, "allow_truncation"),
    save_steps: int = option(TrainParams, "save_steps"),
    accelerate_config: str = option(TrainParams, "accelerate_config"),
    num_processes: Optional[int] = option(TrainParams, "num_processes"),
    dpo_override: Optional[list[str]] = typer.Option(None, "--dpo-override", help=_DPO_OVERRIDE_HELP),
) -> None:
    """DPO with the LongReward loss under `accelerate launch`; re-running the same command resumes."""
    from longreward_core.training.data import TrainingRefused
    from longreward_core.training.launch import TrainingFailed, launch_training

    try:
        params = TrainParams(
            pairs=pairs, output_dir=out, base_model=base_model, ref_model=ref_model, max_steps=max_steps, beta=beta,
            sft_weight=sft_weight, learning_rate=learning_rate, effective_batch_size=effective_batch_size,
            per_device_batch_size=per_device_batch_size, max_length=max_length, allow_truncation=allow_truncation,
            save_steps=save_steps, accelerate_config=accelerate_config, num_processes=num_processes,
            dpo_overrides=parse_dpo_overrides(dpo_override or []),
        )
        manifest = launch_training(
            params.train_config(), params.accelerate_config, params.num_processes,
            on_line=lambda line: console.print(line, markup=False, highlight=False),
        )
    except (InputError, ValidationError, TrainingRefused, TrainingFailed, ValueError, FileNotFoundError) as exc:
        fail(str(exc), 2)
    last = manifest.last_log or {}
    console.print(
        f"{manifest.steps} steps; loss {fmt(last.get('loss'))}, reward margin {fmt(last.get('rewards/margins'))}, "
        f"accuracy {fmt(last.get('rewards/accuracies'))}"
    )
    console.print(f"model:    {manifest.model_dir}")
    console.print(f"manifest: {out / 'manifest.json'}")

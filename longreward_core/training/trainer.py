"""DPO training with LongReward's loss: DPO-sigmoid plus 0.1 x the chosen response's cross-entropy.

`dpo_config` turns a `TrainConfig` into TRL's `DPOConfig`; `prepare_run` checks the pairs once and
writes the run files (length report, quarantine, config); `train` runs in each process started by
`accelerate launch` (see `launch.py`), reading those files instead of tokenising the pairs again:
it resumes from the last checkpoint of its output folder, logs metrics as JSON lines, saves the
final model and writes the output manifest.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from longreward_core.data.io import InputError, atomic_write_bytes
from longreward_core.data.records import QuarantinedRow, TrainingManifest
from longreward_core.training.config import (
    CHECKPOINTS,
    LENGTHS,
    MANIFEST,
    METRICS,
    MODEL,
    NUM_PROCESSES_ENV,
    PAIR_COLUMNS,
    QUARANTINE,
    REPORTED_DPO_FIELDS,
    RUN_CONFIG,
    TrainConfig,
)
from longreward_core.training.data import (
    LengthReport,
    PairsDataset,
    TrainingRefused,
    check_lengths,
    load_pairs,
    resolve_base_model,
)


def _bf16_supported() -> bool:
    import torch

    return torch.cuda.is_available() and torch.cuda.is_bf16_supported()


def _deepspeed_without_gpu() -> bool:
    import torch

    return os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() == "true" and not torch.cuda.is_available()


def dpo_config(config: TrainConfig, max_length: int, world_size: int = 1, configured_state: bool = False) -> Any:
    """TRL's DPOConfig for this run: the LongReward loss, the batch reached by accumulation.

    `configured_state`: the process's accelerate state is already set up (see `build_trainer`).
    """
    from trl import DPOConfig

    per_step = config.per_device_batch_size * world_size
    if config.effective_batch_size % per_step:
        raise ValueError(
            f"effective_batch_size {config.effective_batch_size} is not a multiple of per_device_batch_size "
            f"x processes = {per_step}"
        )
    bf16 = _bf16_supported() if config.bf16 is None else config.bf16
    fields = dict(
        output_dir=str(config.output_dir / CHECKPOINTS),
        beta=config.beta,
        loss_type=["sigmoid", "sft"],
        loss_weights=[1.0, config.sft_weight],
        learning_rate=config.learning_rate,
        per_device_train_batch_size=config.per_device_batch_size,
        gradient_accumulation_steps=config.effective_batch_size // per_step,
        max_steps=config.max_steps,
        num_train_epochs=config.num_train_epochs,
        max_length=max_length,
        activation_checkpointing=config.gradient_checkpointing,
        activation_checkpointing_kwargs={"use_reentrant": False},
        bf16=bf16,
        model_init_kwargs={"dtype": "bfloat16" if bf16 else "float32"},
        save_strategy="steps",
        save_steps=config.save_steps,
        save_total_limit=config.save_total_limit,
        logging_steps=config.logging_steps,
        seed=config.seed,
        report_to=[],
        disable_tqdm=True,
    )
    if configured_state:
        fields["accelerator_config"] = {"use_configured_state": True}
    return DPOConfig(**{**fields, **config.dpo_overrides})


def last_checkpoint(output_dir: Path) -> Path | None:
    """The newest complete checkpoint of a run, or None."""
    from transformers.trainer_utils import get_last_checkpoint

    folder = output_dir / CHECKPOINTS
    found = get_last_checkpoint(str(folder)) if folder.is_dir() else None
    return Path(found) if found else None


def _metrics_callback(path: Path, is_main: bool) -> Any:
    from transformers import TrainerCallback

    class WriteMetrics(TrainerCallback):
        """Appends each log (loss, rewards/margins, rewards/accuracies, ...) to metrics.jsonl."""

        def on_log(self, args: Any, state: Any, control: Any, logs: dict | None = None, **kwargs: Any) -> None:
            if not is_main or not logs:
                return
            with path.open("a") as fh:
                fh.write(json.dumps({"step": state.global_step, **logs}) + "\n")

    return WriteMetrics()


def _rank() -> int:
    return int(os.environ.get("RANK", "0"))


def build_trainer(config: TrainConfig, pairs: PairsDataset, base_model: str, report: LengthReport) -> Any:
    """A DPOTrainer for the run (the policy and reference loaded from their folders) that logs the
    pairs of each step to this process's pair log (`recording.rank_log`)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from longreward_core.training.recording import PAIR_INDEX, PairLoggingDPOTrainer, rank_log

    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    configured_state = _deepspeed_without_gpu()
    if configured_state:
        from accelerate import PartialState

        # accelerate finds no process-group backend for DeepSpeed on a host without GPUs and then
        # counts one process, whatever was launched: name gloo here and let the trainer use this state.
        PartialState(backend="gloo")
    args = dpo_config(config, report.max_length, world_size, configured_state)
    tokenizer = AutoTokenizer.from_pretrained(base_model)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    is_main = _rank() == 0
    # Without a reference, TRL loads a second copy of the policy from its folder.
    ref_model = None
    if config.ref_model is not None:
        ref_model = AutoModelForCausalLM.from_pretrained(config.ref_model, **args.model_init_kwargs)
    dataset = pairs.dataset.select_columns(list(PAIR_COLUMNS))
    return PairLoggingDPOTrainer(
        model=base_model,
        ref_model=ref_model,
        args=args,
        train_dataset=dataset.add_column(PAIR_INDEX, list(range(len(dataset)))),
        processing_class=tokenizer,
        callbacks=[_metrics_callback(config.output_dir / METRICS, is_main)],
        pair_log=rank_log(config.output_dir, _rank()),
    )


def prepare_run(config: TrainConfig) -> tuple[PairsDataset, LengthReport]:
    """Check the pairs (schema, quarantine, every pair's length) and write the run files: the length
    report, the quarantine and the config the launched processes read.

    Raises TrainingRefused, having written nothing, when max_length would lose pairs unasked.
    """
    pairs = load_pairs(config.pairs)
    report = check_lengths(config, pairs, resolve_base_model(config))
    out = config.output_dir
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out / LENGTHS, json.dumps(asdict(report), indent=2).encode())
    atomic_write_bytes(out / QUARANTINE, "".join(row.model_dump_json() + "\n" for row in pairs.quarantined).encode())
    atomic_write_bytes(out / RUN_CONFIG, config.model_dump_json(indent=2).encode())
    return pairs, report


def read_prepared_run(config: TrainConfig) -> tuple[PairsDataset, LengthReport]:
    """The pairs and length report that `prepare_run` wrote for this run, read back.

    Nothing is tokenised and the rows are not checked again: the quarantined ones are dropped by
    their line. Raises InputError when the pairs no longer match the report.
    """
    out = config.output_dir
    report = LengthReport(**json.loads((out / LENGTHS).read_text()))
    quarantined = [QuarantinedRow.model_validate_json(line) for line in (out / QUARANTINE).read_text().splitlines()]
    pairs = load_pairs(config.pairs, quarantined)
    if len(pairs.dataset) != report.pairs:
        raise InputError(
            f"{pairs.source}: {len(pairs.dataset)} pairs, but {out / LENGTHS} counted {report.pairs}; "
            "the pairs changed after they were checked: launch the run again"
        )
    return pairs, report


def _checkpoint_step(checkpoint: Path) -> int:
    return int(checkpoint.name.rsplit("-", 1)[1])


def _forget_steps_after(path: Path, step: int) -> None:
    """Forget the lines (metrics, pairs) logged after the checkpoint a run resumes from: those steps run again."""
    if not path.exists():
        return
    kept = [line for line in path.read_text().splitlines() if json.loads(line)["step"] <= step]
    atomic_write_bytes(path, "".join(line + "\n" for line in kept).encode())


def _finished_state(config: TrainConfig, checkpoint: Path) -> Any:
    """The checkpoint's trainer state if it already reached the run's last step, else None."""
    from transformers import TrainerState

    state = TrainerState.load_from_json(str(checkpoint / "trainer_state.json"))
    target = config.max_steps if config.max_steps > 0 else state.max_steps
    return state if state.global_step >= target else None


def _copy_model_files(checkpoint: Path, model_dir: Path) -> None:
    """The model and tokenizer files of a checkpoint, without its optimizer and trainer state."""
    skip = shutil.ignore_patterns("optimizer*", "scheduler*", "rng_state*", "trainer_state.json", "training_args.bin",
                                  "global_step*", "latest", "zero_to_fp32.py")
    if model_dir.exists():
        shutil.rmtree(model_dir)
    shutil.copytree(checkpoint, model_dir, ignore=skip)


def train(config: TrainConfig, callbacks: list[Any] = (), prepared: bool = False) -> TrainingManifest:
    """Run (or resume) the DPO training described by `config`; return the output manifest.

    With `prepared`, the pairs were already checked by `prepare_run` (the launcher does this once
    for all processes) and its run files are read; otherwise this process checks them itself.
    Raises TrainingRefused when max_length would lose pairs unasked. A run whose output folder
    holds checkpoints continues from the newest one.
    """
    import torch
    import transformers
    import trl

    from longreward_core.training.recording import rank_log

    started = time.time()
    base_model = resolve_base_model(config)
    pairs, report = read_prepared_run(config) if prepared else prepare_run(config)
    is_main = _rank() == 0
    resume = last_checkpoint(config.output_dir)
    resumed_step = _checkpoint_step(resume) if resume else 0
    if is_main:
        _forget_steps_after(config.output_dir / METRICS, resumed_step)
    _forget_steps_after(rank_log(config.output_dir, _rank()), resumed_step)
    trainer = build_trainer(config, pairs, base_model, report)
    launched = int(os.environ.get(NUM_PROCESSES_ENV, trainer.args.world_size))
    if trainer.args.world_size != launched:
        raise ValueError(
            f"{launched} training processes were asked for, but they do not train together (each sees a world of "
            f"{trainer.args.world_size}); the accelerate config's distributed_type does not start them as one run"
        )
    for callback in callbacks:
        trainer.add_callback(callback)
    print(f"longreward: {report.summary()}; resuming from {resume}" if resume else f"longreward: {report.summary()}",
          flush=True)
    model_dir = config.output_dir / MODEL
    finished = _finished_state(config, resume) if resume else None
    if finished is None:
        metrics = trainer.train(resume_from_checkpoint=str(resume) if resume else None).metrics
        trainer.save_model(str(model_dir))
    else:
        # transformers would run one more step when resuming a finished run: keep its last checkpoint.
        metrics = {}
        trainer.state = finished
        if is_main:
            _copy_model_files(resume, model_dir)
    reported_args = trainer.args.to_dict()  # enums as their values, as JSON has them
    manifest = TrainingManifest(
        base_model=base_model,
        ref_model=config.ref_model or base_model,
        pairs=str(pairs.source),
        pairs_sha256=pairs.pairs_sha256,
        dataset_manifest_sha256=pairs.dataset_manifest_sha256,
        config=json.loads(config.model_dump_json()),
        dpo_config={k: reported_args[k] for k in (*REPORTED_DPO_FIELDS, *config.dpo_overrides)},
        lengths={k: v for k, v in asdict(report).items() if not k.endswith("_rows")},
        quarantined=len(pairs.quarantined),
        steps=trainer.state.global_step,
        resumed_from=str(resume) if resume else None,
        final_metrics=metrics,
        last_log=next((log for log in reversed(trainer.state.log_history) if "loss" in log), None),
        model_dir=str(model_dir),
        num_processes=launched,
        world_size=trainer.args.world_size,
        deepspeed_stage=trainer.accelerator.state.deepspeed_plugin.zero_stage if trainer.is_deepspeed_enabled else None,
        tokens_per_second=_tokens_per_second(trainer.state.log_history, metrics),
        peak_gpu_memory_bytes=torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None,
        seconds=round(time.time() - started, 1),
        versions={"torch": torch.__version__, "transformers": transformers.__version__, "trl": trl.__version__},
    )
    if trainer.is_world_process_zero():
        atomic_write_bytes(config.output_dir / MANIFEST, manifest.model_dump_json(indent=2).encode())
    return manifest


def main(argv: list[str] | None = None) -> None:
    """Entry point of the launched processes: `python -m longreward_core.training.trainer RUN_CONFIG.json`,
    where RUN_CONFIG.json was written by `prepare_run` beside the length report and quarantine."""
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        raise SystemExit("usage: python -m longreward_core.training.trainer TRAIN_CONFIG.json")
    config = TrainConfig.model_validate_json(Path(argv[0]).read_text())
    try:
        train(config, prepared=True)
    except (InputError, TrainingRefused, ValueError) as err:
        print(f"longreward: training not started: {err}", file=sys.stderr, flush=True)
        raise SystemExit(2) from err



def _tokens_per_second(history: list[dict[str, Any]], metrics: dict[str, Any]) -> float | None:
    tokens = next((log["num_tokens"] for log in reversed(history) if "num_tokens" in log), None)
    runtime = metrics.get("train_runtime")
    return round(tokens / runtime, 1) if tokens and runtime else None


def read_metrics(output_dir: Path) -> list[dict[str, Any]]:
    """The training steps logged so far (loss, rewards/margins, rewards/accuracies, ...)."""
    path = Path(output_dir) / METRICS
    if not path.exists():
        return []
    return [log for log in map(json.loads, path.read_text().splitlines()) if "loss" in log]


def plot_metrics(steps: list[dict[str, Any]], target: Path) -> Path:
    """Loss, reward margin and reward accuracy over steps, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    figure, axes = plt.subplots(1, 3, figsize=(12, 3.2), constrained_layout=True)
    x = [log["step"] for log in steps]
    for axis, (key, title) in zip(axes, (("loss", "loss"), ("rewards/margins", "reward margin"),
                                         ("rewards/accuracies", "reward accuracy"))):
        axis.plot(x, [log.get(key) for log in steps], marker="o", markersize=3)
        axis.set_title(title)
        axis.set_xlabel("step")
        axis.grid(alpha=0.3)
    figure.savefig(target, dpi=100)
    plt.close(figure)
    return target


if __name__ == "__main__":
    main()

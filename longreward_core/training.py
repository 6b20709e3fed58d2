"""DPO training with LongReward's loss: DPO-sigmoid plus 0.1 x the chosen response's cross-entropy.

The pieces, in the order a run uses them:
- `load_pairs` reads what `longreward build` publishes (a build folder, its `pairs.parquet` or its
  `datasets` folder), checks the schema, and quarantines bad rows with their reason;
- `measure_lengths` / `plan_lengths` tokenise every pair exactly as TRL will and count the pairs
  that `max_length` would drop or truncate, so that training never loses data silently;
- `dpo_config` turns a `TrainConfig` (the paper's defaults, every field overridable) into TRL's
  `DPOConfig`;
- `train` runs in each process started by `accelerate launch` (see `launch.py`): it resumes from
  the last checkpoint of its output folder, logs metrics as JSON lines, saves the final model and
  writes the output manifest.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import BaseModel, ConfigDict, Field

from longreward_core.chunking import common_prefix
from longreward_core.io import InputError, atomic_write_bytes
from longreward_core.runs import file_hash

CHECKPOINTS = "checkpoints"  # under the output folder: TRL/transformers checkpoint-N folders
MODEL = "model"  # the final model and tokenizer
METRICS = "metrics.jsonl"  # one JSON object per logging step
LENGTHS = "lengths.json"  # the length report, written before training starts
MANIFEST = "manifest.json"
QUARANTINE = "quarantine.jsonl"
RUN_CONFIG = "train_config.json"  # the config the launched processes read

PAIR_COLUMNS = ("prompt", "chosen", "rejected")
# The DPOConfig values a reader of the output manifest needs to reproduce the run.
REPORTED_DPO_FIELDS = (
    "beta", "loss_type", "loss_weights", "learning_rate", "lr_scheduler_type", "warmup_steps",
    "per_device_train_batch_size", "gradient_accumulation_steps", "max_steps", "num_train_epochs",
    "max_length", "truncation_mode", "activation_checkpointing", "bf16", "seed", "save_steps",
)


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
    learning_rate: float = Field(1e-6, gt=0)
    effective_batch_size: int = Field(
        16, ge=1, description="Pairs per optimiser step, over all processes; reached by gradient accumulation."
    )
    per_device_batch_size: int = Field(1, ge=1, description="Pairs per forward pass on one device.")
    max_steps: int = Field(-1, description="Optimiser steps; -1 runs `num_train_epochs` epochs.")
    num_train_epochs: float = Field(1.0, gt=0)
    max_length: int | None = Field(
        None, ge=16, description="Longest tokenised prompt + response. None: the longest pair in the data."
    )
    allow_truncation: bool = Field(
        False, description="Train even when max_length drops or truncates pairs (they are still counted)."
    )
    save_steps: int = Field(50, ge=1, description="Checkpoint every N optimiser steps; a retried run resumes there.")
    save_total_limit: int | None = Field(3, ge=1, description="Checkpoints kept; None keeps all.")
    logging_steps: int = Field(1, ge=1)
    gradient_checkpointing: bool = True
    bf16: bool | None = Field(None, description="None: bf16 where the GPU supports it, fp32 otherwise.")
    seed: int = 42
    dpo_overrides: dict[str, Any] = Field(
        default_factory=dict, description="Any other TRL DPOConfig field, by name (e.g. warmup_ratio)."
    )


class PairsSchemaError(InputError):
    """A preference dataset whose columns are not TRL conversational pairs."""


class TrainingRefused(RuntimeError):
    """Training would drop or truncate pairs and the run did not allow it."""

    def __init__(self, report: LengthReport):
        self.report = report
        super().__init__(
            f"max_length={report.max_length} would drop {report.dropped} and truncate {report.truncated} of "
            f"{report.pairs} pairs (longest pair: {report.longest} tokens; model limit: {report.model_limit}). "
            "Raise --max-length, or pass --allow-truncation to train on what fits."
        )


@dataclass
class PairsDataset:
    """The valid pairs, where they came from, and the rows set aside."""

    dataset: Any  # datasets.Dataset with prompt, chosen, rejected (+ any other columns)
    source: Path
    pairs_sha256: str
    dataset_manifest_sha256: str | None
    quarantined: list[dict[str, Any]] = field(default_factory=list)


def _resolve_pairs(path: Path) -> tuple[Path, Path | None]:
    """(the pairs data, the build manifest next to it if any)."""
    if not path.exists():
        raise InputError(f"{path}: no such file or folder (expected a build folder, pairs.parquet or a dataset folder)")
    if path.is_dir() and (path / "pairs.parquet").exists():
        return path / "pairs.parquet", path / "manifest.json" if (path / "manifest.json").exists() else None
    manifest = path.parent / "manifest.json"
    if path.is_file() and path.suffix == ".parquet":
        return path, manifest if manifest.exists() else None
    if path.is_dir() and (path / "dataset_info.json").exists():
        return path, manifest if manifest.exists() else None
    raise InputError(
        f"{path}: not a preference dataset; give a build folder (with pairs.parquet), a .parquet file, "
        "or a folder saved by datasets.save_to_disk"
    )


def _check_message_column(source: Path, name: str, column_type: pa.DataType) -> None:
    expected = "a list of {role, content} messages"
    if not (pa.types.is_list(column_type) or pa.types.is_large_list(column_type)):
        raise PairsSchemaError(f"{source}: column {name!r} is {column_type}, expected {expected}")
    item = column_type.value_type
    if not pa.types.is_struct(item) or not {"role", "content"} <= {item.field(i).name for i in range(item.num_fields)}:
        raise PairsSchemaError(f"{source}: column {name!r} holds {item}, expected {expected}")
    for key in ("role", "content"):
        kind = item.field(key).type
        if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)):
            raise PairsSchemaError(f"{source}: column {name!r} has {key} of type {kind}, expected a string")


def _row_problem(row: dict[str, Any]) -> str | None:
    prompt, chosen, rejected = row["prompt"], row["chosen"], row["rejected"]
    if not prompt or prompt[-1]["role"] != "user":
        return "prompt must end with a user message"
    for name, reply in (("chosen", chosen), ("rejected", rejected)):
        if not reply or any(m["role"] != "assistant" for m in reply):
            return f"{name} must be assistant messages"
        if not any((m["content"] or "").strip() for m in reply):
            return f"{name} is empty"
    if any(m["content"] is None for m in prompt):
        return "prompt has a message with no content"
    return None


def load_pairs(path: str | Path) -> PairsDataset:
    """The preference pairs `longreward build` published, schema-checked.

    Raises `PairsSchemaError` (naming the file, the column and the problem) when the columns are
    not TRL conversational pairs, and `InputError` when nothing is left to train on. Rows with a
    malformed conversation are quarantined with their reason; the rest are returned.
    """
    import datasets

    data_path, manifest = _resolve_pairs(Path(path))
    if data_path.is_file():
        try:
            table = pq.read_table(data_path)
        except pa.ArrowInvalid as err:
            raise InputError(f"{data_path}: not a readable Parquet file ({err})") from err
        pairs_sha256 = file_hash(data_path)
    else:
        table = datasets.load_from_disk(str(data_path)).data.table
        # A saved dataset is one or more Arrow files: hash their hashes, in name order.
        arrow_hashes = "".join(file_hash(f) for f in sorted(data_path.glob("*.arrow")))
        pairs_sha256 = hashlib.sha256(arrow_hashes.encode()).hexdigest()
    missing = [name for name in PAIR_COLUMNS if name not in table.column_names]
    if missing:
        raise PairsSchemaError(
            f"{data_path}: missing column(s) {', '.join(missing)}; preference pairs need prompt, chosen and "
            f"rejected as lists of {{role, content}} messages (found: {', '.join(table.column_names)})"
        )
    for name in PAIR_COLUMNS:
        _check_message_column(data_path, name, table.schema.field(name).type)
    keep, quarantined = [], []
    for index, row in enumerate(table.select(list(PAIR_COLUMNS)).to_pylist()):
        problem = _row_problem(row)
        if problem is None:
            keep.append(index)
        else:
            row_id = table.column("prompt_id")[index].as_py() if "prompt_id" in table.column_names else str(index)
            quarantined.append({"source": str(data_path), "row": index, "prompt_id": row_id, "reason": problem})
    if not keep:
        raise InputError(f"{data_path}: no trainable pairs ({len(quarantined)} rows quarantined, {table.num_rows} read)")
    dataset = datasets.Dataset(table.take(keep))
    return PairsDataset(
        dataset=dataset,
        source=data_path,
        pairs_sha256=pairs_sha256,
        dataset_manifest_sha256=file_hash(manifest) if manifest else None,
        quarantined=quarantined,
    )


@dataclass
class PairLength:
    """Token counts of one pair, tokenised as TRL tokenises conversational pairs."""

    prompt: int
    chosen: int
    rejected: int

    @property
    def sequence(self) -> int:
        """The longer of prompt+chosen and prompt+rejected: what max_length must hold."""
        return self.prompt + max(self.chosen, self.rejected)


def measure_lengths(dataset: Any, tokenizer: Any) -> list[PairLength]:
    """Each pair's prompt / chosen / rejected token counts, the way TRL's DPOTrainer splits them.

    The prompt is rendered with the generation prompt; each completion is whatever follows the
    common prefix of the prompt and the whole conversation.
    """

    def ids(messages: list[dict[str, str]], generation_prompt: bool = False) -> list[int]:
        out = tokenizer.apply_chat_template(
            messages, tokenize=True, return_dict=True, add_generation_prompt=generation_prompt
        )
        return list(out["input_ids"])

    lengths = []
    for row in dataset.select_columns(list(PAIR_COLUMNS)):
        prompt = ids(row["prompt"], generation_prompt=True)
        with_chosen = ids(row["prompt"] + row["chosen"])
        with_rejected = ids(row["prompt"] + row["rejected"])
        cut = min(common_prefix(prompt, with_chosen), common_prefix(prompt, with_rejected))
        lengths.append(PairLength(cut, len(with_chosen) - cut, len(with_rejected) - cut))
    return lengths


@dataclass
class LengthReport:
    """What a max_length does to the data: nothing is dropped or cut without being counted."""

    pairs: int
    max_length: int
    model_limit: int | None
    longest: int
    dropped: int  # the prompt alone fills max_length: TRL removes the pair
    truncated: int  # prompt fits, a response is cut at max_length
    dropped_rows: list[int]
    truncated_rows: list[int]
    total_tokens: int  # through the policy per epoch: each prompt twice (with chosen, with rejected), before any cut

    @property
    def lossless(self) -> bool:
        return self.dropped == 0 and self.truncated == 0

    def summary(self) -> str:
        return (
            f"{self.pairs} pairs, longest {self.longest} tokens; max_length {self.max_length}"
            f" (model limit {self.model_limit}): {self.dropped} dropped, {self.truncated} truncated"
        )


def plan_lengths(lengths: list[PairLength], max_length: int | None, model_limit: int | None) -> LengthReport:
    """Choose max_length (the longest pair, within the model's limit, unless given) and count the losses."""
    longest = max(length.sequence for length in lengths)
    if max_length is None:
        max_length = min(longest, model_limit) if model_limit else longest
    dropped = [i for i, length in enumerate(lengths) if length.prompt >= max_length]
    truncated = [i for i, length in enumerate(lengths) if length.prompt < max_length < length.sequence]
    return LengthReport(
        pairs=len(lengths),
        max_length=max_length,
        model_limit=model_limit,
        longest=longest,
        dropped=len(dropped),
        truncated=len(truncated),
        dropped_rows=dropped,
        truncated_rows=truncated,
        total_tokens=sum(length.prompt * 2 + length.chosen + length.rejected for length in lengths),
    )


def model_limit(model_path: str) -> int | None:
    """The model's context window from its config, if it states one."""
    from transformers import AutoConfig

    return getattr(AutoConfig.from_pretrained(model_path), "max_position_embeddings", None)


def resolve_base_model(config: TrainConfig) -> str:
    """The base model's folder; the embedded SmolLM2 is converted to a plain checkpoint once."""
    if config.base_model is not None:
        return config.base_model
    from longreward_core.embedded import embedded_checkpoint

    return str(embedded_checkpoint())


def check_lengths(config: TrainConfig, pairs: PairsDataset, base_model: str) -> LengthReport:
    """Measure every pair and refuse (TrainingRefused) when max_length would lose data unasked."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(base_model)
    report = plan_lengths(measure_lengths(pairs.dataset, tokenizer), config.max_length, model_limit(base_model))
    if not report.lossless and not config.allow_truncation:
        raise TrainingRefused(report)
    return report


def _bf16_supported() -> bool:
    import torch

    return torch.cuda.is_available() and torch.cuda.is_bf16_supported()


def dpo_config(config: TrainConfig, max_length: int, world_size: int = 1) -> Any:
    """TRL's DPOConfig for this run: the LongReward loss, the batch reached by accumulation."""
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
    unknown = set(config.dpo_overrides) - set(DPOConfig.__dataclass_fields__)
    if unknown:
        raise ValueError(f"dpo_overrides: not DPOConfig fields: {', '.join(sorted(unknown))}")
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


def build_trainer(config: TrainConfig, pairs: PairsDataset, base_model: str, report: LengthReport) -> Any:
    """A DPOTrainer for the run (the policy and reference loaded from their folders)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOTrainer

    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    args = dpo_config(config, report.max_length, world_size)
    tokenizer = AutoTokenizer.from_pretrained(base_model)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    is_main = int(os.environ.get("RANK", "0")) == 0
    # Without a reference, TRL loads a second copy of the policy from its folder.
    ref_model = None
    if config.ref_model is not None:
        ref_model = AutoModelForCausalLM.from_pretrained(config.ref_model, **args.model_init_kwargs)
    return DPOTrainer(
        model=base_model,
        ref_model=ref_model,
        args=args,
        train_dataset=pairs.dataset.select_columns(list(PAIR_COLUMNS)),
        processing_class=tokenizer,
        callbacks=[_metrics_callback(config.output_dir / METRICS, is_main)],
    )


def write_run_files(config: TrainConfig, pairs: PairsDataset, report: LengthReport) -> None:
    """The length report and quarantine, next to the run, before any training starts."""
    config.output_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(config.output_dir / LENGTHS, json.dumps(asdict(report), indent=2).encode())
    atomic_write_bytes(
        config.output_dir / QUARANTINE, "".join(json.dumps(row) + "\n" for row in pairs.quarantined).encode()
    )


def _checkpoint_step(checkpoint: Path) -> int:
    return int(checkpoint.name.rsplit("-", 1)[1])


def _keep_metrics_until(path: Path, step: int) -> None:
    """Forget the metrics logged after the checkpoint a run resumes from: those steps run again."""
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


def train(config: TrainConfig, callbacks: list[Any] = ()) -> dict[str, Any]:
    """Run (or resume) the DPO training described by `config`; return the output manifest.

    Meant to run in each process of `accelerate launch`; works in a plain process too. A run
    whose output folder holds checkpoints continues from the newest one.
    """
    import torch
    import transformers
    import trl

    started = time.time()
    base_model = resolve_base_model(config)
    pairs = load_pairs(config.pairs)
    report = check_lengths(config, pairs, base_model)
    is_main = int(os.environ.get("RANK", "0")) == 0
    if is_main:
        write_run_files(config, pairs, report)
    resume = last_checkpoint(config.output_dir)
    if is_main:
        _keep_metrics_until(config.output_dir / METRICS, _checkpoint_step(resume) if resume else 0)
    trainer = build_trainer(config, pairs, base_model, report)
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
    manifest = {
        "base_model": base_model,
        "ref_model": config.ref_model or base_model,
        "pairs": str(pairs.source),
        "pairs_sha256": pairs.pairs_sha256,
        "dataset_manifest_sha256": pairs.dataset_manifest_sha256,
        "config": json.loads(config.model_dump_json()),
        "dpo_config": {
            k: getattr(trainer.args, k) for k in (*REPORTED_DPO_FIELDS, *config.dpo_overrides)
        },
        "lengths": {k: v for k, v in asdict(report).items() if not k.endswith("_rows")},
        "quarantined": len(pairs.quarantined),
        "steps": trainer.state.global_step,
        "resumed_from": str(resume) if resume else None,
        "final_metrics": metrics,
        "last_log": next((log for log in reversed(trainer.state.log_history) if "loss" in log), None),
        "model_dir": str(model_dir),
        "world_size": trainer.args.world_size,
        # Tokens through the policy per second of training, and this process's peak GPU memory.
        "tokens_per_second": _tokens_per_second(trainer.state.log_history, metrics),
        "peak_gpu_memory_bytes": torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None,
        "seconds": round(time.time() - started, 1),
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__, "trl": trl.__version__},
    }
    if trainer.is_world_process_zero():
        atomic_write_bytes(config.output_dir / MANIFEST, json.dumps(manifest, indent=2, default=str).encode())
    return manifest


def main(argv: list[str] | None = None) -> None:
    """Entry point of the launched processes: `python -m longreward_core.training RUN_CONFIG.json`."""
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        raise SystemExit("usage: python -m longreward_core.training TRAIN_CONFIG.json")
    config = TrainConfig.model_validate_json(Path(argv[0]).read_text())
    try:
        train(config)
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

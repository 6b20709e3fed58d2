"""DPO training with the LongReward loss, on the `gpu` work pool (deployment `dpo-train`).

Two tasks: `check-pairs` reads the published pairs, quarantines malformed rows and counts what
max_length would drop or truncate (the run stops there rather than lose data silently); then
`train-dpo` starts `accelerate launch` (DeepSpeed ZeRO-3 on GPUs, plain CPU otherwise), whose
processes read check-pairs' length report instead of tokenising the pairs again, and streams
its output into this run's logs. A retried task, or a new run on the same output folder, resumes
from the newest checkpoint. Artifacts: the length report, loss / reward margin / reward accuracy
over steps (table and plot), and where the model is.

    python flows/dpo_train.py BUILD_DIR_OR_PAIRS OUT_DIR   # a few steps of the embedded SmolLM2 on CPU
"""

from __future__ import annotations

import base64
import sys
from pathlib import Path

from prefect import flow
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from flows.params import TrainParams
from longreward_core.data.records import TrainingManifest
from longreward_core.training.trainer import plot_metrics, read_metrics
from tasks.train import check_pairs, train_dpo


@flow(name="dpo-train")
def dpo_train(params: TrainParams) -> TrainingManifest:
    """Train the policy on preference pairs; returns the output manifest (model_dir, steps, metrics)."""
    config = params.train_config()
    report = check_pairs(config)
    create_table_artifact(
        key="dpo-lengths",
        table=[{k: getattr(report, k) for k in ("pairs", "longest", "max_length", "model_limit", "dropped", "truncated")}],
        description="Pair lengths in tokens, and what max_length drops or truncates",
    )
    manifest = train_dpo.with_options(retries=params.retries)(
        config, params.accelerate_config, params.num_processes, report
    )
    _training_artifacts(config.output_dir, manifest)
    return manifest


def _training_artifacts(output_dir: Path, manifest: TrainingManifest) -> None:
    steps = read_metrics(output_dir)
    columns = ("step", "loss", "rewards/margins", "rewards/accuracies", "rewards/chosen", "rewards/rejected")
    create_table_artifact(
        key="dpo-metrics",
        table=[{k: log.get(k) for k in columns} for log in steps],
        description="DPO metrics per logged step",
    )
    png = plot_metrics(steps, Path(output_dir) / "metrics.png")
    image = base64.b64encode(png.read_bytes()).decode()
    create_markdown_artifact(
        key="dpo-model",
        markdown=(
            f"## Trained model\n\n`{manifest.model_dir}` ({manifest.steps} steps, from `{manifest.base_model}`)"
            f"\n\nManifest: `{Path(output_dir) / 'manifest.json'}`\n\n![training curves](data:image/png;base64,{image})"
        ),
        description="Where the model is; loss, reward margin and accuracy over steps",
    )


if __name__ == "__main__":
    pairs, out = sys.argv[1:3]
    print(dpo_train(TrainParams(pairs=pairs, output_dir=out, max_steps=2, effective_batch_size=1, save_steps=1)))

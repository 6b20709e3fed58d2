"""Stages of a DPO run: check the pairs (before any GPU process starts), then train."""

from __future__ import annotations

from prefect import get_run_logger, task

from longreward_core.data.records import TrainingManifest
from longreward_core.training.config import TrainConfig
from longreward_core.training.data import LengthReport
from longreward_core.training.launch import launch_training
from longreward_core.training.trainer import prepare_run
from tasks.caching import RETRY_JITTER


@task(name="check-pairs", task_run_name="check-pairs")
def check_pairs(config: TrainConfig) -> LengthReport:
    """The length report: how many pairs max_length would drop or cut (refuses when any, unless allowed).

    Writes the run files that `train-dpo`'s processes read, so the pairs are tokenised only here.
    """
    _, report = prepare_run(config)
    get_run_logger().info("%s", report.summary())
    return report


@task(name="train-dpo", task_run_name="train-dpo", retry_delay_seconds=30, retry_jitter_factor=RETRY_JITTER)
def train_dpo(
    config: TrainConfig, accelerate_config: str, num_processes: int | None, report: LengthReport
) -> TrainingManifest:
    """Launch training on the pairs `check-pairs` checked (`report`); its output lines become this
    task's log. A retry resumes from the newest checkpoint."""
    logger = get_run_logger()
    return launch_training(config, accelerate_config, num_processes, on_line=logger.info, report=report)

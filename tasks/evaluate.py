"""Stage: evaluate one model on one benchmark (predict, resumably, then score)."""

from __future__ import annotations

from pathlib import Path

from prefect import Task, get_run_logger, task
from prefect.client.schemas.objects import State, TaskRun

from longreward_core.data.records import EvaluationSummary
from longreward_core.evaluation.evaluate import (
    DataSources,
    EvaluationIncomplete,
    benchmark_dir,
    evaluate_benchmark,
)
from longreward_core.evaluation.predict import ModelSpec
from longreward_core.models.call_cache import CALL_CACHE_FILE
from longreward_core.reward.judge import JudgeConfig
from tasks.caching import RETRY_DELAYS, RETRY_JITTER, with_secret_key


def _retry_when_incomplete(_: Task, __: TaskRun, state: State) -> bool:
    """Retry only when a model or the judge could not be reached; bad input stays failed."""
    try:
        state.result()
    except EvaluationIncomplete:
        return True
    except Exception:
        return False
    return False


@task(
    name="evaluate",
    task_run_name="{benchmark}-{model.label}",
    retries=1,
    retry_delay_seconds=RETRY_DELAYS,
    retry_jitter_factor=RETRY_JITTER,
    retry_condition_fn=_retry_when_incomplete,
)
def evaluate_model(
    model: ModelSpec,
    benchmark: str,
    output_dir: str,
    data: DataSources,
    judge: JudgeConfig,
    datasets: list[str] | None = None,
    limit: int | None = None,
    judge_key_secret: str | None = None,
    allow_partial: bool = False,
    model_key_secret: str | None = None,
) -> EvaluationSummary:
    """The summary of `evaluate_benchmark`, files under `output_dir/<benchmark>/<model>/`.
    Predictions are kept per example and requests are cached in `output_dir/call_cache.sqlite`,
    so a retry (or a new run) generates and judges only what is missing: no task cache needed.
    A partial result fails the task (EvaluationPartial, not retried: its cases were refused for
    good) unless `allow_partial`."""
    summary = evaluate_benchmark(
        with_secret_key(model, model_key_secret), benchmark, benchmark_dir(output_dir, benchmark, model.label),
        data=data, datasets=datasets, limit=limit, judge=with_secret_key(judge, judge_key_secret),
        cache_path=Path(output_dir) / CALL_CACHE_FILE, allow_partial=allow_partial,
    )
    logger = get_run_logger()
    generated = sum(p.generated for p in summary.predictions)
    reused = sum(p.already_done for p in summary.predictions)
    logger.info("%s on %s: %d answers generated, %d reused; result %s", model.label, benchmark, generated, reused, summary.result_path)
    if summary.partial:
        logger.warning("%s on %s is partial: %d of %d cases scored", model.label, benchmark, summary.scored, summary.cases)
    if summary.quarantined_inputs:
        logger.warning("%d dataset rows quarantined: %s", summary.quarantined_inputs, summary.input_quarantine)
    return summary

"""One model on one benchmark, end to end: load the data, predict (resumably), score.

Benchmarks:
- `longbench`: the 21 tasks (or those named), official metrics -> `result.json` (dataset -> score);
- `longbench-e`: LongBench-E's 13 tasks, official metrics by length bucket -> `result.json`;
- `longbench-judged`: the paper's judged variant on the 12 QA and summarisation tasks; it shares
  the `longbench` predictions (a model answers each example once) -> `judged_result.json`;
- `longbench-v2`: accuracy overall / easy / hard / short / medium / long -> `result.json`;
- `longbench-chat`: judge ratings 1-10 -> `judged_result.json`.

Files go to the model's folder for the benchmark: `benchmark_dir` gives the layout of a run
over several benchmarks, `<output_dir>/<benchmark>/<model label>/` (LongBench's `pred/<model>`
and `pred_e/<model>`), with `longbench-judged` in the `longbench` folder. When some examples got no
answer (the model's server could not be reached) or no verdict could be had from an unreachable
judge, EvaluationIncomplete is raised after the rest is saved: running again does only what is
missing, since predictions are kept per example and every request is in the call cache.

A request refused for good (`RequestRejected`: context length, content filter) is not asked
again: the result then stands on the other cases. Every result file and the summary state
`cases`, `scored` and `partial`; a partial result raises EvaluationPartial (after its files are
written) unless the run allows it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from longreward_core.data.form import form_order
from longreward_core.data.io import InputError, write_quarantine
from longreward_core.data.records import EvaluationSummary, QuarantinedRow
from longreward_core.evaluation import v2
from longreward_core.evaluation.chat import judge_longbench_chat, predict_longbench_chat
from longreward_core.evaluation.data import load_longbench_chat
from longreward_core.evaluation.judging import JudgedRun, judge_longbench_dir
from longreward_core.evaluation.predict import (
    Generator,
    ModelSpec,
    PredictionRun,
    load_generator,
    predict_longbench,
)
from longreward_core.evaluation.grading import record_coverage, score_prediction_dir
from longreward_core.evaluation.longbench import (
    JUDGED_QA_DATASETS,
    JUDGED_SUMMARY_DATASETS,
    resolve_datasets,
)
from longreward_core.models.call_cache import CALL_CACHE_FILE
from longreward_core.reward.judge import JudgeConfig

Benchmark = Literal["longbench", "longbench-e", "longbench-judged", "longbench-v2", "longbench-chat"]
BENCHMARKS: tuple[str, ...] = Benchmark.__args__  # type: ignore[attr-defined]


class EvaluationIncomplete(RuntimeError):
    """Some examples got no answer or no verdict because a model could not be reached."""


class EvaluationPartial(RuntimeError):
    """The result stands on a subset of the cases and the run did not allow that; `summary` is
    what `evaluate_benchmark` would have returned."""

    def __init__(self, summary: EvaluationSummary):
        self.summary = summary
        super().__init__(
            f"{summary.model} on {summary.benchmark}: the result stands on {summary.scored} of {summary.cases} "
            f"cases (the others were refused for good or set aside; see {summary.folder}); allow partial results to keep it"
        )


class DataSources(BaseModel):
    """Where each benchmark's data is read from (empty: the Hugging Face Hub)."""

    model_config = ConfigDict(json_schema_extra=form_order)  # the form shows required fields first

    longbench: str | None = Field(
        None, description="Folder of `<dataset>.jsonl` / `<dataset>_e.jsonl` files, or LongBench's data.zip; empty: THUDM/LongBench on the Hub."
    )
    longbench_v2: str | None = Field(None, description="LongBench v2's data.json (or a folder holding it); empty: THUDM/LongBench-v2 on the Hub.")
    longbench_chat: str | None = Field(
        None, description="Folder with LongBench-Chat's test_cases.json and few_shots.json (github.com/THUDM/LongAlign, LongBench_Chat/)."
    )


def benchmark_dir(output_dir: str | Path, benchmark: str, model_label: str) -> Path:
    """Where a model's files for a benchmark go."""
    return Path(output_dir) / ("longbench" if benchmark == "longbench-judged" else benchmark) / model_label


def _incomplete(runs: list[PredictionRun]) -> None:
    failed = {i: e for r in runs for i, e in r.failed.items()}
    if failed:
        example = next(iter(failed.items()))
        raise EvaluationIncomplete(
            f"{len(failed)} examples got no answer (e.g. '{example[0]}': {example[1][:300]}); "
            "run again: finished answers are kept and only the missing ones are generated"
        )


def _judge_incomplete(run: JudgedRun) -> None:
    if run.unreachable:
        raise EvaluationIncomplete(
            f"the judge could not be reached for {run.unreachable} answers; run again: every verdict received is cached"
        )


def evaluate_benchmark(
    spec: ModelSpec,
    benchmark: str,
    model_dir: str | Path,
    *,
    data: DataSources | None = None,
    datasets: list[str] | None = None,
    limit: int | None = None,
    judge: JudgeConfig | None = None,
    cache_path: str | Path | None = None,
    generator: Generator | None = None,
    allow_partial: bool = False,
) -> EvaluationSummary:
    """Evaluate `spec` on `benchmark` into `model_dir` (see the module docstring); returns its
    summary: `scores`, the result file's path and its coverage (`cases`, `scored`, `partial`).
    `datasets` selects LongBench tasks, `limit` caps the examples per dataset (quick runs; scores
    are then not comparable with published ones). Requests are cached in
    `cache_path` (default: `call_cache.sqlite` beside `model_dir`). Raises EvaluationIncomplete
    when a model could not be reached, and EvaluationPartial for a partial result unless
    `allow_partial`."""
    if benchmark not in BENCHMARKS:
        raise ValueError(f"unknown benchmark '{benchmark}' (known: {', '.join(BENCHMARKS)})")
    data = data or DataSources()
    if benchmark == "longbench-chat" and not data.longbench_chat:
        raise InputError("longbench-chat needs its data folder (test_cases.json, few_shots.json): it is not on the Hub")
    judge = judge or JudgeConfig()
    out = Path(model_dir)
    out.mkdir(parents=True, exist_ok=True)
    cache_path = cache_path or out.parent / CALL_CACHE_FILE  # a file path or a database URL
    generator = generator or load_generator(spec, cache_path)
    details: dict[str, Any] = {}  # the benchmark's own fields of the summary
    input_quarantine: list[QuarantinedRow] = []

    if benchmark in ("longbench", "longbench-e", "longbench-judged"):
        longbench_e = benchmark == "longbench-e"
        names = resolve_datasets(datasets, longbench_e=longbench_e)
        if benchmark == "longbench-judged":
            judged = JUDGED_QA_DATASETS + JUDGED_SUMMARY_DATASETS
            names = [n for n in names if n in judged] if datasets else list(judged)
            if not names:
                raise ValueError(f"none of the datasets is judged (judged: {', '.join(judged)})")
        runs = []
        for name in names:
            predicted = predict_longbench(generator, spec, name, out, source=data.longbench, longbench_e=longbench_e, limit=limit)
            runs.append(predicted.run)
            input_quarantine += predicted.quarantined
        _incomplete(runs)
        cases = sum(r.requested for r in runs)
        if benchmark == "longbench-judged":
            judged_run = judge_longbench_dir(out, judge, cache_path, source=data.longbench, datasets=names)
            _judge_incomplete(judged_run)
            scores, result_path, scored_cases = judged_run.scores, judged_run.result_path, judged_run.judged
            details.update(judge=judged_run.accounting.record(), judge_failed=judged_run.failed,
                           quarantined_predictions=len(judged_run.quarantined))
        else:
            scored = score_prediction_dir(out, longbench_e=longbench_e)
            scores, result_path = {n: scored.scores[n] for n in names if n in scored.scores}, scored.result_path
            scored_cases = sum(scored.rows.get(n, 0) for n in names)
            details.update(examples_scored=scored.rows, quarantined_predictions=len(scored.quarantined), unscored=scored.unscored)
    elif benchmark == "longbench-v2":
        predicted_v2 = v2.predict_longbench_v2(generator, spec, out, source=data.longbench_v2, limit=limit)
        input_quarantine += predicted_v2.quarantined
        runs = [predicted_v2.run]
        _incomplete(runs)
        scores, result_path = v2.score_predictions(out), out / v2.RESULT_FILE
        # Empty answers are left out by the benchmark's own rule, not lost.
        cases = predicted_v2.run.requested - predicted_v2.run.not_written
        scored_cases = scores["questions"]
    else:
        assert data.longbench_chat is not None  # checked above
        loaded = load_longbench_chat(data.longbench_chat, limit=limit)
        input_quarantine += loaded.quarantined
        runs = [predict_longbench_chat(generator, spec, out, loaded.records)]
        _incomplete(runs)
        judged_run = judge_longbench_chat(out, loaded.records, judge, cache_path)
        _judge_incomplete(judged_run)
        scores, result_path = judged_run.scores, judged_run.result_path
        details.update(judge=judged_run.accounting.record(), judge_failed=judged_run.failed)
        cases, scored_cases = len(loaded.records), judged_run.judged

    accounting = getattr(generator, "accounting", None)  # requests to a served model (litellm backend)
    summary = EvaluationSummary(
        model=spec.label, benchmark=benchmark, folder=str(out), limit=limit, predictions=[r.summary() for r in runs],
        scores=scores, result_path=str(result_path), **record_coverage(result_path, cases, scored_cases),
        quarantined_inputs=len(input_quarantine),
        input_quarantine=str(write_quarantine(input_quarantine, out / "input_quarantine.parquet")) if input_quarantine else None,
        generation=accounting.record() if accounting is not None else None,
        **details,
    )
    if summary.partial and not allow_partial:
        raise EvaluationPartial(summary)
    return summary

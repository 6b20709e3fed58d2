"""`longreward eval ...`: LongBench, LongBench-E, LongBench v2 and LongBench-Chat.

    longreward eval longbench-score --pred-dir DIR [--e]
    longreward eval longbench --model M --datasets hotpotqa,trec --out DIR [--e]
    longreward eval longbench-judge --pred-dir DIR/M --judge-model openai/gpt-4o
    longreward eval longbench-v2 --model M --out DIR
    longreward eval longbench-chat --model M --data LongBench_Chat/ --out DIR --judge-model openai/gpt-4o

Prediction commands write `DIR/<model label>/` as LongBench's pred.py writes `pred/<model>/`, so
`longbench-score --pred-dir DIR/<model label>` (or LongBench's own eval.py) scores them.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Optional

import typer
from pydantic import ValidationError
from rich.table import Table

from flows.cli.options import (
    JUDGE,
    MODEL,
    cache_url_option,
    console,
    fail,
    grouped_options,
    input_errors,
)
from longreward_core.data.io import InputError
from longreward_core.evaluation.chat import CHAT_MAX_INPUT_TOKENS
from longreward_core.evaluation.predict import ModelSpec
from longreward_core.evaluation.v2 import V2_MAX_INPUT_TOKENS
from longreward_core.models.errors import ConfigurationError
from longreward_core.reward.judge import JudgeConfig

app = typer.Typer(help="Evaluate models on LongBench, LongBench-E, LongBench v2 and LongBench-Chat.", no_args_is_help=True)

_OUT_HELP = "Output root: files go to OUT/<model label>/."
_DATASETS_HELP = "Comma-separated dataset names (default: all)."
_PARTIAL_HELP = "Accept a result computed from a subset of the cases (requests refused for good); it is marked partial."


def _datasets(values: Optional[list[str]]) -> Optional[list[str]]:
    if not values:
        return None
    return [name.strip() for value in values for name in value.split(",") if name.strip()]


def _value(value: Any) -> str:
    if isinstance(value, dict):
        return "  ".join(f"{k}: {_value(v)}" for k, v in value.items())
    if isinstance(value, float):
        return "NaN" if math.isnan(value) else f"{value:.2f}"
    return "-" if value is None else str(value)


def _print_scores(title: str, scores: dict[str, Any]) -> None:
    table = Table(title=title)
    table.add_column("")
    table.add_column("score", justify="right")
    for key, value in scores.items():
        table.add_row(key, _value(value))
    console.print(table)


def _evaluate(model: ModelSpec, benchmark: str, out: Path, cache_url: Optional[str], **options: Any) -> None:
    from longreward_core.evaluation.evaluate import (
        EvaluationIncomplete,
        EvaluationPartial,
        evaluate_benchmark,
    )
    from longreward_core.models.call_cache import check_cache_url

    try:
        options["cache_path"] = check_cache_url(cache_url)
        summary = evaluate_benchmark(model, benchmark, out / model.label, **options)
    except (InputError, ValidationError, ValueError, ConfigurationError) as exc:
        fail(str(exc), 2)
    except EvaluationIncomplete as exc:
        fail(str(exc), 1)
    except EvaluationPartial as exc:
        _print_scores(f"{model.label}: {benchmark} (partial)", exc.summary.scores)
        fail(f"{exc}: pass --allow-partial", 1)
    partial = " (partial)" if summary.partial else ""
    _print_scores(f"{model.label}: {benchmark}{partial}", summary.scores)
    for run in summary.predictions:
        console.print(
            f"{run.file}: {run.generated} generated, {run.already_done} already there, "
            f"{run.truncated_prompts} prompts cut in the middle"
        )
    if summary.quarantined_inputs:
        console.print(f"[yellow]{summary.quarantined_inputs} dataset rows quarantined: {summary.input_quarantine}")
    console.print(f"result: {summary.result_path} ({summary.scored} of {summary.cases} cases scored)")


@app.command("longbench-score")
def longbench_score(
    pred_dir: Path = typer.Option(..., "--pred-dir", help="Folder of <dataset>.jsonl predictions (pred, answers, all_classes, length)."),
    e: bool = typer.Option(False, "--e", help="LongBench-E: scores by length bucket 0-4k / 4-8k / 8k+."),
) -> None:
    """Score predictions in LongBench's format into PRED_DIR/result.json, as LongBench's eval.py."""
    from longreward_core.evaluation.grading import score_prediction_dir

    with input_errors():
        report = score_prediction_dir(pred_dir, longbench_e=e)
    _print_scores("LongBench-E" if e else "LongBench", report.scores)
    console.print(f"result: {report.result_path}")
    if report.quarantine_path:
        console.print(f"[yellow]{len(report.quarantined)} rows quarantined (see 'reason'): {report.quarantine_path}")
    if report.unscored:
        fail("; ".join(report.unscored.values()), 1)


@app.command("longbench")
@grouped_options
def longbench(
    model: ModelSpec = MODEL,
    out: Path = typer.Option(..., "--out", help=_OUT_HELP),
    datasets: Optional[list[str]] = typer.Option(None, "--datasets", help=_DATASETS_HELP),
    e: bool = typer.Option(False, "--e", help="LongBench-E (its 13 datasets, scored by length bucket)."),
    data: Optional[str] = typer.Option(None, "--data", help="Folder of <dataset>.jsonl files or data.zip (default: the Hub)."),
    limit: Optional[int] = typer.Option(None, "--limit", min=1, help="At most this many examples per dataset (quick runs)."),
    allow_partial: bool = typer.Option(False, "--allow-partial", help=_PARTIAL_HELP),
    cache_url: Optional[str] = cache_url_option(),
) -> None:
    """Generate LongBench answers (resumable) into OUT/<model>/<dataset>.jsonl and score them."""
    from longreward_core.evaluation.evaluate import DataSources

    _evaluate(model, "longbench-e" if e else "longbench", out, cache_url, data=DataSources(longbench=data),
              datasets=_datasets(datasets), limit=limit, allow_partial=allow_partial)


@app.command("longbench-judge")
@grouped_options
def longbench_judge(
    pred_dir: Path = typer.Option(..., "--pred-dir", help="A model's LongBench prediction folder."),
    data: Optional[str] = typer.Option(None, "--data", help="The LongBench data the predictions answer (default: the Hub)."),
    datasets: Optional[list[str]] = typer.Option(None, "--datasets", help="Comma-separated (default: every judged dataset present)."),
    judge: JudgeConfig = JUDGE,
    allow_partial: bool = typer.Option(False, "--allow-partial", help=_PARTIAL_HELP),
    cache_url: Optional[str] = cache_url_option(),
) -> None:
    """The paper's judged LongBench (QA 1-3, summaries 1-5) into PRED_DIR/judged_result.json."""
    from longreward_core.evaluation.judging import judge_longbench_dir
    from longreward_core.models.call_cache import CALL_CACHE_FILE, check_cache_url

    with input_errors():
        cache = check_cache_url(cache_url) or pred_dir.parent / CALL_CACHE_FILE
        run = judge_longbench_dir(pred_dir, judge, cache, source=data, datasets=_datasets(datasets))
    _print_scores("judged LongBench", run.scores)
    console.print(f"result: {run.result_path}; ratings: {run.ratings_path}")
    if run.unreachable:
        fail(f"the judge could not be reached for {run.unreachable} answers; run again (verdicts received are cached)", 1)
    if run.judged < run.cases and not allow_partial:
        fail(f"the result stands on {run.judged} of {run.cases} answers (no verdict for the others); pass --allow-partial", 1)


@app.command("longbench-v2")
@grouped_options
def longbench_v2(
    model: ModelSpec = MODEL.with_defaults(max_input_tokens=V2_MAX_INPUT_TOKENS),
    out: Path = typer.Option(..., "--out", help=_OUT_HELP),
    data: Optional[str] = typer.Option(None, "--data", help="LongBench v2's data.json (default: the Hub)."),
    limit: Optional[int] = typer.Option(None, "--limit", min=1, help="At most this many examples (quick runs)."),
    allow_partial: bool = typer.Option(False, "--allow-partial", help=_PARTIAL_HELP),
    cache_url: Optional[str] = cache_url_option(),
) -> None:
    """Answer LongBench v2 (resumable) into OUT/<model>/predictions.jsonl; accuracy in result.json."""
    from longreward_core.evaluation.evaluate import DataSources

    _evaluate(model, "longbench-v2", out, cache_url, data=DataSources(longbench_v2=data), limit=limit, allow_partial=allow_partial)


@app.command("longbench-chat")
@grouped_options
def longbench_chat(
    model: ModelSpec = MODEL.with_defaults(max_input_tokens=CHAT_MAX_INPUT_TOKENS),
    out: Path = typer.Option(..., "--out", help=_OUT_HELP),
    data: str = typer.Option(..., "--data", help="Folder with test_cases.json and few_shots.json."),
    judge: JudgeConfig = JUDGE,
    limit: Optional[int] = typer.Option(None, "--limit", min=1, help="At most this many cases (quick runs)."),
    allow_partial: bool = typer.Option(False, "--allow-partial", help=_PARTIAL_HELP),
    cache_url: Optional[str] = cache_url_option(),
) -> None:
    """Answer LongBench-Chat and have the judge rate the answers 1-10 (OUT/<model>/judged_result.json)."""
    from longreward_core.evaluation.evaluate import DataSources

    _evaluate(model, "longbench-chat", out, cache_url, data=DataSources(longbench_chat=data), limit=limit,
              judge=judge, allow_partial=allow_partial)

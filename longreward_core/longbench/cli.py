"""`longreward eval ...`: LongBench-family evaluation from the command line (no Prefect).

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
import os
from pathlib import Path
from typing import Annotated, Any, NoReturn, Optional

import typer
from pydantic import ValidationError
from rich.console import Console
from rich.table import Table

from longreward_core.io import InputError
from longreward_core.judge import EMBEDDED_JUDGE, JUDGE_API_KEY_ENV, JudgeConfig
from longreward_core.longbench.evaluate import DataSources, EvaluationIncomplete, evaluate_benchmark
from longreward_core.longbench.judging import judge_longbench_dir
from longreward_core.longbench.predict import ModelSpec
from longreward_core.longbench.scoring import score_prediction_dir

eval_app = typer.Typer(help="Evaluate models on LongBench, LongBench-E, LongBench v2 and LongBench-Chat.", no_args_is_help=True)
console = Console()

Model = Annotated[str, typer.Option("--model", help="litellm model string, or a checkpoint folder with --backend transformers.")]
Name = Annotated[Optional[str], typer.Option("--name", help="Label for results and folders (default: last part of --model).")]
Backend = Annotated[str, typer.Option("--backend", help="'litellm' (a server, e.g. vLLM) or 'transformers' (local).")]
ApiBase = Annotated[Optional[str], typer.Option("--api-base", help="OpenAI-compatible base URL of the model's server.")]
TokenizerOpt = Annotated[Optional[str], typer.Option("--tokenizer", help="Tokenizer counting the input budget (litellm backend).")]
MaxInput = Annotated[int, typer.Option("--max-input-tokens", min=64, help="Longer prompts are cut in the middle.")]
Concurrency = Annotated[int, typer.Option("--concurrency", min=1, help="Requests in flight (litellm backend).")]
Limit = Annotated[Optional[int], typer.Option("--limit", min=1, help="At most this many examples per dataset (quick runs).")]
Out = Annotated[Path, typer.Option("--out", help="Output root: files go to OUT/<model label>/.")]
JudgeModel = Annotated[str, typer.Option("--judge-model", help="litellm model string of the judge.")]
JudgeApiBase = Annotated[Optional[str], typer.Option("--judge-api-base", help="OpenAI-compatible base URL of the judge.")]


def _fail(message: str, code: int) -> NoReturn:
    console.print(f"[red]error:[/red] {message}")
    raise typer.Exit(code)


def _spec(model: str, name: Optional[str], backend: str, api_base: Optional[str], tokenizer: Optional[str],
          max_input_tokens: int, concurrency: int) -> ModelSpec:
    try:
        return ModelSpec(model=model, name=name, backend=backend, api_base=api_base, tokenizer=tokenizer,
                         max_input_tokens=max_input_tokens, concurrency=concurrency)
    except ValidationError as exc:
        _fail(str(exc), 2)


def _judge(model: str, api_base: Optional[str]) -> JudgeConfig:
    return JudgeConfig(model=model, api_base=api_base, api_key=os.environ.get(JUDGE_API_KEY_ENV))


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


def _run(spec: ModelSpec, benchmark: str, out: Path, **options: Any) -> dict[str, Any]:
    try:
        summary = evaluate_benchmark(spec, benchmark, out / spec.label, **options)
    except (InputError, ValueError) as exc:
        _fail(str(exc), 2)
    except EvaluationIncomplete as exc:
        _fail(str(exc), 1)
    _print_scores(f"{spec.label}: {benchmark}", summary["scores"])
    for run in summary["predictions"]:
        console.print(
            f"{run['file']}: {run['generated']} generated, {run['already_done']} already there, "
            f"{run['truncated_prompts']} prompts cut in the middle"
        )
    if summary.get("quarantined_inputs"):
        console.print(f"[yellow]{summary['quarantined_inputs']} dataset rows quarantined: {summary['input_quarantine']}")
    console.print(f"result: {summary['result_path']}")
    return summary


@eval_app.command("longbench-score")
def longbench_score(
    pred_dir: Annotated[Path, typer.Option("--pred-dir", help="Folder of <dataset>.jsonl predictions (pred, answers, all_classes, length).")],
    e: Annotated[bool, typer.Option("--e", help="LongBench-E: scores by length bucket 0-4k / 4-8k / 8k+.")] = False,
) -> None:
    """Score predictions in LongBench's format into PRED_DIR/result.json, as LongBench's eval.py."""
    try:
        report = score_prediction_dir(pred_dir, longbench_e=e)
    except InputError as exc:
        _fail(str(exc), 2)
    _print_scores("LongBench-E" if e else "LongBench", report.scores)
    console.print(f"result: {report.result_path}")
    if report.quarantine_path:
        console.print(f"[yellow]{len(report.quarantined)} rows quarantined (see 'reason'): {report.quarantine_path}")
    if report.unscored:
        _fail("; ".join(report.unscored.values()), 1)


@eval_app.command("longbench")
def longbench(
    model: Model,
    out: Out,
    datasets: Annotated[Optional[list[str]], typer.Option("--datasets", help="Comma-separated dataset names (default: all).")] = None,
    e: Annotated[bool, typer.Option("--e", help="LongBench-E (its 13 datasets, scored by length bucket).")] = False,
    data: Annotated[Optional[str], typer.Option("--data", help="Folder of <dataset>.jsonl files or data.zip (default: the Hub).")] = None,
    name: Name = None,
    backend: Backend = "litellm",
    api_base: ApiBase = None,
    tokenizer: TokenizerOpt = None,
    max_input_tokens: MaxInput = 31_500,
    concurrency: Concurrency = 8,
    limit: Limit = None,
) -> None:
    """Generate LongBench answers (resumable) into OUT/<model>/<dataset>.jsonl and score them."""
    spec = _spec(model, name, backend, api_base, tokenizer, max_input_tokens, concurrency)
    _run(spec, "longbench-e" if e else "longbench", out, data=DataSources(longbench=data), datasets=_datasets(datasets), limit=limit)


@eval_app.command("longbench-judge")
def longbench_judge(
    pred_dir: Annotated[Path, typer.Option("--pred-dir", help="A model's LongBench prediction folder.")],
    data: Annotated[Optional[str], typer.Option("--data", help="The LongBench data the predictions answer (default: the Hub).")] = None,
    datasets: Annotated[Optional[list[str]], typer.Option("--datasets", help="Comma-separated (default: every judged dataset present).")] = None,
    judge_model: JudgeModel = EMBEDDED_JUDGE,
    judge_api_base: JudgeApiBase = None,
) -> None:
    """The paper's judged LongBench (QA 1-3, summaries 1-5) into PRED_DIR/judged_result.json."""
    try:
        run = judge_longbench_dir(pred_dir, _judge(judge_model, judge_api_base), pred_dir.parent / "call_cache.sqlite",
                                  source=data, datasets=_datasets(datasets))
    except (InputError, ValueError) as exc:
        _fail(str(exc), 2)
    _print_scores("judged LongBench", run.scores)
    console.print(f"result: {run.result_path}; ratings: {run.ratings_path}")
    if run.unreachable:
        _fail(f"the judge could not be reached for {run.unreachable} answers; run again (verdicts received are cached)", 1)


@eval_app.command("longbench-v2")
def longbench_v2(
    model: Model,
    out: Out,
    data: Annotated[Optional[str], typer.Option("--data", help="LongBench v2's data.json (default: the Hub).")] = None,
    name: Name = None,
    backend: Backend = "litellm",
    api_base: ApiBase = None,
    tokenizer: TokenizerOpt = None,
    max_input_tokens: MaxInput = 120_000,
    concurrency: Concurrency = 8,
    limit: Limit = None,
) -> None:
    """Answer LongBench v2 (resumable) into OUT/<model>/predictions.jsonl; accuracy in result.json."""
    spec = _spec(model, name, backend, api_base, tokenizer, max_input_tokens, concurrency)
    _run(spec, "longbench-v2", out, data=DataSources(longbench_v2=data), limit=limit)


@eval_app.command("longbench-chat")
def longbench_chat(
    model: Model,
    out: Out,
    data: Annotated[str, typer.Option("--data", help="Folder with test_cases.json and few_shots.json.")],
    judge_model: JudgeModel = EMBEDDED_JUDGE,
    judge_api_base: JudgeApiBase = None,
    name: Name = None,
    backend: Backend = "litellm",
    api_base: ApiBase = None,
    tokenizer: TokenizerOpt = None,
    max_input_tokens: MaxInput = 64_000,
    concurrency: Concurrency = 8,
    limit: Limit = None,
) -> None:
    """Answer LongBench-Chat and have the judge rate the answers 1-10 (OUT/<model>/judged_result.json)."""
    spec = _spec(model, name, backend, api_base, tokenizer, max_input_tokens, concurrency)
    _run(spec, "longbench-chat", out, data=DataSources(longbench_chat=data), limit=limit, judge=_judge(judge_model, judge_api_base))

"""The `longreward` command line: scoring, pairs, the preference build, training and evaluation.

Every option fills a field of a pydantic config (the judge's, the scorer's, a flow's parameters);
its default and help text are read from that field by `option`, so each is stated once, in the
config. `build` and `demo` run the preference-build flow in this process: without
PREFECT_API_URL, Prefect starts a temporary local server for the run; with it, the run reports to
that server. Keys are never options: they come from the environment (see `resolve_api_key`).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import date
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn, Optional

import typer
from pydantic import BaseModel, ValidationError
from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
)
from rich.table import Table

from flows.params import BuildParams, TrainParams
from longreward_core.data.io import InputError
from longreward_core.data.pairs import PairConfig
from longreward_core.evaluation.chat import CHAT_MAX_INPUT_TOKENS
from longreward_core.evaluation.predict import ModelSpec
from longreward_core.evaluation.v2 import V2_MAX_INPUT_TOKENS
from longreward_core.pipeline.sampling import PolicyConfig
from longreward_core.reward.judge import JudgeConfig
from longreward_core.reward.scorer import ScoringConfig

if TYPE_CHECKING:
    from longreward_core.pipeline.score import ScoreRun

__all__ = ["app"]

app = typer.Typer(help="LongReward: LLM-judge rewards for long-context responses, and DPO pairs.", no_args_is_help=True)
eval_app = typer.Typer(help="Evaluate models on LongBench, LongBench-E, LongBench v2 and LongBench-Chat.", no_args_is_help=True)
app.add_typer(eval_app, name="eval")
# soft_wrap: messages are never hard-wrapped at the terminal's width (logs and pipes read them whole).
console = Console(soft_wrap=True)

_UNSET: Any = object()


def option(model: type[BaseModel], field: str, *flags: str, default: Any = _UNSET, help: str | None = None) -> Any:
    """A typer option for `model.field`: its default, help text and bounds come from the field.

    `default` overrides the field's default for one command (e.g. a benchmark's input budget).
    """
    info = model.model_fields[field]
    if default is _UNSET:
        default = ... if info.is_required() else info.get_default(call_default_factory=True)
    bounds = {}
    for constraint in info.metadata:  # ge / le map to typer's min / max; pydantic checks gt / lt
        if getattr(constraint, "ge", None) is not None:
            bounds["min"] = constraint.ge
        if getattr(constraint, "le", None) is not None:
            bounds["max"] = constraint.le
    return typer.Option(default, *flags, help=help or info.description, show_default=default is not None, **bounds)


def _fail(message: str, code: int) -> NoReturn:
    console.print(f"[red]error:[/red] {escape(message)}")
    raise typer.Exit(code)


@contextmanager
def _input_errors() -> Iterator[None]:
    """Bad input (a missing file, a refused value) ends the command with its message and exit code 2."""
    try:
        yield
    except (InputError, ValidationError, ValueError, FileNotFoundError) as exc:
        _fail(str(exc), 2)


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


_CACHE_URL_HELP = (
    "PostgreSQL URL of a call cache several hosts share (postgresql://user@host:5432/db; the password comes from "
    "PGPASSWORD or ~/.pgpass, never the URL). Default: call_cache.sqlite in the output folder."
)


def _cache_url() -> Any:
    return option(BuildParams, "cache_url", "--cache-url", help=_CACHE_URL_HELP)


def _judge_config(
    model: str, api_base: Optional[str], concurrency: int, rpm: Optional[int], timeout_s: float, batch: bool = False,
    batch_poll_s: float = 60.0,
) -> JudgeConfig:
    """The judge's settings; with `batch`, refused at once (exit 2) when the judge cannot batch."""
    from longreward_core.models.batch import batch_provider

    config = JudgeConfig(model=model, api_base=api_base, concurrency=concurrency, rpm=rpm, timeout_s=timeout_s,
                         batch=batch, batch_poll_s=batch_poll_s)
    if batch:
        batch_provider(config)
    return config


def _print_wave(wave: Any) -> None:
    batches = ", ".join(f"{batch_id} {status}" for batch_id, status in wave.status.items())
    console.print(f"wave {wave.wave}: {wave.lines} lines; {batches}; {wave.elapsed_s:.0f} s")


# ---------------------------------------------------------------------------------------------
# Scoring and pairs


@app.command()
def score(
    prompts: Path = typer.Option(..., "--prompts", help="Prompts: JSONL or Parquet."),
    candidates: Path = typer.Option(..., "--candidates", help="Candidates: JSONL or Parquet."),
    out: Path = typer.Option(..., "--out", help="Output folder."),
    judge_model: str = option(JudgeConfig, "model", "--judge-model"),
    judge_api_base: Optional[str] = option(JudgeConfig, "api_base", "--judge-api-base"),
    concurrency: int = option(JudgeConfig, "concurrency", "--concurrency"),
    rpm: Optional[int] = option(JudgeConfig, "rpm", "--rpm"),
    timeout: float = option(JudgeConfig, "timeout_s", "--timeout"),
    embedding_model: str = option(ScoringConfig, "embedding_model"),
    qdrant_url: Optional[str] = option(ScoringConfig, "qdrant_url"),
    retrieval_chunk_tokens: int = option(ScoringConfig, "retrieval_chunk_tokens"),
    completeness_chunk_tokens: int = option(ScoringConfig, "completeness_chunk_tokens"),
    prune: bool = option(ScoringConfig, "prune", "--prune/--no-prune"),
    max_judge_cost_usd: Optional[float] = option(ScoringConfig, "max_judge_cost_usd", "--max-judge-cost-usd"),
    max_judge_tokens: Optional[int] = option(ScoringConfig, "max_judge_tokens", "--max-judge-tokens"),
    min_candidates: int = option(PairConfig, "min_candidates", help="With --prune: the pair rule pruning keeps exact "
                                 "(use the same or a smaller --min-candidates with `longreward pairs`)."),
    cache_url: Optional[str] = _cache_url(),
    batch: bool = option(JudgeConfig, "batch", "--batch/--no-batch"),
    batch_poll_s: float = option(JudgeConfig, "batch_poll_s", "--batch-poll-s"),
) -> None:
    """Score candidates with LongReward: writes OUT/scores.parquet and OUT/accounting.json.

    Exit codes: 0 when every candidate has its outcome (scored, or failed for a reason recorded in
    scores.parquet, such as a request the provider refused); 1 when nothing could be scored (an
    empty input too), the judge could not be reached for some candidates (run the same command
    again: every answer received is cached), the judge budget was reached (prompts left unscored;
    run again with a larger budget), or it refused the credentials; 2 on bad input.
    """
    from longreward_core.models.call_cache import check_cache_url
    from longreward_core.models.batch import BatchFailed
    from longreward_core.models.client import AuthenticationFailed
    from longreward_core.pipeline.score import score_files

    with _input_errors():
        cache_path = check_cache_url(cache_url)
        judge = _judge_config(judge_model, judge_api_base, concurrency, rpm, timeout, batch, batch_poll_s)
        scoring = ScoringConfig(
            retrieval_chunk_tokens=retrieval_chunk_tokens, completeness_chunk_tokens=completeness_chunk_tokens,
            qdrant_url=qdrant_url, embedding_model=embedding_model, prune=prune,
            max_judge_cost_usd=max_judge_cost_usd, max_judge_tokens=max_judge_tokens,
        )
        with Progress(
            TextColumn("[bold]scoring"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), console=console
        ) as progress:
            task = progress.add_task("score", total=None)
            try:
                run = score_files(
                    prompts, candidates, out, judge, scoring, cache_path=cache_path,
                    on_start=lambda n: progress.update(task, total=n),
                    on_scored=lambda _: progress.advance(task),
                    pair_config=PairConfig(min_candidates=min_candidates), on_wave=_print_wave,
                )
            except (AuthenticationFailed, BatchFailed) as exc:
                _fail(str(exc), 1)
    _print_summary(run)
    s = run.summary
    if s.candidates == 0:
        _fail(f"nothing to score: no valid candidates in {candidates}" + (f" for the {s.prompts} prompts" if s.prompts else ""), 1)
    if s.budget_reached:
        _fail(budget_message(s.budget_reached, s.not_scored_prompts), 1)
    if s.unreachable:
        _fail(f"the judge could not be reached for {s.unreachable} candidates; run the same command again "
              "(every answer received is cached)", 1)
    if s.scored == 0:
        _fail("no candidate could be scored (see the 'error' column of scores.parquet)", 1)


def budget_message(reached: str, not_scored: list[str]) -> str:
    """The 'budget reached' status: what was not scored, and how to go on."""
    named = ", ".join(not_scored[:20]) + (f", ... ({len(not_scored) - 20} more)" if len(not_scored) > 20 else "")
    return (f"budget reached: {reached}; {len(not_scored)} prompt(s) not scored: {named}. Run again with a larger "
            "budget to go on: everything done is cached and no call is repeated")


def _print_summary(run: ScoreRun) -> None:
    s = run.summary
    total = s.judge["total"]
    table = Table(title="LongReward scores", show_header=True)
    table.add_column("")
    table.add_column("value", justify="right")
    for label, value in [
        ("prompts", s.prompts),
        ("candidates", s.candidates),
        ("scored", s.scored),
        ("failed", s.failed),
        ("pruned (pair decided without them)", s.pruned),
        ("support checks saved by pruning", s.support_checks_saved),
        ("  refused by the provider (final)", s.rejected),
        ("  judge unreachable (run again)", s.unreachable),
        ("quarantined rows", s.quarantined),
        ("mean reward", _fmt(s.mean_reward)),
        *[(f"mean {d}", _fmt(v)) for d, v in s.mean_by_dimension.items()],
        ("judge requests", total["calls"]),
        ("  of them by batch", total["batch_calls"]),
        ("judge cache hits", total["cache_hits"]),
        ("judge tokens (prompt / completion)", f"{total['prompt_tokens']} / {total['completion_tokens']}"),
        ("judge cost (USD, where known)", f"{total['cost_usd']:.4f}"),
        ("cacheable share of prompt tokens", "-" if total.get("cacheable_share") is None else f"{100 * total['cacheable_share']:.1f}%"),
        ("prompt tokens cached by the provider", total.get("cached_tokens", 0)),
        ("verdict parse failures (retried)", total["parse_failures"]),
        ("transport errors (retried)", total["transport_errors"]),
        ("chunk embeddings computed", s.chunk_embeddings),
        ("wall seconds", s.wall_seconds),
    ]:
        table.add_row(label, str(value))
    if s.embedded_judge is not None:
        e = s.embedded_judge
        verdicts = e["verdicts_unaided"] + e["verdicts_constrained"]
        rate = f"{100 * e['verdicts_unaided'] / verdicts:.0f}%" if verdicts else "n/a"
        table.add_row("embedded judge: verdicts written unaided", f"{e['verdicts_unaided']}/{verdicts} ({rate})")
    console.print(table)
    console.print(f"scores:     {run.scores_path}")
    console.print(f"accounting: {run.accounting_path}")
    if run.quarantine_path:
        console.print(f"[yellow]quarantine: {run.quarantine_path} ({s.quarantined} rows, see 'reason')")


@app.command()
def pairs(
    scores: Path = typer.Option(..., "--scores", help="scores.parquet written by `longreward score`."),
    prompts: Path = typer.Option(..., "--prompts", help="The prompts that were scored."),
    candidates: Path = typer.Option(..., "--candidates", help="The candidates that were scored."),
    out: Path = typer.Option(..., "--out", help="Pairs Parquet file to write."),
    min_candidates: int = option(PairConfig, "min_candidates"),
    min_margin: float = option(PairConfig, "min_margin"),
) -> None:
    """Build DPO preference pairs (TRL conversational format) from scored candidates."""
    from longreward_core.pipeline.score import pairs_files

    with _input_errors():
        result = pairs_files(scores, prompts, candidates, out, PairConfig(min_candidates=min_candidates, min_margin=min_margin))
    console.print(f"{len(result.pairs)} pairs -> {out}")
    for reason, n in sorted(result.skipped.items()):
        console.print(f"  skipped {n} prompt(s): {reason}")


# ---------------------------------------------------------------------------------------------
# The preference build (a Prefect flow)


def _run_build(params: BuildParams) -> dict:
    from flows.preference_build import preference_build

    state = preference_build(params, return_state=True)
    if state.is_failed():
        _fail(f"build failed: {state.message}", 1)
    manifest = state.result()
    counts = manifest["counts"]
    console.print(
        f"{counts['prompts']} prompts, {counts['candidates']} candidates, {counts['scored']} scored, "
        f"{counts['pairs']} pairs; judge: {manifest['judge_accounting']['total']['calls']} requests, "
        f"{manifest['judge_accounting']['total']['cache_hits']} cache hits"
    )
    console.print(f"dataset:  {manifest['dataset_dir']}  (datasets.load_from_disk)")
    console.print(f"pairs:    {Path(manifest['manifest_path']).parent / 'pairs.parquet'}")
    console.print(f"manifest: {manifest['manifest_path']}")
    return manifest


@app.command()
def build(
    prompts: Path = option(BuildParams, "prompts", "--prompts"),
    out: Path = option(BuildParams, "output_dir", "--out"),
    candidates: Optional[Path] = option(BuildParams, "candidates", "--candidates"),
    policy_model: str = option(PolicyConfig, "model", "--policy-model"),
    policy_api_base: Optional[str] = option(PolicyConfig, "api_base", "--policy-api-base"),
    candidates_per_prompt: int = option(PolicyConfig, "candidates_per_prompt"),
    max_new_tokens: int = option(PolicyConfig, "max_new_tokens"),
    temperature: float = option(PolicyConfig, "temperature"),
    top_p: float = option(PolicyConfig, "top_p"),
    judge_model: str = option(JudgeConfig, "model", "--judge-model"),
    judge_api_base: Optional[str] = option(JudgeConfig, "api_base", "--judge-api-base"),
    concurrency: int = option(JudgeConfig, "concurrency", "--concurrency"),
    rpm: Optional[int] = option(JudgeConfig, "rpm", "--rpm"),
    timeout: float = option(JudgeConfig, "timeout_s", "--timeout"),
    policy_timeout: float = option(PolicyConfig, "timeout_s", "--policy-timeout"),
    policy_max_context_tokens: Optional[int] = option(PolicyConfig, "max_context_tokens", "--policy-max-context-tokens"),
    policy_allow_truncation: bool = option(PolicyConfig, "allow_truncation", "--policy-allow-truncation"),
    policy_sample_in_one_request: bool = option(PolicyConfig, "sample_in_one_request", "--policy-sample-in-one-request"),
    shard_size: int = option(BuildParams, "shard_size"),
    shards_in_flight: int = option(BuildParams, "shards_in_flight"),
    min_candidates: int = option(PairConfig, "min_candidates"),
    prune: bool = option(ScoringConfig, "prune", "--prune/--no-prune"),
    max_judge_cost_usd: Optional[float] = option(ScoringConfig, "max_judge_cost_usd", "--max-judge-cost-usd"),
    max_judge_tokens: Optional[int] = option(ScoringConfig, "max_judge_tokens", "--max-judge-tokens"),
    dask_address: Optional[str] = option(BuildParams, "dask_address"),
    run_date: Optional[str] = option(BuildParams, "run_date", help="YYYY-MM-DD (default: today, UTC)."),
    cache_url: Optional[str] = _cache_url(),
    batch: bool = option(JudgeConfig, "batch", "--batch/--no-batch"),
    batch_poll_s: float = option(JudgeConfig, "batch_poll_s", "--batch-poll-s"),
) -> None:
    """Build a DPO preference dataset: shard, sample, score, pair, publish (a Prefect flow)."""
    with _input_errors():
        params = BuildParams(
            prompts=str(prompts),
            candidates=str(candidates) if candidates else None,
            output_dir=str(out),
            run_date=date.fromisoformat(run_date) if run_date else None,
            shard_size=shard_size,
            shards_in_flight=shards_in_flight,
            dask_address=dask_address,
            cache_url=cache_url,
            policy=PolicyConfig(model=policy_model, api_base=policy_api_base, candidates_per_prompt=candidates_per_prompt,
                                max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                                timeout_s=policy_timeout, max_context_tokens=policy_max_context_tokens,
                                allow_truncation=policy_allow_truncation,
                                sample_in_one_request=policy_sample_in_one_request),
            judge=_judge_config(judge_model, judge_api_base, concurrency, rpm, timeout, batch, batch_poll_s),
            pairs=PairConfig(min_candidates=min_candidates),
            scoring=ScoringConfig(prune=prune, max_judge_cost_usd=max_judge_cost_usd, max_judge_tokens=max_judge_tokens),
        )
    _run_build(params)


@app.command()
def demo(
    out: Path = typer.Option(Path("out/demo"), "--out", help="Output root."),
    train: bool = typer.Option(False, "--train", help="Then one DPO step of SmolLM2-135M on the pairs (CPU, a few minutes)."),
) -> None:
    """The whole build on the bundled English + Chinese sample, offline, with the embedded models:
    5 candidates per prompt sampled from SmolLM2-135M, scored by the same model as judge."""
    console.print(
        "[bold]LongReward demo[/bold]: policy and judge are the embedded SmolLM2-135M-Instruct on the CPU. "
        "A model this small grades poorly; real runs point --judge-model at a capable model."
    )
    sample = resources.files("longreward_core") / "sample"
    manifest = _run_build(BuildParams(
        prompts=str(sample / "prompts.jsonl"),
        output_dir=str(out),
        shard_size=1,
        shards_in_flight=2,
        policy=PolicyConfig(candidates_per_prompt=5, max_new_tokens=64, concurrency=1, sample_in_one_request=True),
        judge=JudgeConfig(concurrency=1),
    ))
    if train:
        _run_demo_training(Path(manifest["manifest_path"]).parent)


def _run_demo_training(build: Path) -> None:
    from flows.dpo_train import dpo_train

    # Sample documents make ~5k-token pairs: one step of the 135M model with its reference
    # takes minutes on two cores.
    params = TrainParams(pairs=build, output_dir=build / "dpo", max_steps=1, effective_batch_size=1, save_steps=1,
                         accelerate_config="cpu", retries=0)
    state = dpo_train(params, return_state=True)
    if state.is_failed():
        _fail(f"training failed: {state.message or ''}", 1)
    manifest = state.result()
    last = manifest.last_log or {}
    console.print(f"DPO: {manifest.steps} step(s), loss {last.get('loss', float('nan')):.4f}; model: {manifest.model_dir}")


# ---------------------------------------------------------------------------------------------
# Training


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
        )
        manifest = launch_training(
            params.train_config(), params.accelerate_config, params.num_processes,
            on_line=lambda line: console.print(line, markup=False, highlight=False),
        )
    except (InputError, ValidationError, TrainingRefused, TrainingFailed, ValueError, FileNotFoundError) as exc:
        _fail(str(exc), 2)
    last = manifest.last_log or {}
    console.print(
        f"{manifest.steps} steps; loss {_fmt(last.get('loss'))}, reward margin {_fmt(last.get('rewards/margins'))}, "
        f"accuracy {_fmt(last.get('rewards/accuracies'))}"
    )
    console.print(f"model:    {manifest.model_dir}")
    console.print(f"manifest: {out / 'manifest.json'}")


# ---------------------------------------------------------------------------------------------
# Evaluation: `longreward eval ...`
#
#     longreward eval longbench-score --pred-dir DIR [--e]
#     longreward eval longbench --model M --datasets hotpotqa,trec --out DIR [--e]
#     longreward eval longbench-judge --pred-dir DIR/M --judge-model openai/gpt-4o
#     longreward eval longbench-v2 --model M --out DIR
#     longreward eval longbench-chat --model M --data LongBench_Chat/ --out DIR --judge-model openai/gpt-4o
#
# Prediction commands write `DIR/<model label>/` as LongBench's pred.py writes `pred/<model>/`, so
# `longbench-score --pred-dir DIR/<model label>` (or LongBench's own eval.py) scores them.

_OUT_HELP = "Output root: files go to OUT/<model label>/."
_DATASETS_HELP = "Comma-separated dataset names (default: all)."


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


_PARTIAL_HELP = "Accept a result computed from a subset of the cases (requests refused for good); it is marked partial."


def _evaluate(spec: dict[str, Any], benchmark: str, out: Path, cache_url: Optional[str], **options: Any) -> dict[str, Any]:
    from longreward_core.evaluation.evaluate import (
        EvaluationIncomplete,
        EvaluationPartial,
        evaluate_benchmark,
    )
    from longreward_core.models.call_cache import check_cache_url

    try:
        options["cache_path"] = check_cache_url(cache_url)
        model = ModelSpec(**spec)
        summary = evaluate_benchmark(model, benchmark, out / model.label, **options)
    except (InputError, ValidationError, ValueError) as exc:
        _fail(str(exc), 2)
    except EvaluationIncomplete as exc:
        _fail(str(exc), 1)
    except EvaluationPartial as exc:
        _print_scores(f"{model.label}: {benchmark} (partial)", exc.summary["scores"])
        _fail(f"{exc}: pass --allow-partial", 1)
    partial = " (partial)" if summary["partial"] else ""
    _print_scores(f"{model.label}: {benchmark}{partial}", summary["scores"])
    for run in summary["predictions"]:
        console.print(
            f"{run['file']}: {run['generated']} generated, {run['already_done']} already there, "
            f"{run['truncated_prompts']} prompts cut in the middle"
        )
    if summary.get("quarantined_inputs"):
        console.print(f"[yellow]{summary['quarantined_inputs']} dataset rows quarantined: {summary['input_quarantine']}")
    console.print(f"result: {summary['result_path']} ({summary['scored']} of {summary['cases']} cases scored)")
    return summary


@eval_app.command("longbench-score")
def longbench_score(
    pred_dir: Path = typer.Option(..., "--pred-dir", help="Folder of <dataset>.jsonl predictions (pred, answers, all_classes, length)."),
    e: bool = typer.Option(False, "--e", help="LongBench-E: scores by length bucket 0-4k / 4-8k / 8k+."),
) -> None:
    """Score predictions in LongBench's format into PRED_DIR/result.json, as LongBench's eval.py."""
    from longreward_core.evaluation.scoring import score_prediction_dir

    with _input_errors():
        report = score_prediction_dir(pred_dir, longbench_e=e)
    _print_scores("LongBench-E" if e else "LongBench", report.scores)
    console.print(f"result: {report.result_path}")
    if report.quarantine_path:
        console.print(f"[yellow]{len(report.quarantined)} rows quarantined (see 'reason'): {report.quarantine_path}")
    if report.unscored:
        _fail("; ".join(report.unscored.values()), 1)


@eval_app.command("longbench")
def longbench(
    model: str = option(ModelSpec, "model", "--model"),
    out: Path = typer.Option(..., "--out", help=_OUT_HELP),
    datasets: Optional[list[str]] = typer.Option(None, "--datasets", help=_DATASETS_HELP),
    e: bool = typer.Option(False, "--e", help="LongBench-E (its 13 datasets, scored by length bucket)."),
    data: Optional[str] = typer.Option(None, "--data", help="Folder of <dataset>.jsonl files or data.zip (default: the Hub)."),
    name: Optional[str] = option(ModelSpec, "name", "--name"),
    backend: str = option(ModelSpec, "backend", "--backend"),
    api_base: Optional[str] = option(ModelSpec, "api_base", "--api-base"),
    tokenizer: Optional[str] = option(ModelSpec, "tokenizer", "--tokenizer"),
    max_input_tokens: int = option(ModelSpec, "max_input_tokens", "--max-input-tokens"),
    concurrency: int = option(ModelSpec, "concurrency", "--concurrency"),
    timeout: float = option(ModelSpec, "timeout_s", "--timeout"),
    limit: Optional[int] = typer.Option(None, "--limit", min=1, help="At most this many examples per dataset (quick runs)."),
    allow_partial: bool = typer.Option(False, "--allow-partial", help=_PARTIAL_HELP),
    cache_url: Optional[str] = _cache_url(),
) -> None:
    """Generate LongBench answers (resumable) into OUT/<model>/<dataset>.jsonl and score them."""
    from longreward_core.evaluation.evaluate import DataSources

    spec = dict(model=model, name=name, backend=backend, api_base=api_base, tokenizer=tokenizer,
                max_input_tokens=max_input_tokens, concurrency=concurrency, timeout_s=timeout)
    _evaluate(spec, "longbench-e" if e else "longbench", out, cache_url, data=DataSources(longbench=data),
              datasets=_datasets(datasets), limit=limit, allow_partial=allow_partial)


@eval_app.command("longbench-judge")
def longbench_judge(
    pred_dir: Path = typer.Option(..., "--pred-dir", help="A model's LongBench prediction folder."),
    data: Optional[str] = typer.Option(None, "--data", help="The LongBench data the predictions answer (default: the Hub)."),
    datasets: Optional[list[str]] = typer.Option(None, "--datasets", help="Comma-separated (default: every judged dataset present)."),
    judge_model: str = option(JudgeConfig, "model", "--judge-model"),
    judge_api_base: Optional[str] = option(JudgeConfig, "api_base", "--judge-api-base"),
    judge_timeout: float = option(JudgeConfig, "timeout_s", "--timeout"),
    allow_partial: bool = typer.Option(False, "--allow-partial", help=_PARTIAL_HELP),
    cache_url: Optional[str] = _cache_url(),
) -> None:
    """The paper's judged LongBench (QA 1-3, summaries 1-5) into PRED_DIR/judged_result.json."""
    from longreward_core.evaluation.judging import judge_longbench_dir
    from longreward_core.models.call_cache import check_cache_url
    from longreward_core.models.client import CALL_CACHE_FILE

    with _input_errors():
        judge = JudgeConfig(model=judge_model, api_base=judge_api_base, timeout_s=judge_timeout)
        cache = check_cache_url(cache_url) or pred_dir.parent / CALL_CACHE_FILE
        run = judge_longbench_dir(pred_dir, judge, cache, source=data, datasets=_datasets(datasets))
    _print_scores("judged LongBench", run.scores)
    console.print(f"result: {run.result_path}; ratings: {run.ratings_path}")
    if run.unreachable:
        _fail(f"the judge could not be reached for {run.unreachable} answers; run again (verdicts received are cached)", 1)
    if run.judged < run.cases and not allow_partial:
        _fail(f"the result stands on {run.judged} of {run.cases} answers (no verdict for the others); pass --allow-partial", 1)


@eval_app.command("longbench-v2")
def longbench_v2(
    model: str = option(ModelSpec, "model", "--model"),
    out: Path = typer.Option(..., "--out", help=_OUT_HELP),
    data: Optional[str] = typer.Option(None, "--data", help="LongBench v2's data.json (default: the Hub)."),
    name: Optional[str] = option(ModelSpec, "name", "--name"),
    backend: str = option(ModelSpec, "backend", "--backend"),
    api_base: Optional[str] = option(ModelSpec, "api_base", "--api-base"),
    tokenizer: Optional[str] = option(ModelSpec, "tokenizer", "--tokenizer"),
    max_input_tokens: int = option(ModelSpec, "max_input_tokens", "--max-input-tokens", default=V2_MAX_INPUT_TOKENS),
    concurrency: int = option(ModelSpec, "concurrency", "--concurrency"),
    timeout: float = option(ModelSpec, "timeout_s", "--timeout"),
    limit: Optional[int] = typer.Option(None, "--limit", min=1, help="At most this many examples (quick runs)."),
    allow_partial: bool = typer.Option(False, "--allow-partial", help=_PARTIAL_HELP),
    cache_url: Optional[str] = _cache_url(),
) -> None:
    """Answer LongBench v2 (resumable) into OUT/<model>/predictions.jsonl; accuracy in result.json."""
    from longreward_core.evaluation.evaluate import DataSources

    spec = dict(model=model, name=name, backend=backend, api_base=api_base, tokenizer=tokenizer,
                max_input_tokens=max_input_tokens, concurrency=concurrency, timeout_s=timeout)
    _evaluate(spec, "longbench-v2", out, cache_url, data=DataSources(longbench_v2=data), limit=limit, allow_partial=allow_partial)


@eval_app.command("longbench-chat")
def longbench_chat(
    model: str = option(ModelSpec, "model", "--model"),
    out: Path = typer.Option(..., "--out", help=_OUT_HELP),
    data: str = typer.Option(..., "--data", help="Folder with test_cases.json and few_shots.json."),
    judge_model: str = option(JudgeConfig, "model", "--judge-model"),
    judge_api_base: Optional[str] = option(JudgeConfig, "api_base", "--judge-api-base"),
    judge_timeout: float = option(JudgeConfig, "timeout_s", "--judge-timeout"),
    name: Optional[str] = option(ModelSpec, "name", "--name"),
    backend: str = option(ModelSpec, "backend", "--backend"),
    api_base: Optional[str] = option(ModelSpec, "api_base", "--api-base"),
    tokenizer: Optional[str] = option(ModelSpec, "tokenizer", "--tokenizer"),
    max_input_tokens: int = option(ModelSpec, "max_input_tokens", "--max-input-tokens", default=CHAT_MAX_INPUT_TOKENS),
    concurrency: int = option(ModelSpec, "concurrency", "--concurrency"),
    timeout: float = option(ModelSpec, "timeout_s", "--timeout"),
    limit: Optional[int] = typer.Option(None, "--limit", min=1, help="At most this many cases (quick runs)."),
    allow_partial: bool = typer.Option(False, "--allow-partial", help=_PARTIAL_HELP),
    cache_url: Optional[str] = _cache_url(),
) -> None:
    """Answer LongBench-Chat and have the judge rate the answers 1-10 (OUT/<model>/judged_result.json)."""
    from longreward_core.evaluation.evaluate import DataSources

    spec = dict(model=model, name=name, backend=backend, api_base=api_base, tokenizer=tokenizer,
                max_input_tokens=max_input_tokens, concurrency=concurrency, timeout_s=timeout)
    _evaluate(spec, "longbench-chat", out, cache_url, data=DataSources(longbench_chat=data), limit=limit,
              judge=JudgeConfig(model=judge_model, api_base=judge_api_base, timeout_s=judge_timeout), allow_partial=allow_partial)


if __name__ == "__main__":
    app()

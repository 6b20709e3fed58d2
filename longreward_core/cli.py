"""The `longreward` command line: scoring, pairs and training (the library's own commands).

The orchestrated commands (`build`, `demo`) are added by flows/cli.py, which is the installed
entry point; this module stays free of Prefect.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from longreward_core.io import InputError
from longreward_core.judge import EMBEDDED_JUDGE, JUDGE_API_KEY_ENV, JudgeConfig
from longreward_core.pairs import PairConfig
from longreward_core.runs import ScoreRun, pairs_files, score_files
from longreward_core.scoring import ScoringConfig

app = typer.Typer(help="LongReward: LLM-judge rewards for long-context responses, and DPO pairs.", no_args_is_help=True)
console = Console()

JudgeModel = Annotated[str, typer.Option("--judge-model", help="litellm model string of the judge.")]
JudgeApiBase = Annotated[Optional[str], typer.Option("--judge-api-base", help="OpenAI-compatible base URL.")]
Concurrency = Annotated[int, typer.Option("--concurrency", min=1, help="Judge requests in flight.")]
Rpm = Annotated[Optional[int], typer.Option("--rpm", min=1, help="Judge requests per minute at most.")]


def _score(prompts: Path, candidates: Path, out: Path, judge: JudgeConfig, scoring: ScoringConfig) -> ScoreRun:
    with Progress(
        TextColumn("[bold]scoring"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), console=console
    ) as progress:
        task = progress.add_task("score", total=None)
        run = score_files(
            prompts,
            candidates,
            out,
            judge,
            scoring,
            on_start=lambda n: progress.update(task, total=n),
            on_scored=lambda _: progress.advance(task),
        )
    _print_summary(run)
    return run


def _print_summary(run: ScoreRun) -> None:
    s = run.summary
    table = Table(title="LongReward scores", show_header=True)
    table.add_column("")
    table.add_column("value", justify="right")
    for label, value in [
        ("prompts", s["prompts"]),
        ("candidates", s["candidates"]),
        ("scored", s["scored"]),
        ("failed", s["failed"]),
        ("quarantined rows", s["quarantined"]),
        ("mean reward", _fmt(s["mean_reward"])),
        *[(f"mean {d}", _fmt(v)) for d, v in s["mean_by_dimension"].items()],
        ("judge requests", s["judge"]["total"]["calls"]),
        ("judge cache hits", s["judge"]["total"]["cache_hits"]),
        ("judge tokens (prompt / completion)", f"{s['judge']['total']['prompt_tokens']} / {s['judge']['total']['completion_tokens']}"),
        ("judge cost (USD, where known)", f"{s['judge']['total']['cost_usd']:.4f}"),
        ("verdict parse failures (retried)", s["judge"]["total"]["parse_failures"]),
        ("transport errors (retried)", s["judge"]["total"]["transport_errors"]),
        ("chunk embeddings computed", s["chunk_embeddings"]),
        ("wall seconds", s["wall_seconds"]),
    ]:
        table.add_row(label, str(value))
    if "embedded_judge" in s:
        e = s["embedded_judge"]
        verdicts = e["verdicts_unaided"] + e["verdicts_constrained"]
        rate = f"{100 * e['verdicts_unaided'] / verdicts:.0f}%" if verdicts else "n/a"
        table.add_row("embedded judge: verdicts written unaided", f"{e['verdicts_unaided']}/{verdicts} ({rate})")
    console.print(table)
    console.print(f"scores:     {run.scores_path}")
    console.print(f"accounting: {run.accounting_path}")
    if run.quarantine_path:
        console.print(f"[yellow]quarantine: {run.quarantine_path} ({s['quarantined']} rows, see 'reason')")


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def _judge_config(model: str, api_base: Optional[str], concurrency: int, rpm: Optional[int]) -> JudgeConfig:
    key = os.environ.get(JUDGE_API_KEY_ENV)
    return JudgeConfig(model=model, api_base=api_base, api_key=key, concurrency=concurrency, rpm=rpm)


@app.command()
def score(
    prompts: Annotated[Path, typer.Option("--prompts", help="Prompts: JSONL or Parquet.")],
    candidates: Annotated[Path, typer.Option("--candidates", help="Candidates: JSONL or Parquet.")],
    out: Annotated[Path, typer.Option("--out", help="Output folder.")],
    judge_model: JudgeModel = EMBEDDED_JUDGE,
    judge_api_base: JudgeApiBase = None,
    concurrency: Concurrency = 8,
    rpm: Rpm = None,
    embedding_model: Annotated[Optional[str], typer.Option(help="litellm embedding model (default: embedded MiniLM).")] = None,
    qdrant_url: Annotated[Optional[str], typer.Option(help="Qdrant server URL (default: local folder in --out).")] = None,
    retrieval_chunk_tokens: Annotated[int, typer.Option(min=8)] = 128,
    completeness_chunk_tokens: Annotated[int, typer.Option(min=64)] = 4096,
) -> None:
    """Score candidates with LongReward: writes OUT/scores.parquet and OUT/accounting.json."""
    scoring = ScoringConfig(
        retrieval_chunk_tokens=retrieval_chunk_tokens,
        completeness_chunk_tokens=completeness_chunk_tokens,
        qdrant_url=qdrant_url,
        **({"embedding_model": embedding_model} if embedding_model else {}),
    )
    try:
        _score(prompts, candidates, out, _judge_config(judge_model, judge_api_base, concurrency, rpm), scoring)
    except InputError as exc:
        console.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(2) from None


@app.command()
def pairs(
    scores: Annotated[Path, typer.Option("--scores", help="scores.parquet written by `longreward score`.")],
    prompts: Annotated[Path, typer.Option("--prompts")],
    candidates: Annotated[Path, typer.Option("--candidates")],
    out: Annotated[Path, typer.Option("--out", help="Pairs Parquet file to write.")],
    min_candidates: Annotated[int, typer.Option(min=2)] = 5,
    min_margin: Annotated[float, typer.Option(min=0)] = 0.0,
) -> None:
    """Build DPO preference pairs (TRL conversational format) from scored candidates."""
    try:
        result = pairs_files(scores, prompts, candidates, out, PairConfig(min_candidates=min_candidates, min_margin=min_margin))
    except (InputError, ValueError) as exc:
        console.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(2) from None
    console.print(f"{len(result.pairs)} pairs -> {out}")
    for reason, n in sorted(result.skipped.items()):
        console.print(f"  skipped {n} prompt(s): {reason}")


@app.command()
def train(
    pairs: Annotated[Path, typer.Option("--pairs", help="A build folder, its pairs.parquet, or its dataset folder.")],
    out: Annotated[Path, typer.Option("--out", help="Run folder: checkpoints, model/, metrics.jsonl, manifest.json.")],
    base_model: Annotated[Optional[str], typer.Option(help="Policy checkpoint folder (default: embedded SmolLM2-135M).")] = None,
    ref_model: Annotated[Optional[str], typer.Option(help="Reference model folder (default: the base model).")] = None,
    max_steps: Annotated[int, typer.Option(help="Optimiser steps; -1: one pass over the data.")] = -1,
    beta: Annotated[float, typer.Option(min=0)] = 0.15,
    sft_weight: Annotated[float, typer.Option(min=0, help="Weight of the chosen response's cross-entropy.")] = 0.1,
    learning_rate: Annotated[float, typer.Option(min=0)] = 1e-6,
    effective_batch_size: Annotated[int, typer.Option(min=1)] = 16,
    per_device_batch_size: Annotated[int, typer.Option(min=1)] = 1,
    max_length: Annotated[Optional[int], typer.Option(min=16, help="Default: the longest pair.")] = None,
    allow_truncation: Annotated[bool, typer.Option(help="Train even if max_length drops or cuts pairs.")] = False,
    save_steps: Annotated[int, typer.Option(min=1, help="Checkpoint every N steps.")] = 50,
    accelerate_config: Annotated[str, typer.Option(help="auto, cpu, zero3-single-node, zero3-multi-node, or a file.")] = "auto",
    num_processes: Annotated[Optional[int], typer.Option(min=1, help="Processes (GPUs) in all.")] = None,
) -> None:
    """DPO with the LongReward loss under `accelerate launch`; re-running the same command resumes."""
    from longreward_core.launch import TrainingFailed, launch_training
    from longreward_core.training import TrainConfig, TrainingRefused

    config = TrainConfig(
        pairs=pairs, output_dir=out, base_model=base_model, ref_model=ref_model, max_steps=max_steps, beta=beta,
        sft_weight=sft_weight, learning_rate=learning_rate, effective_batch_size=effective_batch_size,
        per_device_batch_size=per_device_batch_size, max_length=max_length, allow_truncation=allow_truncation,
        save_steps=save_steps,
    )
    try:
        manifest = launch_training(config, accelerate_config, num_processes, on_line=lambda line: console.print(line, markup=False, highlight=False))
    except (InputError, TrainingRefused, TrainingFailed, ValueError, FileNotFoundError) as exc:
        console.print(f"[red]error:[/red] {escape(str(exc))}")
        raise typer.Exit(2) from None
    last = manifest["last_log"] or {}
    console.print(
        f"{manifest['steps']} steps; loss {_fmt(last.get('loss'))}, reward margin {_fmt(last.get('rewards/margins'))}, "
        f"accuracy {_fmt(last.get('rewards/accuracies'))}"
    )
    console.print(f"model:    {manifest['model_dir']}")
    console.print(f"manifest: {out / 'manifest.json'}")


if __name__ == "__main__":
    app()

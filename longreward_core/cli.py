"""The `longreward` command line: scoring and pairs (the library's own commands).

The orchestrated commands (`build`, `demo`) are added by flows/cli.py, which is the installed
entry point; this module stays free of Prefect.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
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


if __name__ == "__main__":
    app()

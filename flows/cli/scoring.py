"""`longreward score` and `longreward pairs`: score candidates from files, then pair them."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Optional

import typer
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
)
from rich.table import Table

from flows.cli.options import (
    BATCH_JUDGE,
    SCORING,
    cache_url_option,
    console,
    fail,
    fmt,
    grouped_options,
    input_errors,
    option,
)
from longreward_core.data.pairs import PairConfig
from longreward_core.reward.judge import JudgeConfig
from longreward_core.reward.scorer import ScoringConfig

if TYPE_CHECKING:
    from longreward_core.pipeline.score_files import ScoreRun
    from longreward_core.reward.batch_executor import WaveReport

app = typer.Typer()


@app.command()
@grouped_options
def score(
    prompts: Path = typer.Option(..., "--prompts", help="Prompts: JSONL or Parquet."),
    candidates: Path = typer.Option(..., "--candidates", help="Candidates: JSONL or Parquet."),
    out: Path = typer.Option(..., "--out", help="Output folder."),
    judge: JudgeConfig = BATCH_JUDGE,
    scoring: ScoringConfig = SCORING,
    min_candidates: int = option(PairConfig, "min_candidates", help="With --prune: the pair rule pruning keeps exact "
                                 "(use the same or a smaller --min-candidates with `longreward pairs`)."),
    cache_url: Optional[str] = cache_url_option(),
) -> None:
    """Score candidates with LongReward: writes OUT/scores.parquet and OUT/accounting.json.

    Exit codes: 0 when every candidate has its outcome (scored, or failed for a reason recorded in
    scores.parquet, such as a request the provider refused); 1 when nothing could be scored (an
    empty input too), the judge could not be reached for some candidates (run the same command
    again: every answer received is cached), the judge budget was reached (prompts left unscored;
    run again with a larger budget), storage failed for good mid-run (the call cache or the output
    disk: the message names it and what a re-run reuses); 2 on bad input or configuration
    (credentials refused or missing, an unknown model, a malformed api_base: the message names the fix).
    """
    from longreward_core.models.batch import BatchFailed
    from longreward_core.models.call_cache import check_cache_url
    from longreward_core.pipeline.score_files import score_files

    with input_errors():
        cache_path = check_cache_url(cache_url)
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
            except BatchFailed as exc:
                fail(str(exc), 1)
    _print_summary(run)
    s = run.summary
    if s.candidates == 0:
        fail(f"nothing to score: no valid candidates in {candidates}" + (f" for the {s.prompts} prompts" if s.prompts else ""), 1)
    if s.budget_reached:
        fail(budget_message(s.budget_reached, s.not_scored_prompts), 1)
    if s.unreachable:
        fail(f"the judge could not be reached for {s.unreachable} candidates; run the same command again "
             "(every answer received is cached)", 1)
    if s.scored == 0:
        fail("no candidate could be scored (see the 'error' column of scores.parquet)", 1)


def _print_wave(wave: WaveReport) -> None:
    batches = ", ".join(f"{batch_id} {status}" for batch_id, status in wave.status.items())
    console.print(f"wave {wave.wave}: {wave.lines} lines; {batches}; {wave.elapsed_s:.0f} s")


def budget_message(reached: str, not_scored: list[str]) -> str:
    """The 'budget reached' status: what was not scored, and how to go on."""
    named = ", ".join(not_scored[:20]) + (f", ... ({len(not_scored) - 20} more)" if len(not_scored) > 20 else "")
    return (f"budget reached: {reached}; {len(not_scored)} prompt(s) not scored: {named}. Run again with a larger "
            "budget to go on: everything done is cached and no call is repeated")


def _print_summary(run: ScoreRun) -> None:
    s = run.summary
    total = s.judge.total
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
        ("mean reward", fmt(s.mean_reward)),
        *[(f"mean {d}", fmt(v)) for d, v in s.mean_by_dimension.items()],
        ("judge requests", total.calls),
        ("  of them by batch", total.batch_calls),
        ("judge cache hits", total.cache_hits),
        ("judge tokens (prompt / completion)", f"{total.prompt_tokens} / {total.completion_tokens}"),
        ("judge cost (USD, where known)", f"{total.cost_usd:.4f}"),
        ("cacheable share of prompt tokens", "-" if total.cacheable_share is None else f"{100 * total.cacheable_share:.1f}%"),
        ("prompt tokens cached by the provider", total.cached_tokens),
        ("verdict parse failures (retried)", total.parse_failures),
        ("transport errors (retried)", total.transport_errors),
        ("chunk embeddings computed", s.chunk_embeddings),
        ("wall seconds", s.wall_seconds),
    ]:
        table.add_row(label, str(value))
    if s.embedded_judge is not None:
        e = s.embedded_judge
        verdicts = e.verdicts_unaided + e.verdicts_constrained
        rate = f"{100 * e.verdicts_unaided / verdicts:.0f}%" if verdicts else "n/a"
        table.add_row("embedded judge: verdicts written unaided", f"{e.verdicts_unaided}/{verdicts} ({rate})")
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
    from longreward_core.pipeline.score_files import pairs_files

    with input_errors():
        result = pairs_files(scores, prompts, candidates, out, PairConfig(min_candidates=min_candidates, min_margin=min_margin))
    console.print(f"{len(result.pairs)} pairs -> {out}")
    for reason, n in sorted(result.skipped.items()):
        console.print(f"  skipped {n} prompt(s): {reason}")

"""`longreward cache stats|prune|prune-outputs`: measure a call cache and keep it, and an output
root, bounded.

CACHE is the SQLite file (`call_cache.sqlite` in an output folder) or a PostgreSQL URL without a
password (PGPASSWORD or ~/.pgpass gives it, as for `--cache-url`). Pruning is safe while builds run:
the cache is pruned in short transactions, and an output root's newest build is never touched.
"""

from __future__ import annotations

import time
from collections import Counter
from pathlib import Path

import typer
from rich.table import Table

from flows.cli.options import console, input_errors

app = typer.Typer(help="Measure a call cache; prune it and an output root by age.", no_args_is_help=True)

CACHE_HELP = "The call cache: its SQLite file, or a PostgreSQL URL (postgresql://user@host:5432/db; password from PGPASSWORD)."
OLDER_THAN_HELP = "Remove what was last {} longer ago than this: a whole number and a unit, s, m, h or d (0s, 12h, 30d)."


def _open(cache: str):
    """The cache at CACHE: an existing SQLite file (never a new one), or a database URL without a password."""
    from longreward_core.models.call_cache import check_cache_url, is_database_url, open_call_cache

    if is_database_url(cache):
        return open_call_cache(check_cache_url(cache))
    if not Path(cache).is_file():
        raise FileNotFoundError(f"call cache not found: {cache} (a call_cache.sqlite file, or a postgresql:// URL)")
    return open_call_cache(cache)


def _size(n: int) -> str:
    return f"{n:,} B" if n < 1024 else f"{n:,} B ({n / 2**20:,.1f} MiB)"


@app.command()
def stats(cache: str = typer.Argument(..., metavar="CACHE", help=CACHE_HELP)) -> None:
    """Answers held by a call cache, the space it takes, by model and by age of last use. A cache
    made before answers carried their model and stamps is migrated first (its answers: model
    unknown, stored and used now)."""
    from longreward_core.models.call_cache import describe_location

    with input_errors():
        store = _open(cache)
        try:
            found = store.stats()
        finally:
            store.close()
    console.print(f"{describe_location(cache)}: {found.size.rows:,} answers, {_size(found.size.bytes)}")
    by_model = Table("model", "answers", "answer text")
    for model, rows, text in found.by_model:
        by_model.add_row(model, f"{rows:,}", _size(text))
    by_age = Table("last used", "answers")
    for bucket, rows in found.by_age:
        by_age.add_row(bucket, f"{rows:,}")
    console.print(by_model, by_age)


@app.command()
def prune(
    cache: str = typer.Argument(..., metavar="CACHE", help=CACHE_HELP),
    older_than: str = typer.Option(..., "--older-than", help=OLDER_THAN_HELP.format("used")),
) -> None:
    """Delete the answers of a call cache not used for longer than --older-than, in short
    transactions (safe while builds read and write it); answers stored or used meanwhile stay."""
    from longreward_core.pipeline.retention import parse_duration

    with input_errors():
        cutoff = time.time() - parse_duration(older_than).total_seconds()
        store = _open(cache)
        try:
            pruned = store.prune(cutoff)
        finally:
            store.close()
    console.print(
        f"removed {pruned.rows:,} answers not used for {older_than} ({_size(pruned.text_bytes)} of answer text); "
        f"the cache went from {_size(pruned.bytes_before)} to {_size(pruned.bytes_after)}: {pruned.space}"
    )


@app.command("prune-outputs")
def prune_outputs(
    root: Path = typer.Argument(..., metavar="ROOT", help="An output root (a build's output_dir)."),
    older_than: str = typer.Option(..., "--older-than", help=OLDER_THAN_HELP.format("modified")),
) -> None:
    """Remove under ROOT what builds leave behind and no later run needs, once older than
    --older-than: Prefect result records in .prefect-results, the Qdrant stores of builds, score
    spools of killed runs. Published datasets and the call cache stay; nothing of the newest build
    (the running one, or the last) is touched."""
    from longreward_core.pipeline import retention

    with input_errors():
        cutoff = time.time() - retention.parse_duration(older_than).total_seconds()
        removed = retention.prune_outputs(root, cutoff)
    count, size = Counter(r.kind for r in removed), Counter()
    for r in removed:
        size[r.kind] += r.bytes
        if r.kind != "prefect result":  # records are many and named by hashes: counted only
            console.print(f"removed {r.kind} {r.path} ({_size(r.bytes)})")
    for kind in ("prefect result", "qdrant store", "spool"):
        console.print(f"{kind}s: {count[kind]:,} removed, {_size(size[kind])}")
    console.print(f"total: {len(removed):,} removed, {_size(sum(size.values()))} freed under {root}")

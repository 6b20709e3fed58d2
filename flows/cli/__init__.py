"""The `longreward` command line: one module per command group.

- `scoring`: `score`, `pairs`;
- `build`: `build`, `demo` (the preference-build flow);
- `train`: `train` (DPO);
- `evaluation`: `eval ...` (the LongBench family);
- `cache`: `cache stats|prune|prune-outputs` (call caches and output roots kept bounded).

Each module holds a `typer.Typer` of its commands; a new group is a module beside them, added
below (`add_typer(module.app)` puts its commands at the top level, `name=` makes them a
subcommand group, as `eval`). What the commands share (options read from config fields, the
judge's and the evaluated model's option groups, the error exits) is in `options`. Keys are
never options: they come from the environment (see `resolve_api_key`).
"""

from __future__ import annotations

import typer

from flows.cli import build, cache, evaluation, scoring, train

app = typer.Typer(help="LongReward: LLM-judge rewards for long-context responses, and DPO pairs.", no_args_is_help=True)
app.add_typer(scoring.app)
app.add_typer(build.app)
app.add_typer(train.app)
app.add_typer(evaluation.app, name="eval")
app.add_typer(cache.app, name="cache")

__all__ = ["app"]

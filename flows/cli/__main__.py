"""`python -m flows.cli`: the `longreward` command line."""

from flows.cli import app

app()

"""The PostgreSQL call cache restarted (`pg_ctl restart -m fast`) while `longreward score` runs:
no request is sent while it is down, the paid answers are stored once it is back, and the run
completes with no failed candidate and no answer paid twice.

Needs the stack's PostgreSQL ($LONGREWARD_TEST_PG_URL, its cluster under
$LONGREWARD_STACK_DIR/pg/data, run by the `postgres` user, as `infra/stack/stack.sh up` makes it)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import polars as pl
import psycopg
import pytest
from typer.testing import CliRunner

from flows.cli import app
from longreward_core.models.call_cache import TABLE
from longreward_testing.scenarios import TEST_API_KEY, write_inputs
from tests.stack.test_call_cache_pg import pg_url  # noqa: F401 (the fixture)

RESTART_AT = 30  # the judge request at whose arrival the database restarts


def restart_postgres() -> None:
    stack = os.environ.get("LONGREWARD_STACK_DIR")
    if not stack:
        pytest.fail("LONGREWARD_STACK_DIR is not set: run `make test-stack`", pytrace=False)
    data = Path(stack) / "pg" / "data"
    subprocess.run(
        ["runuser", "-u", "postgres", "--", "pg_ctl", "-D", str(data), "-l", str(Path(stack) / "pg" / "server.log"),
         "-m", "fast", "-w", "restart"],
        check=True, capture_output=True, timeout=60,
    )


def test_a_cache_database_restarted_mid_run_loses_no_answer(judge_server, pg_url, tmp_path, monkeypatch):  # noqa: F811
    monkeypatch.setenv("LONGREWARD_JUDGE_API_KEY", TEST_API_KEY)
    double = judge_server.double
    restarted = []

    def restart(request, index):
        if index == RESTART_AT:
            restart_postgres()  # the answer to this request waits for it, the others find the cache down
            restarted.append(index)

    double.fault_rule = restart
    prompts, candidates = write_inputs(tmp_path, n_prompts=4)
    result = CliRunner().invoke(app, [
        "score", "--prompts", str(prompts), "--candidates", str(candidates), "--out", str(tmp_path / "out"),
        "--cache-url", pg_url, "--judge-model", "openai/judge-double", "--judge-api-base", judge_server.api_base,
        "--retrieval-chunk-tokens", "32", "--completeness-chunk-tokens", "256",
    ])
    assert restarted and result.exit_code == 0, result.output
    scores = pl.read_parquet(tmp_path / "out" / "scores.parquet")
    assert scores.height == 20 and scores["status"].to_list() == ["scored"] * 20
    sent = [(r.task, r.temperature, r.content) for r in double.requests]
    assert len(set(sent)) == len(sent)  # nothing paid twice
    with psycopg.connect(pg_url) as db:
        assert db.execute(f"SELECT count(*) FROM {TABLE}").fetchone()[0] == len(sent)  # every paid answer stored

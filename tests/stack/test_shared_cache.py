"""Two workers, on "hosts" that share no files, build overlapping inputs against one PostgreSQL
call cache (the stack's database): the second pays only for what the first never asked.

Each worker has its own home and model cache folder and each run its own output folder, so the
only thing the two runs share is the database. Runs in its own module, before test_stack.py, with
workers of its own (the session worker of test_stack.py is not started yet).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import polars as pl
import pytest

from longreward_testing.scenarios import write_inputs
from tests.stack.conftest import (
    NIGHTLY,
    Worker,
    build_params,
    run_logs,
    start_run,
    wait_final,
    worker_env,
)

pytestmark = pytest.mark.timeout(600)


def host_worker(name: str, folder: Path) -> Worker:
    home = folder / name
    home.mkdir()
    env = worker_env(HOME=str(home), LONGREWARD_CACHE=str(home / "cache"), PREFECT_HOME=str(home / "prefect"))
    env.pop("PGPASSWORD", None)  # the database password comes from the Secret block the run names
    return Worker(name, env)


def run_on(name: str, folder: Path, params: dict) -> tuple[str, object]:
    worker = host_worker(name, folder)
    try:
        run_id = start_run(NIGHTLY, params)
        return run_id, wait_final(run_id, worker=worker)
    finally:
        worker.stop()


def test_two_workers_share_the_postgresql_call_cache(deployed, judge, tmp_path):
    prompts, candidates = write_inputs(tmp_path, n_prompts=5)
    rows = prompts.read_text().splitlines(keepends=True)
    first, second = tmp_path / "first.jsonl", tmp_path / "second.jsonl"
    first.write_text("".join(rows[0:3]))  # p0 p1 p2
    second.write_text("".join(rows[1:5]))  # p1 p2 p3 p4: p1 and p2 were judged on the first host
    cache_url = os.environ["LONGREWARD_TEST_PG_URL"]
    password = os.environ["PGPASSWORD"]
    from prefect.blocks.system import Secret

    Secret(value=password).save("stack-cache-password", overwrite=True)
    shared = {"cache_url": cache_url, "cache_password_secret": "stack-cache-password"}

    params_a = build_params(tmp_path / "host-a", judge, first, candidates, **shared)
    run_a, done_a = run_on("host-a", tmp_path, params_a)
    assert done_a.state.type.value == "COMPLETED", done_a.state.message
    paid_by_a = {r.content for r in judge.double.requests}
    judge.double.reset()

    params_b = build_params(tmp_path / "host-b", judge, second, candidates, **shared)
    run_b, done_b = run_on("host-b", tmp_path, params_b)
    assert done_b.state.type.value == "COMPLETED", done_b.state.message
    paid_by_b = [r.content for r in judge.double.requests]

    # Each run was taken by its own worker.
    assert any("Worker 'host-a'" in line for line in run_logs(run_a))
    assert any("Worker 'host-b'" in line for line in run_logs(run_b))
    # No request paid twice: not within a run, and not the second host for what the first paid.
    assert paid_by_b and len(set(paid_by_b)) == len(paid_by_b)
    assert not paid_by_a & set(paid_by_b)
    assert not any(topic in body for body in paid_by_b for topic in ("BIRCH", "CEDAR"))  # p1, p2
    # The second host's build holds all four prompts' pairs, the shared ones from the cache.
    pairs = pl.read_parquet(tmp_path / "host-b" / "builds" / "2026-11-21" / "pairs.parquet")
    assert sorted(pairs["prompt_id"].to_list()) == ["p1", "p2", "p3", "p4"]
    manifest = json.loads((tmp_path / "host-b" / "builds" / "2026-11-21" / "manifest.json").read_text())
    assert manifest["judge_accounting"]["total"]["cache_hits"] > 0
    assert not (tmp_path / "host-b" / "builds" / "call_cache.sqlite").exists()
    # The password reached the workers through the Secret block and was written nowhere.
    assert not [p for p in tmp_path.rglob("*") if p.is_file() and password.encode() in p.read_bytes()]
    assert not any(password in line for run in (run_a, run_b) for line in run_logs(run))

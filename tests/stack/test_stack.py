"""The deployed project on a real Prefect stack (PostgreSQL, Redis, server + services, a `cpu`
process worker), with the loopback judge double serving the judge and the policy.

Each test starts runs the way an operator does (`prefect deployment run`, `prefect flow-run
retry`) and reads back what the server and the judge saw.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import urllib.error
import urllib.request
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from longreward_testing.judge_double import Fault, JudgeDouble
from longreward_testing.scenarios import TEST_API_KEY, write_inputs
from tests.stack.browser import browser, logged_in
from tests.stack.conftest import (
    NIGHTLY,
    build_params,
    prefect,
    published_pairs,
    run_logs,
    start_run,
    task_states,
    wait_final,
)
from tests.test_flow import cedar_logicality_outage

pytestmark = pytest.mark.timeout(600)

ROOT = Path(__file__).resolve().parents[2]
SCREENSHOTS = ROOT / "out" / "stack" / "ui"  # kept after the stack is removed


def test_a_deployment_run_of_the_nightly_build_completes_and_publishes(worker, judge, tmp_path):
    prompts, candidates = write_inputs(tmp_path, n_prompts=3)
    run_id = start_run(NIGHTLY, build_params(tmp_path, judge, prompts, candidates))
    run = wait_final(run_id, worker=worker)
    assert run.state.type.value == "COMPLETED", run.state.message
    pairs = published_pairs(tmp_path)
    assert pairs["chosen_id"].to_list() == ["p0-0", "p1-0", "p2-0"]
    assert pairs["rejected_id"].to_list() == ["p0-4", "p1-4", "p2-4"]
    # The key came from the worker's environment; it is in no log line and no parameter.
    logs = run_logs(run_id)
    assert logs and not any(TEST_API_KEY in line for line in logs)
    assert TEST_API_KEY not in json.dumps(run.parameters)
    assert set(judge.double.authorization) == {f"Bearer {TEST_API_KEY}"}

    # What the user sees: the build's artifacts rendered by Prefect's UI in a browser, once logged in.
    artifacts = {artifact.key: artifact for artifact in asyncio.run(_artifacts(run_id)) if artifact.key}
    assert {"shards", "rewards", "judge-accounting"} <= set(artifacts), sorted(artifacts)
    with logged_in() as page:
        shards_page = page.open(f"/artifacts/artifact/{artifacts['shards'].id}", until="shard-0000")
        assert "shard-0001" in shards_page
        _png(page.screenshot(SCREENSHOTS / "shards.png", width=1400, height=1200))
        page.open(f"/artifacts/artifact/{artifacts['judge-accounting'].id}", until="helpfulness")
        rewards_page = page.open(f"/artifacts/artifact/{artifacts['rewards'].id}", until='<img src="data:image/png;base64,')
        assert "Reward histogram" in rewards_page
        _png(page.screenshot(SCREENSHOTS / "rewards.png", width=1400, height=1200))


def _png(path: Path) -> None:
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_api_and_the_ui_ask_strangers_for_the_auth_string(deployed):
    api = os.environ["PREFECT_API_URL"]
    # The health check answers anyone (compose's health check and load balancers use it).
    assert _status(f"{api}/health") == 200
    for headers in ({}, {"Authorization": "Basic " + base64.b64encode(b"longreward:wrong").decode()}):
        assert _status(f"{api}/deployments/filter", headers, body=b"{}") == 401
        assert _status(f"{api}/flow_runs/filter", headers, body=b"{}") == 401
    token = base64.b64encode(os.environ["PREFECT_API_AUTH_STRING"].encode()).decode()
    assert _status(f"{api}/deployments/filter", {"Authorization": f"Basic {token}"}, body=b"{}") == 200
    # The UI of a browser that has not logged in shows the login form, not the runs.
    with browser() as page:
        page.open("/runs", until='placeholder="admin:pass"')


def _status(url: str, headers: dict[str, str] | None = None, body: bytes | None = None) -> int:
    request = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status
    except urllib.error.HTTPError as error:
        return error.code


async def _artifacts(run_id: str):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    async with get_client() as client:
        return await client.read_artifacts(artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[run_id])))


def test_a_policy_outage_fails_sampling_and_a_retry_publishes(worker, judge, tmp_path):
    double = judge.double
    # Candidates of 1 to 5 sentences: helpfulness (by length) tells them apart.
    double.answers["unknown"] = lambda r: "The mill closed in 1960 after a fire. " * (1 + len(double.requests) % 5)
    outage = {"on": True}
    double.fault_rule = lambda r, i: Fault("status", 503) if outage["on"] and r.task == "unknown" else None
    prompts, _ = write_inputs(tmp_path, n_prompts=2)
    policy = {"model": "openai/policy-double", "api_base": judge.api_base, "candidates_per_prompt": 5,
              "max_context_tokens": 4096, "max_new_tokens": 32, "timeout_s": 5.0, "transport_retries": 1,
              "backoff_initial_s": 0.01, "backoff_max_s": 0.05}
    run_id = start_run(NIGHTLY, build_params(tmp_path, judge, prompts, None, policy=policy))
    run = wait_final(run_id, worker=worker)
    assert run.state.type.value == "FAILED"
    assert not (tmp_path / "builds" / "2026-11-21" / "pairs.parquet").exists()
    assert double.count("unknown") > 0 and double.count("helpfulness") == 0

    outage["on"] = False
    prefect("flow-run", "retry", run_id)
    run = wait_final(run_id, worker=worker)
    assert run.state.type.value == "COMPLETED", run.state.message
    assert run.run_count == 2
    assert published_pairs(tmp_path).height == 2


def test_a_judge_outage_on_one_shard_is_retried_paying_only_what_never_succeeded(worker, judge, tmp_path):
    double = judge.double
    outage = cedar_logicality_outage(double)
    prompts, candidates = write_inputs(tmp_path, n_prompts=5)
    run_id = start_run(NIGHTLY, build_params(tmp_path, judge, prompts, candidates))
    run = wait_final(run_id, worker=worker)
    assert run.state.type.value == "FAILED"
    assert "shard-0001" in run.state.message and "shard-0000" not in run.state.message and "shard-0002" not in run.state.message
    answered = {r.content for r, fault in zip(double.requests, _faulted(double)) if not fault}

    outage["on"] = False
    double.reset()
    prefect("flow-run", "retry", run_id)
    run = wait_final(run_id, worker=worker)
    assert run.state.type.value == "COMPLETED", run.state.message
    # Only the calls that never got an answer: one logicality verdict per CEDAR candidate.
    assert double.counts() == {"logicality": 5}
    assert all("CEDAR" in r.content and r.content not in answered for r in double.requests)
    states = task_states(run_id)
    cached_scores = [name for name, state in states if name.startswith("score-shard") and state == "Cached"]
    assert len(cached_scores) == 2, states  # shard-0000 and shard-0002 come back from the first attempt
    assert published_pairs(tmp_path).height == 5


def _faulted(double: JudgeDouble) -> list[bool]:
    hit = {index for index, _ in double.injected}
    return [index in hit for index in range(len(double.requests))]


def test_a_judge_limit_of_3_holds_across_four_shards_of_concurrency_8(worker, judge, tmp_path):
    judge.double.latency_s = 0.1
    prefect("gcl", "update", "longreward-judge", "--limit", "3")
    try:
        prompts, candidates = write_inputs(tmp_path, n_prompts=4)
        params = build_params(tmp_path, judge, prompts, candidates, shard_size=1, shards_in_flight=4)
        run_id = start_run(NIGHTLY, params)
        run = wait_final(run_id, worker=worker)
    finally:
        prefect("gcl", "update", "longreward-judge", "--limit", "16")
    assert run.state.type.value == "COMPLETED", run.state.message
    assert published_pairs(tmp_path).height == 4
    assert 1 <= judge.double.max_in_flight <= 3


def test_the_scheduler_creates_runs_and_the_worker_completes_one(worker, judge, tmp_path):
    # The nightly's cron schedule has upcoming runs, created by the scheduler service.
    upcoming = prefect("flow-run", "ls", "--state", "SCHEDULED", "--flow-name", "preference-build")
    assert "SCHEDULED" in upcoming or "Scheduled" in upcoming, upcoming
    # A scheduled deployment of the same flow whose first slot is 20 s away: the scheduler creates
    # the run and the worker picks it up when it is due. (Hourly from then on, so that no second
    # run starts while this one is checked.)
    prompts, candidates = write_inputs(tmp_path, n_prompts=2)
    params = build_params(tmp_path, judge, prompts, candidates)
    prefect("--no-prompt", "deploy", "flows/preference_build.py:preference_build", "--name", "hourly-check",
            "--pool", "cpu", "--params", json.dumps({"params": params}))
    try:
        # The schedule comes after the deployment: `prefect deploy` can take longer than the lead
        # on a busy machine, and a first slot already past would put the first run an hour later.
        first_slot = (datetime.now(UTC) + timedelta(seconds=20)).isoformat()
        prefect("deployment", "schedule", "create", "preference-build/hourly-check", "--interval", "3600",
                "--anchor-date", first_slot)
        run_id = _first_scheduled_run("hourly-check", within_s=90)
        run = wait_final(run_id, timeout_s=300, worker=worker)
    finally:
        prefect("deployment", "delete", "preference-build/hourly-check")
    assert run.state.type.value == "COMPLETED", run.state.message
    assert run.auto_scheduled  # created by the scheduler, not by hand
    assert published_pairs(tmp_path).height == 2


def _first_scheduled_run(deployment_name: str, within_s: float) -> str:
    import time

    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        runs = asyncio.run(_deployment_runs(deployment_name))
        if runs:
            return str(min(runs, key=lambda r: r.expected_start_time).id)
        time.sleep(2)
    raise AssertionError(f"the scheduler created no run of {deployment_name} within {within_s} s")


async def _deployment_runs(deployment_name: str):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterName

    async with get_client() as client:
        return await client.read_flow_runs(deployment_filter=DeploymentFilter(name=DeploymentFilterName(any_=[deployment_name])))

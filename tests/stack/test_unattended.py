"""The nightly unattended, on the stack: a worker killed mid-run, the automations of
infra/stack/automations.py that end such a run and retry it, and the notification of a run
that needs someone.

(This file runs after test_stack.py: its worker-kill test stops the session's worker and starts
it again, which tests that start their own workers before the session's must not see.)"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import time
import urllib.request
from datetime import UTC, datetime
from pathlib import Path

import pytest

from tests.stack.conftest import (
    BIN,
    NIGHTLY,
    ROOT,
    Worker,
    build_params,
    cli_env,
    judge_for,
    published_pairs,
    read_run,
    start_run,
    task_states,
    worker_env,
)
from tests.test_flow import write_inputs

pytestmark = pytest.mark.timeout(600)

ZOMBIE_AFTER_S = int(os.environ.get("LONGREWARD_ZOMBIE_AFTER_S", "0"))
HEARTBEAT_S = int(os.environ.get("PREFECT_FLOWS_HEARTBEAT_FREQUENCY", "0"))


def _load_automations_module():
    import importlib.util

    spec = importlib.util.spec_from_file_location("longreward_automations", ROOT / "infra" / "stack" / "automations.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


automations = _load_automations_module()


async def _automations_named(name: str):
    from prefect.client.orchestration import get_client

    async with get_client() as client:
        return await client.read_automations_by_name(name)


def test_deploying_again_updates_the_automations_and_adds_none(deployed):
    for _ in range(2):
        done = subprocess.run([str(BIN / "python"), "infra/stack/automations.py"], cwd=ROOT, env=cli_env(),
                              capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stdout + done.stderr
        assert "updated" in done.stdout
    for name in (automations.ZOMBIE_AUTOMATION, automations.RETRY_AUTOMATION):
        (found,) = asyncio.run(_automations_named(name))
        assert found.enabled
    (zombie,) = asyncio.run(_automations_named(automations.ZOMBIE_AUTOMATION))
    assert zombie.trigger.within.total_seconds() == ZOMBIE_AFTER_S


async def _run_states(run_id: str):
    from prefect.client.orchestration import get_client

    async with get_client() as client:
        return await client.read_flow_run_states(run_id)


def _flow_run_processes(run_id: str) -> list[int]:
    """The processes executing flow run `run_id` (the process worker puts its id in their environment)."""
    marker = f"PREFECT__FLOW_RUN_ID={run_id}".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if marker in (entry / "environ").read_bytes().split(b"\0"):
                    found.append(int(entry.name))
            except OSError:
                continue
    return found


def _wait(what: str, condition, timeout_s: float, every_s: float = 0.25):
    deadline = time.monotonic() + timeout_s
    while not (value := condition()):
        assert time.monotonic() < deadline, f"{what}: not within {timeout_s} s"
        time.sleep(every_s)
    return value


def test_a_worker_killed_mid_scoring_leaves_a_crashed_run_that_is_retried_and_resumes(worker, judge, tmp_path):
    assert HEARTBEAT_S and ZOMBIE_AFTER_S, "the stack's env sets the heartbeat and the automation's threshold"
    double = judge.double
    double.latency_s = 0.3  # each shard scores for several seconds: time to kill the worker mid-shard
    prompts, candidates = write_inputs(tmp_path, n_prompts=3)
    params = build_params(tmp_path, judge, prompts, candidates, shard_size=1, shards_in_flight=1,
                          judge=judge_for(judge, concurrency=2))

    worker.stop()  # the run must land on the worker that is killed
    victim = Worker("stack-victim", worker_env())
    try:
        _wait("the worker's health check", lambda: _health(victim.health_url) == 200, timeout_s=60)
        run_id = start_run(NIGHTLY, params)

        def mid_scoring() -> bool:
            states = dict(task_states(run_id))
            return states.get("score-shard-0000") == "Completed" and states.get("score-shard-0001") == "Running"

        _wait("shard-0000 scored and shard-0001 scoring", mid_scoring, timeout_s=240, every_s=0.5)
        asked = double.count()
        _wait("shard-0001's first judge answers", lambda: double.count() > asked + 4, timeout_s=60)
        processes = _flow_run_processes(run_id)
        assert processes, "no process runs the flow run"
        os.killpg(victim.process.pid, signal.SIGKILL)
        for pid in processes:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        killed_at = datetime.now(UTC)
        in_flight = double.in_flight
        asked_before = {r.content for r in double.requests}
        victim.process.wait(timeout=30)
    finally:
        victim.stop()
    assert read_run(run_id).state.type.value == "RUNNING"  # what a killed worker leaves behind
    double.reset()

    worker.start()  # the worker comes back (compose restarts its container), as another would
    run = _wait("the run to crash, be retried and complete",
                lambda: (r := read_run(run_id)).state.type.value == "COMPLETED" and r,
                timeout_s=ZOMBIE_AFTER_S + 4 * HEARTBEAT_S + 180, every_s=2)

    states = asyncio.run(_run_states(run_id))
    crashed = [s for s in states if s.type.value == "CRASHED"]
    assert [s.message for s in crashed] == [automations.ZOMBIE_MESSAGE], [(s.name, s.message) for s in states]
    # Crashed within the automation's threshold of the last heartbeat, which came before the kill
    # (plus the triggers service's evaluation period).
    assert (crashed[0].timestamp - killed_at).total_seconds() <= ZOMBIE_AFTER_S + 15
    retried = [s for s in states if s.name == "AwaitingRetry" and s.timestamp > crashed[0].timestamp]
    assert retried, [(s.name, s.message) for s in states]
    assert run.run_count == 2
    # The retry resumed: shard-0000 came back from the cache, and the judge was asked again at
    # most what was in flight when the worker died (the judge's concurrency is 2).
    shards = task_states(run_id)
    assert ("score-shard-0000", "Cached") in shards, shards
    repeated = {r.content for r in double.requests} & asked_before
    assert len(repeated) <= max(in_flight, 2), (len(repeated), in_flight)
    assert double.count() > 0  # shard-0001's rest and shard-0002 were asked for
    assert published_pairs(tmp_path).height == 3


def _health(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status
    except OSError:
        return 0

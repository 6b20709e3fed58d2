"""The nightly unattended, on the stack: a worker killed mid-run, the automations of
infra/stack/automations.py that end such a run and retry it, and the notification of a run
that needs someone.

(This file runs after test_stack.py: its worker-kill test stops the session's worker and starts
it again, which tests that start their own workers before the session's must not see.)"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import signal
import subprocess
import threading
import time
import urllib.request
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
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
    wait_final,
    worker_env,
)
from longreward_testing.judge_double import Fault, sentences, slot
from longreward_testing.scenarios import TEST_API_KEY, write_inputs
from tests.test_flow import cedar_logicality_outage

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


def run_automations_script(**settings: str) -> str:
    """`python infra/stack/automations.py` (deploy.sh's last line) with these settings; its output."""
    done = subprocess.run([str(BIN / "python"), "infra/stack/automations.py"], cwd=ROOT, env=cli_env(**settings),
                          capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def test_deploying_again_updates_the_automations_and_adds_none(deployed):
    for _ in range(2):
        assert "updated" in run_automations_script()
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
    double.latency_s = 1.0  # a shard scores for ~10 s: time to see shard-0000 done and kill mid shard-0001
    prompts, candidates = write_inputs(tmp_path, n_prompts=3)
    params = build_params(tmp_path, judge, prompts, candidates, shard_size=1, shards_in_flight=1,
                          judge=judge_for(judge, concurrency=2))

    worker.stop()  # the run must land on the worker that is killed
    victim = Worker("stack-victim", worker_env())
    try:
        _wait("the worker's health check", lambda: _health(victim.health_url) == 200, timeout_s=60)
        run_id = start_run(NIGHTLY, params)

        _wait("shard-0000 scored", lambda: ("score-shard-0000", "Completed") in task_states(run_id), timeout_s=240, every_s=0.5)
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
    double.latency_s = 0.0

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
    assert ("score-shard-0000", "Cached") in shards and ("score-shard-0001", "Cached") not in shards, shards
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


class WebhookReceiver:
    """A loopback HTTP server standing in for Slack: it keeps the body of every POST."""

    def __init__(self):
        received = self.received = []

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (http.server's naming)
                received.append((self.path, self.rfile.read(int(self.headers.get("Content-Length", 0))).decode()))
                self.send_response(200)
                self.end_headers()

            def log_message(self, *args) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    def message_about(self, run_id: str, timeout_s: float = 120) -> str:
        """The text of the first message that names the run."""
        bodies = _wait(f"a message about {run_id}", lambda: [b for _, b in self.received if run_id in b], timeout_s, every_s=1)
        return json.loads(bodies[0])["text"]

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()


async def _block_data(name: str) -> dict:
    from prefect.client.orchestration import get_client

    async with get_client() as client:
        return (await client.read_block_document_by_name(name, block_type_slug="webhook", include_secrets=False)).data


def test_someone_is_told_of_a_failed_nightly_and_of_one_that_needs_review_and_no_secret_is_in_it(worker, judge, tmp_path):
    receiver = WebhookReceiver()
    hook_secret = secrets.token_hex(16)
    try:
        out = run_automations_script(LONGREWARD_NOTIFY_WEBHOOK_URL=f"{receiver.url}/hooks/{hook_secret}",
                                     LONGREWARD_NOTIFY_FAILED_SHARE="0.2")
        assert automations.NOTIFY_FAILED_AUTOMATION in out and automations.NOTIFY_REVIEW_AUTOMATION in out
        # The URL is a secret field of the block: the UI and the API show it masked.
        assert hook_secret not in json.dumps(asyncio.run(_block_data(automations.NOTIFY_BLOCK)))

        # A judge outage fails shard-0001 (CEDAR) of two: the run ends Failed.
        double = judge.double
        outage = cedar_logicality_outage(double)
        prompts, candidates = write_inputs(tmp_path, n_prompts=3)
        failed_id = start_run(NIGHTLY, build_params(tmp_path / "failed", judge, prompts, candidates))
        failed = wait_final(failed_id, worker=worker)
        assert failed.state.type.value == "FAILED"
        text = receiver.message_about(failed_id)
        assert failed.name in text and "ended Failed on attempt 1" in text
        assert "1 of 2 shards failed: shard-0001" in text
        assert f"prefect flow-run retry {failed_id}" in text

        # Two of each prompt's five candidates are refused by the provider for good (HTTP 400):
        # 40% without a reward, above the 20% set above. The build is published, and told.
        outage["on"] = False
        double.fault_rule = lambda r, i: (Fault("status", 400) if r.task == "helpfulness"
                                          and len(sentences(slot(r.content, "response"))) <= 2 else None)
        review_id = start_run(NIGHTLY, build_params(tmp_path / "review", judge, prompts, candidates))
        review = wait_final(review_id, worker=worker)
        assert review.state.type.value == "COMPLETED", review.state.message
        review_text = receiver.message_about(review_id)
        assert review.name in review_text and "6 of 15 candidates without a reward (40.0%, above 20.0%)" in review_text
        assert "6 refused by the provider for good" in review_text and "no shard failed" in review_text
    finally:
        receiver.close()
    # Nothing secret went out: not the judge's key, the API's auth string, the database password
    # nor the webhook's own URL.
    bodies = "\n".join(body for _, body in receiver.received)
    for secret in (TEST_API_KEY, os.environ["PREFECT_API_AUTH_STRING"], os.environ["PGPASSWORD"], hook_secret):
        assert secret not in bodies
    assert {path for path, _ in receiver.received} == {f"/hooks/{hook_secret}"}

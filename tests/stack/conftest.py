"""The stack suite's fixtures: a real Prefect server (PostgreSQL, Redis, services) started by
`infra/stack/stack.sh up`, the project deployed to it by `infra/stack/deploy.sh`, and `cpu` process
workers started here. `make test-stack` does all of it; these tests fail (never skip) without it.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shlex
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import polars as pl
import pytest

from longreward_testing.judge_double import JudgeDouble, JudgeServer
from tests.test_flow import helpfulness_by_length

ROOT = Path(__file__).resolve().parents[2]
BIN = ROOT / ".venv" / "bin"
NIGHTLY = "preference-build/nightly-preference-build"
# The README's commands for a worker outside the worker image (tests/test_infra.py checks them
# against the README): the code where the deployments' pull step looks, then the worker. Tests add
# a name so that each worker's log is its own.
LINK_COMMAND = 'ln -sfn "$PWD" /opt/longreward'
WORKER_COMMAND = "prefect worker start --pool cpu --with-healthcheck"
FINAL = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}


def stack_dir() -> Path:
    value = os.environ.get("LONGREWARD_STACK_DIR")
    if not value or not os.environ.get("PREFECT_API_URL"):
        pytest.fail("no stack: run `make test-stack` (it starts PostgreSQL, Redis and a Prefect server, then these tests)")
    return Path(value)


def cli_env(**extra: str) -> dict[str, str]:
    env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}", "PYTHONPATH": str(ROOT), "COLUMNS": "200"}
    env.update(extra)
    return env


def prefect(*args: str, check: bool = True) -> str:
    """A `prefect` CLI command against the stack; its output."""
    done = subprocess.run([str(BIN / "prefect"), *args], cwd=ROOT, env=cli_env(), capture_output=True, text=True, timeout=180)
    if check and done.returncode != 0:
        raise AssertionError(f"`prefect {' '.join(args)}` exited {done.returncode}:\n{done.stdout}\n{done.stderr}")
    return done.stdout + done.stderr


class Worker:
    """A `cpu` process worker in its own process group, logging to the stack folder, its health
    check on a port of its own (`health_url`)."""

    def __init__(self, name: str, env: dict[str, str]):
        subprocess.run(["bash", "-c", LINK_COMMAND], cwd=ROOT, check=True)
        self.name = name
        self.log_path = stack_dir() / f"worker-{name}.log"
        self.log_path.write_text("")
        self._env = env
        self.start()

    def start(self) -> None:
        """Start the worker (again, after `stop`: same name, a log that goes on)."""
        port = free_port()
        self.health_url = f"http://127.0.0.1:{port}/health"
        command = shlex.split(WORKER_COMMAND) + ["--name", self.name]
        command[0] = str(BIN / "prefect")
        self._log = self.log_path.open("a")
        env = {**self._env, "PREFECT_WORKER_WEBSERVER_HOST": "127.0.0.1", "PREFECT_WORKER_WEBSERVER_PORT": str(port)}
        self.process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True)
        (stack_dir() / f"worker-{self.name}.pid").write_text(str(self.process.pid))

    def stop(self) -> None:
        try:
            os.killpg(self.process.pid, signal.SIGTERM)
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=30)
        except ProcessLookupError:
            pass
        self._log.close()
        (stack_dir() / f"worker-{self.name}.pid").unlink(missing_ok=True)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def worker_env(**extra: str) -> dict[str, str]:
    from longreward_testing.scenarios import TEST_API_KEY

    return cli_env(
        # Keys come from the worker's environment, never from the run's parameters.
        LONGREWARD_JUDGE_API_KEY=TEST_API_KEY,
        LONGREWARD_POLICY_API_KEY=TEST_API_KEY,
        HF_HUB_OFFLINE="1",
        LITELLM_LOCAL_MODEL_COST_MAP="True",
        # A test stack: poll for work every 2 s instead of 10.
        PREFECT_WORKER_QUERY_SECONDS="2",
        PREFECT_WORKER_PREFETCH_SECONDS="5",
        **extra,
    )


@pytest.fixture(scope="session")
def deployed() -> Path:
    """The project deployed with the README's steps (infra/stack/deploy.sh)."""
    folder = stack_dir()
    if (folder / "deployed").exists():  # once per stack (deploy.sh can run again, but takes a minute)
        return folder
    done = subprocess.run(["bash", str(ROOT / "infra" / "stack" / "deploy.sh")], cwd=ROOT, env=cli_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"deploy.sh failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    (folder / "deployed").touch()
    return folder


@pytest.fixture(scope="session")
def worker(deployed) -> Iterator[Worker]:
    started = Worker("stack-a", worker_env())
    yield started
    started.stop()


def start_run(deployment: str, params: dict[str, Any]) -> str:
    """`prefect deployment run` with the whole `params` object (it replaces the deployment's)."""
    out = prefect("deployment", "run", deployment, "--params", json.dumps({"params": params}))
    found = re.search(r"UUID:\s*([0-9a-f-]{36})", out)
    assert found, f"no flow run id in:\n{out}"
    return found.group(1)


async def _read_run(run_id: str):
    from prefect.client.orchestration import get_client

    async with get_client() as client:
        return await client.read_flow_run(run_id)


def read_run(run_id: str):
    return asyncio.run(_read_run(run_id))


def wait_final(run_id: str, timeout_s: float = 240, worker: Worker | None = None):
    """The flow run once it is in a final state."""
    deadline = time.monotonic() + timeout_s
    while True:
        run = read_run(run_id)
        if run.state and run.state.type.value in FINAL:
            return run
        if time.monotonic() > deadline:
            tail = worker.log()[-4000:] if worker else ""
            raise AssertionError(f"flow run {run_id} still {run.state.type.value if run.state else None} after {timeout_s} s\n{tail}")
        time.sleep(1)


async def _task_states(run_id: str) -> list[tuple[str, str]]:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    async with get_client() as client:
        tasks = await client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[run_id])))
        return [(task.name, task.state.name if task.state else "") for task in tasks]


def task_states(run_id: str) -> list[tuple[str, str]]:
    """(task name, state name) of every task run of the flow run."""
    return asyncio.run(_task_states(run_id))


async def _run_logs(run_id: str) -> list[str]:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

    async with get_client() as client:
        logs = await client.read_logs(LogFilter(flow_run_id=LogFilterFlowRunId(any_=[run_id])), limit=200)
        return [log.message for log in logs]


def run_logs(run_id: str) -> list[str]:
    return asyncio.run(_run_logs(run_id))


SCORING = {"retrieval_chunk_tokens": 32, "completeness_chunk_tokens": 256}


@pytest.fixture
def judge() -> Iterator[JudgeServer]:
    """The loopback judge double (and policy), its helpfulness rating by response length."""
    with JudgeServer(JudgeDouble(answers={"helpfulness": helpfulness_by_length})) as server:
        yield server


def judge_for(server: JudgeServer, **overrides: Any) -> dict[str, Any]:
    settings = {"model": "openai/judge-double", "api_base": server.api_base, "timeout_s": 5.0, "transport_retries": 1,
                "backoff_initial_s": 0.01, "backoff_max_s": 0.05, "concurrency": 8}
    return {**settings, **overrides}


def build_params(folder: Path, server: JudgeServer, prompts: Path, candidates: Path | None, **overrides: Any) -> dict[str, Any]:
    """The nightly's whole `params` object for a run (a run's `params` replaces the deployment's)."""
    params = {
        "prompts": str(prompts), "candidates": str(candidates) if candidates else None, "output_dir": str(folder / "builds"),
        "run_date": "2026-11-21", "shard_size": 2, "shards_in_flight": 4, "task_retries": 0,
        "judge_limit_strict": True, "judge": judge_for(server), "scoring": SCORING,
    }
    return {**params, **overrides}


def published_pairs(folder: Path) -> pl.DataFrame:
    return pl.read_parquet(folder / "builds" / "2026-11-21" / "pairs.parquet").sort("prompt_id")

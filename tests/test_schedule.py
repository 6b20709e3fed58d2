"""A deployment's schedule creates flow runs on a real Prefect server (SQLite, loopback).

The nightly build exists only through its schedule, and Prefect's scheduler service fails silently
for the deployment (an error in the server log, no run ever created) when the installed
SQLAlchemy does not suit Prefect 3.8.8: 2.1.x raises "Can't evaluate bulk DML statement" in every
scheduler loop; 2.0.x works (hence the pin in pyproject.toml). The test harness's server runs no
services, so this starts `prefect server start` as a subprocess with its scheduler looping every
second. It takes tens of seconds, most of it the server starting.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path

import pytest

pytestmark = [pytest.mark.server, pytest.mark.timeout(300)]

SERVER_START_S = 150  # a cold start takes 10-30 s on two busy cores
RUNS_WITHIN_S = 45  # the recent-deployments scheduler looks every 5 s


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _start_server(home: Path, port: int, log) -> subprocess.Popen:
    env = {
        **os.environ,
        "PREFECT_HOME": str(home),
        "PREFECT_API_DATABASE_CONNECTION_URL": f"sqlite+aiosqlite:///{home / 'prefect.db'}",
        "PREFECT_SERVER_SERVICES_SCHEDULER_LOOP_SECONDS": "1",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_UI_ENABLED": "false",
    }
    env.pop("PREFECT_API_URL", None)
    # A session of its own, so that stopping it stops every process the server started.
    return subprocess.Popen(
        [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port)],
        env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )


def _stop_server(server: subprocess.Popen) -> None:
    try:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(server.pid, signal.SIGKILL)
        server.wait(timeout=30)
    except ProcessLookupError:
        pass


async def _scheduled_runs(api_url: str, server: subprocess.Popen) -> tuple[int, float]:
    """Create a flow and a deployment with a one-minute schedule; (runs the scheduler created,
    seconds it took) once some exist or RUNS_WITHIN_S have passed."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import DeploymentScheduleCreate
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId
    from prefect.client.schemas.schedules import IntervalSchedule
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings({PREFECT_API_URL: api_url}):
        async with get_client() as client:
            deadline = time.monotonic() + SERVER_START_S
            while await _unhealthy(client):
                assert server.poll() is None, "the Prefect server exited while starting"
                assert time.monotonic() < deadline, f"the Prefect server did not answer within {SERVER_START_S} s"
                await asyncio.sleep(0.5)
            flow_id = await client.create_flow_from_name("schedule-check")
            deployment_id = await client.create_deployment(
                flow_id, "every-minute",
                schedules=[DeploymentScheduleCreate(schedule=IntervalSchedule(interval=timedelta(minutes=1)))],
            )
            this_deployment = DeploymentFilter(id=DeploymentFilterId(any_=[deployment_id]))
            started = time.monotonic()
            while True:
                runs = await client.read_flow_runs(deployment_filter=this_deployment)
                waited = time.monotonic() - started
                if runs or waited > RUNS_WITHIN_S:
                    return len(runs), waited
                await asyncio.sleep(1)


async def _unhealthy(client) -> bool:
    try:
        return await client.api_healthcheck() is not None
    except Exception:  # not listening yet
        return True


def test_the_scheduler_creates_runs_for_a_scheduled_deployment(tmp_path):
    port = _free_port()
    log_path = tmp_path / "server.log"
    with log_path.open("w") as log:
        server = _start_server(tmp_path, port, log)
        try:
            runs, waited = asyncio.run(_scheduled_runs(f"http://127.0.0.1:{port}/api", server))
        finally:
            _stop_server(server)
    errors = [line for line in log_path.read_text().splitlines() if "Error" in line]
    assert runs > 0, (
        f"no run scheduled within {waited:.0f} s; the server log's errors (SQLAlchemy 2.1 breaks Prefect 3.8.8's "
        "scheduler: install sqlalchemy<2.1):\n" + "\n".join(errors[-5:])
    )

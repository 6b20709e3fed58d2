"""What a retried preference build leaves in Prefect's UI: each attempt's artifacts named by the
attempt, the reward histogram as a picture, and a run log of log records only (Prefect's test
server; the retry is run as `prefect flow-run retry` runs a flow run that has no deployment)."""

from __future__ import annotations

import asyncio
import base64
import io
import re

import pytest
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import (
    ArtifactFilter,
    ArtifactFilterFlowRunId,
    LogFilter,
    LogFilterFlowRunId,
)
from prefect.flow_engine import run_flow
from prefect.logging.handlers import APILogWorker
from prefect.states import Scheduled

from flows.preference_build import preference_build
from longreward_testing.scenarios import write_inputs
from tests.test_flow import cedar_logicality_outage, helpfulness_by_length, params_for

pytestmark = pytest.mark.usefixtures("prefect_harness")

# A line of `dis` output: offset, opcode name, argument.
BYTECODE = re.compile(r"^\s*(\d+\s+)?\d+\s+[A-Z][A-Z_]+(\s|$)")


def retry(flow_run_id, params):
    """What `prefect flow-run retry ID --entrypoint ...` does: schedule the same flow run again
    and execute it (a worker does the second half for a deployment's run)."""

    async def schedule():
        async with get_client() as client:
            await client.set_flow_run_state(flow_run_id, Scheduled(message="Retried via CLI"), force=True)
            return await client.read_flow_run(flow_run_id)

    return run_flow(preference_build, flow_run=asyncio.run(schedule()), parameters={"params": params}, return_type="state")


def read(flow_run_id):
    APILogWorker.drain_all(timeout=30)  # the logs sent in the background are all on the server

    async def both():
        async with get_client() as client:
            artifacts = await client.read_artifacts(
                artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id]))
            )
            logs = await client.read_logs(LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])))
            return artifacts, logs

    return asyncio.run(both())


def png_of(markdown: str) -> bytes:
    (encoded,) = re.findall(r"!\[reward histogram\]\(data:image/png;base64,([A-Za-z0-9+/=]+)\)", markdown)
    return base64.b64decode(encoded, validate=True)


def test_a_retried_run_labels_each_attempts_artifacts(judge_server, tmp_path):
    from PIL import Image

    double = judge_server.double
    double.answers = {"helpfulness": helpfulness_by_length}
    outage = cedar_logicality_outage(double)
    prompts, candidates = write_inputs(tmp_path)
    params = params_for(judge_server, tmp_path, prompts, candidates)

    first = preference_build(params, return_state=True)
    assert first.is_failed()
    flow_run_id = first.state_details.flow_run_id
    outage["on"] = False
    second = retry(flow_run_id, params)
    assert second.is_completed(), second.message
    assert second.state_details.flow_run_id == flow_run_id

    artifacts, logs = read(flow_run_id)
    described = sorted((a.type, a.key, a.description) for a in artifacts)
    assert described == sorted([
        ("progress", None, "Shards scored of 3 (attempt 1)"),
        ("table", "shards", "Shards of this build (attempt 1)"),
        ("progress", None, "Shards scored of 3 (attempt 2)"),
        ("table", "shards", "Shards of this build (attempt 2)"),
        ("markdown", "rewards", "25 scored candidates (attempt 2)"),
        ("table", "judge-accounting", "Judge requests, cache hits, tokens, cost, failures (attempt 2)"),
    ])

    (rewards,) = [a for a in artifacts if a.key == "rewards"]
    assert rewards.data.startswith("## Reward histogram (attempt 2)")
    png = png_of(rewards.data)
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) < 100_000
    image = Image.open(io.BytesIO(png))
    image.verify()
    assert image.format == "PNG" and image.size == (450, 234)
    # The text table stays beside the picture: 25 candidates over the bins.
    assert sum(int(n) for n in re.findall(r"^\| \d+-\d+ \| (\d+) \|", rewards.data, re.M)) == 25

    # Only log records reach the run log: nothing a library printed (publishing used to put ~10
    # lines of disassembled bytecode there).
    messages = [log.message for log in logs]
    assert any("dataset published in" in m for m in messages)
    assert [m for m in messages if BYTECODE.match(m) or not m.strip()] == []

"""Finished stages kept in a result storage block that every worker reaches (here a
RemoteFileSystem over fsspec's in-memory store, as it would be over s3://; RemoteFileSystem
refuses file:// URLs, and the retry below runs in this process): a retry of the run finds them."""

from __future__ import annotations

import asyncio
import uuid

import pytest
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
from prefect.filesystems import RemoteFileSystem
from pydantic import ValidationError

from flows.params import BuildParams
from flows.preference_build import preference_build
from longreward_testing.judge_double import Fault
from longreward_testing.scenarios import write_inputs
from tests.test_flow import helpfulness_by_length, params_for
from tests.test_flow_ui import retry

pytestmark = pytest.mark.usefixtures("prefect_harness")


def task_states(flow_run_id) -> list[tuple[str, str]]:
    async def read():
        async with get_client() as client:
            runs = await client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
            return [(run.name, run.state.name) for run in runs]

    return asyncio.run(read())


def test_a_retry_finds_finished_shards_in_the_result_storage_block(judge_server, tmp_path):
    block = RemoteFileSystem(basepath=f"memory://longreward-results/{uuid.uuid4().hex}")
    block.save("shared-results-test", overwrite=True)
    double = judge_server.double
    double.answers = {"helpfulness": helpfulness_by_length}
    outage = {"on": True}
    double.fault_rule = lambda r, i: Fault("status", 503) if outage["on"] and r.task == "logicality" and "CEDAR" in r.content else None
    prompts, candidates = write_inputs(tmp_path)
    params = params_for(judge_server, tmp_path, prompts, candidates, result_storage_block="remote-file-system/shared-results-test")

    first = preference_build(params, return_state=True)
    assert first.is_failed() and "shard-0001" in first.message
    flow_run_id = first.state_details.flow_run_id
    written = [path.rsplit("/", 1)[-1] for path in block.filesystem.find(block.basepath)]
    # The finished shards' score results, under their cache keys (the failed shard has none).
    assert sum(name.startswith("score-v") for name in written) == 2, written
    assert not (tmp_path / "builds" / ".prefect-results").exists()  # nothing went to the default folder

    outage["on"] = False
    double.reset()
    second = retry(flow_run_id, params)
    assert second.is_completed(), second.message
    states = task_states(flow_run_id)
    # The retry's score tasks: the two finished shards come from the block, only shard-0001 runs.
    assert ("score-shard-0000", "Cached") in states and ("score-shard-0002", "Cached") in states
    assert sorted(s for n, s in states if n == "score-shard-0001") == ["Completed", "Failed"]
    assert double.counts() == {"logicality": 5}


def test_a_missing_result_storage_block_fails_the_run_before_any_work(judge_server, tmp_path):
    prompts, candidates = write_inputs(tmp_path, n_prompts=1)
    params = params_for(judge_server, tmp_path, prompts, candidates, result_storage_block="remote-file-system/no-such-block")
    state = preference_build(params, return_state=True)
    assert state.is_failed() and "result_storage_block 'remote-file-system/no-such-block' cannot be loaded" in state.message
    assert judge_server.double.count() == 0
    with pytest.raises(ValidationError, match="expected block-type/block-name"):
        BuildParams(prompts=str(prompts), result_storage_block="s3://bucket/results")

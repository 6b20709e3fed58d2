"""What no retry can fix stops a build before any shard starts: through the real flow on Prefect's
test server and through `longreward build`, with the loopback double as judge and policy server."""

from __future__ import annotations

import asyncio

import pytest
import typer
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
from typer.testing import CliRunner

from flows.cli import app
from flows.cli.build import _run_build
from flows.preference_build import preference_build
from longreward_testing.scenarios import TEST_API_KEY, write_inputs
from tests.test_flow import params_for

pytestmark = pytest.mark.usefixtures("prefect_harness")
runner = CliRunner()


@pytest.fixture(autouse=True)
def keys(monkeypatch):
    monkeypatch.setenv("LONGREWARD_POLICY_API_KEY", TEST_API_KEY)
    monkeypatch.setenv("LONGREWARD_JUDGE_API_KEY", TEST_API_KEY)


def task_runs_of(state) -> list[str]:
    """Names of the task runs of the flow run that ended in `state`."""

    async def read() -> list[str]:
        async with get_client() as client:
            runs = await client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[state.state_details.flow_run_id])))
        return sorted(r.name for r in runs)

    return asyncio.run(read())


def build_command(server, tmp_path, *options: str) -> list[str]:
    prompts, _ = write_inputs(tmp_path, n_prompts=2)
    return ["build", "--prompts", str(prompts), "--out", str(tmp_path / "builds"), "--run-date", "2026-11-21",
            "--shard-size", "1", "--judge-api-base", server.api_base, "--judge-model", "openai/judge-double", *options]


def assert_stopped_before_any_shard(result, server, tmp_path) -> None:
    assert result.exit_code == 2, result.output
    assert "retry the run" not in result.output and "run again" not in result.output
    assert server.double.count() == 0  # not one completion was asked for
    assert not (tmp_path / "builds" / "2026-11-21" / "shards").exists()  # nothing was sharded


def test_a_policy_whose_context_is_unknown_exits_2_with_the_fix_before_any_shard(judge_server, tmp_path):
    """The policy's server lists other models (no max_model_len for this one) and litellm does not
    know it: every shard would fail alike, so the build stops at the start."""
    result = runner.invoke(app, build_command(
        judge_server, tmp_path, "--policy-model", "openai/policy-nobody-knows", "--policy-api-base", judge_server.api_base,
    ))
    assert_stopped_before_any_shard(result, judge_server, tmp_path)
    output = " ".join(result.output.split())
    assert "--policy-max-context-tokens" in output and "max_model_len" in output


def test_the_same_policy_with_its_context_given_builds(judge_server, tmp_path):
    result = runner.invoke(app, build_command(
        judge_server, tmp_path, "--policy-model", "openai/policy-nobody-knows", "--policy-api-base", judge_server.api_base,
        "--policy-max-context-tokens", "4096", "--candidates-per-prompt", "2", "--max-new-tokens", "32",
    ))
    assert result.exit_code == 0, result.output
    assert judge_server.double.count("unknown") == 4  # the samples


def test_a_judge_model_litellm_cannot_route_exits_2_before_any_shard(judge_server, tmp_path):
    _, candidates = write_inputs(tmp_path, n_prompts=2)
    command = build_command(judge_server, tmp_path, "--candidates", str(candidates))
    command[command.index("openai/judge-double")] = "judge-double-without-provider"
    command[command.index("--judge-api-base"):command.index("--judge-api-base") + 2] = []
    result = runner.invoke(app, command)
    assert_stopped_before_any_shard(result, judge_server, tmp_path)
    assert "litellm cannot tell which provider serves this model" in " ".join(result.output.split())


def test_credentials_the_judge_server_refuses_exit_2_before_any_shard(judge_server, tmp_path):
    judge_server.double.required_key = "the-servers-own-key"
    _, candidates = write_inputs(tmp_path, n_prompts=2)
    result = runner.invoke(app, build_command(judge_server, tmp_path, "--candidates", str(candidates)))
    assert_stopped_before_any_shard(result, judge_server, tmp_path)
    assert "refused the credentials (HTTP 401)" in " ".join(result.output.split())
    assert TEST_API_KEY not in result.output


def test_a_missing_strict_judge_limit_fails_the_run_before_any_shard_task(judge_server, tmp_path):
    """The flow ends Failed with how to create the limit, no shard task ran, and the command line
    (which runs the same flow) exits 2."""
    prompts, candidates = write_inputs(tmp_path, n_prompts=2)
    params = params_for(judge_server, tmp_path, prompts, candidates, judge_slots="no-such-limit", judge_limit_strict=True)
    state = preference_build(params, return_state=True)
    assert state.is_failed() and "prefect gcl create no-such-limit --limit N" in state.message
    assert "retry" not in state.message
    assert task_runs_of(state) == ["preflight"]
    with pytest.raises(typer.Exit) as exit_:
        _run_build(params)
    assert exit_.value.exit_code == 2
    assert judge_server.double.count() == 0


def test_an_unknown_policy_context_fails_the_flow_run_with_the_fix(judge_server, tmp_path):
    """The run as the UI shows it: Failed, the fix in its message, the preflight its only task."""
    prompts, _ = write_inputs(tmp_path, n_prompts=2)
    policy = dict(model="openai/policy-nobody-knows", api_base=judge_server.api_base)
    state = preference_build(params_for(judge_server, tmp_path, prompts, None, policy=policy), return_state=True)
    assert state.is_failed() and "--policy-max-context-tokens" in state.message and "retry" not in state.message
    assert task_runs_of(state) == ["preflight"]


def test_credentials_refused_on_the_first_paid_request_exit_2(judge_server, tmp_path):
    """A refusal the listing cannot see (the server lists models to anyone, as a hosted provider's
    gateway may): the shards stop at the first refused request, and the run still exits 2 with the
    fix, never advising a retry."""
    _, candidates = write_inputs(tmp_path, n_prompts=2)
    from longreward_testing.judge_double import Fault

    judge_server.double.faults = [Fault("status", 401)] * 100
    result = runner.invoke(app, build_command(judge_server, tmp_path, "--candidates", str(candidates)))
    assert result.exit_code == 2, result.output
    output = " ".join(result.output.split())
    assert "a retry fails alike until the configuration is fixed" in output and "refused the credentials" in output
    assert "retry the run" not in output

"""The preference-build flow on Prefect's test server with the loopback judge."""

from __future__ import annotations

import json
from pathlib import Path

import datasets
import polars as pl
import pytest
from pydantic import ValidationError

from flows.preference_build import BuildParams, preference_build
from longreward_core.reward.scorer import ScoringConfig
from longreward_testing.judge_double import Fault, sentences, slot
from longreward_testing.scenarios import judge_config_for, write_inputs

pytestmark = pytest.mark.usefixtures("prefect_harness")

SCORING = ScoringConfig(retrieval_chunk_tokens=32, completeness_chunk_tokens=256)


@pytest.fixture(autouse=True)
def policy_key(monkeypatch):
    """The policy's key comes from the worker's environment (a key is never a parameter)."""
    monkeypatch.setenv("LONGREWARD_POLICY_API_KEY", "k")


def helpfulness_by_length(request) -> str:
    return f"Rating: [[{min(10, 2 * len(sentences(slot(request.content, 'response'))))}]]"


def cedar_logicality_outage(double) -> dict[str, bool]:
    """Fail every logicality request about the CEDAR prompt (shard-0001 at 2 prompts a shard) with
    a 503 while the returned switch is on."""
    outage = {"on": True}
    double.fault_rule = lambda r, i: Fault("status", 503) if outage["on"] and r.task == "logicality" and "CEDAR" in r.content else None
    return outage


def params_for(server, tmp_path: Path, prompts: Path, candidates: Path | None, **overrides) -> BuildParams:
    settings = dict(
        prompts=str(prompts), candidates=str(candidates) if candidates else None, output_dir=str(tmp_path / "builds"),
        run_date="2026-11-21", shard_size=2, shards_in_flight=2, task_retries=0, judge_slots=None,
        judge=judge_config_for(server, transport_retries=1), scoring=SCORING,
    )
    settings.update(overrides)
    return BuildParams(**settings)


def test_build_produces_the_expected_pairs(judge_server, tmp_path):
    judge_server.double.answers = {"helpfulness": helpfulness_by_length}
    prompts, candidates = write_inputs(tmp_path)
    manifest = preference_build(params_for(judge_server, tmp_path, prompts, candidates))
    build = tmp_path / "builds" / "2026-11-21"
    assert sorted(p.name for p in build.glob("shard-*")) == []  # shards live under build/shards
    assert sorted(p.name for p in (build / "shards").iterdir()) == ["shard-0000", "shard-0001", "shard-0002"]
    pairs = pl.read_parquet(build / "pairs.parquet").sort("prompt_id")
    assert pairs["chosen_id"].to_list() == [f"p{p}-0" for p in range(5)]
    assert pairs["rejected_id"].to_list() == [f"p{p}-4" for p in range(5)]
    dataset = datasets.load_from_disk(manifest["dataset_dir"])
    assert dataset.num_rows == 5 and dataset[0]["chosen"][0]["role"] == "assistant"
    assert manifest["counts"]["candidates"] == 25 and manifest["counts"]["pairs"] == 5
    assert manifest["inputs"]["prompts"]["sha256"]
    assert manifest["judge_accounting"]["total"]["calls"] == judge_server.double.count()
    on_disk = json.loads(Path(manifest["manifest_path"]).read_text())
    assert on_disk["pairs_sha256"] and "api_key" not in json.dumps(on_disk["parameters"])


def test_failed_shard_is_named_and_a_retry_reruns_only_it(judge_server, tmp_path):
    """An outage hits one shard's logicality calls: the others finish, the run fails naming the
    shard, and the retry makes exactly the missing calls, with no lost or duplicated rows."""
    double = judge_server.double
    double.answers = {"helpfulness": helpfulness_by_length}
    outage = cedar_logicality_outage(double)
    prompts, candidates = write_inputs(tmp_path)
    params = params_for(judge_server, tmp_path, prompts, candidates)

    state = preference_build(params, return_state=True)
    assert state.is_failed()
    assert "shard-0001" in state.message and "shard-0000" not in state.message and "shard-0002" not in state.message
    shards = tmp_path / "builds" / "2026-11-21" / "shards"
    assert (shards / "shard-0000" / "scores.parquet").exists() and (shards / "shard-0002" / "scores.parquet").exists()
    assert not (tmp_path / "builds" / "2026-11-21" / "manifest.json").exists()

    outage["on"] = False
    double.reset()
    manifest = preference_build(params)
    # Only the calls that failed are made again: one logicality verdict per CEDAR candidate.
    assert double.counts() == {"logicality": 5}
    assert all("CEDAR" in r.content for r in double.requests)
    scores = pl.concat([pl.read_parquet(p) for p in sorted(shards.glob("*/scores.parquet"))])
    assert scores.height == 25 and scores["candidate_id"].n_unique() == 25
    assert (scores["status"] == "scored").all()
    assert manifest["counts"]["pairs"] == 5


def test_second_run_with_same_parameters_makes_no_judge_call(judge_server, tmp_path):
    judge_server.double.answers = {"helpfulness": helpfulness_by_length}
    prompts, candidates = write_inputs(tmp_path, n_prompts=2)
    params = params_for(judge_server, tmp_path, prompts, candidates)
    first = preference_build(params)
    calls = judge_server.double.count()
    assert calls > 0
    second = preference_build(params)
    assert judge_server.double.count() == calls
    assert second["counts"] == first["counts"]
    build = tmp_path / "builds" / "2026-11-21"
    assert json.loads((build / "manifest.json").read_text())["pairs_sha256"] == json.loads(
        Path(first["manifest_path"]).read_text()
    )["pairs_sha256"]


def test_sampling_from_a_policy_server(judge_server, tmp_path):
    """Without candidates, the flow samples them from the policy (here the loopback server)."""
    double = judge_server.double
    double.answers = {
        "helpfulness": helpfulness_by_length,
        "unknown": lambda r: "The mill closed in 1960 after a fire. " * (1 + len(double.requests) % 4),
    }
    prompts, _ = write_inputs(tmp_path, n_prompts=2)
    policy = dict(model="openai/policy-double", api_base=judge_server.api_base,
                  candidates_per_prompt=5, max_context_tokens=256, max_new_tokens=32, allow_truncation=True)
    manifest = preference_build(params_for(judge_server, tmp_path, prompts, None, policy=policy))
    assert manifest["counts"]["candidates"] == 10 and manifest["models"]["policy"] == "openai/policy-double"
    report = pl.read_parquet(tmp_path / "builds" / "2026-11-21" / "shards" / "shard-0000" / "sampling.parquet")
    assert report["sampled"].to_list() == [5, 5]
    # The documents (~170 tokens) fit in 256 - 32 - 256 < 128 -> the budget floor of 128: cut in the middle.
    assert (report["kept_tokens"] < report["context_tokens"]).all()


def test_a_shard_the_policy_could_not_reach_is_sampled_again_on_retry(judge_server, tmp_path):
    """An outage of the policy for one shard's prompts fails that shard (not cached short); a
    request the provider refuses is final. With the policy back, the same build samples only the
    missing candidates and publishes."""
    double = judge_server.double
    double.answers = {
        "helpfulness": helpfulness_by_length,
        "unknown": lambda r: "The mill closed in 1960 after a fire. " * (1 + len(double.requests) % 4),
    }
    outage = {"on": True}
    refused = []

    def policy_faults(request, index):
        if request.task != "unknown":
            return None
        if outage["on"] and "ALDER" in request.content:
            return Fault("status", 503)
        if "CEDAR" in request.content and not refused:
            refused.append(index)
            return Fault("status", 400)
        return None

    double.fault_rule = policy_faults
    prompts, _ = write_inputs(tmp_path, n_prompts=4)
    policy = dict(model="openai/policy-double", api_base=judge_server.api_base,
                  candidates_per_prompt=5, max_context_tokens=256, max_new_tokens=32, allow_truncation=True,
                  timeout_s=5.0, transport_retries=1, backoff_initial_s=0.01, backoff_max_s=0.05)
    params = params_for(judge_server, tmp_path, prompts, None, policy=policy)

    state = preference_build(params, return_state=True)
    assert state.is_failed()
    assert "shard-0000" in state.message and "shard-0001" not in state.message
    shards = tmp_path / "builds" / "2026-11-21" / "shards"
    report = pl.read_parquet(shards / "shard-0000" / "sampling.parquet").sort("prompt_id")
    assert report["unreachable"].to_list() == [5, 0] and report["sampled"].to_list() == [0, 5]
    refusal = pl.read_parquet(shards / "shard-0001" / "sampling.parquet").sort("prompt_id")
    assert refusal["sampled"].to_list() == [4, 5] and refusal["unreachable"].to_list() == [0, 0]

    outage["on"] = False
    double.reset()
    manifest = preference_build(params)
    policy_requests = [r for r in double.requests if r.task == "unknown"]
    assert len(policy_requests) == 5 and all("ALDER" in r.content for r in policy_requests)
    assert manifest["counts"]["candidates"] == 19


def test_a_global_judge_limit_caps_requests_across_shards_wider_than_it(judge_server, tmp_path):
    """A limit of 3 slots and four shards of judge concurrency 8 in flight: no shard fails, and
    never more than 3 judge requests are in flight."""
    import asyncio

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate

    async def create_limit() -> None:
        async with get_client() as client:
            await client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name="judge-limit-of-3", limit=3))

    asyncio.run(create_limit())
    double = judge_server.double
    double.answers = {"helpfulness": helpfulness_by_length}
    double.latency_s = 0.1
    prompts, candidates = write_inputs(tmp_path, n_prompts=4)
    params = params_for(judge_server, tmp_path, prompts, candidates, shard_size=1, shards_in_flight=4,
                        judge=judge_config_for(judge_server, transport_retries=1, concurrency=8),
                        judge_slots="judge-limit-of-3", judge_limit_strict=True)
    manifest = preference_build(params)
    assert manifest["counts"]["shards"] == 4 and manifest["counts"]["pairs"] == 4
    assert 1 <= double.max_in_flight <= 3


def test_a_missing_judge_limit_fails_a_strict_build_with_how_to_create_it(judge_server, tmp_path):
    prompts, candidates = write_inputs(tmp_path, n_prompts=1)
    params = params_for(judge_server, tmp_path, prompts, candidates, judge_slots="no-such-judge-limit", judge_limit_strict=True)
    state = preference_build(params, return_state=True)
    assert state.is_failed()
    assert "prefect gcl create no-such-judge-limit --limit N" in state.message
    assert judge_server.double.count() == 0


def test_judge_key_from_a_prefect_secret_block(judge_server, tmp_path):
    from prefect.blocks.system import Secret

    secret = "sk-from-secret-block-3b9d"
    Secret(value=secret).save("judge-key-test", overwrite=True)
    prompts, candidates = write_inputs(tmp_path, n_prompts=1)
    judge = judge_config_for(judge_server, transport_retries=1).model_copy(update={"api_key": None})
    manifest = preference_build(params_for(judge_server, tmp_path, prompts, candidates, judge=judge, judge_key_secret="judge-key-test"))
    assert manifest["counts"]["scored"] == 5
    assert set(judge_server.double.authorization) == {f"Bearer {secret}"}
    for path in (tmp_path / "builds").rglob("*"):
        if path.is_file():
            assert secret.encode() not in path.read_bytes(), path


def test_parameters_are_validated_with_clear_messages(tmp_path):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"id": "a", "context": "x", "query": "y"}\n')
    with pytest.raises(ValidationError, match="prompts file not found"):
        BuildParams(prompts=str(tmp_path / "missing.jsonl"))
    with pytest.raises(ValidationError, match="shard_size"):
        BuildParams(prompts=str(prompts), shard_size=0)
    with pytest.raises(ValidationError, match="candidates_per_prompt"):
        BuildParams(prompts=str(prompts), policy={"candidates_per_prompt": 0})
    with pytest.raises(ValidationError, match="concurrency"):
        BuildParams(prompts=str(prompts), judge={"concurrency": 0})


def test_shards_split_across_a_local_dask_cluster(judge_server, tmp_path, monkeypatch):
    """Two Dask worker processes share one run: results and the call cache are on shared storage."""
    from distributed import LocalCluster
    from prefect.settings import PREFECT_API_URL

    # Worker processes report to the same Prefect server as this test.
    monkeypatch.setenv("PREFECT_API_URL", PREFECT_API_URL.value())
    judge_server.double.answers = {"helpfulness": helpfulness_by_length}
    prompts, candidates = write_inputs(tmp_path, n_prompts=4)
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster:
        params = params_for(judge_server, tmp_path, prompts, candidates, shard_size=1, dask_address=cluster.scheduler_address)
        manifest = preference_build(params)
        workers_used = {
            json.loads(p.read_text()).get("worker_pid")
            for p in (tmp_path / "builds" / "2026-11-21" / "shards").glob("*/accounting.json")
        }
    assert manifest["counts"]["pairs"] == 4
    assert pl.read_parquet(tmp_path / "builds" / "2026-11-21" / "pairs.parquet")["chosen_id"].to_list() == [f"p{p}-0" for p in range(4)]
    assert len(workers_used) == 2, workers_used


def test_a_document_longer_than_the_policy_context_is_never_cut_unasked(judge_server, tmp_path):
    """The context comes from the server's model listing; a prompt that does not fit is reported, not cut."""
    double = judge_server.double
    double.answers = {"helpfulness": helpfulness_by_length, "unknown": lambda r: "The mill closed in 1960 after a fire."}
    double.max_model_len = 512  # documents of ~170 tokens fit; the long one below does not
    prompts, _ = write_inputs(tmp_path, n_prompts=2)
    rows = [json.loads(line) for line in prompts.read_text().splitlines()]
    rows[1]["context"] = rows[1]["context"] * 12
    prompts.write_text("".join(json.dumps(r) + "\n" for r in rows))
    policy = dict(model="openai/policy-double", api_base=judge_server.api_base,
                  candidates_per_prompt=5, max_new_tokens=32)
    manifest = preference_build(params_for(judge_server, tmp_path, prompts, None, policy=policy))
    report = pl.read_parquet(tmp_path / "builds" / "2026-11-21" / "shards" / "shard-0000" / "sampling.parquet").sort("prompt_id")
    assert report["sampled"].to_list() == [5, 0] and manifest["counts"]["candidates"] == 5
    assert "does not fit the policy's context (512 tokens" in report["error"][1]
    assert report["kept_tokens"][0] == report["context_tokens"][0]  # the one that fits is whole
    assert double.count("unknown") == 5  # nothing was sent for the prompt that does not fit


def test_an_unknown_policy_context_is_a_clear_error(tmp_path):
    import asyncio

    from longreward_core.pipeline.sampling import (
        ContextUnknown,
        PolicyConfig,
        policy_context,
    )

    with pytest.raises(ContextUnknown, match="set policy.max_context_tokens"):
        asyncio.run(policy_context(PolicyConfig(model="openai/no-such-model-anywhere")))
    assert asyncio.run(policy_context(PolicyConfig(model="openai/x", max_context_tokens=4096))) == 4096


def test_a_pruned_build_under_a_budget_stops_names_the_rest_and_goes_on(judge_server, tmp_path):
    """Pruning publishes the same pairs; a judge budget (split over the shards) leaves prompts
    unscored with a clear status, and a re-run with a larger budget asks only for those."""
    double = judge_server.double
    double.answers = {"helpfulness": helpfulness_by_length}
    prompts, candidates = write_inputs(tmp_path)
    scoring = SCORING.model_copy(update={"prune": True, "prompts_in_flight": 1, "max_judge_tokens": 3})
    params = params_for(judge_server, tmp_path, prompts, candidates, scoring=scoring, pairs={"min_candidates": 2})

    state = preference_build(params, return_state=True)
    assert state.is_failed()
    message = " ".join(state.message.split())
    # Three shards (2, 2, 1 prompts), one token each: each starts its first prompt only.
    assert "budget reached" in message and "2 prompt(s) not scored: p1, p3" in message
    first = {r.content for r in double.requests}

    double.reset()
    params = params.model_copy(update={"scoring": scoring.model_copy(update={"max_judge_tokens": 10**9})})
    manifest = preference_build(params)
    assert not first & {r.content for r in double.requests}  # nothing asked again
    pairs = pl.read_parquet(tmp_path / "builds" / "2026-11-21" / "pairs.parquet").sort("prompt_id")
    assert pairs["chosen_id"].to_list() == [f"p{p}-0" for p in range(5)]
    assert pairs["rejected_id"].to_list() == [f"p{p}-4" for p in range(5)]
    counts = manifest["counts"]
    # Every statement here is supported, so no middle candidate's interval clears the worst one's
    # reward before it is complete: nothing is pruned (tests/test_pruning.py measures savings).
    assert counts["scored"] + counts["failed"] + counts["pruned"] == 25 and counts["support_checks_saved"] >= 0


def test_a_batch_build_publishes_the_online_pairs_and_lists_its_batches(judge_server, tmp_path):
    from prefect.client.orchestration import get_client

    judge_server.double.answers = {"helpfulness": helpfulness_by_length}
    prompts, candidates = write_inputs(tmp_path)
    judge = judge_config_for(judge_server, transport_retries=1, batch=True, batch_poll_s=0.01)
    manifest = preference_build(params_for(judge_server, tmp_path, prompts, candidates, judge=judge))
    pairs = pl.read_parquet(tmp_path / "builds" / "2026-11-21" / "pairs.parquet").sort("prompt_id")
    assert pairs["chosen_id"].to_list() == [f"p{p}-0" for p in range(5)]
    assert pairs["rejected_id"].to_list() == [f"p{p}-4" for p in range(5)]
    assert judge_server.double.count() == 0
    assert sorted(manifest["batch_ids"]) == sorted(judge_server.double.batch_api.batches)
    with get_client(sync_client=True) as client:
        keys = {a.key for a in client.read_artifacts() if a.key}
    assert {"batches-shard-0000", "batches-shard-0001", "batches-shard-0002"} <= keys


def test_a_batch_build_with_the_embedded_judge_is_refused_by_its_parameters(tmp_path):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"id": "a", "context": "x", "query": "y"}\n')
    with pytest.raises(ValidationError, match="embedded/smollm2-135m-instruct has no Batch API"):
        BuildParams(prompts=str(prompts), judge={"batch": True})

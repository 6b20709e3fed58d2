"""Scoring and the preference build under injected judge faults.

Every run is compared with a clean run of the same input (scores, pairs), and every fault the
double injected (`JudgeDouble.injected`) with what the client counted in its accounting. The scenarios
(4 prompts x 3 candidates, 80 judge requests when nothing fails) are in `longreward_testing.faults`,
which bench/bench_faults.py measures too.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import polars as pl
import pytest

from flows.preference_build import preference_build
from longreward_core.data.pairs import PairConfig
from longreward_core.models.errors import AuthenticationFailed
from longreward_core.models.secrets import JUDGE_API_KEY_ENV
from longreward_core.pipeline.score_files import score_files
from longreward_core.reward.judge import JudgeConfig
from longreward_testing.faults import (
    CANDIDATES,
    KILL_CONCURRENCY,
    NO_VERDICT,
    PROMPTS,
    SCORING,
    TRANSPORT,
    answered,
    asked,
    faulty_judge,
    garbage_burst,
    inject,
    injected,
    kill_then_rerun,
    read_scores,
)
from longreward_testing.judge_double import KINDS, Fault, JudgeServer, context_limit
from longreward_testing.scenarios import judge_config_for, write_inputs
from tests.test_flow import helpfulness_by_length, params_for

PROVIDER_KEY = "sk-provider-variable-only-4d5e6f7a8b"


def files_holding(root: Path, secret: str) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_file() and secret.encode() in p.read_bytes()]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> tuple[Path, Path]:
    return write_inputs(tmp_path_factory.mktemp("inputs"), n_prompts=PROMPTS, n_candidates=CANDIDATES)


@pytest.fixture(scope="module")
def clean_scores(inputs, tmp_path_factory) -> pl.DataFrame:
    with JudgeServer() as server:
        run = score_files(*inputs, tmp_path_factory.mktemp("clean"), judge_config_for(server), SCORING)
    assert run.summary.scored == PROMPTS * CANDIDATES
    return read_scores(run)


# -- scoring ---------------------------------------------------------------------------------


@pytest.mark.parametrize("kinds", [[k] for k in KINDS] + [list(KINDS)], ids=[*KINDS, "mixed"])
def test_scoring_under_faults_counts_every_fault_and_matches_a_clean_run(judge_server, inputs, clean_scores, tmp_path, kinds):
    double = judge_server.double
    inject(double, kinds, seed=len(kinds))
    run = score_files(*inputs, tmp_path / "out", faulty_judge(judge_server), SCORING)
    assert read_scores(run).equals(clean_scores)
    faults, total = injected(double), run.summary.judge.total
    assert sum(faults.values()) > 0, "the seeded rule injected nothing"
    # Each request gets at most one fault, and a retried request is a new one that may get
    # another: every injected fault is one failed send (transport) or one unparseable answer.
    assert total.transport_errors == sum(faults[k] for k in TRANSPORT)
    assert total.parse_failures == sum(faults[k] for k in NO_VERDICT)
    # Every request the double saw is either an answer the client read or a transport error.
    assert total.calls + total.transport_errors == double.count()
    assert total.failed_calls == 0 and total.rejected == 0


@pytest.mark.parametrize("burst", ["every request", "every grading request"])
def test_rerun_after_a_garbage_burst_asks_only_what_was_never_answered(judge_server, inputs, clean_scores, tmp_path, burst):
    """The burst answers without a verdict (every request, or all but the statement extraction and
    support checks): every candidate fails. A re-run against the healthy judge reuses every verdict
    the burst let through and asks, once, for each call that never got one."""
    double = judge_server.double
    spared = () if burst == "every request" else ("statements", "support")
    double.fault_rule = garbage_burst(spared)
    first = score_files(*inputs, tmp_path / "out", judge_config_for(judge_server, max_attempts=2), SCORING)
    assert first.summary.scored == 0 and first.summary.failed == PROMPTS * CANDIDATES
    verdicts = answered(double)
    assert (len(verdicts) > 0) == bool(spared)

    double.reset()
    double.fault_rule = None
    second = score_files(*inputs, tmp_path / "out", judge_config_for(judge_server), SCORING)
    assert read_scores(second).equals(clean_scores)
    rerun = asked(double)
    assert rerun and not set(rerun) & verdicts
    assert len(set(rerun)) == len(rerun) and {t for _, t in rerun} == {0.0}
    assert not set(double.counts()) & set(spared)


def test_kill_9_then_rerun_repeats_only_requests_in_flight(judge_server, inputs, clean_scores, tmp_path):
    out = tmp_path / "out"
    runs = kill_then_rerun(judge_server, inputs, out)
    assert len(runs["before"]) < 80 and runs["rerun_requests"], "the kill came after the run had finished"
    repeated = [key for key in runs["rerun_requests"] if key in set(runs["before"])]
    # An answer is cached as soon as the client reads it, so only requests unanswered or unread
    # at the kill are asked again. The double's in-flight count at the kill can miss answers it
    # had written but the client had not yet read; those still held one of the client's
    # KILL_CONCURRENCY slots, which bounds them all.
    assert runs["in_flight_at_kill"] <= KILL_CONCURRENCY
    assert len(repeated) <= KILL_CONCURRENCY and len(set(repeated)) == len(repeated)
    assert read_scores(runs["rerun"]).equals(clean_scores)
    # Everything answered before the kill is read from the cache the killed process left.
    assert runs["rerun"].summary.judge.total.cache_hits >= len(set(runs["before"]) - set(repeated))


def test_a_provider_key_reaches_no_output_under_faults_or_refusal(judge_server, inputs, tmp_path, monkeypatch):
    monkeypatch.delenv(JUDGE_API_KEY_ENV, raising=False)
    monkeypatch.setenv("OPENAI_API_KEY", PROVIDER_KEY)
    double = judge_server.double
    inject(double, list(KINDS), seed=3)
    run = score_files(*inputs, tmp_path / "faulted", faulty_judge(judge_server, api_key=None), SCORING)
    assert run.summary.scored == PROMPTS * CANDIDATES and sum(injected(double).values()) > 0
    assert set(double.authorization) == {f"Bearer {PROVIDER_KEY}"}
    assert files_holding(tmp_path / "faulted", PROVIDER_KEY) == []

    # A 401 (quoting the key back, as providers do) stops the run: every other request would fail alike.
    double.reset()
    double.fault_rule = lambda request, index: Fault("status", 401)
    with pytest.raises(AuthenticationFailed, match=r"refused the credentials \(HTTP 401\)") as refused:
        score_files(*inputs, tmp_path / "refused", judge_config_for(judge_server, api_key=None, concurrency=2), SCORING)
    assert PROVIDER_KEY not in str(refused.value) and "***" in str(refused.value)
    assert double.count() <= 2
    assert files_holding(tmp_path / "refused", PROVIDER_KEY) == []


# -- the preference build --------------------------------------------------------------------


def build_params(server: JudgeServer, inputs: tuple[Path, Path], root: Path, judge: JudgeConfig, **overrides):
    """Two prompts per shard; a pair from 2 scored candidates (the inputs have 3 per prompt)."""
    return params_for(server, root, *inputs, output_dir=str(root), judge=judge, pairs=PairConfig(min_candidates=2), **overrides)


def published_pairs(root: Path) -> pl.DataFrame:
    pairs = pl.read_parquet(root / "2026-11-21" / "pairs.parquet")
    return pairs.select("prompt_id", "chosen_id", "rejected_id", "chosen_reward", "rejected_reward").sort("prompt_id")


@pytest.mark.usefixtures("prefect_harness")
def test_build_under_faults_publishes_the_clean_pairs_and_no_key(judge_server, tmp_path, monkeypatch):
    monkeypatch.delenv(JUDGE_API_KEY_ENV, raising=False)
    monkeypatch.setenv("OPENAI_API_KEY", PROVIDER_KEY)
    double = judge_server.double
    double.answers = {"helpfulness": helpfulness_by_length}
    inputs = write_inputs(tmp_path, n_prompts=PROMPTS, n_candidates=CANDIDATES)
    judge = faulty_judge(judge_server, api_key=None)
    preference_build(build_params(judge_server, inputs, tmp_path / "clean", judge))
    inject(double, list(KINDS), seed=11)
    manifest = preference_build(build_params(judge_server, inputs, tmp_path / "faulted", judge))
    assert sum(injected(double).values()) > 0
    assert manifest["counts"]["scored"] == PROMPTS * CANDIDATES and manifest["counts"]["pairs"] == PROMPTS
    assert published_pairs(tmp_path / "faulted").equals(published_pairs(tmp_path / "clean"))
    # The output root holds the shards, the call cache and the Prefect results.
    assert (tmp_path / "faulted" / ".prefect-results").is_dir()
    assert files_holding(tmp_path / "faulted", PROVIDER_KEY) == []


@pytest.mark.usefixtures("prefect_harness")
def test_refused_credentials_stop_the_build_and_leave_no_key(judge_server, tmp_path, monkeypatch):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    monkeypatch.delenv(JUDGE_API_KEY_ENV, raising=False)
    monkeypatch.setenv("OPENAI_API_KEY", PROVIDER_KEY)
    double = judge_server.double
    double.fault_rule = lambda request, index: Fault("status", 401)
    inputs = write_inputs(tmp_path, n_prompts=PROMPTS, n_candidates=CANDIDATES)
    judge = judge_config_for(judge_server, api_key=None, concurrency=2)
    state = preference_build(build_params(judge_server, inputs, tmp_path / "builds", judge, task_retries=2), return_state=True)
    assert state.is_failed() and "2 of 2 shards failed" in state.message
    # The fix, never the advice to retry: a retry would be refused alike.
    assert "refused the credentials (HTTP 401)" in state.message and "retry the run" not in state.message
    # Each shard's client stops at its first refusal, and the task is not retried.
    assert double.count() <= 2 * judge.concurrency
    with get_client(sync_client=True) as client:
        task_runs = client.read_task_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[state.state_details.flow_run_id]))
        )
    scores = [t for t in task_runs if t.name.startswith("score-")]
    assert len(scores) == 2 and all(t.run_count == 1 for t in scores)
    for task_run in scores:
        assert "refused the credentials (HTTP 401)" in task_run.state.message
        assert PROVIDER_KEY not in task_run.state.message
    assert not (tmp_path / "builds" / "2026-11-21" / "manifest.json").exists()
    assert files_holding(tmp_path / "builds", PROVIDER_KEY) == []


@pytest.mark.usefixtures("prefect_harness")
def test_a_candidate_over_the_context_limit_fails_alone_and_the_build_publishes(judge_server, tmp_path):
    """Every request about candidate p1-1 exceeds the judge's context (HTTP 400); the judge's other
    requests stay under 4,000 characters."""
    double = judge_server.double
    double.answers = {"helpfulness": helpfulness_by_length}
    double.fault_rule = context_limit(6000)
    prompts, candidates = write_inputs(tmp_path, n_prompts=PROMPTS, n_candidates=CANDIDATES)
    rows = [json.loads(line) for line in candidates.read_text().splitlines()]
    for row in rows:
        if row["candidate_id"] == "p1-1":
            row["response"] = " ".join([row["response"]] * 40)
    candidates.write_text("".join(json.dumps(row) + "\n" for row in rows))
    params = build_params(judge_server, (prompts, candidates), tmp_path / "builds", judge_config_for(judge_server), task_retries=2)
    state = preference_build(params, return_state=True)
    assert state.is_completed(), state.message
    build = tmp_path / "builds" / "2026-11-21"
    scores = pl.concat([pl.read_parquet(p) for p in sorted((build / "shards").glob("*/scores.parquet"))])
    failed = scores.filter(pl.col("status") == "failed")
    assert failed["candidate_id"].to_list() == ["p1-1"] and "HTTP 400" in failed["error"][0]
    assert scores.height == PROMPTS * CANDIDATES
    # Its helpfulness, logicality, statement extraction and completeness requests, each refused
    # once: not retried by the client, by the judge, or by a second run of the shard task.
    assert injected(double) == Counter({"400": 4})
    manifest = json.loads((build / "manifest.json").read_text())
    assert manifest["counts"]["rejected"] == 1 and manifest["counts"]["failed"] == 1
    assert manifest["counts"]["pairs"] == PROMPTS

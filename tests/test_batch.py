"""Batch mode against the judge double's `/v1/files` and `/v1/batches`: the transport, the ledger,
and `score_files` with `batch=True` (same scores as online, no online request, resumable, faults)."""

from __future__ import annotations

import json
import time
from collections import Counter

import polars as pl
import pytest

from longreward_core.models.batch import (
    BatchFailed,
    BatchLedger,
    BatchTransport,
    BatchUnsupported,
    split_lines,
)
from longreward_core.pipeline.score_files import score_files
from longreward_core.reward.judge import JudgeConfig
from longreward_core.reward.scorer import ScoringConfig
from longreward_testing.scenarios import judge_config_for
from longreward_testing.judge_double import Fault, fault_mix
from tests.test_scoring import SCORING, small_input  # noqa: F401 (a fixture)

HELP = [{"role": "user", "content": "[Task: grade HELPFULNESS]\nhow helpful?"}]


def batch_config(server, **overrides) -> JudgeConfig:
    return judge_config_for(server, **{"batch": True, "batch_poll_s": 0.01, "transport_retries": 2, **overrides})


def lines_for(transport: BatchTransport, n: int):
    return [transport.line(f"key-{i}", HELP, {"temperature": 0.0, "max_tokens": 64}) for i in range(n)]


def test_submit_poll_and_read_back(judge_server):
    judge_server.double.batch_api.delay_s = 2.0
    transport = BatchTransport(batch_config(judge_server))
    record = transport.submit(lines_for(transport, 3), wave=0)
    assert record.custom_ids == ["key-0", "key-1", "key-2"]
    assert transport.state(record.batch_id).status == "in_progress"
    while not (state := transport.state(record.batch_id)).finished:
        time.sleep(0.05)
    assert state.status == "completed" and state.completed == 3
    results = transport.results(state, record.custom_ids)
    assert {k: r.body["choices"][0]["message"]["content"].endswith("[[7]]") for k, r in results.items()} == dict.fromkeys(record.custom_ids, True)
    assert judge_server.double.count() == 0 and judge_server.double.batch_api.count("helpfulness") == 3


def test_failed_lines_and_an_expired_batch_are_reported_per_line(judge_server):
    api = judge_server.double.batch_api
    api.line_fault = lambda request, index: Fault("status", 500) if index == 0 else None
    api.expire = {0}
    transport = BatchTransport(batch_config(judge_server))
    record = transport.submit(lines_for(transport, 4), wave=0)
    state = transport.state(record.batch_id)
    assert state.status == "expired"
    results = transport.results(state, record.custom_ids)
    assert "HTTP 500" in results["key-0"].error and results["key-0"].status == 500
    assert results["key-1"].body is not None
    assert all(results[k].error.startswith("batch_expired") for k in ("key-2", "key-3"))


def test_a_batch_whose_every_line_failed_has_no_output_file(judge_server):
    judge_server.double.batch_api.line_fault = lambda request, index: Fault("status", 503)
    transport = BatchTransport(batch_config(judge_server))
    record = transport.submit(lines_for(transport, 2), wave=0)
    state = transport.state(record.batch_id)
    assert state.output_file_id is None and state.error_file_id is not None
    assert all(r.status == 503 for r in transport.results(state, record.custom_ids).values())


def test_a_batch_that_fails_validation_or_is_cancelled_reports_it(judge_server):
    api = judge_server.double.batch_api
    api.fail_validation = {0}
    api.delay_s = 60
    transport = BatchTransport(batch_config(judge_server))
    failed = transport.state(transport.submit(lines_for(transport, 1), wave=0).batch_id)
    assert failed.status == "failed" and "injected validation failure" in failed.errors
    live = transport.submit(lines_for(transport, 2), wave=0)
    cancelled = transport.cancel(live.batch_id)
    assert cancelled.status == "cancelled"
    assert {r.error for r in transport.results(cancelled, live.custom_ids).values()} == {f"not run (batch {live.batch_id} cancelled)"}


def test_files_are_split_at_the_line_and_byte_limits(judge_server):
    transport = BatchTransport(batch_config(judge_server))
    lines = lines_for(transport, 5)
    assert [len(f) for f in split_lines(lines, 2, 10**6)] == [2, 2, 1]
    one = len(lines[0].to_json()) + 1
    assert [len(f) for f in split_lines(lines, 100, 2 * one + 1)] == [2, 2, 1]


def test_the_embedded_judge_and_unbatchable_providers_are_refused():
    with pytest.raises(ValueError, match="embedded/smollm2.*openai, azure"):
        JudgeConfig(batch=True)
    with pytest.raises(ValueError, match="ollama/llama3.*provider ollama"):
        JudgeConfig(model="ollama/llama3", batch=True)
    with pytest.raises(BatchUnsupported, match="embedded/smollm2"):
        BatchTransport(JudgeConfig())


def test_ledger_reads_back_live_and_finished_batches(tmp_path, judge_server):
    transport = BatchTransport(batch_config(judge_server))
    ledger = BatchLedger(tmp_path / "batches.jsonl")
    first = transport.submit(lines_for(transport, 2), wave=0)
    ledger.submitted(first)
    second = transport.submit(lines_for(transport, 1), wave=1)
    ledger.submitted(second)
    ledger.read(first.batch_id, "completed", {"key-1": "failed: HTTP 500"})
    again = BatchLedger(tmp_path / "batches.jsonl")
    assert [r.batch_id for r in again.live()] == [second.batch_id] and again.waves() == 2
    failures, last, live = again.history()
    assert failures == {"key-1": 1} and last == {"key-1": "failed: HTTP 500"} and live == {"key-0"}


# -- score_files in batch mode --------------------------------------------------------------


def frame(run) -> pl.DataFrame:
    return pl.read_parquet(run.scores_path).drop("error")


def online_scores(judge_server, small_input, tmp_path, scoring=SCORING) -> pl.DataFrame:
    prompts, candidates = small_input
    run = score_files(prompts, candidates, tmp_path / "online", judge_config_for(judge_server), scoring)
    judge_server.double.reset()
    return frame(run)


@pytest.mark.parametrize("prune", [False, True])
def test_batch_mode_scores_as_online_with_no_online_request(judge_server, small_input, tmp_path, prune):
    scoring = SCORING.model_copy(update={"prune": prune})
    expected = online_scores(judge_server, small_input, tmp_path, scoring)
    waves = []
    run = score_files(*small_input, tmp_path / "batch", batch_config(judge_server), scoring, on_wave=waves.append)
    assert frame(run).equals(expected)
    assert judge_server.double.count() == 0
    total = run.summary.judge.total
    assert total.batch_calls == total.calls == judge_server.double.batch_api.count() > 0
    batch = run.summary.batch
    assert batch.waves >= 2 and batch.batch_ids == list(judge_server.double.batch_api.batches)
    assert batch.pricing == "unknown (litellm has no price for the model)"
    assert batch.requests_online == 0 and batch.requests_by_batch == total.calls
    assert {w.wave for w in waves} == set(range(batch.waves))
    submitted = judge_server.double.batch_api.submitted
    assert len(submitted) == len(set(submitted))
    # Run again: every answer is cached, nothing is submitted.
    again = score_files(*small_input, tmp_path / "batch", batch_config(judge_server), scoring)
    assert frame(again).equals(expected) and len(judge_server.double.batch_api.submitted) == len(submitted)


class Died(BaseException):
    """The worker dies while it waits (a kill -9 leaves nothing else behind either)."""


def test_a_run_that_died_waiting_resumes_the_same_batches(judge_server, small_input, tmp_path, monkeypatch):
    from longreward_core.reward import batch_executor

    expected = online_scores(judge_server, small_input, tmp_path)
    api = judge_server.double.batch_api
    api.delay_s = 0.5

    def die_on_second_wave(seconds):
        if len(api.batches) == 2:
            raise Died

    monkeypatch.setattr(batch_executor, "pause", die_on_second_wave)
    with pytest.raises(Died):
        score_files(*small_input, tmp_path / "batch", batch_config(judge_server), SCORING)
    monkeypatch.undo()
    live = [r.batch_id for r in BatchLedger(tmp_path / "batch" / "batches.jsonl").live()]
    assert live == ["batch_0001"]
    api.delay_s = 0
    run = score_files(*small_input, tmp_path / "batch", batch_config(judge_server), SCORING)
    assert frame(run).equals(expected)
    assert len(api.submitted) == len(set(api.submitted)), "no line submitted twice"
    assert judge_server.double.count() == 0


def test_failed_lines_and_an_expired_batch_are_asked_again(judge_server, small_input, tmp_path):
    expected = online_scores(judge_server, small_input, tmp_path)
    api = judge_server.double.batch_api
    api.line_fault = fault_mix(0.2, ["500"], seed=3)
    api.expire = {1}
    run = score_files(*small_input, tmp_path / "batch", batch_config(judge_server, transport_retries=5), SCORING)
    assert frame(run).equals(expected)
    assert run.summary.judge.total.batch_failed_lines > 0
    assert api.batches["batch_0001"]["status"] == "expired"


def test_a_line_failing_every_time_fails_its_candidate_only(judge_server, small_input, tmp_path):
    api = judge_server.double.batch_api
    api.line_fault = lambda request, index: Fault("status", 500) if "steel prices" in request.content and request.task == "helpfulness" else None
    run = score_files(*small_input, tmp_path / "batch", batch_config(judge_server, transport_retries=1), SCORING)
    scores = pl.read_parquet(run.scores_path)
    failed = scores.filter(pl.col("status") == "failed")["candidate_id"].to_list()
    assert failed == ["p1-1"] and run.summary.unreachable == 1
    assert Counter(api.submitted).most_common(1)[0][1] == 2  # the first try and one retry


def test_every_line_of_the_first_batch_failing_is_asked_again(judge_server, small_input, tmp_path):
    expected = online_scores(judge_server, small_input, tmp_path)
    api = judge_server.double.batch_api
    api.line_fault = lambda request, index: Fault("status", 500) if len(api.batches) == 1 else None
    run = score_files(*small_input, tmp_path / "batch", batch_config(judge_server), SCORING)
    assert frame(run).equals(expected)
    assert api.batches["batch_0000"]["output_file_id"] is None
    first, second = ({line["custom_id"] for line in api.batches[b]["_lines"]} for b in ("batch_0000", "batch_0001"))
    assert first <= second  # every line of the failed batch asked again in the next wave


def test_waves_are_split_into_files_within_the_line_limit(judge_server, small_input, tmp_path):
    expected = online_scores(judge_server, small_input, tmp_path)
    api = judge_server.double.batch_api
    run = score_files(*small_input, tmp_path / "batch", batch_config(judge_server, batch_max_lines=7), SCORING)
    assert frame(run).equals(expected)
    sizes = [b["request_counts"]["total"] for b in api.batches.values()]
    assert max(sizes) == 7 and len(sizes) > run.summary.batch.waves


@pytest.mark.parametrize("how", ["fail_validation", "cancel"])
def test_a_broken_batch_stops_the_run_naming_it_and_a_rerun_finishes(judge_server, small_input, tmp_path, how):
    expected = online_scores(judge_server, small_input, tmp_path)
    api = judge_server.double.batch_api
    if how == "fail_validation":
        api.fail_validation = {1}
    else:
        api.delay_s = 0.3
        original = api._create

        def create_then_cancel(request):
            answer = original(request)
            if len(api.batches) == 2:
                api.cancel("batch_0001")
            return answer

        api._create = create_then_cancel
    with pytest.raises(BatchFailed, match="batch batch_0001 (failed|cancelled).*run the same command again"):
        score_files(*small_input, tmp_path / "batch", batch_config(judge_server), SCORING)
    api.fail_validation, api.delay_s = set(), 0
    run = score_files(*small_input, tmp_path / "batch", batch_config(judge_server), SCORING)
    assert frame(run).equals(expected)
    ledger = [json.loads(line) for line in (tmp_path / "batch" / "batches.jsonl").read_text().splitlines()]
    assert any(row.get("batch_id") == "batch_0001" and row["event"] == "read" for row in ledger)


# -- the command line -----------------------------------------------------------------------


def test_score_batch_on_the_command_line_prints_each_wave(judge_server, sample_paths, tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from flows.cli import app
    from longreward_testing.scenarios import TEST_API_KEY

    monkeypatch.setenv("LONGREWARD_JUDGE_API_KEY", TEST_API_KEY)
    prompts, candidates = sample_paths
    result = CliRunner().invoke(app, [
        "score", "--prompts", str(prompts), "--candidates", str(candidates), "--out", str(tmp_path / "out"),
        "--judge-model", "openai/judge-double", "--judge-api-base", judge_server.api_base, "--batch", "--batch-poll-s", "0.01",
    ])
    assert result.exit_code == 0, result.output
    assert "wave 0:" in result.output and "batch_0000 completed" in result.output and TEST_API_KEY not in result.output
    assert judge_server.double.count() == 0
    accounting = json.loads((tmp_path / "out" / "accounting.json").read_text())
    assert accounting["batch"]["batch_ids"] == list(judge_server.double.batch_api.batches)
    assert accounting["judge"]["total"]["batch_calls"] == judge_server.double.batch_api.count()


def test_score_batch_with_the_embedded_judge_is_refused_before_anything_starts(sample_paths, tmp_path):
    from typer.testing import CliRunner

    from flows.cli import app

    prompts, candidates = sample_paths
    result = CliRunner().invoke(app, ["score", "--prompts", str(prompts), "--candidates", str(candidates),
                                      "--out", str(tmp_path / "out"), "--batch"])
    assert result.exit_code == 2
    assert "embedded/smollm2-135m-instruct has no Batch API" in " ".join(result.output.split())
    assert not (tmp_path / "out").exists()


def test_the_judge_budget_is_checked_before_each_wave(judge_server, small_input, tmp_path):
    first = score_files(*small_input, tmp_path / "probe", batch_config(judge_server), SCORING)
    wave0 = json.loads((tmp_path / "probe" / "batches.jsonl").read_text().splitlines()[0])["custom_ids"]
    judge_server.double.batch_api.reset()
    # Tokens for a bit less than the first wave: it is submitted (the budget is not reached yet), the second is not.
    tokens = first.summary.judge.total.prompt_tokens + first.summary.judge.total.completion_tokens
    budget = SCORING.model_copy(update={"max_judge_tokens": tokens // 4})
    run = score_files(*small_input, tmp_path / "batch", batch_config(judge_server), budget)
    assert judge_server.double.batch_api.submitted == wave0
    assert run.summary.budget_reached and run.summary.not_scored_prompts == ["p1", "p2"]
    larger = score_files(*small_input, tmp_path / "batch", batch_config(judge_server), SCORING)
    assert larger.summary.not_scored_prompts == [] and larger.summary.scored == first.summary.scored
    assert len(judge_server.double.batch_api.submitted) == len(set(judge_server.double.batch_api.submitted))

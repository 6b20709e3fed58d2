"""The judge budget: no new prompt once it is reached, a clear status naming what was not scored,
and a re-run with a larger budget that goes on without repeating a call."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from flows.cli import app
from longreward_core.pipeline.score_files import score_files
from longreward_core.reward.scorer import ScoringConfig
from longreward_testing.scenarios import TEST_API_KEY, judge_config_for
from tests.test_scoring import DOC, write_jsonl

SCORING = dict(retrieval_chunk_tokens=32, completeness_chunk_tokens=256, prompts_in_flight=1)


def inputs(tmp_path, n=4, doc=DOC):
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [
        {"id": f"p{i:02d}", "context": doc, "query": f"What happened to the station ({i})?"} for i in range(n)
    ])
    candidates = write_jsonl(tmp_path / "candidates.jsonl", [
        {"prompt_id": f"p{i:02d}", "candidate_id": f"p{i:02d}-{k}", "response": f"Station {i} was built in {1960 + k}. Its pumps number {i + k}."}
        for i in range(n) for k in range(2)
    ])
    return prompts, candidates


def test_a_budget_stops_new_prompts_and_a_larger_one_goes_on_without_repeating(judge_server, tmp_path):
    prompts, candidates = inputs(tmp_path)
    judge = judge_config_for(judge_server)
    double = judge_server.double
    # What one prompt costs in tokens, from an unlimited run elsewhere.
    full = score_files(prompts, candidates, tmp_path / "full", judge, ScoringConfig(**SCORING))
    total = full.summary.judge.total
    per_prompt = (total.prompt_tokens + total.completion_tokens) / 4
    full_requests = double.count()
    double.reset()

    # Room for a bit more than one prompt: the second starts (the first is within budget), the rest do not.
    small = score_files(prompts, candidates, tmp_path / "out", judge, ScoringConfig(**SCORING, max_judge_tokens=int(per_prompt * 1.5)))
    s = small.summary
    assert s.budget_reached and "reached the budget" in s.budget_reached
    assert s.not_scored_prompts == ["p02", "p03"] and s.scored == 4
    asked = [r.content for r in double.requests]

    double.reset()
    larger = score_files(prompts, candidates, tmp_path / "out", judge, ScoringConfig(**SCORING, max_judge_tokens=int(per_prompt * 10)))
    assert larger.summary.budget_reached is None and larger.summary.not_scored_prompts == []
    assert larger.summary.scored == 8
    # Nothing asked before is asked again.
    assert not set(asked) & {r.content for r in double.requests}
    # Both runs together asked exactly what one unlimited run asks.
    assert len(asked) + double.count() == full_requests


def test_the_cli_names_what_was_not_scored(judge_server, tmp_path, monkeypatch):
    monkeypatch.setenv("LONGREWARD_JUDGE_API_KEY", TEST_API_KEY)
    # 18 prompts: the first 16 start at once (prompts in flight), the last two find the budget spent.
    prompts, candidates = inputs(tmp_path, n=18, doc=DOC[:300])
    result = CliRunner().invoke(app, [
        "score", "--prompts", str(prompts), "--candidates", str(candidates), "--out", str(tmp_path / "out"),
        "--judge-model", "openai/judge-double", "--judge-api-base", judge_server.api_base, "--max-judge-tokens", "1",
        "--retrieval-chunk-tokens", "32",
    ])
    assert result.exit_code == 1
    output = " ".join(result.output.split())  # whatever the terminal's width wrapped
    assert "budget reached" in output and "not scored" in output
    accounting = json.loads((tmp_path / "out" / "accounting.json").read_text())
    assert accounting["budget_reached"] and accounting["not_scored_prompts"] == ["p16", "p17"]
    assert "2 prompt(s) not scored: p16, p17" in output

"""The embedded judge (SmolLM2-135M on the CPU) end to end on one small prompt."""

from __future__ import annotations

import json

import polars as pl

from longreward_core.models.embedded import embedded_stats
from longreward_core.pipeline.score import score_files
from longreward_core.reward.judge import JudgeConfig
from longreward_core.reward.scorer import ScoringConfig


def test_embedded_judge_scores_a_small_prompt(tmp_path):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({
        "id": "mill",
        "context": "The Orrin mill opened in 1901 and ground wheat for three villages. It closed in 1968 after a fire.",
        "query": "When did the mill close, and why?",
    }) + "\n")
    candidates = tmp_path / "c.jsonl"
    candidates.write_text(json.dumps({"prompt_id": "mill", "candidate_id": "mill-0", "response": "It closed in 1968 after a fire."}) + "\n")
    before = embedded_stats()
    run = score_files(prompts, candidates, tmp_path / "out", JudgeConfig(concurrency=1), ScoringConfig())
    row = pl.read_parquet(run.scores_path).row(0, named=True)
    # The embedded judge always yields a parseable verdict: every dimension is scored.
    assert row["status"] == "scored", row["error"]
    for dimension in ("helpfulness", "logicality", "faithfulness", "completeness"):
        assert 0.0 <= row[dimension] <= 10.0
    total = run.summary.judge["total"]
    assert total["parse_failures"] == 0 and total["failed_calls"] == 0
    after = run.summary.embedded_judge
    verdicts = (after["verdicts_unaided"] + after["verdicts_constrained"]) - (
        before["verdicts_unaided"] + before["verdicts_constrained"]
    )
    assert verdicts == total["calls"] >= 5


def test_decoding_stops_only_at_a_verdict_the_parser_reads():
    from longreward_core.models.embedded import _has_verdict
    from longreward_core.reward.dimensions.faithfulness import STATEMENTS
    from longreward_core.reward.verdicts import RATING

    cases = [
        (RATING, "The reference would earn [[7]]", False),
        (RATING, "Analysis.\nRating: [[7]]", True),
        (STATEMENTS, "[[statements]]\n- The sky is bl", False),
        (STATEMENTS, "[[statements]]\n- The sky is blue.\n", False),
        (STATEMENTS, "[[statements]]\n- Statements:\n[[end]]", False),
        (STATEMENTS, "[[statements]]\n- The sky is blue.\n[[end]]", True),
    ]
    for verdict, text, stops in cases:
        assert _has_verdict(text, verdict.constraint()) is stops, text
        if stops:
            verdict.parse(text)

"""Sharding the inputs (pipeline.build.write_shards): streamed, in input order, bad rows quarantined."""

from __future__ import annotations

import json

import polars as pl

from longreward_core.pipeline import build
from longreward_core.pipeline.build import write_shards


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_candidates_follow_their_prompts_into_shards_in_input_order(tmp_path, monkeypatch):
    monkeypatch.setattr(build._CandidateSpool, "BUFFER_ROWS", 2)  # several flushes of the spool
    prompts = _jsonl(tmp_path / "prompts.jsonl", [
        {"id": f"p{i}", "context": f"Document {i}.", "query": f"Question {i}?"} for i in range(5)
    ] + [{"id": "p1", "context": "again", "query": "again?"}])
    candidates = _jsonl(tmp_path / "candidates.jsonl", [
        {"prompt_id": "p1", "candidate_id": "p1-a", "response": "one a"},
        {"prompt_id": "p0", "candidate_id": "p0-a", "response": "zero a"},
        {"prompt_id": "p4", "candidate_id": "p4-a", "response": "four a"},
        {"prompt_id": "p9", "candidate_id": "p9-a", "response": "unknown prompt"},
        {"prompt_id": "p1", "candidate_id": "p1-b", "response": "one b"},
        {"prompt_id": "p0", "candidate_id": "p0-a", "response": "duplicate"},
        {"prompt_id": "p0", "candidate_id": "p0-b", "response": "zero b"},
    ])
    plan = write_shards(prompts, candidates, 2, tmp_path / "shards")

    assert [d.name for d in plan.shard_dirs] == ["shard-0000", "shard-0001", "shard-0002"]
    assert (plan.prompts, plan.candidates, plan.quarantined) == (5, 5, 3)
    shard_prompts = [pl.read_parquet(d / "prompts.parquet")["id"].to_list() for d in plan.shard_dirs]
    assert shard_prompts == [["p0", "p1"], ["p2", "p3"], ["p4"]]
    shard_candidates = [pl.read_parquet(d / "candidates.parquet")["candidate_id"].to_list() for d in plan.shard_dirs]
    assert shard_candidates == [["p0-a", "p0-b", "p1-a", "p1-b"], [], ["p4-a"]]
    assert pl.read_parquet(plan.shard_dirs[0] / "candidates.parquet")["response"].to_list()[0] == "zero a"
    reasons = pl.read_parquet(plan.quarantine_path)["reason"].to_list()
    assert reasons[0].startswith("duplicate id 'p1'")
    assert reasons[1:] == ["candidate for unknown prompt 'p9'", "duplicate candidate_id 'p0-a' (first on line 2)"]
    assert [p.name for p in (tmp_path / "shards").iterdir() if p.name.startswith(".")] == []  # the spool is gone


def test_without_candidates_only_prompts_are_sharded(tmp_path):
    prompts = _jsonl(tmp_path / "prompts.jsonl", [{"id": f"p{i}", "context": "Text.", "query": "Why?"} for i in range(3)])
    plan = write_shards(prompts, None, 5, tmp_path / "shards")
    assert plan.candidates is None and plan.quarantine_path is None
    assert [sorted(p.name for p in d.iterdir()) for d in plan.shard_dirs] == [["prompts.parquet"]]


def test_reward_distribution_reads_the_shards_scores_lazily_and_leaves_failed_rows_out(tmp_path):
    from longreward_core.data.records import SCORES_SCHEMA
    from longreward_core.pipeline.build import reward_distribution

    def rows(rewards, status="scored"):
        return pl.DataFrame([{"prompt_id": "p", "candidate_id": f"c{i}", "helpfulness": r, "logicality": r,
                              "faithfulness": r, "completeness": r, "reward": r, "status": status}
                             for i, r in enumerate(rewards)], schema=SCORES_SCHEMA)

    rows([0.5, 9.2, 10.0]).write_parquet(tmp_path / "a.parquet")
    pl.concat([rows([3.0, 4.0]), rows([None], "failed")]).write_parquet(tmp_path / "b.parquet")
    lazy = reward_distribution(pl.scan_parquet([tmp_path / "a.parquet", tmp_path / "b.parquet"]))
    assert lazy.histogram == [1, 0, 0, 1, 1, 0, 0, 0, 0, 2] and lazy.scored == 5
    helpfulness = lazy.by_dimension.filter(pl.col("dimension") == "helpfulness").row(0, named=True)
    assert helpfulness["median"] == 4.0 and helpfulness["mean"] == (0.5 + 9.2 + 10.0 + 3.0 + 4.0) / 5
    eager = reward_distribution(pl.concat([pl.read_parquet(tmp_path / n) for n in ("a.parquet", "b.parquet")]))
    assert eager.histogram == lazy.histogram and eager.by_dimension.equals(lazy.by_dimension)

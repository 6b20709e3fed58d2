"""Preference pairs from scored candidates (pairs.build_pairs) and the `pairs` file run."""

from __future__ import annotations

import json
from pathlib import Path

import polars as pl
import pytest

from longreward_core.data.pairs import (
    PairConfig,
    PairsResult,
    build_pairs,
    user_message,
)
from longreward_core.data.records import (
    DIMENSIONS,
    PAIRS_SCHEMA,
    SCORES_SCHEMA,
    Candidate,
    Prompt,
)
from longreward_core.pipeline.score_files import pairs_files

P1 = Prompt(id="p1", context="Document one: the station was built in 1962.", query="When was it built?")
P2 = Prompt(id="p2", context="Document two: 云溪镇图书馆 has 52,000 books.", query="How many books?")


def candidates_for(prompt_id: str, n: int) -> list[Candidate]:
    return [Candidate(prompt_id=prompt_id, candidate_id=f"{prompt_id}-{k}", response=f"answer {k} to {prompt_id}") for k in range(n)]


def score_row(prompt_id: str, candidate_id: str, reward: float | None) -> dict:
    failed = reward is None
    row = {"prompt_id": prompt_id, "candidate_id": candidate_id, "language": "en"}
    for d in DIMENSIONS:
        row[d] = None if (failed and d == "faithfulness") else (reward if reward is not None else 5.0)
    row["faithfulness_statements"] = None if failed else 2
    row["reward"] = reward
    row["status"] = "failed" if failed else "scored"
    row["error"] = "faithfulness: judge gave no verdict" if failed else None
    return row


def scores_frame(rewards: dict[str, float | None]) -> pl.DataFrame:
    """candidate_id -> reward (None = failed); the prompt id is the candidate id's prefix."""
    rows = [score_row(cid.rsplit("-", 1)[0], cid, r) for cid, r in rewards.items()]
    return pl.DataFrame(rows, schema=SCORES_SCHEMA)


def cfg(min_candidates: int = 2, min_margin: float = 0.0) -> PairConfig:
    return PairConfig(min_candidates=min_candidates, min_margin=min_margin)


def test_chosen_is_highest_and_rejected_is_lowest() -> None:
    scores = scores_frame({"p1-0": 6.5, "p1-1": 9.0, "p1-2": 2.25, "p1-3": 7.0})

    result = build_pairs(scores, [P1], candidates_for("p1", 4), cfg())

    assert result.skipped == {}
    (pair,) = result.pairs
    assert (pair.prompt_id, pair.chosen_id, pair.rejected_id) == ("p1", "p1-1", "p1-2")
    assert (pair.chosen_reward, pair.rejected_reward) == (9.0, 2.25)
    assert pair.margin == 6.75
    assert pair.chosen == [{"role": "assistant", "content": "answer 1 to p1"}]
    assert pair.rejected == [{"role": "assistant", "content": "answer 2 to p1"}]


def test_input_order_does_not_matter() -> None:
    rewards = {"p1-0": 3.0, "p1-1": 8.0, "p1-2": 1.0, "p1-3": 8.0, "p1-4": 1.0}
    forward = build_pairs(scores_frame(rewards), [P1], candidates_for("p1", 5), cfg())
    backward = build_pairs(
        scores_frame(dict(reversed(rewards.items()))), [P1], list(reversed(candidates_for("p1", 5))), cfg()
    )
    assert forward.frame().equals(backward.frame())


def test_failed_candidates_are_not_counted_and_never_chosen() -> None:
    # p1-0 failed; were its reward (None) treated as anything it could be chosen or rejected.
    scores = scores_frame({"p1-0": None, "p1-1": 4.0, "p1-2": 6.0, "p1-3": None})

    result = build_pairs(scores, [P1], candidates_for("p1", 4), cfg(min_candidates=2))
    (pair,) = result.pairs
    assert (pair.chosen_id, pair.rejected_id) == ("p1-2", "p1-1")

    # Four score rows, but only two scored: not enough for three.
    skipped = build_pairs(scores, [P1], candidates_for("p1", 4), cfg(min_candidates=3))
    assert skipped.pairs == []
    assert skipped.skipped == {"fewer than 3 scored candidates": 1}


def test_prompt_with_too_few_scored_candidates_is_skipped_and_counted() -> None:
    prompt3 = Prompt(id="p3", context="Document three.", query="Anything?")
    scores = scores_frame(
        {
            **{f"p1-{k}": float(k) for k in range(5)},  # 5 scored: enough
            **{f"p2-{k}": float(k) for k in range(4)},  # 4 scored: too few
            # p3: no score rows at all
        }
    )
    candidates = candidates_for("p1", 5) + candidates_for("p2", 4) + candidates_for("p3", 5)

    result = build_pairs(scores, [P1, P2, prompt3], candidates, PairConfig())  # default min_candidates=5

    assert [p.prompt_id for p in result.pairs] == ["p1"]
    assert result.skipped == {"fewer than 5 scored candidates": 2}


def test_scores_for_unknown_candidates_are_ignored() -> None:
    # p1-9 has a score but no candidate row (so no response): it cannot be chosen nor counted.
    scores = scores_frame({"p1-0": 2.0, "p1-1": 3.0, "p1-9": 10.0})
    result = build_pairs(scores, [P1], candidates_for("p1", 2), cfg(min_candidates=2))
    (pair,) = result.pairs
    assert (pair.chosen_id, pair.rejected_id) == ("p1-1", "p1-0")
    assert build_pairs(scores, [P1], candidates_for("p1", 2), cfg(min_candidates=3)).skipped == {
        "fewer than 3 scored candidates": 1
    }


def test_min_margin_skips_close_prompts() -> None:
    scores = scores_frame({"p1-0": 5.0, "p1-1": 6.0, "p2-0": 5.0, "p2-1": 7.5})
    candidates = candidates_for("p1", 2) + candidates_for("p2", 2)

    result = build_pairs(scores, [P1, P2], candidates, cfg(min_margin=1.0))

    # margin 1.0 is not *above* 1.0; margin 2.5 is.
    assert [(p.prompt_id, p.margin) for p in result.pairs] == [("p2", 2.5)]
    assert result.skipped == {"reward margin not above 1.0": 1}


def test_all_equal_rewards_are_skipped() -> None:
    scores = scores_frame({f"p1-{k}": 7.25 for k in range(5)})
    result = build_pairs(scores, [P1], candidates_for("p1", 5), PairConfig())
    assert result.pairs == []
    assert result.skipped == {"reward margin not above 0.0": 1}


def test_tie_break_is_deterministic() -> None:
    # Top reward 9.0 shared by b, a, c -> smallest id 'p1-a' chosen.
    # Bottom reward 1.0 shared by x, z, y -> largest id 'p1-z' rejected.
    rewards = {"p1-b": 9.0, "p1-x": 1.0, "p1-a": 9.0, "p1-m": 5.0, "p1-z": 1.0, "p1-c": 9.0, "p1-y": 1.0}
    candidates = [Candidate(prompt_id="p1", candidate_id=cid, response=f"resp {cid}") for cid in rewards]

    result = build_pairs(scores_frame(rewards), [P1], candidates, cfg())

    (pair,) = result.pairs
    assert (pair.chosen_id, pair.rejected_id) == ("p1-a", "p1-z")
    assert pair.chosen[0]["content"] == "resp p1-a"
    assert pair.rejected[0]["content"] == "resp p1-z"


def test_output_is_trl_conversational_format() -> None:
    scores = scores_frame({"p2-0": 3.0, "p2-1": 8.0})
    result = build_pairs(scores, [P2], candidates_for("p2", 2), cfg())

    (pair,) = result.pairs
    assert pair.prompt == [{"role": "user", "content": f"{P2.context}\n\n{P2.query}"}]
    assert user_message(P2) == pair.prompt[0]["content"]
    assert pair.chosen == [{"role": "assistant", "content": "answer 1 to p2"}]
    assert pair.rejected == [{"role": "assistant", "content": "answer 0 to p2"}]

    frame = result.frame()
    assert frame.schema == PAIRS_SCHEMA
    (row,) = frame.to_dicts()
    assert row == {
        "prompt_id": "p2",
        "prompt": [{"role": "user", "content": f"{P2.context}\n\n{P2.query}"}],
        "chosen": [{"role": "assistant", "content": "answer 1 to p2"}],
        "rejected": [{"role": "assistant", "content": "answer 0 to p2"}],
        "chosen_id": "p2-1",
        "rejected_id": "p2-0",
        "chosen_reward": 8.0,
        "rejected_reward": 3.0,
        "margin": 5.0,
    }


def test_empty_result_frame_has_schema() -> None:
    frame = PairsResult(pairs=[]).frame()
    assert frame.height == 0
    assert frame.schema == PAIRS_SCHEMA


def test_pair_config_validation() -> None:
    with pytest.raises(ValueError):
        PairConfig(min_candidates=1)
    with pytest.raises(ValueError):
        PairConfig(min_margin=-0.5)
    assert PairConfig().min_candidates == 5 and PairConfig().min_margin == 0.0


def test_pairs_parquet_loads_with_datasets(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf_cache"))
    import datasets

    scores = scores_frame({"p1-0": 1.0, "p1-1": 9.0, "p1-2": 5.0, "p2-0": 2.0, "p2-1": 4.0})
    result = build_pairs(scores, [P1, P2], candidates_for("p1", 3) + candidates_for("p2", 2), cfg())
    path = tmp_path / "pairs.parquet"
    result.frame().write_parquet(path)

    ds = datasets.load_dataset("parquet", data_files=str(path), split="train", cache_dir=str(tmp_path / "hf_cache"))

    assert ds.num_rows == 2
    assert ds.column_names == list(PAIRS_SCHEMA.names())
    first = ds[0]
    assert first["prompt_id"] == "p1"
    assert first["prompt"] == [{"role": "user", "content": f"{P1.context}\n\n{P1.query}"}]
    assert first["chosen"] == [{"role": "assistant", "content": "answer 1 to p1"}]
    assert first["rejected"] == [{"role": "assistant", "content": "answer 0 to p1"}]
    assert (first["chosen_reward"], first["rejected_reward"], first["margin"]) == (9.0, 1.0, 8.0)
    # The conversational structure TRL expects: lists of {role, content} string structs.
    # (polars writes Arrow large_string, which datasets reports as such.)
    for column in ("prompt", "chosen", "rejected"):
        feature = ds.features[column]
        inner = feature.feature if hasattr(feature, "feature") else feature[0]
        assert set(inner) == {"role", "content"}
        assert {v.dtype for v in inner.values()} <= {"string", "large_string"}
    assert ds[1]["prompt"][0]["content"].endswith(P2.query)


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def test_pairs_files_end_to_end(tmp_path: Path) -> None:
    prompts_path = write_jsonl(
        tmp_path / "prompts.jsonl",
        [
            {"id": "p1", "context": P1.context, "query": P1.query},
            {"id": "p2", "context": P2.context, "query": P2.query},
            {"id": "p3", "context": "Document three.", "query": "Q3?"},
        ],
    )
    candidate_rows = [
        {"prompt_id": c.prompt_id, "candidate_id": c.candidate_id, "response": c.response}
        for c in candidates_for("p1", 3) + candidates_for("p2", 3) + candidates_for("p3", 3)
    ]
    candidate_rows.append({"prompt_id": "p1", "candidate_id": "p1-bad", "response": ""})  # quarantined
    candidates_path = write_jsonl(tmp_path / "candidates.jsonl", candidate_rows)
    scores_path = tmp_path / "scores.parquet"
    scores_frame(
        {
            "p1-0": 4.0, "p1-1": 8.5, "p1-2": 4.0,  # pair: p1-1 over p1-2 (tie at bottom -> larger id)
            "p2-0": 6.0, "p2-1": None, "p2-2": 6.5,  # margin 0.5: not above 1.0 -> skipped
            "p3-0": 9.0, "p3-1": None, "p3-2": None,  # one scored -> skipped
        }
    ).write_parquet(scores_path)
    out_path = tmp_path / "out" / "pairs.parquet"

    result = pairs_files(scores_path, prompts_path, candidates_path, out_path, cfg(min_candidates=2, min_margin=1.0))

    assert result.skipped == {"reward margin not above 1.0": 1, "fewer than 2 scored candidates": 1}
    written = pl.read_parquet(out_path)
    assert written.schema == PAIRS_SCHEMA
    assert written.equals(result.frame())
    (row,) = written.to_dicts()
    assert (row["prompt_id"], row["chosen_id"], row["rejected_id"], row["margin"]) == ("p1", "p1-1", "p1-2", 4.5)
    assert row["prompt"] == [{"role": "user", "content": f"{P1.context}\n\n{P1.query}"}]
    assert row["chosen"] == [{"role": "assistant", "content": "answer 1 to p1"}]
    assert row["rejected"] == [{"role": "assistant", "content": "answer 2 to p1"}]
    assert sorted(p.name for p in out_path.parent.iterdir()) == ["pairs.parquet"]  # no temp files left


def test_publish_writes_a_loadable_dataset_even_without_pairs(tmp_path, empty_build_manifest):
    """A build where no prompt qualifies still publishes: an empty dataset with the pair columns."""
    import datasets

    from longreward_core.data.records import PAIRS_SCHEMA
    from longreward_core.pipeline.build import publish_dataset

    empty = tmp_path / "pairs.parquet"
    pl.DataFrame([], schema=PAIRS_SCHEMA).write_parquet(empty)
    manifest_path = publish_dataset(empty, tmp_path / "build", empty_build_manifest)
    dataset = datasets.load_from_disk(str(tmp_path / "build" / "dataset"))
    assert dataset.num_rows == 0
    assert set(dataset.column_names) == set(PAIRS_SCHEMA.names())
    assert json.loads(manifest_path.read_text())["counts"]["pairs"] == 0

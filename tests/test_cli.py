"""The `longreward` command line on the bundled sample, with the loopback judge."""

from __future__ import annotations

import json
import re

import polars as pl
from typer.testing import CliRunner

from flows.cli import app
from flows.cli.train import parse_dpo_overrides
from longreward_testing.judge_double import Fault, slot
from longreward_testing.scenarios import TEST_API_KEY
from tests.test_training import pair_row, save_tiny_llama, write_pairs

runner = CliRunner()


def test_score_then_pairs(judge_server, sample_paths, tmp_path, monkeypatch):
    monkeypatch.setenv("LONGREWARD_JUDGE_API_KEY", TEST_API_KEY)
    # Longer answers get more helpfulness here, so rewards differ within each prompt.
    judge_server.double.answers = {"helpfulness": lambda r: f"Rating: [[{min(10, len(slot(r.content, 'response')) // 40)}]]"}
    prompts, candidates = sample_paths
    out = tmp_path / "out"
    result = runner.invoke(
        app,
        ["score", "--prompts", str(prompts), "--candidates", str(candidates), "--out", str(out),
         "--judge-model", "openai/judge-double", "--judge-api-base", judge_server.api_base,
         "--judge-concurrency", "4", "--judge-rpm", "60000"],
    )
    assert result.exit_code == 0, result.output
    assert "LongReward scores" in result.output and TEST_API_KEY not in result.output
    scores = pl.read_parquet(out / "scores.parquet")
    assert scores.height == 12 and scores["status"].to_list() == ["scored"] * 12
    assert set(scores["language"]) == {"en", "zh"}
    accounting = json.loads((out / "accounting.json").read_text())
    assert accounting["judge"]["total"]["calls"] == judge_server.double.count()
    assert set(accounting["judge"]["per_purpose"]) == {"helpfulness", "logicality", "faithfulness", "completeness"}
    # Every request carried the key from the environment.
    assert all(a == f"Bearer {TEST_API_KEY}" for a in judge_server.double.authorization)

    pairs_path = tmp_path / "pairs.parquet"
    result = runner.invoke(
        app, ["pairs", "--scores", str(out / "scores.parquet"), "--prompts", str(prompts),
              "--candidates", str(candidates), "--out", str(pairs_path)],
    )
    assert result.exit_code == 0, result.output
    pairs = pl.read_parquet(pairs_path).sort("prompt_id")
    assert pairs["prompt_id"].to_list() == ["en-001", "zh-001"] and (pairs["margin"] > 0).all()
    for pair in pairs.iter_rows(named=True):
        rewards = scores.filter(pl.col("prompt_id") == pair["prompt_id"])
        assert pair["chosen_reward"] == rewards["reward"].max()
        assert pair["rejected_reward"] == rewards["reward"].min()


def test_score_quarantines_bad_rows_and_goes_on(judge_server, tmp_path, monkeypatch):
    monkeypatch.setenv("LONGREWARD_JUDGE_API_KEY", TEST_API_KEY)
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(
        json.dumps({"id": "a", "context": "The mill opened in 1901.", "query": "When did the mill open?"}) + "\n"
        + json.dumps({"id": "b", "context": "   ", "query": "Empty?"}) + "\n"
    )
    candidates = tmp_path / "c.jsonl"
    candidates.write_text(
        json.dumps({"prompt_id": "a", "candidate_id": "a-0", "response": "The mill opened in 1901."}) + "\n"
        + json.dumps({"prompt_id": "zzz", "candidate_id": "z-0", "response": "?"}) + "\n"
    )
    out = tmp_path / "out"
    result = runner.invoke(
        app, ["score", "--prompts", str(prompts), "--candidates", str(candidates), "--out", str(out),
              "--judge-model", "openai/judge-double", "--judge-api-base", judge_server.api_base],
    )
    assert result.exit_code == 0, result.output
    quarantine = pl.read_parquet(out / "quarantine.parquet")
    assert sorted(quarantine["reason"].to_list()) == ["candidate for unknown prompt 'zzz'", "empty context"]
    assert pl.read_parquet(out / "scores.parquet")["candidate_id"].to_list() == ["a-0"]
    assert json.loads((out / "accounting.json").read_text())["quarantined"] == 2


def test_missing_input_file_is_a_clear_error(tmp_path):
    result = runner.invoke(
        app, ["score", "--prompts", str(tmp_path / "nope.jsonl"), "--candidates", str(tmp_path / "c.jsonl"), "--out", str(tmp_path)]
    )
    assert result.exit_code == 2
    assert "nope.jsonl: file not found" in re.sub(r"\s+", " ", result.output)


def _score(judge_server, prompts, candidates, out):
    return runner.invoke(
        app, ["score", "--prompts", str(prompts), "--candidates", str(candidates), "--out", str(out),
              "--judge-model", "openai/judge-double", "--judge-api-base", judge_server.api_base, "--judge-timeout", "5"],
    )


def test_score_exit_codes_say_when_nothing_was_scored(judge_server, sample_paths, tmp_path, monkeypatch):
    monkeypatch.setenv("LONGREWARD_JUDGE_API_KEY", TEST_API_KEY)
    prompts, candidates = sample_paths
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    result = _score(judge_server, prompts, empty, tmp_path / "empty")
    assert result.exit_code == 1 and "nothing to score" in result.output and judge_server.double.count() == 0

    judge_server.double.faults = [Fault("status", 400)] * 1000  # every request refused for good
    result = _score(judge_server, prompts, candidates, tmp_path / "refused")
    assert result.exit_code == 1 and "no candidate could be scored" in result.output
    scores = pl.read_parquet(tmp_path / "refused" / "scores.parquet")
    assert set(scores["status"]) == {"failed"} and all("HTTP 400" in e for e in scores["error"])

    judge_server.double.faults = [Fault("status", 401)] * 1000
    result = _score(judge_server, prompts, candidates, tmp_path / "unauthorised")
    assert result.exit_code == 2 and "refused the credentials (HTTP 401)" in result.output
    assert TEST_API_KEY not in result.output


def test_score_with_prune_publishes_the_same_pairs(judge_server, sample_paths, tmp_path, monkeypatch):
    monkeypatch.setenv("LONGREWARD_JUDGE_API_KEY", TEST_API_KEY)
    judge_server.double.answers = {"helpfulness": lambda r: f"Rating: [[{min(10, len(slot(r.content, 'response')) // 40)}]]"}
    prompts, candidates = sample_paths
    published = {}
    for flag in ("--no-prune", "--prune"):
        out = tmp_path / flag
        result = runner.invoke(
            app,
            ["score", "--prompts", str(prompts), "--candidates", str(candidates), "--out", str(out),
             "--judge-model", "openai/judge-double", "--judge-api-base", judge_server.api_base, flag,
             "--min-candidates", "2"],
        )
        assert result.exit_code == 0, result.output
        result = runner.invoke(
            app, ["pairs", "--scores", str(out / "scores.parquet"), "--prompts", str(prompts),
                  "--candidates", str(candidates), "--out", str(out / "pairs.parquet"), "--min-candidates", "2"],
        )
        assert result.exit_code == 0, result.output
        published[flag] = pl.read_parquet(out / "pairs.parquet").sort("prompt_id").to_dicts()
    assert published["--prune"] == published["--no-prune"] and len(published["--prune"]) == 2
    accounting = json.loads((tmp_path / "--prune" / "accounting.json").read_text())
    # The sample's candidates make one to three statements each: too few checks for pruning to
    # save any here (tests/test_pruning.py measures the savings); the counts are reported.
    assert accounting["scored"] + accounting["failed"] + accounting["pruned"] == 12
    assert "support_checks_saved" in accounting


def test_dpo_overrides_are_parsed_as_json_where_they_parse():
    assert parse_dpo_overrides(["max_grad_norm=0.5", "lr_scheduler_type=constant", "use_cpu=true",
                                "run_name=a=b", "warmup_steps=-1"]) == {
        "max_grad_norm": 0.5, "lr_scheduler_type": "constant", "use_cpu": True, "run_name": "a=b", "warmup_steps": -1,
    }
    assert parse_dpo_overrides([]) == {}


def test_a_malformed_dpo_override_is_refused_before_training(tmp_path):
    pairs = write_pairs(tmp_path / "pairs.parquet", [pair_row(0)])
    for item in ("max_grad_norm", "=0.5"):
        result = runner.invoke(app, ["train", "--pairs", str(pairs), "--out", str(tmp_path / "run"),
                                     "--dpo-override", "seed=3", "--dpo-override", item])
        assert result.exit_code == 2, result.output
        assert f"--dpo-override '{item}': expected KEY=VALUE" in result.output
    assert not (tmp_path / "run").exists()


def test_dpo_overrides_reach_the_trainer(tmp_path):
    """`--dpo-override` items end in the DPOConfig of the run, as the manifest reports it."""
    policy = save_tiny_llama(tmp_path / "policy", seed=0)
    pairs = write_pairs(tmp_path / "pairs.parquet", [pair_row(i) for i in range(2)])
    result = runner.invoke(app, ["train", "--pairs", str(pairs), "--out", str(tmp_path / "run"), "--base-model", str(policy),
                                 "--max-steps", "1", "--effective-batch-size", "2", "--per-device-batch-size", "2",
                                 "--accelerate-config", "cpu",
                                 "--dpo-override", "max_grad_norm=0.5", "--dpo-override", "lr_scheduler_type=constant"])
    assert result.exit_code == 0, result.output
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert manifest["dpo_config"]["max_grad_norm"] == 0.5 and manifest["dpo_config"]["lr_scheduler_type"] == "constant"

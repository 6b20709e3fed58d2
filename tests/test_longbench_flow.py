"""The evaluation flow on Prefect's test server: two tiny local models (an "SFT" and a "DPO"
checkpoint) on small LongBench-family fixtures, with the loopback judge."""

from __future__ import annotations

import json

import pytest
from prefect.artifacts import Artifact
from pydantic import ValidationError

from flows.longbench_eval import EvalParams, longbench_eval
from longreward_core.evaluation.predict import POLICY_API_KEY_ENV, ModelSpec
from longreward_testing.judge_double import Fault
from longreward_testing.scenarios import TEST_API_KEY, judge_config_for
from longreward_testing.longbench_fixtures import tiny_model, write_chat, write_longbench, write_v2

pytestmark = pytest.mark.usefixtures("prefect_harness")


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("checkpoints")
    return {name: tiny_model(root / name, seed=seed) for name, seed in (("sft", 0), ("dpo", 1))}


def model(name: str, path) -> ModelSpec:
    return ModelSpec(name=name, model=str(path), backend="transformers", max_input_tokens=96)


def test_the_flow_compares_two_models_on_four_benchmarks(judge_server, checkpoints, tmp_path):
    judge_server.double.answers = {"longbench_qa": lambda r: "Rating: [[2]]"}
    source = write_longbench(tmp_path / "lb", {"hotpotqa": 2, "trec": 1})
    write_longbench(source, {"hotpotqa": 2, "trec": 1}, suffix="_e")
    params = EvalParams(
        models=[model("sft", checkpoints["sft"]), model("dpo", checkpoints["dpo"])],
        benchmarks=["longbench", "longbench-e", "longbench-judged", "longbench-v2"],
        datasets=["hotpotqa", "trec"],
        data={"longbench": str(source), "longbench_v2": str(write_v2(tmp_path / "v2.json", 2))},
        output_dir=str(tmp_path / "eval"),
        judge=judge_config_for(judge_server),
    )
    result = longbench_eval(params)

    out = tmp_path / "eval"
    for name in ("sft", "dpo"):
        assert set(result["results"][name]) == {"longbench", "longbench-e", "longbench-judged", "longbench-v2"}
        assert set(json.loads((out / "longbench" / name / "result.json").read_text())) == {"hotpotqa", "trec", "cases", "scored", "partial"}
        assert set(json.loads((out / "longbench-e" / name / "result.json").read_text())["hotpotqa"]) == {"0-4k", "4-8k", "8k+"}
        # The paper's judge rated both hotpotqa answers 2 of 3: (2 - 1) / 2 = 0.5 -> 50.0; trec is not judged.
        assert json.loads((out / "longbench" / name / "judged_result.json").read_text()) == {
            "hotpotqa": 50.0, "cases": 2, "scored": 2, "partial": False}
        assert (out / "longbench-v2" / name / "predictions.jsonl").is_file()
    # Judged LongBench reused the longbench predictions: 2 models x 2 hotpotqa examples judged.
    assert judge_server.double.counts() == {"longbench_qa": 4}

    comparison = json.loads((out / "comparison.json").read_text())
    assert comparison["models"] == ["sft", "dpo"]
    rows = {(r["benchmark"], r["metric"]): r for r in comparison["rows"]}
    avg = rows[("longbench", "avg all tasks")]
    assert avg["headline"] and avg["sft"] == round((result["results"]["sft"]["longbench"]["hotpotqa"]
                                                   + result["results"]["sft"]["longbench"]["trec"]) / 2, 2)
    assert avg["delta"] == round(avg["dpo"] - avg["sft"], 2)
    assert rows[("longbench-judged", "avg all")]["sft"] == 50.0
    assert {("longbench-v2", k) for k in ("overall", "easy", "hard", "short", "medium", "long")} <= rows.keys()
    assert (out / "comparison.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    markdown = (out / "comparison.md").read_text()
    assert "| benchmark | metric | sft | dpo | Δ (dpo − sft) |" in markdown and "](data:image/png;base64," in markdown
    results = json.loads((out / "results.json").read_text())
    assert results["failed"] == {} and len(results["summaries"]) == 8
    assert Artifact.get("longbench-comparison").data == markdown
    table = json.loads(Artifact.get("longbench-scores").data)
    assert table == json.loads(json.dumps(comparison["rows"]))

    # A second run finds every answer on disk and every verdict in the cache.
    judge_server.double.reset()
    again = longbench_eval(params)
    assert again["results"] == result["results"] and judge_server.double.count() == 0


def test_a_failing_model_is_named_and_the_others_are_still_compared(checkpoints, tmp_path):
    source = write_longbench(tmp_path / "lb", {"passage_count": 1})
    params = EvalParams(
        models=[model("sft", checkpoints["sft"]), model("missing", tmp_path / "no-such-checkpoint")],
        benchmarks=["longbench"], datasets=["passage_count"], data={"longbench": str(source)},
        output_dir=str(tmp_path / "eval"),
    )
    state = longbench_eval(params, return_state=True)
    assert state.is_failed() and "longbench-missing" in state.message
    comparison = json.loads((tmp_path / "eval" / "comparison.json").read_text())
    assert comparison["results"]["sft"]["longbench"].keys() == {"passage_count"}
    assert comparison["results"]["missing"] == {}
    assert "checkpoint folder not found" in json.loads((tmp_path / "eval" / "results.json").read_text())["failed"]["longbench-missing"]


def test_a_partial_result_fails_its_evaluation_unless_allowed_then_is_marked(judge_server, tmp_path, monkeypatch):
    monkeypatch.setenv(POLICY_API_KEY_ENV, TEST_API_KEY)
    double = judge_server.double
    double.answers = {"unknown": lambda r: "We recommend supplier 0.", "longbench_chat": lambda r: "Rating: [[8]]"}
    # The provider refuses the verdict on the second case for good.
    double.fault_rule = lambda r, i: Fault("status", 400) if r.task == "longbench_chat" and "memo 1 " in r.content else None
    served = ModelSpec(name="served", model="openai/model-under-test", api_base=judge_server.api_base, timeout_s=5)
    params = EvalParams(models=[served], benchmarks=["longbench-chat"], data={"longbench_chat": str(write_chat(tmp_path / "chat", 3))},
                        output_dir=str(tmp_path / "eval"), judge=judge_config_for(judge_server))
    state = longbench_eval(params, return_state=True)
    assert state.is_failed() and "longbench-chat-served" in state.message
    failed = json.loads((tmp_path / "eval" / "results.json").read_text())["failed"]
    assert "stands on 2 of 3 cases" in failed["longbench-chat-served"]

    longbench_eval(params.model_copy(update={"allow_partial": True}))
    comparison = json.loads((tmp_path / "eval" / "comparison.json").read_text())
    assert comparison["partial"] == {"served": {"longbench-chat": {"cases": 3, "scored": 2}}}
    assert all(row["partial"] == ["served"] for row in comparison["rows"])
    markdown = (tmp_path / "eval" / "comparison.md").read_text()
    assert "| **80.00*** |" in markdown and "partial result, from a subset of the cases (served on longbench-chat: 2 of 3 cases)" in markdown


def test_parameters_are_validated_with_clear_messages(tmp_path):
    with pytest.raises(ValidationError, match="model labels must differ"):
        EvalParams(models=[ModelSpec(model="openai/m"), ModelSpec(name="m", model="openai/other")])
    with pytest.raises(ValidationError, match="unknown LongBench dataset 'hotpot'"):
        EvalParams(models=[ModelSpec(model="openai/m")], datasets=["hotpot"])
    with pytest.raises(ValidationError, match="longbench-chat needs data.longbench_chat"):
        EvalParams(models=[ModelSpec(model="openai/m")], benchmarks=["longbench-chat"])
    with pytest.raises(ValidationError, match="must be letters, digits"):
        ModelSpec(name="a/b", model="openai/m")

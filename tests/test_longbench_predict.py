"""Generating answers: middle truncation, the litellm path (loopback server), a tiny local model,
and resuming after a crash or an outage."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from longreward_core.evaluation.evaluate import (
    DataSources,
    EvaluationPartial,
    evaluate_benchmark,
)
from longreward_core.evaluation.predict import (
    GenerationRequest,
    ModelSpec,
    load_generator,
    longbench_truncate_middle,
)
from longreward_core.models.tokenizers import load_tokenizer
from longreward_testing.judge_double import Fault
from longreward_testing.scenarios import TEST_API_KEY
from longreward_testing.longbench_fixtures import tiny_model, write_longbench


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_truncation_keeps_the_head_half_and_the_tail_half_of_the_tokens():
    tokenizer = load_tokenizer(None)
    prompt = "HEAD first words. " + " ".join(f"filler{i}" for i in range(400)) + " last words TAIL"
    ids = tokenizer(prompt)["input_ids"]
    cut, total, truncated = longbench_truncate_middle(prompt, tokenizer, 40)
    assert truncated and total == len(ids) > 40
    assert cut == tokenizer.decode(ids[:20]) + tokenizer.decode(ids[-20:])
    assert cut.startswith("HEAD first words.") and cut.endswith("last words TAIL")
    assert "filler200" not in cut and len(tokenizer(cut)["input_ids"]) <= 41  # retokenising may merge at the seam
    assert longbench_truncate_middle("short prompt", tokenizer, 40) == ("short prompt", len(tokenizer("short prompt")["input_ids"]), False)


def capital_answer(request) -> str:
    return re.search(r"the capital is (\w+)", request.content).group(1)


@pytest.fixture
def served_model(judge_server):
    """The model under test is the loopback server: chat prompts get the passage's city, plain
    completions (trec, no chat template) get a class on the first line and rambling after it."""
    judge_server.double.answers = {"unknown": capital_answer, "completion": lambda r: "Location\nType: Human"}
    return ModelSpec(name="served", model="openai/model-under-test", api_base=judge_server.api_base,
                     api_key=TEST_API_KEY, concurrency=4, timeout_s=5)


def test_litellm_prediction_is_scored_and_resumes_after_a_crash(judge_server, served_model, tmp_path):
    source = write_longbench(tmp_path / "lb", {"hotpotqa": 3, "trec": 2})
    out = tmp_path / "pred" / "served"
    summary = evaluate_benchmark(served_model, "longbench", out, data=DataSources(longbench=str(source)),
                                 datasets=["hotpotqa", "trec"], cache_path=tmp_path / "cache-1.sqlite")
    assert summary.scores == {"hotpotqa": 100.0, "trec": 100.0}  # trec: scored on the first line only
    assert json.loads((out / "result.json").read_text()) == {"hotpotqa": 100.0, "trec": 100.0, "cases": 5, "scored": 5, "partial": False}
    rows = read_jsonl(out / "hotpotqa.jsonl")
    assert sorted(r["_id"] for r in rows) == ["hotpotqa-0", "hotpotqa-1", "hotpotqa-2"]
    assert set(rows[0]) == {"pred", "answers", "all_classes", "length", "_id"}
    assert read_jsonl(out / "trec.jsonl")[0]["all_classes"] == ["Description", "Location", "Human"]
    # hotpotqa went through the chat endpoint; trec, which LongBench prompts without a chat
    # template, as a plain completion carrying the task's template verbatim.
    counts = judge_server.double.counts()
    assert counts["unknown"] == 3 and counts["completion"] == 2
    trec_prompt = next(r.content for r in judge_server.double.requests if r.task == "completion")
    assert trec_prompt.startswith("Please determine the type of the question below.") and trec_prompt.endswith("Type:")

    # A crash while writing the last answer: a torn line, one example missing. A new run (with an
    # empty request cache, so every request would show) generates exactly that example.
    lines = (out / "hotpotqa.jsonl").read_text().splitlines()
    (out / "hotpotqa.jsonl").write_text("\n".join(lines[:2]) + '\n{"pred": "Par')
    judge_server.double.reset()
    summary = evaluate_benchmark(served_model, "longbench", out, data=DataSources(longbench=str(source)),
                                 datasets=["hotpotqa", "trec"], cache_path=tmp_path / "cache-2.sqlite")
    assert judge_server.double.count() == 1
    assert [(p.generated, p.already_done) for p in summary.predictions] == [(1, 2), (0, 2)]
    assert len(read_jsonl(out / "hotpotqa.jsonl")) == 3 and summary.scores["hotpotqa"] == 100.0


def test_a_prediction_refused_for_good_makes_the_result_partial_until_a_rerun(judge_server, served_model, tmp_path):
    source = write_longbench(tmp_path / "lb", {"hotpotqa": 3})
    served_model = served_model.model_copy(update={"concurrency": 1})
    # The second example's request is refused for good (HTTP 400 is not retried).
    judge_server.double.fault_rule = lambda request, i: Fault("status", 400) if "passage 1?" in request.content else None
    out = tmp_path / "pred" / "served"
    options = dict(data=DataSources(longbench=str(source)), datasets=["hotpotqa"], cache_path=tmp_path / "cache.sqlite")
    with pytest.raises(EvaluationPartial, match="stands on 2 of 3 cases") as refused:
        evaluate_benchmark(served_model, "longbench", out, **options)
    assert refused.value.summary.predictions[0].rejected == 1
    assert sorted(r["_id"] for r in read_jsonl(out / "hotpotqa.jsonl")) == ["hotpotqa-0", "hotpotqa-2"]
    assert json.loads((out / "result.json").read_text()) == {"hotpotqa": 100.0, "cases": 3, "scored": 2, "partial": True}
    assert evaluate_benchmark(served_model, "longbench", out, allow_partial=True, **options).partial
    judge_server.double.fault_rule = None
    judge_server.double.reset()
    summary = evaluate_benchmark(served_model, "longbench", out, **options)
    assert judge_server.double.count() == 1 and summary.scores == {"hotpotqa": 100.0}
    assert (summary.cases, summary.scored, summary.partial) == (3, 3, False)


def test_a_tiny_local_model_answers_greedily_with_the_chat_template_where_longbench_uses_one(tmp_path, monkeypatch):
    model_dir = tiny_model(tmp_path / "tiny")
    source = write_longbench(tmp_path / "lb", {"hotpotqa": 2, "trec": 1})
    spec = ModelSpec(name="tiny", model=str(model_dir), backend="transformers", max_input_tokens=64)
    generator = load_generator(spec, tmp_path / "cache.sqlite")
    assert load_generator(spec, tmp_path / "cache.sqlite") is generator  # loaded once per process
    answered: list[GenerationRequest] = []
    answer = generator.answer
    monkeypatch.setattr(generator, "answer", lambda request: answered.append(request) or answer(request))

    out = tmp_path / "pred" / "tiny"
    summary = evaluate_benchmark(spec, "longbench", out, data=DataSources(longbench=str(source)), datasets=["hotpotqa", "trec"],
                                 cache_path=tmp_path / "cache.sqlite")
    assert len(answered) == 3 and all(r.truncated for r in answered)  # every fixture prompt exceeds 64 tokens
    preds = {r["_id"]: r["pred"] for r in read_jsonl(out / "hotpotqa.jsonl") + read_jsonl(out / "trec.jsonl")}
    assert set(preds) == {"hotpotqa-0", "hotpotqa-1", "trec-0"} and all(isinstance(p, str) for p in preds.values())
    assert set(summary.scores) == {"hotpotqa", "trec"}
    # Greedy: the same prompt gives the same answer again.
    assert generator.answer(answered[0]) == preds["hotpotqa-0"]
    # The chat template wraps hotpotqa's prompt, not trec's.
    chat_ids = generator._input_ids(answered[0])
    plain_ids = generator._input_ids(answered[2])
    assert generator.tokenizer.decode(chat_ids).startswith("<|im_start|>")
    assert plain_ids == generator.tokenizer(answered[2].prompt)["input_ids"]

    # Everything is on disk: a second run generates nothing.
    answered.clear()
    again = evaluate_benchmark(spec, "longbench", out, data=DataSources(longbench=str(source)), datasets=["hotpotqa", "trec"],
                               cache_path=tmp_path / "cache.sqlite")
    assert answered == [] and again.scores == summary.scores


def test_resuming_keeps_finished_rows_and_refuses_files_it_cannot_tell_apart(tmp_path):
    from longreward_core.data.io import InputError
    from longreward_core.evaluation.predict import finished_ids

    path = tmp_path / "hotpotqa.jsonl"
    path.write_text('{"pred": "a", "_id": "x"}\n{"pred": "b", "_id": "y"}\n{"pred": "c", "_i')
    assert finished_ids(path) == {"x", "y"}
    assert path.read_text() == '{"pred": "a", "_id": "x"}\n{"pred": "b", "_id": "y"}\n'  # the torn line is gone
    path.write_text('{"pred": "a", "answers": ["a"], "all_classes": null, "length": 1}\n')  # LongBench's own pred.py row
    with pytest.raises(InputError, match=r"hotpotqa.jsonl:1: no '_id'"):
        finished_ids(path)
    path.write_text('{"pred": "a", "_id": "x"}\nnot json\n{"pred": "b", "_id": "y"}\n')
    with pytest.raises(InputError, match=r"hotpotqa.jsonl:2: not a JSON row"):
        finished_ids(path)


def test_the_longbench_command_predicts_then_scores(judge_server, tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from flows.cli import app

    monkeypatch.setenv("LONGREWARD_POLICY_API_KEY", TEST_API_KEY)
    monkeypatch.setenv("COLUMNS", "400")
    judge_server.double.answers = {"unknown": capital_answer}
    source = write_longbench(tmp_path / "lb", {"hotpotqa": 2})
    out = tmp_path / "pred"
    command = ["eval", "longbench", "--model", "openai/model-under-test", "--model-api-base", judge_server.api_base,
               "--name", "served", "--data", str(source), "--out", str(out)]
    result = CliRunner().invoke(app, [*command, "--datasets", "hotpotqa"])
    assert result.exit_code == 0, result.output
    assert "2 generated, 0 already there" in result.output
    assert json.loads((out / "served" / "result.json").read_text()) == {"hotpotqa": 100.0, "cases": 2, "scored": 2, "partial": False}
    assert all(a == f"Bearer {TEST_API_KEY}" for a in judge_server.double.authorization)
    result = CliRunner().invoke(app, [*command, "--datasets", "hotpotqa,hotpot"])
    assert result.exit_code == 2 and "unknown LongBench dataset 'hotpot'" in result.output

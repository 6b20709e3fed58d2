"""LongBench v2: the prompt, answer extraction, accuracy by category, prediction end to end."""

from __future__ import annotations

import json
import re

import pytest

from longreward_core.evaluation import v2
from longreward_core.evaluation.evaluate import DataSources, evaluate_benchmark
from longreward_core.evaluation.predict import ModelSpec
from longreward_testing.scenarios import TEST_API_KEY
from longreward_testing.longbench_fixtures import v2_items, write_v2


@pytest.mark.parametrize(
    ("response", "letter"),
    [
        ("The correct answer is (B)", "B"),
        ("Reasoning first... The correct answer is C.", "C"),  # without parentheses
        ("**The correct answer is (D)**", "D"),  # markdown bold removed
        ("The correct answer is **(A)**", "A"),
        ("The correct answer is B, or rather The correct answer is (C)", "C"),  # the parenthesised form wins
        ("The correct answer is: B", None),  # not the asked form
        ("the correct answer is (B)", None),  # case matters, as in the official regex
        ("The correct answer is (E)", None),
        ("", None),
    ],
)
def test_answer_extraction(response, letter):
    assert v2.extract_answer(response) == letter


def test_prompt_fills_the_official_template_with_stripped_fields():
    item = v2_items(1)[0]
    prompt = v2.render_prompt(item)
    assert prompt.startswith("Please read the following text and answer the question below.\n\n<text>\nDocument 0 names Paris.")
    assert "</text>\n\nWhat is the correct answer to this question: Which city is named in document 0?\nChoices:\n(A) Paris\n(B) Rome\n" in prompt
    assert prompt.endswith('Format your response as follows: "The correct answer is (insert answer here)".')


def test_accuracy_overall_by_difficulty_and_by_length():
    rows = [
        {"judge": True, "difficulty": "easy", "length": "short"},
        {"judge": False, "difficulty": "easy", "length": "medium"},
        {"judge": True, "difficulty": "hard", "length": "medium"},
        {"judge": False, "difficulty": "hard", "length": "long"},
        {"judge": False, "difficulty": "hard", "length": "long"},
        {"judge": True, "difficulty": "hard", "length": "long"},
    ]
    assert v2.accuracy(rows) == {"overall": 50.0, "easy": 50.0, "hard": 50.0, "short": 100.0, "medium": 50.0, "long": 33.3}
    assert v2.accuracy([])["overall"] is None


def test_prediction_and_scoring_through_a_served_model(judge_server, tmp_path):
    def answer(request):
        if "document 3" in request.content:
            return "   "  # an empty response: not written, as the official script skips it
        named = re.search(r"Document \d names (\w+)", request.content).group(1)
        letter = "ABCD"["Paris Rome Oslo Lima".split().index(named)]
        return f"Reading the document... **The correct answer is ({letter})**" if "document 2" not in request.content else "I am unsure."

    judge_server.double.answers = {"unknown": answer}
    data = write_v2(tmp_path / "data.json", 4)
    spec = ModelSpec(name="served", model="openai/model-under-test", api_base=judge_server.api_base, api_key=TEST_API_KEY, timeout_s=5)
    out = tmp_path / "v2" / "served"
    summary = evaluate_benchmark(spec, "longbench-v2", out, data=DataSources(longbench_v2=str(data)), cache_path=tmp_path / "c.sqlite")
    rows = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    by_id = {r["_id"]: r for r in rows}
    assert set(by_id) == {"v2-0", "v2-1", "v2-2"}
    assert by_id["v2-1"]["pred"] == "B" and by_id["v2-1"]["judge"] is True and by_id["v2-2"]["pred"] is None
    assert len(by_id["v2-0"]["context"]) == 1000 and by_id["v2-0"]["response"].startswith("Reading")
    # v2-0 easy/short right, v2-1 hard/medium right, v2-2 easy/long no answer.
    assert summary.scores == {"overall": 66.7, "easy": 50.0, "hard": 100.0, "short": 100.0, "medium": 100.0, "long": 0.0,
                                 "questions": 3, "no_answer_found": 1}
    assert summary.predictions[0].not_written == 1
    assert json.loads((out / "result.json").read_text())["overall"] == 66.7
    assert all(r.temperature == 0.0 for r in judge_server.double.requests)  # greedy

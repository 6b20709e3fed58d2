"""LongBench v2: 503 multiple-choice questions over long documents, scored by accuracy.

As LongBench v2's `pred.py` (zero-shot, no chain of thought): the prompt is
`prompts/longbench_v2.txt` (the official 0-shot template) with the document, question and
choices stripped of surrounding whitespace; middle truncation to the model's budget; a chat
request with up to 128 new tokens, greedy (the official script samples at temperature 0.1). The
answer letter is read from "The correct answer is (X)", or failing that "The correct answer is
X", after removing every '*' (markdown bold); no match is a wrong answer. An empty response is
not written (the official script skips it), so the next run asks again.

Accuracy is reported overall, by difficulty (easy / hard) and by length (short / medium / long),
in percent rounded to 1 place, as the official `result.py` (whose medium bucket is corrected
here: its test compares with "short" twice). A bucket without questions is None.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from longreward_core.data.io import InputError, atomic_write_bytes, read_rows
from longreward_core.data.records import QuarantinedRow
from longreward_core.evaluation.data import load_longbench_v2
from longreward_core.evaluation.predict import (
    GenerationRequest,
    Generator,
    ModelSpec,
    PredictionRun,
    make_request,
    predict_file,
)

MAX_NEW_TOKENS = 128
V2_MAX_INPUT_TOKENS = 120_000  # default input budget of the command line (the official script's 128k less room)
PREDICTIONS_FILE = "predictions.jsonl"
RESULT_FILE = "result.json"
_WITH_PARENTHESES = re.compile(r"The correct answer is \(([A-D])\)")
_BARE = re.compile(r"The correct answer is ([A-D])")


def template() -> str:
    """The 0-shot prompt template, with $DOC$, $Q$ and $C_A$..$C_D$ slots."""
    return (resources.files("longreward_core.evaluation") / "prompts" / "longbench_v2.txt").read_text(encoding="utf-8")


def render_prompt(item: dict[str, Any]) -> str:
    """The prompt for one question, as the official pred.py fills its template."""
    return (
        template()
        .replace("$DOC$", item["context"].strip())
        .replace("$Q$", item["question"].strip())
        .replace("$C_A$", item["choice_A"].strip())
        .replace("$C_B$", item["choice_B"].strip())
        .replace("$C_C$", item["choice_C"].strip())
        .replace("$C_D$", item["choice_D"].strip())
    )


def extract_answer(response: str) -> str | None:
    """The chosen letter A-D, or None when the response states no answer in the asked form."""
    response = response.replace("*", "")
    match = _WITH_PARENTHESES.search(response) or _BARE.search(response)
    return match.group(1) if match else None


def prediction_row(request: GenerationRequest, answer: str) -> dict[str, Any] | None:
    """The official output row: the question's fields, `response`, `pred`, `judge` (correct or
    not), with the context cut to its first 1,000 characters; None for an empty response."""
    response = answer.strip()
    if not response:
        return None
    item = request.row
    pred = extract_answer(response)
    return {**item, "context": item["context"][:1000], "response": response, "pred": pred, "judge": pred == item["answer"]}


@dataclass
class V2Prediction:
    run: PredictionRun
    quarantined: list[QuarantinedRow]  # bad rows of the dataset file


def predict_longbench_v2(
    generator: Generator, spec: ModelSpec, out_dir: str | Path, *, source: str | Path | None = None, limit: int | None = None
) -> V2Prediction:
    """Answers to LongBench v2 in `out_dir/predictions.jsonl` (resumable)."""
    loaded = load_longbench_v2(source, limit=limit)
    requests = [
        make_request(item["_id"], render_prompt(item), generator.tokenizer, spec.max_input_tokens,
                     chat=True, max_new_tokens=MAX_NEW_TOKENS, row=item)
        for item in loaded.records
    ]
    run = predict_file(Path(out_dir) / PREDICTIONS_FILE, requests, generator, prediction_row)
    return V2Prediction(run=run, quarantined=loaded.quarantined)


def _percent(correct: float, total: int) -> float | None:
    return round(100 * correct / total, 1) if total else None


def accuracy(rows: list[dict[str, Any]]) -> dict[str, float | None]:
    """Accuracy in percent: overall, easy, hard, short, medium, long."""
    groups: dict[str, list[bool]] = {k: [] for k in ("overall", "easy", "hard", "short", "medium", "long")}
    for row in rows:
        correct = bool(row["judge"])
        groups["overall"].append(correct)
        groups["easy" if row["difficulty"] == "easy" else "hard"].append(correct)
        groups[row["length"] if row["length"] in ("short", "medium") else "long"].append(correct)
    return {k: _percent(sum(v), len(v)) for k, v in groups.items()}


def score_predictions(out_dir: str | Path) -> dict[str, Any]:
    """Accuracy of `out_dir/predictions.jsonl`, written to `out_dir/result.json` with the counts."""
    path = Path(out_dir) / PREDICTIONS_FILE
    rows = []
    for line, row, _, reason in read_rows(path):
        if reason or row is None or not {"judge", "difficulty", "length"} <= row.keys():
            raise InputError(f"{path}:{line}: not a LongBench v2 prediction ({reason or 'needs judge, difficulty, length'})")
        rows.append(row)
    result = {
        **accuracy(rows),
        "questions": len(rows),
        "no_answer_found": sum(1 for r in rows if r.get("pred") is None),
    }
    atomic_write_bytes(Path(out_dir) / RESULT_FILE, json.dumps(result, indent=2).encode("utf-8"))
    return result

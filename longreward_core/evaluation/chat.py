"""LongBench-Chat: 50 long-context questions; a judge LLM rates each answer 1-10.

As LongAlign's `LongBench_Chat/eval.py`: the model under test answers the case's prompt (the
document and the question) in a chat, up to 1,024 new tokens (greedy here), the prompt cut in the
middle to the model's budget; the judge then rates the answer against the reference answer with
the benchmark's graded example answers for that question. The result is the mean rating (1-10)
and `score` = 10 x the mean, on the same 0-100 scale as the other benchmarks.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from longreward_core.data.io import InputError, read_rows
from longreward_core.data.records import QuarantinedRow
from longreward_core.evaluation.data import ChatCase
from longreward_core.evaluation.judging import (
    JudgedRun,
    JudgeJob,
    finish_judged,
    judge_chat_answer,
    judge_jobs,
)
from longreward_core.evaluation.predict import (
    GenerationRequest,
    Generator,
    ModelSpec,
    PredictionRun,
    make_request,
    predict_file,
)
from longreward_core.models.accounting import RunAccounting
from longreward_core.reward.judge import Judge, JudgeConfig

MAX_NEW_TOKENS = 1024
CHAT_MAX_INPUT_TOKENS = 64_000  # default input budget of the command line (LongAlign's evaluation uses 64k)
PREDICTIONS_FILE = "predictions.jsonl"


def prediction_row(request: GenerationRequest, answer: str) -> dict[str, Any]:
    case: ChatCase = request.row["case"]
    return {"query": case.query, "answer": case.answer, "pred": answer.strip()}


def predict_longbench_chat(generator: Generator, spec: ModelSpec, out_dir: str | Path, cases: list[ChatCase]) -> PredictionRun:
    """Answers to the cases in `out_dir/predictions.jsonl` (resumable)."""
    requests = [
        make_request(case.id, case.prompt, generator.tokenizer, spec.max_input_tokens, chat=True,
                     max_new_tokens=MAX_NEW_TOKENS, row={"case": case})
        for case in cases
    ]
    return predict_file(Path(out_dir) / PREDICTIONS_FILE, requests, generator, prediction_row)


async def _rate(judge: Judge, case: ChatCase, response: str) -> tuple[float, float]:
    rating = await judge_chat_answer(judge, case.query, case.answer, case.examples, response)
    return rating, rating


def judge_longbench_chat(out_dir: str | Path, cases: list[ChatCase], judge_config: JudgeConfig, cache_path: str | Path) -> JudgedRun:
    """Rate every answer of `out_dir/predictions.jsonl`; writes `judged_result.json` (score,
    mean rating, and how many of the cases were rated) and `judge_ratings.parquet` into `out_dir`."""
    path = Path(out_dir) / PREDICTIONS_FILE
    by_id = {case.id: case for case in cases}
    jobs: list[JudgeJob] = []
    quarantined: list[QuarantinedRow] = []
    for line, row, raw, reason in read_rows(path):
        row_id = str(row["_id"]) if row and row.get("_id") is not None else None
        problem = reason or (None if row_id in by_id and isinstance(row.get("pred"), str) else "needs the '_id' of a case and a text 'pred'")
        if problem:
            quarantined.append(QuarantinedRow(source=str(path), line=line, row_id=row_id, reason=problem, raw=raw))
            continue
        jobs.append(("longbench-chat", row_id, _rate, (by_id[row_id], row["pred"])))
    if not jobs:
        raise InputError(f"{path}: no answer to rate")
    accounting = RunAccounting()
    rows = judge_jobs(jobs, judge_config, cache_path, accounting)
    ratings = [r["rating"] for r in rows if r["rating"] is not None]
    mean = sum(ratings) / len(ratings) if ratings else None
    result = {
        "score": round(10 * mean, 2) if mean is not None else None,
        "mean_rating": round(mean, 3) if mean is not None else None,
    }
    return finish_judged(rows, Path(out_dir), result, accounting, quarantined, cases=len(cases))


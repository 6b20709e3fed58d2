"""LLM-judged scores: LongBench-Chat's 1-10 rating, and the LongReward paper's judged LongBench.

Every call goes through the project's judge client (`Judge.verdict`): cached, retried until
the verdict parses, rate limited and accounted. Prompts are `prompts/longbench_{chat,qa,summary}.en.txt`
(English, as the official LongBench-Chat judge prompt; they grade Chinese answers as well), and
every verdict ends `Rating: [[N]]`.

- LongBench-Chat: the answer is rated 1-10 against the reference answer, with the benchmark's
  graded example answers for the same question shown to the judge.
- Judged LongBench (the paper's variant, 12 tasks): QA answers are rated 1-3 against the
  reference answers and scored (s-1)/2; summaries are rated 1-5 and scored (s-1)/4. A task's
  score is 100 x the mean, rounded to 2 places, over the examples that got a verdict.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import polars as pl

from longreward_core.data.io import (
    InputError,
    atomic_write_bytes,
    write_parquet_atomic,
    write_quarantine,
)
from longreward_core.data.records import QuarantinedRow
from longreward_core.evaluation.data import load_longbench
from longreward_core.evaluation.grading import coverage, read_prediction_file
from longreward_core.evaluation.longbench import (
    JUDGED_QA_DATASETS,
    JUDGED_SUMMARY_DATASETS,
    get_dataset,
)
from longreward_core.models.accounting import RunAccounting
from longreward_core.models.call_cache import open_call_cache
from longreward_core.models.errors import ConfigurationError, LLMCallFailed
from longreward_core.models.event_loop import run_async
from longreward_core.reward.judge import Judge, JudgeConfig
from longreward_core.reward.prompts import render
from longreward_core.reward.verdicts import (
    VerdictFormat,
    VerdictParseError,
    parse_rating,
)

PROMPTS = resources.files("longreward_core.evaluation") / "prompts"
JUDGED_RESULT_FILE = "judged_result.json"
RATINGS_FILE = "judge_ratings.parquet"
RATINGS_SCHEMA = pl.Schema(
    {
        "dataset": pl.String,
        "_id": pl.String,
        "rating": pl.Float64,  # the judge's verdict on the task's scale; null when it gave none
        "score": pl.Float64,  # the rating mapped to 0..1 (LongBench-Chat: the rating itself)
        "error": pl.String,
    }
)


def rating_between(low: int, high: int) -> VerdictFormat[float]:
    """A `Rating: [[N]]` verdict with N from `low` to `high`."""

    def parse(text: str) -> float:
        value = parse_rating(text)
        if not low <= value <= high:
            raise VerdictParseError(f"rating {value} outside {low}-{high}")
        return value

    return VerdictFormat(parse=parse, prefix="Rating: [[", choices=tuple(str(i) for i in range(low, high + 1)), suffix="]]")


CHAT_RATING = rating_between(1, 10)
QA_RATING = rating_between(1, 3)
SUMMARY_RATING = rating_between(1, 5)


def qa_score(rating: float) -> float:
    """A 1-3 QA rating as 0..1: (s - 1) / 2."""
    return (rating - 1) / 2


def summary_score(rating: float) -> float:
    """A 1-5 summary rating as 0..1: (s - 1) / 4."""
    return (rating - 1) / 4


def format_examples(examples: tuple[tuple[str, float], ...] | list[tuple[str, float]]) -> str:
    """Graded example answers as the judge reads them."""
    if not examples:
        return "(no graded examples for this question)"
    return "\n\n".join(
        f"Example answer {i} (rated {rating:g} of 10):\n{answer.strip()}" for i, (answer, rating) in enumerate(examples, start=1)
    )


async def judge_chat_answer(
    judge: Judge, question: str, reference: str, examples: tuple[tuple[str, float], ...], response: str
) -> float:
    """LongBench-Chat: the response's rating, 1-10. Raises LLMCallFailed without a verdict."""
    messages = render(
        "longbench_chat", "en", PROMPTS, question=question, reference=reference, examples=format_examples(examples), response=response
    )
    return await judge.verdict("longbench_chat", messages, CHAT_RATING)


def judged_kind(dataset: str) -> str:
    """'qa' or 'summary': how the paper's judge rates the dataset; ValueError for other tasks."""
    if dataset in JUDGED_QA_DATASETS:
        return "qa"
    if dataset in JUDGED_SUMMARY_DATASETS:
        return "summary"
    raise ValueError(
        f"'{dataset}' is not judged (judged: {', '.join(JUDGED_QA_DATASETS + JUDGED_SUMMARY_DATASETS)})"
    )


async def judge_longbench_answer(judge: Judge, dataset: str, question: str, references: list[str], response: str) -> tuple[float, float]:
    """The paper's judge on one LongBench answer: (rating, score in 0..1)."""
    kind = judged_kind(dataset)
    reference = "\n".join(f"- {r}" for r in references) if len(references) > 1 else references[0]
    if kind == "summary" and not question.strip():
        question = "(no query: the summary should cover the whole source)"
    messages = render(f"longbench_{kind}", "en", PROMPTS, question=question, reference=reference, response=response)
    if kind == "qa":
        rating = await judge.verdict("longbench_qa", messages, QA_RATING)
        return rating, qa_score(rating)
    rating = await judge.verdict("longbench_summary", messages, SUMMARY_RATING)
    return rating, summary_score(rating)


@dataclass
class JudgedRun:
    """What a judged evaluation produced."""

    scores: dict[str, Any]
    ratings_path: Path
    result_path: Path
    accounting: RunAccounting
    cases: int = 0  # answers the judge was to rate (quarantined ones included)
    judged: int = 0
    failed: int = 0  # no verdict after every attempt, or the request refused for good: left out of the scores
    unreachable: int = 0  # the judge could not be reached: the run should be retried
    quarantined: list[QuarantinedRow] = field(default_factory=list)


# (dataset, row id, judge function, its arguments after the client): the function returns
# (rating, score).
JudgeJob = tuple[str, str, Callable[..., Awaitable[tuple[float, float]]], tuple[Any, ...]]


def judge_jobs(jobs: list[JudgeJob], judge_config: JudgeConfig, cache_path: str | Path, accounting: RunAccounting) -> list[dict[str, Any]]:
    """Run the jobs concurrently under one judge client; one ratings row per job."""
    return run_async(_judge_all(jobs, judge_config, cache_path, accounting))


async def _judge_all(jobs: list[JudgeJob], judge_config: JudgeConfig, cache_path: str | Path, accounting: RunAccounting) -> list[dict[str, Any]]:
    cache = open_call_cache(cache_path)
    try:
        judge = Judge(judge_config, cache, accounting)

        async def one(dataset: str, row_id: str, call: Callable[..., Awaitable[tuple[float, float]]], args: tuple[Any, ...]) -> dict[str, Any]:
            try:
                rating, score = await call(judge, *args)
            except ConfigurationError:
                raise
            except LLMCallFailed as exc:
                return {"dataset": dataset, "_id": row_id, "rating": None, "score": None, "error": str(exc),
                        "transport": exc.transport}
            return {"dataset": dataset, "_id": row_id, "rating": rating, "score": score, "error": None, "transport": False}

        return list(await asyncio.gather(*(one(*job) for job in jobs)))
    finally:
        cache.close()


def finish_judged(rows: list[dict[str, Any]], out_dir: Path, result: dict[str, Any], accounting: RunAccounting,
                  quarantined: list[QuarantinedRow], cases: int) -> JudgedRun:
    """Write the ratings, the result file (`result` with its coverage of the `cases`) and (when rows
    were refused) `judge_quarantine.parquet`; count failures."""
    if quarantined:
        write_quarantine(quarantined, out_dir / "judge_quarantine.parquet")
    ratings_path = write_parquet_atomic(
        pl.DataFrame([{k: r[k] for k in RATINGS_SCHEMA.names()} for r in rows], schema=RATINGS_SCHEMA), out_dir / RATINGS_FILE
    )
    judged = sum(1 for r in rows if r["error"] is None)
    result_path = atomic_write_bytes(
        out_dir / JUDGED_RESULT_FILE, json.dumps({**result, **coverage(cases, judged)}, indent=4, ensure_ascii=False).encode("utf-8")
    )
    return JudgedRun(
        scores=result, ratings_path=ratings_path, result_path=result_path, accounting=accounting,
        cases=cases, judged=judged,
        failed=sum(1 for r in rows if r["error"] is not None and not r["transport"]),
        unreachable=sum(1 for r in rows if r["transport"]),
        quarantined=quarantined,
    )


def judge_longbench_dir(
    pred_dir: str | Path, judge_config: JudgeConfig, cache_path: str | Path, *,
    source: str | Path | None = None, datasets: list[str] | None = None,
) -> JudgedRun:
    """The paper's judged LongBench on a prediction folder: every judged dataset with a
    `<dataset>.jsonl` there (or the `datasets` named). Questions are looked up in the dataset
    (`source`, as for prediction) by the rows' `_id`. Writes `judged_result.json` (dataset ->
    score) and `judge_ratings.parquet` (one row per example) into the folder."""
    folder = Path(pred_dir)
    names = datasets or [d for d in JUDGED_QA_DATASETS + JUDGED_SUMMARY_DATASETS if (folder / f"{d}.jsonl").is_file()]
    if not names:
        raise InputError(f"{folder}: no prediction file of a judged dataset ({', '.join(JUDGED_QA_DATASETS + JUDGED_SUMMARY_DATASETS)})")
    jobs: list[JudgeJob] = []
    quarantined: list[QuarantinedRow] = []
    for dataset in names:
        judged_kind(dataset)  # raises for a dataset the paper did not judge
        predictions, bad = read_prediction_file(folder / f"{dataset}.jsonl", get_dataset(dataset))
        quarantined += bad
        questions = {row["_id"]: row["input"] for row in load_longbench(dataset, source).records}
        for p in predictions:
            if p.row_id not in questions:
                quarantined.append(QuarantinedRow(source=str(folder / f"{dataset}.jsonl"), line=p.line, row_id=p.row_id,
                                                  reason="its '_id' is not in the dataset, so its question is unknown", raw=p.raw))
                continue
            jobs.append((dataset, p.row_id, judge_longbench_answer, (dataset, questions[p.row_id], p.answers, p.pred)))
    accounting = RunAccounting()
    rows = judge_jobs(jobs, judge_config, cache_path, accounting)
    result = {}
    for dataset in names:
        scores = [r["score"] for r in rows if r["dataset"] == dataset and r["score"] is not None]
        if scores:
            result[dataset] = round(100 * sum(scores) / len(scores), 2)
    return finish_judged(rows, folder, result, accounting, quarantined, cases=len(jobs) + len(quarantined))


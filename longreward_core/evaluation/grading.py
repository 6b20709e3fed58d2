"""Scoring LongBench predictions in LongBench's own interchange format, as its `eval.py` does.

A prediction folder holds `<dataset>.jsonl` files with one row per example: `pred` (the model's
answer), `answers` (the references), `all_classes` (the class names for trec and lsht, else
null) and `length` (the example's length in words or characters, for LongBench-E). Scoring it
writes `result.json` into the same folder, mapping each dataset to its score, or with
`longbench_e` to its three length buckets: byte for byte what the official tooling writes.

Per example: trec, triviaqa, samsum and lsht keep only the prediction's first line; the score is
the best metric value over the reference answers. Per dataset: 100 x the mean, rounded to 2
places. LongBench-E buckets examples by `length` < 4000, < 8000, else; an empty bucket is NaN
(numpy's mean of nothing), written as `NaN` like the official file.

Two official details are kept on purpose: `all_classes` is read from the file's last row and
used for every row (the official loop overwrites it; it is the same on every row of the real
data), and files are found by the name ending in "jsonl", the dataset being the part before the
first dot. Unlike the official script, a bad row (invalid JSON, missing `pred` or `answers`, no
`length` with LongBench-E, a reference the metric cannot read) is quarantined with its reason
and the rest of the file is scored, and an unknown dataset name is an error before anything is
written.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from longreward_core.data.io import (
    InputError,
    ValidRow,
    atomic_write_bytes,
    read_rows,
    validated_rows,
    write_quarantine,
)
from longreward_core.data.records import QuarantinedRow
from longreward_core.evaluation.metrics import PARAGRAPH_PATTERNS, paragraph_id
from longreward_core.evaluation.longbench import LongBenchDataset, all_datasets, get_dataset

BUCKETS = ("0-4k", "4-8k", "8k+")
RESULT_FILE = "result.json"


@dataclass
class PredictionRow:
    """One row of a LongBench prediction file."""

    pred: str
    answers: list[str]
    all_classes: list[str] | None
    length: int | None
    line: int
    raw: str
    row_id: str | None


@dataclass
class ScoredDir:
    """What scoring a prediction folder produced."""

    result_path: Path
    scores: dict[str, Any]  # dataset -> score, or -> {bucket: score} for LongBench-E
    rows: dict[str, int] = field(default_factory=dict)  # dataset -> rows scored
    quarantined: list[QuarantinedRow] = field(default_factory=list)
    quarantine_path: Path | None = None
    unscored: dict[str, str] = field(default_factory=dict)  # dataset -> why it has no score


def coverage(cases: int, scored: int) -> dict[str, Any]:
    """How much of a benchmark a result stands on: `partial` when some of its `cases` are not in
    the score (a prediction or a verdict refused for good, a row set aside). A partial result is
    not comparable with a whole one, so every result file states it."""
    return {"cases": cases, "scored": scored, "partial": scored < cases}


def record_coverage(result_path: str | Path, cases: int, scored: int) -> dict[str, Any]:
    """Add `coverage(cases, scored)` to a result file (a JSON object), in place; returns it."""
    path = Path(result_path)
    counts = coverage(cases, scored)
    result = {**json.loads(path.read_text(encoding="utf-8")), **counts}
    atomic_write_bytes(path, json.dumps(result, ensure_ascii=False, indent=4).encode("utf-8"))
    return counts


def example_score(task: LongBenchDataset, prediction: str, answers: list[str], all_classes: list[str] | None) -> float:
    """One example's score in 0..1: the best over its reference answers."""
    if task.first_line_only:
        prediction = prediction.lstrip("\n").split("\n")[0]
    best = 0.0
    for answer in answers:
        best = max(best, task.metric(prediction, answer, all_classes=all_classes))
    return best


def dataset_score(task: LongBenchDataset, rows: list[PredictionRow]) -> float:
    """100 x the mean example score, rounded to 2 places (LongBench's `scorer`)."""
    all_classes = rows[-1].all_classes
    total = sum(example_score(task, r.pred, r.answers, all_classes) for r in rows)
    return round(100 * total / len(rows), 2)


def bucket_of(length: int) -> str:
    """LongBench-E's length bucket."""
    if length < 4000:
        return "0-4k"
    if length < 8000:
        return "4-8k"
    return "8k+"


def dataset_score_e(task: LongBenchDataset, rows: list[PredictionRow]) -> dict[str, float]:
    """100 x the mean example score per length bucket, rounded to 2 places (`scorer_e`)."""
    all_classes = rows[-1].all_classes
    buckets: dict[str, list[float]] = {b: [] for b in BUCKETS}
    for r in rows:
        assert r.length is not None  # read_prediction_file requires it for LongBench-E
        buckets[bucket_of(r.length)].append(example_score(task, r.pred, r.answers, all_classes))
    return {b: round(100 * sum(v) / len(v), 2) if v else math.nan for b, v in buckets.items()}


def _string_list(row: dict[str, Any], name: str, *, nullable: bool) -> list[str] | None:
    value = row.get(name)
    if value is None:
        if nullable:
            return None
        raise ValueError(f"missing field '{name}'")
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ValueError(f"field '{name}' must be a list of strings")
    return value


def _parse_row(row: dict[str, Any], task: LongBenchDataset, need_length: bool) -> tuple[str, list[str], list[str] | None, int | None]:
    if "pred" not in row or row["pred"] is None:
        raise ValueError("missing field 'pred'")
    if not isinstance(row["pred"], str):
        raise ValueError(f"field 'pred' is {type(row['pred']).__name__}, expected text")
    answers = _string_list(row, "answers", nullable=False)
    assert answers is not None
    all_classes = _string_list(row, "all_classes", nullable=True)
    length = row.get("length")
    if need_length and (not isinstance(length, int) or isinstance(length, bool)):
        raise ValueError("LongBench-E needs an integer field 'length'")
    if task.metric_name in PARAGRAPH_PATTERNS:
        for answer in answers:  # a reference naming no paragraph cannot be scored
            paragraph_id(answer, task.metric_name)
    if task.metric_name == "classification" and all_classes is None:
        raise ValueError(f"{task.name} needs 'all_classes'")
    return row["pred"], answers, all_classes, length


def read_prediction_file(path: str | Path, task: LongBenchDataset, *, need_length: bool = False) -> tuple[list[PredictionRow], list[QuarantinedRow]]:
    """The valid rows of one prediction file and the quarantined ones (with their reason)."""
    path = Path(path)
    rows: list[PredictionRow] = []
    quarantined: list[QuarantinedRow] = []
    for item in validated_rows(path, read_rows(path), lambda row: _parse_row(row, task, need_length), id_fields=("_id",)):
        if isinstance(item, ValidRow):
            rows.append(PredictionRow(*item.record, item.line, item.raw, item.row_id))
        else:
            quarantined.append(item)
    return rows, quarantined


def prediction_files(pred_dir: str | Path) -> dict[str, Path]:
    """Dataset name -> prediction file, for every `*jsonl` file of the folder (official rule)."""
    folder = Path(pred_dir)
    if not folder.is_dir():
        raise InputError(f"{folder}: prediction folder not found")
    files = {}
    for path in sorted(folder.iterdir()):
        # Hidden files are left alone: atomic writes keep their temporary files there.
        if path.is_file() and path.name.endswith("jsonl") and not path.name.startswith("."):
            dataset = path.name.split(".")[0]
            if dataset not in all_datasets():
                raise InputError(
                    f"{path}: '{dataset}' is not a LongBench dataset; prediction files are named "
                    f"<dataset>.jsonl with one of: {', '.join(all_datasets())}"
                )
            files[dataset] = path
    if not files:
        raise InputError(f"{folder}: no <dataset>.jsonl prediction file")
    return files


def score_prediction_dir(pred_dir: str | Path, *, longbench_e: bool = False) -> ScoredDir:
    """Score every prediction file of `pred_dir` and write `pred_dir/result.json` (and
    `pred_dir/quarantine.parquet` when rows were refused). Datasets are listed in LongBench's
    order; one without any valid row is left out of the result and named in `unscored`."""
    folder = Path(pred_dir)
    files = prediction_files(folder)
    scores: dict[str, Any] = {}
    report = ScoredDir(result_path=folder / RESULT_FILE, scores=scores)
    for dataset in (name for name in all_datasets() if name in files):
        task = get_dataset(dataset)
        rows, quarantined = read_prediction_file(files[dataset], task, need_length=longbench_e)
        report.quarantined += quarantined
        if not rows:
            report.unscored[dataset] = f"{files[dataset]}: no valid row"
            continue
        scores[dataset] = dataset_score_e(task, rows) if longbench_e else dataset_score(task, rows)
        report.rows[dataset] = len(rows)
    atomic_write_bytes(report.result_path, json.dumps(scores, ensure_ascii=False, indent=4).encode("utf-8"))
    quarantine = folder / "quarantine.parquet"
    if report.quarantined:
        report.quarantine_path = write_quarantine(report.quarantined, quarantine)
    else:
        quarantine.unlink(missing_ok=True)  # a stale one from an earlier run would mislead
    return report

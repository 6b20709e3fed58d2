"""Scoring prediction folders in LongBench's format: result.json as the official eval.py writes it."""

from __future__ import annotations

import json
from pathlib import Path

import polars as pl
import pytest
from typer.testing import CliRunner

from flows.cli import app
from longreward_core.evaluation.grading import score_prediction_dir

runner = CliRunner()


@pytest.fixture(autouse=True)
def wide_console(monkeypatch):
    monkeypatch.setenv("COLUMNS", "400")  # rich wraps long paths at the default 80 columns


def write_jsonl(path: Path, rows: list) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r, ensure_ascii=False)) + "\n" for r in rows), encoding="utf-8")
    return path


def row(pred, answers, length=100, all_classes=None):
    return {"pred": pred, "answers": answers, "all_classes": all_classes, "length": length}


TREC_CLASSES = ["Location", "City", "Country"]


def test_result_json_maps_each_dataset_to_its_score(tmp_path):
    # hotpotqa: 1, 0.8 and 0 -> 100 x 1.8 / 3 = 60.0; trec (first line only): 1 and 1/2 -> 75.0;
    # passage_count: 1, 0, 1/3 -> 44.44 (rounded to 2 places).
    write_jsonl(tmp_path / "hotpotqa.jsonl", [row("Paris", ["Paris"]), row("The Eiffel Tower, Paris.", ["Eiffel tower"]), row("", ["x"])])
    write_jsonl(tmp_path / "trec.jsonl", [row("Location\nCity", ["Location"], all_classes=TREC_CLASSES),
                                          row("City or Country", ["City"], all_classes=TREC_CLASSES)])
    write_jsonl(tmp_path / "passage_count.jsonl", [row("7", ["7"]), row("none", ["3"]), row("3, 4 or 5", ["3"])])
    result = runner.invoke(app, ["eval", "longbench-score", "--pred-dir", str(tmp_path)])
    assert result.exit_code == 0, result.output
    # The official layout: json.dump(scores, ensure_ascii=False, indent=4), datasets in LongBench's order.
    assert (tmp_path / "result.json").read_text() == (
        '{\n    "hotpotqa": 60.0,\n    "trec": 75.0,\n    "passage_count": 44.44\n}'
    )
    assert not (tmp_path / "quarantine.parquet").exists()


def test_longbench_e_result_has_three_length_buckets(tmp_path):
    # length 3999 -> 0-4k, 4000 and 7999 -> 4-8k, 8000 -> 8k+; no example in a bucket -> NaN.
    write_jsonl(tmp_path / "hotpotqa.jsonl", [row("Paris", ["Paris"], 3999), row("Rome", ["Paris"], 4000),
                                              row("Paris", ["Paris"], 7999), row("Paris", ["Paris"], 8000)])
    write_jsonl(tmp_path / "lcc.jsonl", [row("x = foo(2)", ["x = foo(1)"], 10)])
    result = runner.invoke(app, ["eval", "longbench-score", "--pred-dir", str(tmp_path), "--e"])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "result.json").read_text() == (
        '{\n    "hotpotqa": {\n        "0-4k": 100.0,\n        "4-8k": 50.0,\n        "8k+": 100.0\n    },\n'
        '    "lcc": {\n        "0-4k": 90.0,\n        "4-8k": NaN,\n        "8k+": NaN\n    }\n}'
    )


def test_all_classes_come_from_the_last_row_as_in_the_official_loop(tmp_path):
    # The first row's own classes would make its score 1/2 ("City" and "Country" named); the
    # official script uses the last row's classes for every row, where only "City" exists.
    write_jsonl(tmp_path / "trec.jsonl", [row("City or Country", ["City"], all_classes=["City", "Country"]),
                                          row("City", ["City"], all_classes=["City"])])
    assert score_prediction_dir(tmp_path).scores == {"trec": 100.0}


def test_bad_rows_are_quarantined_and_the_rest_is_scored(tmp_path):
    write_jsonl(tmp_path / "hotpotqa.jsonl", [
        {**row("Paris", ["Paris"]), "_id": "good"},
        {"answers": ["Paris"], "all_classes": None, "_id": "no-pred"},
        {"pred": "Paris", "answers": "Paris", "_id": "answers-not-a-list"},
        "{not json",
    ])
    write_jsonl(tmp_path / "passage_retrieval_en.jsonl", [row("Paragraph 1", ["the first"]), row("Paragraph 2", ["Paragraph 2"])])
    result = runner.invoke(app, ["eval", "longbench-score", "--pred-dir", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "result.json").read_text()) == {"hotpotqa": 100.0, "passage_retrieval_en": 100.0}
    quarantine = pl.read_parquet(tmp_path / "quarantine.parquet")
    reasons = dict(zip(quarantine["line"].to_list(), quarantine["reason"].to_list()))
    assert quarantine["row_id"].to_list()[:2] == ["no-pred", "answers-not-a-list"]
    assert reasons[2] == "missing field 'pred'"
    assert reasons[3] == "field 'answers' must be a list of strings"
    assert reasons[4].startswith("invalid JSON")
    assert "names no paragraph" in quarantine.filter(pl.col("source").str.ends_with("passage_retrieval_en.jsonl"))["reason"][0]
    assert "4 rows quarantined" in result.output


def test_longbench_e_needs_lengths_and_a_file_without_valid_rows_is_named(tmp_path):
    write_jsonl(tmp_path / "hotpotqa.jsonl", [{"pred": "Paris", "answers": ["Paris"], "all_classes": None}])
    write_jsonl(tmp_path / "qasper.jsonl", [row("yes", ["yes"], 100)])
    result = runner.invoke(app, ["eval", "longbench-score", "--pred-dir", str(tmp_path), "--e"])
    assert result.exit_code == 1
    assert "hotpotqa.jsonl: no valid row" in result.output
    assert json.loads((tmp_path / "result.json").read_text())["qasper"]["0-4k"] == 100.0
    reason = pl.read_parquet(tmp_path / "quarantine.parquet")["reason"][0]
    assert reason == "LongBench-E needs an integer field 'length'"


def test_unknown_dataset_and_missing_folder_are_clear_errors(tmp_path):
    write_jsonl(tmp_path / "hotpot_qa.jsonl", [row("Paris", ["Paris"])])
    result = runner.invoke(app, ["eval", "longbench-score", "--pred-dir", str(tmp_path)])
    assert result.exit_code == 2
    assert "hotpot_qa.jsonl" in result.output and "'hotpot_qa' is not a LongBench dataset" in result.output
    assert not (tmp_path / "result.json").exists()
    result = runner.invoke(app, ["eval", "longbench-score", "--pred-dir", str(tmp_path / "nope")])
    assert result.exit_code == 2 and "prediction folder not found" in result.output

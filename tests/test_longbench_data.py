"""Loading the official datasets: local folders, LongBench's data.zip, and the Hub path."""

from __future__ import annotations

import json

import pytest

from longreward_core.data.io import InputError, write_quarantine
from longreward_core.evaluation import data
from longreward_core.evaluation.data import (
    load_longbench,
    load_longbench_chat,
    load_longbench_v2,
)
from longreward_testing.longbench_fixtures import (
    longbench_rows,
    v2_items,
    write_chat,
    write_longbench,
    write_v2,
    zip_folder,
)


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LONGREWARD_CACHE", str(tmp_path / "cache"))  # where data.zip members are extracted


def test_longbench_from_a_folder_its_data_subfolder_and_the_zip(tmp_path):
    root = write_longbench(tmp_path / "lb", {"hotpotqa": 3, "trec": 2})
    write_longbench(root, {"hotpotqa": 2}, suffix="_e")
    expected = longbench_rows("hotpotqa", 3)
    assert load_longbench("hotpotqa", root).records == expected
    assert load_longbench("hotpotqa", root / "data").records == expected
    archive = zip_folder(root, tmp_path / "data.zip")
    assert load_longbench("hotpotqa", archive).records == expected
    assert load_longbench("hotpotqa", archive, longbench_e=True).records == longbench_rows("hotpotqa", 2)
    assert [r["_id"] for r in load_longbench("trec", archive, limit=1).records] == ["trec-0"]


def test_the_hub_loader_fetches_data_zip_of_thudm_longbench(tmp_path, monkeypatch):
    archive = zip_folder(write_longbench(tmp_path / "lb", {"trec": 2}), tmp_path / "data.zip")
    calls = []

    def fake_download(**kwargs):
        calls.append(kwargs)
        return str(archive)

    monkeypatch.setattr(data, "hf_hub_download", fake_download)
    loaded = load_longbench("trec")
    assert calls == [{"repo_id": "THUDM/LongBench", "filename": "data.zip", "repo_type": "dataset"}]
    assert loaded.records == longbench_rows("trec", 2) and loaded.records[0]["all_classes"] == ["Description", "Location", "Human"]


def test_an_unreachable_hub_is_a_clear_error(monkeypatch):
    def offline(**_):
        raise OSError("offline")

    monkeypatch.setattr(data, "hf_hub_download", offline)
    with pytest.raises(InputError, match=r"could not fetch data.zip of the dataset THUDM/LongBench .*pass its path"):
        load_longbench("trec")


def test_bad_rows_are_quarantined_with_their_reason(tmp_path):
    rows = longbench_rows("hotpotqa", 4)
    rows[1]["answers"] = "Paris"
    rows[2]["length"] = "long"
    rows[3]["_id"] = rows[0]["_id"]
    path = tmp_path / "hotpotqa.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"broken\n', encoding="utf-8")
    loaded = load_longbench("hotpotqa", tmp_path)
    assert [r["_id"] for r in loaded.records] == ["hotpotqa-0"]
    assert [(q.line, q.reason) for q in loaded.quarantined] == [
        (2, "field 'answers' must be a non-empty list of strings"),
        (3, "field 'length' must be an integer"),
        (4, "duplicate _id 'hotpotqa-0'"),
        (5, "invalid JSON (Invalid control character at)"),
    ]


def test_rows_holding_a_lone_surrogate_are_quarantined_in_every_benchmark(tmp_path):
    surrogate = "\udc80"
    unencodable = "holds text that cannot be encoded as UTF-8 (lone surrogate at character"
    rows = longbench_rows("hotpotqa", 2)
    rows[0]["context"] = surrogate
    (tmp_path / "hotpotqa.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    loaded = load_longbench("hotpotqa", tmp_path)
    assert [r["_id"] for r in loaded.records] == ["hotpotqa-1"]
    assert [(q.line, q.row_id, q.reason) for q in loaded.quarantined] == [(1, "hotpotqa-0", f"field 'context' {unencodable} 0)")]

    items = v2_items(2)
    items[1]["choice_C"] = f"Oslo {surrogate}"
    path = tmp_path / "data.json"
    path.write_text(json.dumps(items), encoding="utf-8")  # ensure_ascii: the escape, as the Hub's files hold it
    loaded = load_longbench_v2(path)
    assert [r["_id"] for r in loaded.records] == ["v2-0"]
    assert [q.reason for q in loaded.quarantined] == [f"field 'choice_C' {unencodable} 5)"]

    folder = write_chat(tmp_path / "chat", 3)
    cases = json.loads((folder / "test_cases.json").read_text())
    cases[0]["prompt"] += surrogate
    (folder / "test_cases.json").write_text(json.dumps(cases), encoding="utf-8")
    shots = json.loads((folder / "few_shots.json").read_text())
    shots[2][1]["answer"] = surrogate
    (folder / "few_shots.json").write_text(json.dumps(shots), encoding="utf-8")
    loaded = load_longbench_chat(folder)
    assert [c.id for c in loaded.records] == ["2"]
    assert [q.reason for q in loaded.quarantined] == [
        f"field 'prompt' {unencodable} {len(cases[0]['prompt']) - 1})",
        f"few_shots.json case 3: field 'answer' {unencodable} 0)",
    ]
    write_quarantine(loaded.quarantined, tmp_path / "quarantine.parquet")


def test_missing_dataset_files_name_what_was_looked_for(tmp_path):
    root = write_longbench(tmp_path / "lb", {"hotpotqa": 1})
    with pytest.raises(InputError, match=r"no musique.jsonl \(looked in the folder and in its data/\)"):
        load_longbench("musique", root)
    with pytest.raises(InputError, match="the archive holds no data/musique_e.jsonl"):
        load_longbench("musique", zip_folder(root, tmp_path / "data.zip"), longbench_e=True)
    with pytest.raises(InputError, match="not found"):
        load_longbench("hotpotqa", tmp_path / "nowhere")


def test_longbench_v2_from_data_json_a_folder_and_the_hub(tmp_path, monkeypatch):
    path = write_v2(tmp_path / "v2" / "data.json", 4)
    assert load_longbench_v2(path).records == v2_items(4)
    assert len(load_longbench_v2(tmp_path / "v2", limit=2).records) == 2
    monkeypatch.setattr(data, "hf_hub_download", lambda **kw: str(path) if kw["repo_id"] == "THUDM/LongBench-v2" and kw["filename"] == "data.json" else None)
    assert load_longbench_v2().records == v2_items(4)
    items = v2_items(2)
    items[1]["answer"] = "E"
    path.write_text(json.dumps(items))
    loaded = load_longbench_v2(path)
    assert [q.reason for q in loaded.quarantined] == ["field 'answer' must be one of A, B, C, D, got 'E'"]


def test_longbench_chat_cases_carry_their_graded_examples(tmp_path):
    folder = write_chat(tmp_path / "chat", 2)
    cases = load_longbench_chat(folder).records
    assert [c.id for c in cases] == ["1", "2"]
    assert cases[1].query == "What does memo 1 recommend?" and cases[1].answer == "It recommends supplier 1."
    assert cases[1].examples == (("Supplier 1.", 10.0), ("No idea.", 1.0), ("Maybe supplier 2.", 3.0))
    (folder / "few_shots.json").unlink()
    with pytest.raises(InputError, match="few_shots.json: not found"):
        load_longbench_chat(folder)

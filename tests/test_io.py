"""Input validation and quarantine (io.load_prompts / io.load_candidates) and atomic writes."""

from __future__ import annotations

import json
import os
from importlib import resources
from pathlib import Path

import polars as pl
import pytest

from longreward_core.data import io
from longreward_core.data.records import QUARANTINE_SCHEMA, QuarantinedRow

GOOD_PROMPT = {"id": "p1", "context": "A long document about pumps.", "query": "What about pumps?"}
GOOD_PROMPT_2 = {"id": "p2", "context": "Another document.", "query": "What else?"}
PROMPT_IDS = {"p1", "p2"}


def jline(row: object) -> str:
    return json.dumps(row, ensure_ascii=False)


def write_lines(path: Path, lines: list[str | bytes]) -> Path:
    """Write one line per item (str encoded as UTF-8, bytes written as is), newline-terminated."""
    data = b"".join((line if isinstance(line, bytes) else line.encode("utf-8")) + b"\n" for line in lines)
    path.write_bytes(data)
    return path


def only_quarantined(loaded: io.Loaded) -> QuarantinedRow:
    assert len(loaded.quarantined) == 1, [q.reason for q in loaded.quarantined]
    return loaded.quarantined[0]


def assert_good_prompts_loaded(loaded: io.Loaded, *ids: str) -> None:
    assert [p.id for p in loaded.records] == list(ids)


# --------------------------------------------------------------------------- prompts: bad rows


@pytest.mark.parametrize("missing", ["context", "query"])
def test_prompt_missing_text_field_is_quarantined(tmp_path: Path, missing: str) -> None:
    bad = {k: v for k, v in {"id": "bad", "context": "doc", "query": "q"}.items() if k != missing}
    path = write_lines(tmp_path / "prompts.jsonl", [jline(GOOD_PROMPT), jline(bad), jline(GOOD_PROMPT_2)])

    loaded = io.load_prompts(path)

    assert_good_prompts_loaded(loaded, "p1", "p2")
    q = only_quarantined(loaded)
    assert q.line == 2
    assert q.row_id == "bad"
    assert q.reason == f"missing field '{missing}'"
    assert json.loads(q.raw) == bad
    assert q.source == str(path)


def test_prompt_with_null_field_counts_as_missing(tmp_path: Path) -> None:
    bad = {"id": "bad", "context": None, "query": "q"}
    path = write_lines(tmp_path / "prompts.jsonl", [jline(bad), jline(GOOD_PROMPT)])

    loaded = io.load_prompts(path)

    assert_good_prompts_loaded(loaded, "p1")
    q = only_quarantined(loaded)
    assert (q.line, q.row_id, q.reason) == (1, "bad", "missing field 'context'")


def test_prompt_missing_id_is_quarantined(tmp_path: Path) -> None:
    bad = {"context": "doc", "query": "q"}
    path = write_lines(tmp_path / "prompts.jsonl", [jline(GOOD_PROMPT), jline(bad)])

    loaded = io.load_prompts(path)

    assert_good_prompts_loaded(loaded, "p1")
    q = only_quarantined(loaded)
    assert q.line == 2
    assert q.row_id is None
    assert "missing field 'id'" in q.reason
    assert json.loads(q.raw) == bad


@pytest.mark.parametrize("blank", ["", "   ", " \n\t  "])
def test_prompt_with_empty_context_is_quarantined(tmp_path: Path, blank: str) -> None:
    bad = {"id": "bad", "context": blank, "query": "q"}
    path = write_lines(tmp_path / "prompts.jsonl", [jline(GOOD_PROMPT), jline(bad)])

    loaded = io.load_prompts(path)

    assert_good_prompts_loaded(loaded, "p1")
    q = only_quarantined(loaded)
    assert (q.line, q.row_id) == (2, "bad")
    assert q.reason == "empty context"
    assert json.loads(q.raw) == bad


@pytest.mark.parametrize(
    ("field", "value", "type_name"),
    [("context", 42, "int"), ("query", ["a", "b"], "list"), ("context", {"text": "x"}, "dict"), ("query", True, "bool")],
)
def test_prompt_with_non_string_field_is_quarantined(tmp_path: Path, field: str, value: object, type_name: str) -> None:
    bad = {"id": "bad", "context": "doc", "query": "q", field: value}
    path = write_lines(tmp_path / "prompts.jsonl", [jline(bad), jline(GOOD_PROMPT)])

    loaded = io.load_prompts(path)

    assert_good_prompts_loaded(loaded, "p1")
    q = only_quarantined(loaded)
    assert (q.line, q.row_id) == (1, "bad")
    assert q.reason == f"field '{field}' is {type_name}, expected text"


def test_prompt_line_that_is_not_utf8_is_quarantined(tmp_path: Path) -> None:
    bad = b'{"id": "bad", "context": "caf\xff\xfe", "query": "q"}'
    path = write_lines(tmp_path / "prompts.jsonl", [jline(GOOD_PROMPT), bad, jline(GOOD_PROMPT_2)])

    loaded = io.load_prompts(path)

    assert_good_prompts_loaded(loaded, "p1", "p2")
    q = only_quarantined(loaded)
    assert q.line == 2
    assert q.row_id is None  # the row could not be decoded, so it has no id
    assert q.reason.startswith("not UTF-8")
    bad_byte = bad.index(b"\xff")
    assert f"at byte {bad_byte}" in q.reason
    # The raw text keeps the line, with the undecodable bytes replaced, for the ops team.
    assert q.raw.rstrip("\n") == bad.decode("utf-8", "replace")
    assert "\ufffd" in q.raw


def test_prompt_line_with_invalid_json_is_quarantined(tmp_path: Path) -> None:
    bad = '{"id": "bad", "context": "doc", "query": '
    path = write_lines(tmp_path / "prompts.jsonl", [jline(GOOD_PROMPT), bad, jline(GOOD_PROMPT_2)])

    loaded = io.load_prompts(path)

    assert_good_prompts_loaded(loaded, "p1", "p2")
    q = only_quarantined(loaded)
    assert q.line == 2
    assert q.row_id is None
    assert q.reason.startswith("invalid JSON (")
    assert q.raw.rstrip("\n") == bad


@pytest.mark.parametrize("not_object", ['["p1", "doc", "q"]', '"just a string"', "42", "null"])
def test_prompt_json_line_that_is_not_an_object_is_quarantined(tmp_path: Path, not_object: str) -> None:
    path = write_lines(tmp_path / "prompts.jsonl", [not_object, jline(GOOD_PROMPT)])

    loaded = io.load_prompts(path)

    assert_good_prompts_loaded(loaded, "p1")
    q = only_quarantined(loaded)
    assert q.line == 1
    assert q.reason == "row is not a JSON object"
    assert q.raw.rstrip("\n") == not_object


def test_duplicate_prompt_ids_keep_first_and_quarantine_later_naming_first_line(tmp_path: Path) -> None:
    first = {"id": "p1", "context": "first document", "query": "q1"}
    second = {"id": "p1", "context": "second document", "query": "q2"}
    third = {"id": "p1", "context": "third document", "query": "q3"}
    path = write_lines(
        tmp_path / "prompts.jsonl",
        ["", jline(GOOD_PROMPT_2), jline(first), jline(second), jline(third)],
    )

    loaded = io.load_prompts(path)

    assert [p.id for p in loaded.records] == ["p2", "p1"]
    kept = loaded.records[1]
    assert kept.context == "first document"
    assert [q.line for q in loaded.quarantined] == [4, 5]
    for q, row in zip(loaded.quarantined, [second, third]):
        assert q.row_id == "p1"
        # Line numbers are the file's (the blank first line counts), and name the kept row.
        assert q.reason == "duplicate id 'p1' (first on line 3)"
        assert json.loads(q.raw) == row


def test_prompt_quarantined_first_does_not_block_a_later_valid_row_with_same_id(tmp_path: Path) -> None:
    broken = {"id": "p1", "context": "  ", "query": "q"}
    path = write_lines(tmp_path / "prompts.jsonl", [jline(broken), jline(GOOD_PROMPT)])

    loaded = io.load_prompts(path)

    assert_good_prompts_loaded(loaded, "p1")
    assert only_quarantined(loaded).reason == "empty context"


def test_prompt_extra_fields_become_metadata(tmp_path: Path) -> None:
    row = {**GOOD_PROMPT, "source": "unit-test", "length": 123}
    path = write_lines(tmp_path / "prompts.jsonl", [jline(row)])

    (prompt,) = io.load_prompts(path).records

    assert (prompt.id, prompt.context, prompt.query) == ("p1", GOOD_PROMPT["context"], GOOD_PROMPT["query"])
    assert prompt.metadata == {"source": "unit-test", "length": 123}


# --------------------------------------------------------------------------- candidates: bad rows


def good_candidate(cid: str = "p1-0", pid: str = "p1", response: str = "An answer.") -> dict:
    return {"prompt_id": pid, "candidate_id": cid, "response": response}


def test_candidate_for_unknown_prompt_is_quarantined(tmp_path: Path) -> None:
    orphan = good_candidate("ghost-0", pid="ghost")
    path = write_lines(tmp_path / "candidates.jsonl", [jline(good_candidate()), jline(orphan)])

    loaded = io.load_candidates(path, PROMPT_IDS)

    assert [c.candidate_id for c in loaded.records] == ["p1-0"]
    q = only_quarantined(loaded)
    assert (q.line, q.row_id) == (2, "ghost-0")
    assert q.reason == "candidate for unknown prompt 'ghost'"
    assert json.loads(q.raw) == orphan


def test_duplicate_candidate_ids_keep_first(tmp_path: Path) -> None:
    first = good_candidate("p1-0", response="first")
    dup = good_candidate("p1-0", response="second")
    path = write_lines(
        tmp_path / "candidates.jsonl", [jline(first), jline(good_candidate("p2-0", "p2")), jline(dup)]
    )

    loaded = io.load_candidates(path, PROMPT_IDS)

    assert [(c.candidate_id, c.response) for c in loaded.records] == [("p1-0", "first"), ("p2-0", "An answer.")]
    q = only_quarantined(loaded)
    assert (q.line, q.row_id) == (3, "p1-0")
    assert q.reason == "duplicate candidate_id 'p1-0' (first on line 1)"
    assert json.loads(q.raw) == dup


@pytest.mark.parametrize("missing", ["prompt_id", "candidate_id", "response"])
def test_candidate_missing_field_is_quarantined(tmp_path: Path, missing: str) -> None:
    bad = {k: v for k, v in good_candidate("p1-9").items() if k != missing}
    path = write_lines(tmp_path / "candidates.jsonl", [jline(bad), jline(good_candidate())])

    loaded = io.load_candidates(path, PROMPT_IDS)

    assert [c.candidate_id for c in loaded.records] == ["p1-0"]
    q = only_quarantined(loaded)
    assert q.line == 1
    assert q.reason == f"missing field '{missing}'"
    assert json.loads(q.raw) == bad


@pytest.mark.parametrize(("field", "value", "type_name"), [("response", 3.5, "float"), ("candidate_id", 7, "int")])
def test_candidate_non_string_field_is_quarantined(tmp_path: Path, field: str, value: object, type_name: str) -> None:
    bad = {**good_candidate("p1-9"), field: value}
    path = write_lines(tmp_path / "candidates.jsonl", [jline(good_candidate()), jline(bad)])

    loaded = io.load_candidates(path, PROMPT_IDS)

    assert [c.candidate_id for c in loaded.records] == ["p1-0"]
    q = only_quarantined(loaded)
    assert q.line == 2
    assert q.reason == f"field '{field}' is {type_name}, expected text"


def test_candidate_bad_lines_are_quarantined_and_good_rows_load(tmp_path: Path) -> None:
    lines: list[str | bytes] = [
        jline(good_candidate("p1-0")),
        b'{"prompt_id": "p1", "candidate_id": "p1-x", "response": "\xff\xfe"}',
        "not json at all",
        "[1, 2, 3]",
        jline(good_candidate("p2-0", "p2")),
    ]
    path = write_lines(tmp_path / "candidates.jsonl", lines)

    loaded = io.load_candidates(path, PROMPT_IDS)

    assert [c.candidate_id for c in loaded.records] == ["p1-0", "p2-0"]
    reasons = {q.line: q.reason for q in loaded.quarantined}
    assert set(reasons) == {2, 3, 4}
    assert reasons[2].startswith("not UTF-8")
    assert reasons[3].startswith("invalid JSON")
    assert reasons[4] == "row is not a JSON object"


# --------------------------------------------------------------------------- release format


@pytest.fixture
def release_paths() -> tuple[Path, Path]:
    sample = resources.files("longreward_core") / "sample" / "release_format"
    return Path(str(sample / "prompts.jsonl")), Path(str(sample / "candidates.jsonl"))


def test_release_format_maps_ids_and_answer(release_paths: tuple[Path, Path]) -> None:
    prompts_path, candidates_path = release_paths
    raw_prompts = [json.loads(line) for line in prompts_path.read_text(encoding="utf-8").splitlines()]
    raw_candidates = [json.loads(line) for line in candidates_path.read_text(encoding="utf-8").splitlines()]

    prompts = io.load_prompts(prompts_path)
    assert prompts.quarantined == []
    assert [p.id for p in prompts.records] == ["en-001", "zh-001"]
    for prompt, raw in zip(prompts.records, raw_prompts):
        assert prompt.context == raw["context"]
        assert prompt.query == raw["query"]
        # The release's reference answer is kept as metadata, not dropped or used as a field.
        assert prompt.metadata == {"answer": raw["answer"]}

    candidates = io.load_candidates(candidates_path, {p.id for p in prompts.records})
    assert candidates.quarantined == []
    assert len(candidates.records) == len(raw_candidates) == 12
    by_id = {c.candidate_id: c for c in candidates.records}
    en3 = by_id["en-001-3"]
    assert en3.prompt_id == "en-001"
    assert en3.response == next(r["answer"] for r in raw_candidates if r["idx"] == "en-001-3")
    for c, raw in zip(candidates.records, raw_candidates):
        assert c.candidate_id == raw["idx"]
        assert c.prompt_id == raw["idx"].rsplit("-", 1)[0]
        assert c.response == raw["answer"]


def test_release_format_matches_the_plain_sample(release_paths: tuple[Path, Path], sample_paths: tuple[Path, Path]) -> None:
    rel_prompts = io.load_prompts(release_paths[0]).records
    plain_prompts = io.load_prompts(sample_paths[0]).records
    assert [(p.id, p.context, p.query) for p in rel_prompts] == [(p.id, p.context, p.query) for p in plain_prompts]
    ids = {p.id for p in plain_prompts}
    rel = io.load_candidates(release_paths[1], ids).records
    plain = io.load_candidates(sample_paths[1], ids).records
    assert [c.model_dump() for c in rel] == [c.model_dump() for c in plain]


def test_release_format_candidate_idx_without_dash_is_quarantined(tmp_path: Path) -> None:
    bad = {"idx": "en001", "query": "q", "answer": "a"}
    good = {"idx": "en-001-0", "query": "q", "answer": "a"}
    path = write_lines(tmp_path / "candidates.jsonl", [jline(bad), jline(good)])

    loaded = io.load_candidates(path, {"en-001"})

    assert [(c.prompt_id, c.candidate_id) for c in loaded.records] == [("en-001", "en-001-0")]
    q = only_quarantined(loaded)
    assert (q.line, q.row_id) == (1, "en001")
    assert "release-format idx 'en001'" in q.reason
    assert json.loads(q.raw) == bad


def test_release_format_candidate_without_idx_or_answer_is_quarantined(tmp_path: Path) -> None:
    no_idx = {"query": "q", "answer": "a"}
    no_answer = {"idx": "en-001-1", "query": "q"}
    path = write_lines(tmp_path / "candidates.jsonl", [jline(no_idx), jline(no_answer)])

    loaded = io.load_candidates(path, {"en-001"})

    assert loaded.records == []
    reasons = [q.reason for q in loaded.quarantined]
    assert "missing field 'candidate_id'" in reasons[0]
    assert reasons[1] == "missing field 'answer'"


# --------------------------------------------------------------------------- parquet input


def test_parquet_input_loads_and_quarantines(tmp_path: Path) -> None:
    prompts_path = tmp_path / "prompts.parquet"
    pl.DataFrame(
        {
            "id": ["p1", "p2", "p3"],
            "context": ["doc one", "   ", "doc three"],
            "query": ["q1", "q2", "q3"],
            "source": ["a", "b", "c"],
        }
    ).write_parquet(prompts_path)
    candidates_path = tmp_path / "candidates.parquet"
    pl.DataFrame(
        {
            "prompt_id": ["p1", "p3", "p2", "p1"],
            "candidate_id": ["p1-0", "p3-0", "p2-0", "p1-1"],
            "response": ["r1", "r3", "r2", None],
        }
    ).write_parquet(candidates_path)

    prompts = io.load_prompts(prompts_path)
    assert [(p.id, p.context, p.query, p.metadata) for p in prompts.records] == [
        ("p1", "doc one", "q1", {"source": "a"}),
        ("p3", "doc three", "q3", {"source": "c"}),
    ]
    q = only_quarantined(prompts)
    assert (q.line, q.row_id, q.reason) == (2, "p2", "empty context")
    assert json.loads(q.raw) == {"id": "p2", "context": "   ", "query": "q2", "source": "b"}

    candidates = io.load_candidates(candidates_path, {p.id for p in prompts.records})
    assert [(c.prompt_id, c.candidate_id, c.response) for c in candidates.records] == [
        ("p1", "p1-0", "r1"),
        ("p3", "p3-0", "r3"),
    ]
    assert [(q.line, q.row_id, q.reason) for q in candidates.quarantined] == [
        (3, "p2-0", "candidate for unknown prompt 'p2'"),
        (4, "p1-1", "missing field 'response'"),
    ]


def test_parquet_is_read_in_batches_with_lines_numbered_across_them(tmp_path: Path) -> None:
    rows = io.PARQUET_BATCH_ROWS * 2 + 5
    path = tmp_path / "prompts.parquet"
    pl.DataFrame({
        "id": [f"p{i}" for i in range(rows)],
        "context": ["" if i == io.PARQUET_BATCH_ROWS + 3 else f"doc {i}" for i in range(rows)],
        "query": ["q"] * rows,
    }).write_parquet(path)
    prompts = io.load_prompts(path)
    assert len(prompts.records) == rows - 1
    q = only_quarantined(prompts)
    # A row of the second batch is named by its line in the file, not in its batch.
    assert (q.line, q.row_id, q.reason) == (io.PARQUET_BATCH_ROWS + 4, f"p{io.PARQUET_BATCH_ROWS + 3}", "empty context")


def test_prompt_stream_keeps_ids_and_yields_the_same_prompts_as_loading(tmp_path: Path) -> None:
    path = write_lines(tmp_path / "prompts.jsonl", [
        jline(GOOD_PROMPT),
        '{"id": "p2", "context": "", "query": "q"}',
        jline({**GOOD_PROMPT, "id": "p3"}),
        jline(GOOD_PROMPT),  # a duplicate of p1
    ])
    stream = io.stream_prompts(path)
    loaded = io.load_prompts(path)
    assert stream.ids == ["p1", "p3"]
    assert stream.quarantined == loaded.quarantined
    assert list(stream) == loaded.records
    assert list(stream) == loaded.records  # each iteration reads the file again


# --------------------------------------------------------------------------- text that cannot be encoded

# Valid JSON and plain ASCII on disk, but json.loads makes it a str with a lone surrogate.
LONE_SURROGATE = '"A long document \\udc80 about pumps."'


def test_lone_surrogate_in_prompt_or_candidate_is_quarantined_naming_the_field(tmp_path: Path) -> None:
    prompts_path = write_lines(tmp_path / "prompts.jsonl", [
        '{"id": "p0", "context": ' + LONE_SURROGATE + ', "query": "What about pumps?"}',
        jline(GOOD_PROMPT),
        '{"id": "p3", "context": "doc", "query": "q", "source": {"tags": ["ok", "\\ud800"]}}',
    ])
    prompts = io.load_prompts(prompts_path)
    assert_good_prompts_loaded(prompts, "p1")
    assert [(q.line, q.row_id, q.reason) for q in prompts.quarantined] == [
        (1, "p0", "field 'context' holds text that cannot be encoded as UTF-8 (lone surrogate at character 16)"),
        (3, "p3", "field 'source.tags[1]' holds text that cannot be encoded as UTF-8 (lone surrogate at character 0)"),
    ]
    candidates_path = write_lines(tmp_path / "candidates.jsonl", [
        '{"prompt_id": "p1", "candidate_id": "p1-0", "response": "An \\udc80 answer."}',
        jline(good_candidate("p1-1")),
    ])
    candidates = io.load_candidates(candidates_path, PROMPT_IDS)
    assert [c.candidate_id for c in candidates.records] == ["p1-1"]
    q = only_quarantined(candidates)
    assert (q.row_id, q.reason) == ("p1-0", "field 'response' holds text that cannot be encoded as UTF-8 (lone surrogate at character 3)")

    written = pl.read_parquet(io.write_quarantine(prompts.quarantined + candidates.quarantined, tmp_path / "q.parquet"))
    assert written["row_id"].to_list() == ["p0", "p3", "p1-0"]
    assert json.loads(written["raw"][0])["context"] == json.loads(LONE_SURROGATE)


def test_quarantine_file_takes_rows_whose_id_and_raw_hold_a_lone_surrogate(tmp_path: Path) -> None:
    row = QuarantinedRow(source="in.json", line=1, row_id="p\udc80", reason="bad", raw=json.dumps({"id": "p\udc80"}, ensure_ascii=False))
    written = pl.read_parquet(io.write_quarantine([row], tmp_path / "q.parquet"))
    assert written["row_id"].to_list() == ["p\\udc80"]
    assert json.loads(written["raw"][0]) == {"id": "p\udc80"}


def parquet_with_surrogate_bytes(path: Path) -> Path:
    """A prompts Parquet whose second context holds the UTF-8 encoding of a lone surrogate, which
    Arrow writes without checking."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    contexts = pa.array([b"doc one", "doc \udc80".encode("utf-8", "surrogatepass"), b"doc three"], pa.binary())
    pq.write_table(pa.table({"id": ["p1", "p2", "p3"], "context": contexts.view(pa.string()), "query": ["q1", "q2", "q3"]}), path)
    return path


def test_parquet_row_that_is_not_utf8_is_quarantined_and_the_rest_load(tmp_path: Path) -> None:
    prompts = io.load_prompts(parquet_with_surrogate_bytes(tmp_path / "prompts.parquet"))
    assert_good_prompts_loaded(prompts, "p1", "p3")
    q = only_quarantined(prompts)
    assert (q.line, q.reason) == (2, "field 'context' holds text that is not valid UTF-8 (invalid continuation byte at byte 4)")
    assert json.loads(q.raw)["id"] == "p2"
    io.write_quarantine(prompts.quarantined, tmp_path / "q.parquet")


# --------------------------------------------------------------------------- unreadable files


def test_unknown_extension_raises_input_error_with_path(tmp_path: Path) -> None:
    path = tmp_path / "prompts.csv"
    path.write_text("id,context,query\np1,doc,q\n", encoding="utf-8")
    with pytest.raises(io.InputError) as info:
        io.load_prompts(path)
    assert str(path) in str(info.value)
    assert "'.csv'" in str(info.value)
    with pytest.raises(io.InputError, match="unknown input format"):
        io.load_candidates(path, {"p1"})


def test_missing_file_raises_input_error_with_path(tmp_path: Path) -> None:
    path = tmp_path / "nowhere" / "prompts.jsonl"
    with pytest.raises(io.InputError) as info:
        io.load_prompts(path)
    assert str(path) in str(info.value)
    assert "not found" in str(info.value)
    with pytest.raises(io.InputError) as info:
        io.load_candidates(path, set())
    assert str(path) in str(info.value)
    assert issubclass(io.InputError, ValueError)


# --------------------------------------------------------------------------- writing


def test_write_quarantine_writes_parquet_with_schema(tmp_path: Path) -> None:
    bad_prompts = write_lines(
        tmp_path / "prompts.jsonl", [jline(GOOD_PROMPT), "{oops", jline({"id": "x", "context": "", "query": "q"})]
    )
    rows = io.load_prompts(bad_prompts).quarantined
    assert len(rows) == 2

    out = io.write_quarantine(rows, tmp_path / "out" / "quarantine.parquet")

    assert out == tmp_path / "out" / "quarantine.parquet"
    frame = pl.read_parquet(out)
    assert frame.schema == QUARANTINE_SCHEMA
    assert frame.columns == ["source", "line", "row_id", "reason", "raw"]
    assert frame.to_dicts() == [r.model_dump() for r in rows]
    assert frame["line"].to_list() == [2, 3]
    assert frame["row_id"].to_list() == [None, "x"]
    assert [p.name for p in out.parent.iterdir()] == ["quarantine.parquet"]


def test_write_quarantine_of_no_rows_writes_empty_frame_with_schema(tmp_path: Path) -> None:
    frame = pl.read_parquet(io.write_quarantine([], tmp_path / "q.parquet"))
    assert frame.height == 0
    assert frame.schema == QUARANTINE_SCHEMA


def test_atomic_write_bytes_replaces_and_leaves_no_temp_files(tmp_path: Path) -> None:
    target = tmp_path / "sub" / "accounting.json"

    assert io.atomic_write_bytes(target, b"first") == target
    assert target.read_bytes() == b"first"
    io.atomic_write_bytes(target, b"second, longer content")

    assert target.read_bytes() == b"second, longer content"
    assert sorted(p.name for p in target.parent.iterdir()) == ["accounting.json"]


def test_atomic_write_bytes_failure_keeps_old_file_and_removes_temp(tmp_path: Path, monkeypatch) -> None:
    target = tmp_path / "accounting.json"
    io.atomic_write_bytes(target, b"old")

    def failing_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(io.os, "replace", failing_replace)
    with pytest.raises(OSError, match="disk full"):
        io.atomic_write_bytes(target, b"new")

    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["accounting.json"]


def test_write_parquet_atomic_leaves_no_temp_files(tmp_path: Path) -> None:
    frame = pl.DataFrame({"a": [1, 2]})
    path = io.write_parquet_atomic(frame, tmp_path / "x.parquet")
    assert pl.read_parquet(path).equals(frame)
    assert os.listdir(tmp_path) == ["x.parquet"]

"""Loading the official benchmark data, validated row by row.

- LongBench / LongBench-E: the Hugging Face dataset `THUDM/LongBench`. Its loading script cannot
  run under `datasets` 4, so the loader fetches the repository's `data.zip` (the files the script
  reads, `data/<dataset>.jsonl` and `data/<dataset>_e.jsonl`) with huggingface_hub and reads the
  JSONL inside. Rows: `input`, `context`, `answers`, `length`, `dataset`, `language`,
  `all_classes`, `_id`.
- LongBench v2: `THUDM/LongBench-v2`, the JSON list `data.json`. Rows: `_id`, `domain`,
  `sub_domain`, `difficulty`, `length`, `question`, `choice_A`..`choice_D`, `answer`, `context`.
- LongBench-Chat: not on the Hub; the folder `LongBench_Chat` of github.com/THUDM/LongAlign with
  `test_cases.json` (`idx`, `query`, `answer`, `prompt`) and `few_shots.json` (per case, graded
  example answers: `answer`, `score`).

Every loader also takes a local `source` (a folder, or LongBench's data.zip) so that runs need no
Hub access. Bad rows are quarantined with their reason; a missing file is an InputError.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import zipfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from huggingface_hub import hf_hub_download

from longreward_core.data.io import (
    InputError,
    Loaded,
    RowRead,
    atomic_path,
    cache_dir,
    read_rows,
    unencodable_field,
    validated_rows,
)

LONGBENCH_REPO = "THUDM/LongBench"
LONGBENCH_V2_REPO = "THUDM/LongBench-v2"
V2_CHOICES = ("A", "B", "C", "D")


@dataclass(frozen=True)
class ChatCase:
    """One LongBench-Chat question with its reference answer and graded example answers."""

    id: str
    prompt: str  # what the model under test is asked: the document and the question
    query: str  # the question alone, for the judge
    answer: str  # the reference answer
    examples: tuple[tuple[str, float], ...]  # (answer, rating 1-10) graded by the benchmark's authors


def _hub_file(repo_id: str, filename: str) -> Path:
    try:
        return Path(hf_hub_download(repo_id=repo_id, filename=filename, repo_type="dataset"))
    except Exception as exc:
        raise InputError(
            f"could not fetch {filename} of the dataset {repo_id} from the Hugging Face Hub "
            f"({type(exc).__name__}: {exc}); download it where the Hub is reachable and pass its path as the data source"
        ) from None


def _extract_member(archive: Path, member: str) -> Path:
    """`member` of a zip file, extracted once into the cache (keyed by the archive's identity)."""
    stat = archive.stat()
    identity = hashlib.sha256(f"{archive.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    target = cache_dir() / "longbench-data" / identity / member
    if target.exists():
        return target
    # Atomic: a concurrent reader sees no half-extracted file.
    with atomic_path(target) as tmp, zipfile.ZipFile(archive) as zf, zf.open(member) as src, tmp.open("wb") as dst:
        shutil.copyfileobj(src, dst)
    return target


def _longbench_file(source: str | Path | None, filename: str) -> Path:
    """Where `filename` is: in a folder (or its `data/`), or in LongBench's data.zip."""
    root = Path(source) if source is not None else _hub_file(LONGBENCH_REPO, "data.zip")
    if root.is_dir():
        for candidate in (root / filename, root / "data" / filename):
            if candidate.is_file():
                return candidate
        raise InputError(f"{root}: no {filename} (looked in the folder and in its data/)")
    if root.is_file() and zipfile.is_zipfile(root):
        with zipfile.ZipFile(root) as zf:
            names = set(zf.namelist())
        for member in (f"data/{filename}", filename):
            if member in names:
                return _extract_member(root, member)
        raise InputError(f"{root}: the archive holds no data/{filename}")
    raise InputError(f"{root}: not found (expected a folder of <dataset>.jsonl files or LongBench's data.zip)")


def _text(row: dict[str, Any], name: str, *, allow_empty: bool = False) -> str:
    value = row.get(name)
    if value is None:
        raise ValueError(f"missing field '{name}'")
    if not isinstance(value, str):
        raise ValueError(f"field '{name}' is {type(value).__name__}, expected text")
    if not allow_empty and not value.strip():
        raise ValueError(f"empty {name}")
    return value


def _validate_rows(
    source: Path, rows: Iterable[RowRead], validate: Callable[[dict[str, Any]], Any], limit: int | None, *,
    id_field: str = "_id",
) -> Loaded:
    """Validated records (duplicate ids quarantined after the first), at most `limit` of them."""
    checked = validated_rows(source, rows, validate, id_fields=(id_field,), duplicate=f"duplicate {id_field} '{{id}}'")
    return Loaded.collect(checked, limit)


def _require_id(row: dict[str, Any]) -> str:
    if row.get("_id") is None:
        raise ValueError("missing field '_id'")
    return str(row["_id"])


def _longbench_row(row: dict[str, Any]) -> dict[str, Any]:
    row_id = _require_id(row)
    _text(row, "context")
    _text(row, "input", allow_empty=True)  # summarisation and code tasks have no question
    answers = row.get("answers")
    if not isinstance(answers, list) or not answers or not all(isinstance(a, str) for a in answers):
        raise ValueError("field 'answers' must be a non-empty list of strings")
    classes = row.get("all_classes")
    if classes is not None and (not isinstance(classes, list) or not all(isinstance(c, str) for c in classes)):
        raise ValueError("field 'all_classes' must be a list of strings or null")
    length = row.get("length")
    if not isinstance(length, int) or isinstance(length, bool):
        raise ValueError("field 'length' must be an integer")
    return {**row, "_id": row_id}


def load_longbench(dataset: str, source: str | Path | None = None, *, longbench_e: bool = False, limit: int | None = None) -> Loaded:
    """The test rows of one LongBench (or LongBench-E) dataset, as dicts in the official schema.

    `source`: a folder holding `<dataset>.jsonl` (or `data/<dataset>.jsonl`), LongBench's data.zip,
    or None for the Hub. LongBench-E reads `<dataset>_e.jsonl`.
    """
    path = _longbench_file(source, f"{dataset}_e.jsonl" if longbench_e else f"{dataset}.jsonl")
    return _validate_rows(path, read_rows(path), _longbench_row, limit)


def _v2_row(row: dict[str, Any]) -> dict[str, Any]:
    row_id = _require_id(row)
    for name in ("question", "context", *(f"choice_{c}" for c in V2_CHOICES)):
        _text(row, name)
    if row.get("answer") not in V2_CHOICES:
        raise ValueError(f"field 'answer' must be one of {', '.join(V2_CHOICES)}, got {row.get('answer')!r}")
    if row.get("difficulty") not in ("easy", "hard"):
        raise ValueError(f"field 'difficulty' must be 'easy' or 'hard', got {row.get('difficulty')!r}")
    if row.get("length") not in ("short", "medium", "long"):
        raise ValueError(f"field 'length' must be 'short', 'medium' or 'long', got {row.get('length')!r}")
    return {**row, "_id": row_id}


def _json_list_rows(path: Path) -> Iterator[RowRead]:
    """Rows of a file holding one JSON list, numbered from 1, in read_rows' shape."""
    try:
        items = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputError(f"{path}: not a JSON file ({exc})") from None
    if not isinstance(items, list):
        raise InputError(f"{path}: expected a JSON list of rows")
    for number, item in enumerate(items, start=1):
        raw = json.dumps(item, ensure_ascii=False)
        if isinstance(item, dict):
            yield number, item, raw, unencodable_field(item)
        else:
            yield number, None, raw, "row is not a JSON object"


def load_longbench_v2(source: str | Path | None = None, *, limit: int | None = None) -> Loaded:
    """LongBench v2's 503 questions as dicts in the official schema.

    `source`: `data.json` (a JSON list) or a JSONL file of the same rows, a folder holding
    `data.json`, or None for the Hub.
    """
    path = Path(source) if source is not None else _hub_file(LONGBENCH_V2_REPO, "data.json")
    if path.is_dir():
        path = path / "data.json"
    if not path.is_file():
        raise InputError(f"{path}: not found (expected LongBench v2's data.json)")
    rows = read_rows(path) if path.suffix.lower() in {".jsonl", ".ndjson"} else _json_list_rows(path)
    return _validate_rows(path, rows, _v2_row, limit)


def load_longbench_chat(source: str | Path, *, limit: int | None = None) -> Loaded:
    """LongBench-Chat's cases (ChatCase) from its folder: `test_cases.json` and `few_shots.json`."""
    folder = Path(source)
    cases_path, shots_path = folder / "test_cases.json", folder / "few_shots.json"
    for path in (cases_path, shots_path):
        if not path.is_file():
            raise InputError(f"{path}: not found (LongBench-Chat needs test_cases.json and few_shots.json)")
    shots = json.loads(shots_path.read_text(encoding="utf-8"))
    if not isinstance(shots, list):
        raise InputError(f"{shots_path}: expected a JSON list (one list of graded answers per case)")

    def case(row: dict[str, Any]) -> ChatCase:
        idx = row.get("idx")
        if not isinstance(idx, int) or isinstance(idx, bool) or not 1 <= idx <= len(shots):
            raise ValueError(f"field 'idx' must be an integer from 1 to {len(shots)} (the cases of few_shots.json)")
        examples = []
        for shot in shots[idx - 1]:
            if not isinstance(shot, dict) or not isinstance(shot.get("answer"), str) or not isinstance(shot.get("score"), (int, float)):
                raise ValueError(f"few_shots.json case {idx}: each example needs 'answer' (text) and 'score' (number)")
            if unencodable := unencodable_field(shot):
                raise ValueError(f"few_shots.json case {idx}: {unencodable}")
            examples.append((shot["answer"], float(shot["score"])))
        return ChatCase(
            id=str(idx), prompt=_text(row, "prompt"), query=_text(row, "query"), answer=_text(row, "answer"),
            examples=tuple(examples),
        )

    return _validate_rows(cases_path, _json_list_rows(cases_path), case, limit, id_field="idx")

"""Reading prompts and candidates, validating them row by row, and writing results atomically.

Accepted inputs (JSONL or Parquet):
- prompts: `id`, `context`, `query` (other fields become `metadata`), or the LongReward release
  format `idx`, `context`, `query`, `answer`;
- candidates: `prompt_id`, `candidate_id`, `response`, or the release format
  `idx` = "<prompt idx>-<k>", `query`, `answer`.

A bad row never stops a run: it is returned as a `QuarantinedRow` with its reason, and the caller
writes the quarantine file. Every reader of rows (these, and the benchmark readers of
`evaluation`) checks them with `validated_rows`; the checks of a field are the record's own
(`records.Prompt`, `records.Candidate`), turned into a reason by `build_record`. JSONL is decoded line by line (not with polars' NDJSON reader) so
that one undecodable or malformed line is quarantined instead of failing the whole file; Parquet
is converted row by row for the same reason (`arrow_rows`). Text that cannot be encoded as UTF-8
(a JSON-escaped lone surrogate) is found at input by `unencodable_field`, in every reader, so that
it never reaches a judge request or an output file.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Generic, TypeVar

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import BaseModel, ValidationError
from pydantic_core import ErrorDetails

from longreward_core.data.records import (
    QUARANTINE_SCHEMA,
    Candidate,
    Prompt,
    QuarantinedRow,
)


class InputError(ValueError):
    """An input file that cannot be read at all (missing, unknown format)."""


PARQUET_BATCH_ROWS = 64  # rows of a Parquet input decoded at a time

T = TypeVar("T")
M = TypeVar("M", bound=BaseModel)

# A row as read: (line number, the row or None, its raw text, why it cannot be used or None).
RowRead = tuple[int, dict[str, Any] | None, str, str | None]


@dataclass
class Loaded:
    """Valid records plus the quarantined rows of one input file."""

    records: list[Any] = field(default_factory=list)
    quarantined: list[QuarantinedRow] = field(default_factory=list)

    @classmethod
    def collect(cls, rows: Iterable[ValidRow[Any] | QuarantinedRow], limit: int | None = None) -> Loaded:
        """The records and quarantined rows of `validated_rows`, reading no further once `limit`
        records are kept."""
        out = cls()
        for item in rows:
            if limit is not None and len(out.records) >= limit:
                break
            if isinstance(item, QuarantinedRow):
                out.quarantined.append(item)
            else:
                out.records.append(item.record)
        return out


def read_rows(path: Path) -> Iterator[RowRead]:
    """Yield (line number, row or None, raw text, reason when the row cannot be used) of a JSONL or
    Parquet file; raises InputError when the file is missing or of an unknown format.

    A row that parses but holds text that cannot be encoded as UTF-8 comes with the row and its
    reason, so that the caller can still name its id."""
    if not path.exists():
        raise InputError(f"{path}: file not found")
    suffix = path.suffix.lower()
    if suffix in {".jsonl", ".ndjson", ".json"}:
        with path.open("rb") as fh:
            for number, raw in enumerate(fh, start=1):
                if not raw.strip():
                    continue
                try:
                    # A byte-order mark may open the file; it is not part of the first row.
                    text = raw.decode("utf-8-sig" if number == 1 else "utf-8")
                except UnicodeDecodeError as exc:
                    yield number, None, raw.decode("utf-8", "replace"), f"not UTF-8 ({exc.reason} at byte {exc.start})"
                    continue
                try:
                    row = json.loads(text)
                except json.JSONDecodeError as exc:
                    yield number, None, text, f"invalid JSON ({exc.msg})"
                    continue
                if not isinstance(row, dict):
                    yield number, None, text, "row is not a JSON object"
                    continue
                yield number, row, text, unencodable_field(row)
    elif suffix == ".parquet":
        # Batch by batch, so that a file of long documents is never held whole.
        read = 0
        try:
            for batch in pq.ParquetFile(path).iter_batches(batch_size=PARQUET_BATCH_ROWS):
                yield from arrow_rows(pa.Table.from_batches([batch]), start=read + 1)
                read += batch.num_rows
        except pa.ArrowInvalid as exc:
            raise InputError(f"{path}: not a readable Parquet file ({exc})") from None
    else:
        raise InputError(f"{path}: unknown input format '{suffix}' (expected .jsonl or .parquet)")


def _unencodable_text(value: Any, name: str) -> str | None:
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as exc:
            return f"field '{name}' holds text that cannot be encoded as UTF-8 (lone surrogate at character {exc.start})"
        return None
    if isinstance(value, dict):
        for key, item in value.items():
            reason = _unencodable_text(key, f"{name} (a key)") or _unencodable_text(item, f"{name}.{key}")
            if reason:
                return reason
    elif isinstance(value, (list, tuple)):
        for index, item in enumerate(value):
            reason = _unencodable_text(item, f"{name}[{index}]")
            if reason:
                return reason
    return None


def unencodable_field(row: dict[str, Any]) -> str | None:
    """Why `row` cannot be used, naming the first field (nested fields as `a.b` / `a[0]`) that holds
    text which cannot be encoded as UTF-8, or None when every text can.

    Valid JSON may escape a lone surrogate (`"\\udc80"`): `json.loads` turns it into a str that no
    HTTP request, UTF-8 file or Parquet column accepts, so it must be caught when the row is read.
    """
    for key, value in row.items():
        reason = _unencodable_text(key, "(a field name)") or _unencodable_text(value, str(key))
        if reason:
            return reason
    return None


def arrow_rows(table: pa.Table, start: int = 1) -> Iterator[RowRead]:
    """The rows of an Arrow table in `read_rows`' shape, numbered from `start`.

    Arrow does not check that a string column is UTF-8 when a file is written, so a row holding
    other bytes (an encoded lone surrogate, say) is yielded with its reason instead of failing
    the whole table; its `raw` shows that field as Arrow renders it.
    """
    for index in range(table.num_rows):
        one = table.slice(index, 1)
        try:
            row = one.to_pylist()[0]
        except UnicodeDecodeError:
            fields: dict[str, Any] = {}
            reason = None
            for name in one.column_names:
                try:
                    fields[name] = one.column(name).to_pylist()[0]
                except UnicodeDecodeError as exc:
                    fields[name] = one.column(name).to_string()
                    reason = reason or f"field '{name}' holds text that is not valid UTF-8 ({exc.reason} at byte {exc.start})"
            yield start + index, None, json.dumps(fields, ensure_ascii=False, default=str), reason
            continue
        yield start + index, row, json.dumps(row, ensure_ascii=False, default=str), None


def _row_id(row: dict[str, Any] | None, *names: str) -> str | None:
    if not row:
        return None
    for name in names:
        if row.get(name) is not None:
            return str(row[name])
    return None


def _field_problem(error: ErrorDetails, names: Mapping[str, str]) -> str:
    location = [str(part) for part in error["loc"]]
    name = ".".join([names.get(location[0], location[0]), *location[1:]]) if location else "(the row)"
    if error["type"] == "missing" or error["input"] is None:
        return f"missing field '{name}'"
    if error["type"] == "string_type":
        return f"field '{name}' is {type(error['input']).__name__}, expected text"
    if error["type"] in {"blank", "string_too_short"}:
        return f"empty {name}"
    return f"field '{name}': {error['msg']}"


def build_record(model: type[M], fields: dict[str, Any], names: Mapping[str, str] | None = None) -> M:
    """`model` built from an input row's `fields`, checked by the model's own field types; a
    ValueError names the first field that fails and why ("missing field 'query'", "empty context",
    "field 'context' is int, expected text"). `names` gives a field's name in the input where it
    differs from the model's (the release format's `answer` for `response`)."""
    try:
        return model.model_validate(fields)
    except ValidationError as exc:
        raise ValueError(_field_problem(exc.errors()[0], names or {})) from None


@dataclass(frozen=True)
class ValidRow(Generic[T]):
    """A row that passed its checks: its record and where it came from."""

    line: int
    row_id: str | None
    raw: str
    record: T


def validated_rows(
    source: Path, rows: Iterable[RowRead], record: Callable[[dict[str, Any]], T], *,
    id_fields: tuple[str, ...], duplicate: str | None = None,
) -> Iterator[ValidRow[T] | QuarantinedRow]:
    """Each row of `rows` (as `read_rows` yields them) checked: a ValidRow holding `record(row)`, or
    the row quarantined with its reason (the reader's, or the ValueError `record` raised).

    The row's id is the first of `id_fields` it has. With `duplicate`, a row whose id a valid
    row before it has is quarantined with that reason, formatted with `id` and `line` (the first
    row's); a row set aside does not claim its id."""
    first_seen: dict[str, int] = {}
    for line, row, raw, reason in rows:
        row_id = _row_id(row, *id_fields)
        try:
            if reason:
                raise ValueError(reason)
            assert row is not None
            item = record(row)
            if duplicate is not None and row_id in first_seen:
                raise ValueError(duplicate.format(id=row_id, line=first_seen[row_id]))
        except ValueError as exc:
            yield QuarantinedRow(source=str(source), line=line, row_id=row_id, reason=str(exc), raw=raw)
            continue
        if duplicate is not None and row_id is not None:
            first_seen[row_id] = line
        yield ValidRow(line, row_id, raw, item)


def _prompt(row: dict[str, Any]) -> Prompt:
    row_id = _row_id(row, "id", "idx")
    if row_id is None:
        raise ValueError("missing field 'id' (or 'idx')")
    metadata = {k: v for k, v in row.items() if k not in {"id", "idx", "context", "query"}}
    if isinstance(metadata.get("metadata"), str):  # our own prompts Parquet (PROMPTS_SCHEMA)
        metadata = json.loads(metadata["metadata"])
    return build_record(Prompt, {"id": row_id, "context": row.get("context"), "query": row.get("query"), "metadata": metadata})


def _prompt_rows(path: Path) -> Iterator[ValidRow[Prompt] | QuarantinedRow]:
    """Each row of a prompts file, validated; duplicates after the first occurrence are quarantined."""
    return validated_rows(
        path, read_rows(path), _prompt, id_fields=("id", "idx"), duplicate="duplicate id '{id}' (first on line {line})"
    )


def load_prompts(path: str | Path) -> Loaded:
    """Read and validate prompts; duplicates after the first occurrence are quarantined."""
    return Loaded.collect(_prompt_rows(Path(path)))


@dataclass
class PromptStream:
    """A prompts file validated once, holding only the valid prompts' ids; iterating it reads the
    file again and yields those prompts one at a time, so that a run never holds every document."""

    path: Path
    ids: list[str]
    quarantined: list[QuarantinedRow]

    def __iter__(self) -> Iterator[Prompt]:
        for item in _prompt_rows(self.path):
            if isinstance(item, ValidRow):
                yield item.record


def stream_prompts(path: str | Path) -> PromptStream:
    """Validate a prompts file (as `load_prompts`) without keeping the documents."""
    path = Path(path)
    ids: list[str] = []
    quarantined: list[QuarantinedRow] = []
    for item in _prompt_rows(path):
        if isinstance(item, QuarantinedRow):
            quarantined.append(item)
        else:
            ids.append(item.record.id)
    return PromptStream(path, ids, quarantined)


def load_candidates(path: str | Path, prompt_ids: Collection[str]) -> Loaded:
    """Read and validate candidates against the known prompt ids (see `candidate_rows`)."""
    return Loaded.collect(candidate_rows(path, prompt_ids))


def candidate_rows(path: str | Path, prompt_ids: Collection[str]) -> Iterator[ValidRow[Candidate] | QuarantinedRow]:
    """Each row of a candidates file, validated against the known prompt ids; duplicates after the
    first occurrence are quarantined.

    Release-format rows (`idx` = "<prompt idx>-<k>", `answer`) are mapped to
    `prompt_id` = "<prompt idx>", `candidate_id` = `idx`, `response` = `answer`.
    """

    def candidate(row: dict[str, Any]) -> Candidate:
        if "candidate_id" in row or "prompt_id" in row:
            record = build_record(Candidate, {name: row.get(name) for name in ("prompt_id", "candidate_id", "response")})
        else:
            candidate_id = _row_id(row, "idx")
            if candidate_id is None:
                raise ValueError("missing field 'candidate_id' (or release-format 'idx')")
            if "-" not in candidate_id:
                raise ValueError(f"release-format idx '{candidate_id}' is not '<prompt idx>-<k>'")
            fields = {"prompt_id": candidate_id.rsplit("-", 1)[0], "candidate_id": candidate_id, "response": row.get("answer")}
            record = build_record(Candidate, fields, names={"response": "answer"})
        if record.prompt_id not in prompt_ids:
            raise ValueError(f"candidate for unknown prompt '{record.prompt_id}'")
        return record

    path = Path(path)
    return validated_rows(
        path, read_rows(path), candidate, id_fields=("candidate_id", "idx"),
        duplicate="duplicate candidate_id '{id}' (first on line {line})",
    )


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """A temporary file beside `path` for the caller to write; when the block ends without error
    it is flushed to disk and renamed onto `path`, so that readers (and a crash) see either the
    old file or the whole new one. On error the temporary file is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        with tmp.open("rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """Write a file atomically (`atomic_path`)."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def write_parquet_atomic(frame: pl.DataFrame, path: str | Path) -> Path:
    """Write a polars frame to Parquet atomically (`atomic_path`)."""
    with atomic_path(path) as tmp:
        frame.write_parquet(tmp)
    return Path(path)


def write_quarantine(rows: list[QuarantinedRow], path: str | Path) -> Path:
    """Write quarantined rows as Parquet (schema in records.QUARANTINE_SCHEMA)."""
    frame = pl.DataFrame([r.model_dump() for r in rows], schema=QUARANTINE_SCHEMA)
    return write_parquet_atomic(frame, path)


def cache_dir() -> Path:
    """Where derived model files are kept: $LONGREWARD_CACHE or ~/.cache/longreward."""
    path = Path(os.environ.get("LONGREWARD_CACHE") or Path.home() / ".cache" / "longreward")
    path.mkdir(parents=True, exist_ok=True)
    return path


def file_hash(path: str | Path) -> str:
    """sha256 of a file's bytes."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()

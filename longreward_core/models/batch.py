"""A provider's Batch API: requests submitted as a file, answered within hours at batch prices.

`BatchTransport` speaks OpenAI's batch format through litellm (`create_file`, `create_batch`,
`retrieve_batch`, `file_content`, `cancel_batch`), so every provider litellm batches for works:
a batch is a JSON-lines file of chat requests, each line named by its `custom_id` (here the
request's call-cache key), and its answers come back as an output file (answered lines) and an
error file (failed or expired lines; a batch whose every line failed has only the error file).

`BatchLedger` is the durable record of the batches a run submitted (`batches.jsonl` in the output
folder, and a PostgreSQL table when the call cache is shared there): each batch is written down with its lines before anyone waits for it, and what came of
its lines once its answers were stored. A re-run, or a worker that died while waiting, reads it
back, polls the same batches and never submits a line that a live or finished batch holds.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from tenacity import Retrying, retry_if_exception, stop_after_attempt, wait_exponential_jitter

from longreward_core.models.call_cache import CallCacheUnavailable, redact_url, url_password
from longreward_core.models.client import LLMConfig, litellm_module
from longreward_core.models.errors import ConfigurationError, LLMCallFailed, classify_failure, is_transient
from longreward_core.models.secrets import JUDGE_API_KEY_ENV, redact, register_secret

# Providers whose batches litellm creates (`litellm.create_batch`), OpenAI's batch format.
BATCH_PROVIDERS = ("openai", "azure", "vertex_ai", "bedrock", "hosted_vllm", "litellm_proxy", "mistral", "xai")
BATCH_ENDPOINT = "/v1/chat/completions"
LEDGER_FILE = "batches.jsonl"  # the batches of a run, in its output folder
LEDGER_TABLE = "longreward_batches"  # the same rows in the shared call cache's database, when there is one
FINISHED = ("completed", "expired", "failed", "cancelled")  # a batch in one of these changes no more
BROKEN = ("failed", "cancelled")  # a batch that did not run its lines: the run stops there


class BatchUnsupported(ValueError):
    """The judge cannot be asked through a Batch API (the embedded model, or a provider litellm
    has no batches for): a configuration error, found before anything starts."""


class BatchFailed(LLMCallFailed):
    """A submitted batch failed validation or was cancelled: its message names the batch. The
    answers it did give are kept; a re-run submits its other lines again."""


def batch_provider(config: LLMConfig) -> tuple[str, str]:
    """The provider litellm batches `config.model` through, and the model's name there; raises
    BatchUnsupported naming the model and the providers that work."""
    supported = ", ".join(BATCH_PROVIDERS)
    if config.is_embedded:
        raise BatchUnsupported(
            f"--batch: the embedded judge {config.model} has no Batch API; point the judge at a model of a provider "
            f"litellm batches for ({supported}), or leave --batch out"
        )
    try:
        name, provider, _, _ = litellm_module().get_llm_provider(config.model, api_base=config.api_base)
    except Exception as exc:
        raise BatchUnsupported(f"--batch: litellm does not know the provider of {config.model}: {redact(str(exc))}") from None
    if provider not in BATCH_PROVIDERS:
        raise BatchUnsupported(
            f"--batch: litellm has no Batch API for {config.model} (provider {provider}); "
            f"batch mode works with the providers {supported}, or leave --batch out"
        )
    return provider, name


@dataclass(frozen=True)
class BatchLine:
    """One request of a batch: its `custom_id` (the request's cache key) and its chat body."""

    custom_id: str
    body: dict[str, Any]

    def to_json(self) -> str:
        return json.dumps(
            {"custom_id": self.custom_id, "method": "POST", "url": BATCH_ENDPOINT, "body": self.body}, ensure_ascii=False
        )


def split_lines(lines: list[BatchLine], max_lines: int, max_bytes: int) -> list[list[BatchLine]]:
    """`lines` cut into files within the provider's limits (lines and bytes per input file)."""
    files: list[list[BatchLine]] = []
    current: list[BatchLine] = []
    size = 0
    for line in lines:
        length = len(line.to_json().encode("utf-8")) + 1
        if length > max_bytes:
            raise ValueError(f"batch line {line.custom_id} is {length} bytes, over the {max_bytes}-byte file limit")
        if current and (len(current) == max_lines or size + length > max_bytes):
            files.append(current)
            current, size = [], 0
        current.append(line)
        size += length
    if current:
        files.append(current)
    return files


@dataclass(frozen=True)
class LineResult:
    """What a batch gave for one line: the completion body, or why the line failed (`status`: its
    HTTP status where it had one; None for an expired or unrun line)."""

    custom_id: str
    body: dict[str, Any] | None = None
    error: str | None = None
    status: int | None = None


@dataclass
class BatchState:
    """A batch as the provider reports it."""

    batch_id: str
    status: str
    output_file_id: str | None
    error_file_id: str | None
    completed: int
    failed: int
    total: int
    errors: str | None = None  # why the batch failed validation, in the provider's words

    @property
    def finished(self) -> bool:
        return self.status in FINISHED


class BatchTransport:
    """Submits, polls, reads and cancels batches of chat requests for one model (blocking calls:
    run them in a thread from async code)."""

    def __init__(self, config: LLMConfig):
        self.config = config
        self.provider, self.model_name = batch_provider(config)
        self._kwargs = {"custom_llm_provider": self.provider, "api_base": config.api_base, "api_key": config.resolved_api_key()}

    def line(self, custom_id: str, messages: list[dict[str, Any]], params: dict[str, Any]) -> BatchLine:
        """The batch line of a chat request (`params`: its sampling parameters)."""
        return BatchLine(custom_id, {"model": self.model_name, "messages": messages, **params})

    def _call(self, what: str, fn: Any, *args: Any, **kwargs: Any) -> Any:
        cfg = self.config
        retrying = Retrying(
            retry=retry_if_exception(is_transient), wait=wait_exponential_jitter(multiplier=cfg.backoff_initial_s, max=cfg.backoff_max_s),
            stop=stop_after_attempt(cfg.transport_retries + 1), reraise=True,
        )
        try:
            return retrying(fn, *args, **self._kwargs, **kwargs)
        except Exception as exc:
            failure = classify_failure(
                exc, model=cfg.model, api_base=cfg.api_base, api_key=self._kwargs["api_key"], key_variables=f"${JUDGE_API_KEY_ENV}"
            )
            # Refused credentials or an unknown model end the run with their fix; anything else names the batch call.
            if isinstance(failure, ConfigurationError):
                raise failure from None
            raise LLMCallFailed(f"Batch API of {cfg.model}: {what} failed: {failure}", transport=failure.transport) from None

    def submit(self, lines: list[BatchLine], wave: int) -> BatchRecord:
        """Upload `lines` as a file and create a batch of it; its record (not yet written down)."""
        litellm = litellm_module()
        content = "".join(line.to_json() + "\n" for line in lines).encode("utf-8")
        uploaded = self._call("uploading a batch file", litellm.create_file, file=(f"wave-{wave}.jsonl", content), purpose="batch")
        batch = self._call(
            f"creating a batch of file {uploaded.id}", litellm.create_batch, completion_window="24h", endpoint=BATCH_ENDPOINT,
            input_file_id=uploaded.id, metadata={"wave": str(wave)},
        )
        return BatchRecord(batch.id, uploaded.id, wave, [line.custom_id for line in lines], time.time())

    def state(self, batch_id: str) -> BatchState:
        batch = self._call(f"polling batch {batch_id}", litellm_module().retrieve_batch, batch_id)
        counts = batch.request_counts
        errors = getattr(batch, "errors", None)
        reasons = "; ".join(f"{e.code}: {e.message}" for e in (getattr(errors, "data", None) or [])) or None
        return BatchState(
            batch.id, batch.status, batch.output_file_id, batch.error_file_id,
            getattr(counts, "completed", 0) or 0, getattr(counts, "failed", 0) or 0, getattr(counts, "total", 0) or 0, reasons,
        )

    def results(self, state: BatchState, custom_ids: Iterable[str]) -> dict[str, LineResult]:
        """Every line of a finished batch: its answer, or why it has none (a line the provider
        reported nothing for, as in a cancelled batch, is 'not run')."""
        results: dict[str, LineResult] = {}
        for file_id in (state.output_file_id, state.error_file_id):
            if not file_id:
                continue
            content = self._call(f"reading file {file_id} of batch {state.batch_id}", litellm_module().file_content, file_id=file_id)
            for raw in content.content.decode("utf-8").splitlines():
                if raw.strip():
                    result = _line_result(json.loads(raw))
                    results[result.custom_id] = result
        for custom_id in custom_ids:
            results.setdefault(custom_id, LineResult(custom_id, error=f"not run (batch {state.batch_id} {state.status})"))
        return results

    def cancel(self, batch_id: str) -> BatchState:
        self._call(f"cancelling batch {batch_id}", litellm_module().cancel_batch, batch_id)
        return self.state(batch_id)


def _line_result(row: dict[str, Any]) -> LineResult:
    custom_id = row["custom_id"]
    response = row.get("response") or {}
    status = response.get("status_code")
    body = response.get("body") or {}
    if row.get("error"):
        error = row["error"]
        return LineResult(custom_id, error=f"{error.get('code')}: {error.get('message')}", status=status)
    if status != 200:
        message = (body.get("error") or {}).get("message") if isinstance(body, dict) else None
        return LineResult(custom_id, error=f"HTTP {status}: {message or body}", status=status)
    return LineResult(custom_id, body=body)


@dataclass
class BatchRecord:
    """A submitted batch as the ledger keeps it: ids, wave, the custom ids of its lines, and once
    read, what came of each line that was not answered ('unaccepted': an answer the caller would
    not keep; else the failure's reason)."""

    batch_id: str
    input_file_id: str
    wave: int
    custom_ids: list[str]
    submitted_at: float
    status: str = "submitted"
    outcomes: dict[str, str] = field(default_factory=dict)

    @property
    def read(self) -> bool:
        return self.status in FINISHED


class PostgresLedger:
    """A ledger's rows in the shared PostgreSQL call cache's database (table `longreward_batches`),
    under the ledger's name (its output folder), so a worker on another host that resumes the run
    finds its batches even where the output folder's file is not shared."""

    def __init__(self, url: str, name: str):
        self.label, self.name = redact_url(url), name
        register_secret(url_password(url))
        try:
            import psycopg

            self._db = psycopg.connect(url, autocommit=True, connect_timeout=30)
            self._db.execute(
                f"CREATE TABLE IF NOT EXISTS {LEDGER_TABLE} (id BIGSERIAL PRIMARY KEY, ledger TEXT NOT NULL, row JSONB NOT NULL)"
            )
            self._db.execute(f"CREATE INDEX IF NOT EXISTS {LEDGER_TABLE}_ledger ON {LEDGER_TABLE} (ledger)")
        except Exception as exc:
            raise self._fail("connecting", exc) from None

    def _fail(self, doing: str, exc: Exception) -> CallCacheUnavailable:
        return CallCacheUnavailable(f"batch ledger in {self.label}: {doing} failed: {redact(f'{type(exc).__name__}: {exc}')}")

    def rows(self) -> list[dict[str, Any]]:
        try:
            found = self._db.execute(f"SELECT row FROM {LEDGER_TABLE} WHERE ledger = %s ORDER BY id", (self.name,)).fetchall()
        except Exception as exc:
            raise self._fail("reading", exc) from None
        return [row for (row,) in found]

    def append(self, row: dict[str, Any]) -> None:
        from psycopg.types.json import Jsonb

        try:
            self._db.execute(f"INSERT INTO {LEDGER_TABLE} (ledger, row) VALUES (%s, %s)", (self.name, Jsonb(row)))
        except Exception as exc:
            raise self._fail("writing", exc) from None

    def close(self) -> None:
        self._db.close()


class BatchLedger:
    """The batches of a run, appended to `path` (JSON lines: a 'submitted' row written and synced
    before the batch is waited for, a 'read' row once its answers were stored), and to `mirror`
    (the shared PostgreSQL database) when given: the run resumes from what either holds."""

    def __init__(self, path: str | Path, mirror: PostgresLedger | None = None):
        self.path = Path(path)
        self.mirror = mirror
        self._lock = threading.Lock()
        self.records: dict[str, BatchRecord] = {}
        rows = []
        if self.path.exists():
            rows = [json.loads(raw) for raw in self.path.read_text(encoding="utf-8").splitlines() if raw.strip()]
        for row in (mirror.rows() if mirror is not None else []):
            if row not in rows:
                rows.append(row)
        for row in sorted(rows, key=lambda r: r["event"] != "submitted"):  # a batch before what came of it
            self._apply(row)

    def _apply(self, row: dict[str, Any]) -> None:
        if row["event"] == "submitted":
            fields = {k: row[k] for k in ("batch_id", "input_file_id", "wave", "custom_ids", "submitted_at")}
            self.records[row["batch_id"]] = BatchRecord(**fields)
        elif row["event"] == "read" and row["batch_id"] in self.records:
            record = self.records[row["batch_id"]]
            record.status, record.outcomes = row["status"], row["outcomes"]

    def _append(self, row: dict[str, Any]) -> None:
        with self._lock:
            with self.path.open("a", encoding="utf-8") as f:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
                f.flush()
                os.fsync(f.fileno())
            if self.mirror is not None:
                self.mirror.append(row)
            self._apply(row)

    def submitted(self, record: BatchRecord) -> None:
        row = asdict(record)
        del row["status"], row["outcomes"]
        self._append({"event": "submitted", **row})

    def read(self, batch_id: str, status: str, outcomes: dict[str, str]) -> None:
        self._append({"event": "read", "batch_id": batch_id, "status": status, "outcomes": outcomes})

    def live(self) -> list[BatchRecord]:
        """Batches submitted and not read yet, oldest first."""
        return [r for r in self.records.values() if not r.read]

    def waves(self) -> int:
        return len({r.wave for r in self.records.values()})

    def history(self) -> tuple[dict[str, int], dict[str, str], set[str]]:
        """Per custom id: how many read batches failed it and its last failure's reason; and the ids
        in live batches."""
        failures: dict[str, int] = {}
        last: dict[str, str] = {}
        live: set[str] = set()
        for record in self.records.values():
            if not record.read:
                live.update(record.custom_ids)
                continue
            for custom_id, outcome in record.outcomes.items():
                last[custom_id] = outcome
                if outcome != UNACCEPTED:
                    failures[custom_id] = failures.get(custom_id, 0) + 1
        return failures, last, live


UNACCEPTED = "unaccepted"

"""The judge double's Batch API: OpenAI's `/v1/files` and `/v1/batches`, on the same loopback server.

`BatchAPI` keeps uploaded files and batches in memory; the double's HTTP handler passes it every
request under `/files` or `/batches` (`handle`). A batch's lines are answered by the same scripted
judge as online requests (`answer_line`, given by the double), but they are logged apart
(`lines`), so a test tells online requests (`JudgeDouble.requests`) from batch lines.

Settable, to test the faults a provider's batch can have:
- `delay_s`: a batch stays `in_progress` this long after it was created, then completes;
- `line_fault`: a rule (as the double's `fault_rule`) giving a line a `Fault`: an HTTP status
  makes the line an error line (in the error file, as OpenAI writes failed requests), 'no_verdict'
  an answer without a verdict;
- `expire`: batch numbers (0 for the first batch created) that expire: the first half of their
  lines are answered, the rest are written to the error file with code `batch_expired`;
- `fail_validation`: batch numbers that fail validation (status `failed`, no line answered);
- `cancel(batch_id)` (also `POST /v1/batches/{id}/cancel`): a batch stops, its lines unanswered.
A batch whose every line failed has no output file, only an error file, as OpenAI's.
"""

from __future__ import annotations

import email.parser
import email.policy
import json
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

# (Request, line body, line number, Fault or None) -> the completion body answering the line.
AnswerLine = Callable[[Any, dict[str, Any], int, Any], dict[str, Any]]


@dataclass
class BatchAPI:
    read_line: Callable[[dict[str, Any]], Any]  # a line's chat body -> the double's Request
    answer_line: AnswerLine
    delay_s: float = 0.0
    line_fault: Callable[[Any, int], Any] | None = None  # (Request, line number) -> Fault | None
    expire: set[int] = field(default_factory=set)
    fail_validation: set[int] = field(default_factory=set)
    files: dict[str, bytes] = field(default_factory=dict)
    batches: dict[str, dict[str, Any]] = field(default_factory=dict)
    submitted: list[str] = field(default_factory=list)  # every custom_id of every batch created, in order
    lines: list[Any] = field(default_factory=list)  # every line answered (Request), in order

    def __post_init__(self) -> None:
        self._lock = threading.Lock()

    # -- what tests read ------------------------------------------------------------------
    def count(self, task: str | None = None) -> int:
        with self._lock:
            return sum(1 for r in self.lines if task is None or r.task == task)

    def reset(self) -> None:
        with self._lock:
            self.files.clear()
            self.batches.clear()
            self.submitted.clear()
            self.lines.clear()

    def cancel(self, batch_id: str) -> dict[str, Any]:
        with self._lock:
            batch = self.batches[batch_id]
            if batch["status"] in ("validating", "in_progress"):
                batch["status"] = "cancelled"
                batch["cancelled_at"] = int(time.time())
            return dict(batch)

    # -- HTTP -------------------------------------------------------------------------------
    def handle(self, method: str, path: str, headers: Any, body: bytes) -> tuple[int, bytes, str]:
        """(status, body, content type) of a request under `/files` or `/batches`."""
        parts = path.split("?")[0].rstrip("/").split("/")
        try:
            at = parts.index("files") if "files" in parts else parts.index("batches")
        except ValueError:
            return _not_found()
        resource, rest = parts[at], parts[at + 1:]
        if resource == "files":
            if method == "POST" and not rest:
                return self._upload(headers, body)
            if method == "GET" and len(rest) == 2 and rest[1] == "content" and rest[0] in self.files:
                return 200, self.files[rest[0]], "application/octet-stream"
            if method == "GET" and len(rest) == 1 and rest[0] in self.files:
                return _json(_file_object(rest[0], len(self.files[rest[0]])))
            return _not_found()
        if method == "POST" and not rest:
            return self._create(json.loads(body or b"{}"))
        if not rest or rest[0] not in self.batches:
            return _not_found()
        if method == "GET" and len(rest) == 1:
            return _json(self._retrieve(rest[0]))
        if method == "POST" and rest[1:] == ["cancel"]:
            return _json(self.cancel(rest[0]))
        return _not_found()

    def _upload(self, headers: Any, body: bytes) -> tuple[int, bytes, str]:
        head = f"Content-Type: {headers.get('Content-Type')}\r\n\r\n".encode()
        message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(head + body)
        content = None
        for part in message.iter_parts():
            if part.get_param("name", header="content-disposition") == "file":
                content = part.get_payload(decode=True)
        if content is None:
            return 400, json.dumps({"error": {"message": "no file part"}}).encode(), "application/json"
        with self._lock:
            file_id = f"file-{len(self.files)}"
            self.files[file_id] = content
        return _json(_file_object(file_id, len(content)))

    def _create(self, request: dict[str, Any]) -> tuple[int, bytes, str]:
        file_id = request.get("input_file_id")
        if file_id not in self.files:
            return 400, json.dumps({"error": {"message": f"no file {file_id}"}}).encode(), "application/json"
        lines = [json.loads(line) for line in self.files[file_id].decode("utf-8").splitlines() if line.strip()]
        now = int(time.time())
        with self._lock:
            number = len(self.batches)
            batch_id = f"batch_{number:04d}"
            self.submitted.extend(line["custom_id"] for line in lines)
            self.batches[batch_id] = {
                "id": batch_id, "object": "batch", "endpoint": request.get("endpoint"), "errors": None,
                "input_file_id": file_id, "completion_window": request.get("completion_window", "24h"),
                "status": "in_progress", "output_file_id": None, "error_file_id": None, "created_at": now,
                "in_progress_at": now, "expires_at": now + 86400, "completed_at": None, "failed_at": None,
                "expired_at": None, "cancelled_at": None, "metadata": request.get("metadata"),
                "request_counts": {"total": len(lines), "completed": 0, "failed": 0},
                "_number": number, "_lines": lines, "_ready_at": time.monotonic() + self.delay_s,
            }
            if number in self.fail_validation:
                self.batches[batch_id].update(
                    status="failed", failed_at=now, in_progress_at=None,
                    errors={"object": "list", "data": [{"code": "invalid_request", "message": "injected validation failure", "line": 1}]},
                )
            return _json(self._public(self.batches[batch_id]))

    def _retrieve(self, batch_id: str) -> dict[str, Any]:
        with self._lock:
            batch = self.batches[batch_id]
            if batch["status"] == "in_progress" and time.monotonic() >= batch["_ready_at"]:
                self._finish(batch)
            return self._public(batch)

    def _finish(self, batch: dict[str, Any]) -> None:
        """Answer a batch's lines (under the lock): output and error files, counts, final status."""
        lines = batch["_lines"]
        expired = batch["_number"] in self.expire
        answered = lines[: len(lines) // 2] if expired else lines
        output, errors = [], []
        for line in answered:
            request = self.read_line(line["body"])
            index = len(self.lines)
            self.lines.append(request)
            fault = self.line_fault(request, index) if self.line_fault is not None else None
            if fault is not None and fault.kind == "status":
                error = {"error": {"message": f"injected {fault.status}", "type": "injected"}}
                errors.append(_line(line, index, fault.status, error))
                continue
            output.append(_line(line, index, 200, self.answer_line(request, line["body"], index, fault)))
        for line in lines[len(answered):]:
            errors.append({"id": f"batch_req_{line['custom_id'][:12]}", "custom_id": line["custom_id"], "response": None,
                           "error": {"code": "batch_expired", "message": "This request could not be executed before the completion window expired."}})
        now = int(time.time())
        for name, rows in (("output_file_id", output), ("error_file_id", errors)):
            if rows:
                file_id = f"file-{len(self.files)}"
                self.files[file_id] = "".join(json.dumps(r) + "\n" for r in rows).encode()
                batch[name] = file_id
        batch["request_counts"] = {"total": len(lines), "completed": len(output), "failed": len(errors)}
        batch["status"] = "expired" if expired else "completed"
        batch["expired_at" if expired else "completed_at"] = now

    @staticmethod
    def _public(batch: dict[str, Any]) -> dict[str, Any]:
        return {k: v for k, v in batch.items() if not k.startswith("_")}


def _line(line: dict[str, Any], index: int, status: int, body: dict[str, Any]) -> dict[str, Any]:
    return {"id": f"batch_req_{index}", "custom_id": line["custom_id"],
            "response": {"status_code": status, "request_id": f"req_{index}", "body": body}, "error": None}


def _file_object(file_id: str, size: int) -> dict[str, Any]:
    return {"id": file_id, "object": "file", "bytes": size, "created_at": int(time.time()),
            "filename": f"{file_id}.jsonl", "purpose": "batch", "status": "processed"}


def _json(payload: dict[str, Any]) -> tuple[int, bytes, str]:
    return 200, json.dumps(payload).encode(), "application/json"


def _not_found() -> tuple[int, bytes, str]:
    return 404, b'{"error": {"message": "not found"}}', "application/json"

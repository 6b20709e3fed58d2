"""A real OpenAI-compatible HTTP server on loopback, standing in for the judge in tests.

It answers `POST .../chat/completions` with scripted judge answers chosen by the task line that
opens every prompt template, and can inject latency and faults (`Fault`): HTTP errors (with
Retry-After; a 401 that quotes the token; a 400 "context length" above a size, `context_limit`),
hangs past the timeout, truncated bodies, dropped connections, null content and answers without
a verdict, one by one or as a seeded share of all requests (`fault_mix`). Every request is logged
(task, temperature, time), and every injected fault by request index and name (`injected`), so
tests can count judge calls exactly and compare the client's accounting with what was injected.

Default answers follow the task, so scores depend on the content:
- helpfulness 7, logicality 8, completeness 6 (override with `ratings`);
- statements: one per sentence of the response (none for an empty one);
- support: "Fully supported" when the statement's text occurs in the evidence, else "No support";
- key points: the first words of the chunk.
Prompts that open with no task line (a model under test answering a benchmark) are task
"unknown", or "completion" when sent to the plain `/completions` endpoint; script their answers
with `answers`. `POST .../embeddings` answers 8 numbers per text, from its hash (task
"embedding"). The `model` of every request and its Authorization header are recorded (`models`,
`authorization`; `listed_by` for `GET /models`); `only_served_models` answers 404 for a model not in `served_models`, as vLLM does.
`required_key` answers 401 to any other bearer token, on the model listing too.

Batch requests (`/v1/files`, `/v1/batches`) go to `batch_api` (`longreward_testing.batch_double`), whose
lines are answered by the same script and logged apart from online requests.

Usage counts 4 characters as a token and reports a prompt cache as OpenAI does
(`prompt_tokens_details.cached_tokens`): the prefix a prompt shares with an earlier prompt to the
same model, in whole 128-token blocks, for prompts of 1024 tokens or more.
"""

from __future__ import annotations

import hashlib
import json
import re
import socket
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from longreward_testing.batch_double import BatchAPI

TASKS = {
    "[Task: grade HELPFULNESS]": "helpfulness",
    "[Task: grade LOGICALITY]": "logicality",
    "[Task: extract FACTUAL STATEMENTS]": "statements",
    "[Task: check SUPPORT of a statement]": "support",
    "[Task: extract KEY POINTS from a document chunk]": "key_points",
    "[Task: grade COMPLETENESS]": "completeness",
    "[Task: grade ANSWER against a REFERENCE, 1-10]": "longbench_chat",
    "[Task: grade QA ANSWER against REFERENCES, 1-3]": "longbench_qa",
    "[Task: grade SUMMARY against a REFERENCE, 1-5]": "longbench_summary",
}


def task_of(content: str) -> str:
    first = content.splitlines()[0] if content else ""
    for line, task in TASKS.items():
        if first.startswith(line):
            return task
    return "unknown"


def slot(content: str, tag: str) -> str:
    """The text inside the (last) <tag>...</tag> block of a prompt."""
    matches = re.findall(rf"<{tag}>\n?(.*?)\n?</{tag}>", content, re.S)
    return matches[-1] if matches else ""


def sentences(text: str) -> list[str]:
    return [s.strip() for s in re.split(r"(?<=[.!?])\s+|(?<=[。！？])", text) if s.strip()]


def normal_text(text: str) -> str:
    """`text` with white space collapsed, a final full stop dropped, and case folded, for matching."""
    return re.sub(r"\s+", " ", text).strip().rstrip(".。").casefold()


@dataclass
class Request:
    task: str
    temperature: float | None
    content: str
    at: float
    cached_tokens: int = 0
    cache_control: bool = False  # the prompt carried an Anthropic cache_control breakpoint


CACHE_BLOCK, CACHE_MIN = 128, 1024  # OpenAI's prompt caching: 128-token steps from 1024 tokens


def message_text(content: Any) -> str:
    """A message's text, given as a string or as text parts."""
    if isinstance(content, list):
        return "".join(part.get("text", "") for part in content if isinstance(part, dict))
    return content or ""


@dataclass
class Fault:
    """One injected fault: 'status' (an HTTP error; 401 quotes the bearer token back, as providers
    do), 'timeout' (hangs past the client's timeout), 'broken_body' (a truncated JSON body), 'drop'
    (the connection closes with no answer), 'no_verdict' (an answer without a verdict) or 'null'
    (null content)."""

    kind: str
    status: int = 500
    retry_after: str | None = None  # a Retry-After header on a 'status' fault

    @property
    def name(self) -> str:
        """The fault's name as in KINDS ('hang', 'garbage', ...); an HTTP error is named by its status."""
        return str(self.status) if self.kind == "status" else _NAMES[self.kind]


_NAMES = {"timeout": "hang", "no_verdict": "garbage", "broken_body": "truncated", "drop": "drop", "null": "null"}


KINDS: dict[str, Fault] = {
    "500": Fault("status", 500),
    "429": Fault("status", 429, retry_after="1"),
    "hang": Fault("timeout"),
    "garbage": Fault("no_verdict"),
    "truncated": Fault("broken_body"),
    "drop": Fault("drop"),
    "null": Fault("null"),
}


def fault_mix(rate: float, kinds: list[str], seed: int = 0) -> Callable[[Request, int], Fault | None]:
    """A fault rule: each request independently gets one of `kinds` (names in KINDS) with
    probability `rate`, reproducibly for a given seed and request order."""
    import random

    rng = random.Random(seed)
    lock = threading.Lock()

    def rule(request: Request, index: int) -> Fault | None:
        with lock:
            hit, pick = rng.random() < rate, rng.choice(kinds)
        return KINDS[pick] if hit else None

    return rule


def context_limit(max_chars: int) -> Callable[[Request, int], Fault | None]:
    """A fault rule: 400 'context length exceeded' for every prompt longer than `max_chars`."""

    def rule(request: Request, index: int) -> Fault | None:
        return Fault("status", 400) if len(request.content) > max_chars else None

    return rule


@dataclass
class JudgeDouble:
    latency_s: float = 0.0
    timeout_sleep_s: float = 3.0
    ratings: dict[str, int] = field(default_factory=lambda: {"helpfulness": 7, "logicality": 8, "completeness": 6})
    # Called for every request; returns a Fault to inject or None. Default: pop from `faults`.
    fault_rule: Callable[[Request, int], Fault | None] | None = None
    faults: list[Fault] = field(default_factory=list)
    # Overrides the scripted answer for a task: (request) -> answer text.
    answers: dict[str, Callable[[Request], str]] = field(default_factory=dict)
    requests: list[Request] = field(default_factory=list)
    injected: list[tuple[int, str]] = field(default_factory=list)  # (request index, Fault.name)
    in_flight: int = 0
    max_in_flight: int = 0
    authorization: list[str] = field(default_factory=list)
    models: list[str] = field(default_factory=list)  # the `model` of every POST, as the body names it
    listed_by: list[str] = field(default_factory=list)  # the Authorization header of every GET /models
    # Answer 404 "model does not exist" for a model not in `served_models`, as vLLM does.
    only_served_models: bool = False
    # A server started with a key (vLLM's --api-key): any other bearer gets 401, the listing included.
    required_key: str | None = None
    # What `GET /v1/models` reports, as vLLM does: served names and their context window.
    served_models: tuple[str, ...] = ("judge-double", "policy-double")
    max_model_len: int = 32_768
    cache_min_tokens: int = CACHE_MIN  # shorter prompts are never served from the prompt cache
    # The `n` parameter (several choices in one answer): "serve" it, "refuse" it (HTTP 400, as a
    # server without it does) or "ignore" it (one choice, as some servers silently do).
    n_mode: str = "serve"

    def __post_init__(self) -> None:
        self._lock = threading.Lock()
        self._prompts: dict[str, list[str]] = {}  # per model, earlier prompts in sorted order
        # `/v1/files` and `/v1/batches`; its lines are answered as chat requests are.
        self.batch_api = BatchAPI(
            lambda body: Request(task_of(text := message_text(body["messages"][-1]["content"])), body.get("temperature"), text, time.monotonic()),
            lambda request, body, index, fault: self.completion(request, body, index, True, fault),
        )

    def cached_tokens(self, model: str, content: str) -> int:
        """Tokens of `content` a provider's prefix cache serves: the longest prefix shared with an
        earlier prompt to `model`, in whole blocks (then remembers `content`)."""
        import bisect
        import os

        with self._lock:
            seen = self._prompts.setdefault(model, [])
            at = bisect.bisect_left(seen, content)
            shared = max((len(os.path.commonprefix([content, seen[i]])) for i in (at - 1, at) if 0 <= i < len(seen)), default=0)
            seen.insert(at, content)
        if len(content) // 4 < self.cache_min_tokens:
            return 0
        return (shared // 4) // CACHE_BLOCK * CACHE_BLOCK

    # -- scripted judge -------------------------------------------------------------------
    def answer(self, request: Request) -> str:
        if request.task in self.answers:
            return self.answers[request.task](request)
        c = request.content
        if request.task in self.ratings:
            return f"Analysis: looks fine.\nRating: [[{self.ratings[request.task]}]]"
        if request.task == "statements":
            found = sentences(slot(c, "response"))
            if not found:
                return "[[no statements]]"
            return "[[statements]]\n" + "\n".join(f"- {s}" for s in found) + "\n[[end]]"
        if request.task == "support":
            statement, evidence = slot(c, "statement"), slot(c, "document_excerpts")
            supported = normal_text(statement) in normal_text(evidence)
            return "Checked.\n" + ("[[Fully supported]]" if supported else "[[No support]]")
        if request.task == "key_points":
            words = slot(c, "document_chunk").split()[:8]
            return "[[information]]\n- " + " ".join(words) + "\n[[end]]" if words else "[[none]]"
        return "I cannot tell."


    def completion(self, request: Request, payload: dict[str, Any], index: int, chat: bool, fault: Fault | None) -> dict[str, Any]:
        """The completion body answering `request` (`payload` as sent), with usage and prompt cache."""
        content = request.content
        request.cached_tokens = self.cached_tokens(payload.get("model", ""), content)
        n = int(payload.get("n") or 1)
        text: str | None = self.answer(request)
        extra = [self.answer(request) for _ in range(n - 1)] if n > 1 and self.n_mode == "serve" else []
        if fault is not None and fault.kind == "no_verdict":
            text = "I think it is fine."
        if fault is not None and fault.kind == "null":
            text = None
        choice = (
            {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}
            if chat
            else {"index": 0, "text": text, "logprobs": None, "finish_reason": "stop"}
        )
        more = [
            {"index": i, "message": {"role": "assistant", "content": t}, "finish_reason": "stop"}
            if chat else {"index": i, "text": t, "logprobs": None, "finish_reason": "stop"}
            for i, t in enumerate(extra, start=1)
        ]
        body = {
            "id": f"chatcmpl-{index}",
            "object": "chat.completion" if chat else "text_completion",
            "created": int(time.time()),
            "model": payload.get("model", "judge-double"),
            "choices": [choice, *more],
            "usage": {
                "prompt_tokens": len(content) // 4,
                "completion_tokens": sum(len(t or "") // 4 for t in [text, *extra]),
                "total_tokens": len(content) // 4 + sum(len(t or "") // 4 for t in [text, *extra]),
                "prompt_tokens_details": {"cached_tokens": request.cached_tokens},
            },
        }
        return body

    def count(self, task: str | None = None) -> int:
        with self._lock:
            return sum(1 for r in self.requests if task is None or r.task == task)

    def counts(self) -> Counter:
        with self._lock:
            return Counter(r.task for r in self.requests)

    def reset(self) -> None:
        with self._lock:
            self.requests.clear()
            self.injected.clear()
            self.max_in_flight = 0

    def _next_fault(self, request: Request, index: int) -> Fault | None:
        if self.fault_rule is not None:
            fault = self.fault_rule(request, index)
        else:
            with self._lock:
                fault = self.faults.pop(0) if self.faults else None
        if fault is not None:
            with self._lock:
                self.injected.append((index, fault.name))
        return fault


def _make_handler(double: JudgeDouble) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        # Headers and body go out in separate writes: without this, Nagle's algorithm and the
        # client's delayed ACK add ~40 ms to every response.
        disable_nagle_algorithm = True

        def log_message(self, *args: Any) -> None:  # keep test output clean
            pass

        def _send(self, status: int, body: bytes, content_type: str = "application/json", headers: dict[str, str] | None = None) -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            for name, value in (headers or {}).items():
                self.send_header(name, value)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def _embed(self, payload: dict[str, Any]) -> None:
            """`/embeddings`: a vector of 8 numbers per text, from the text's hash (status faults apply)."""
            texts = payload["input"] if isinstance(payload["input"], list) else [payload["input"]]
            request = Request("embedding", None, "\n".join(texts), time.monotonic())
            with double._lock:
                double.requests.append(request)
                double.authorization.append(self.headers.get("Authorization", ""))
            fault = double._next_fault(request, len(double.requests) - 1)
            if fault is not None and fault.kind == "status":
                self._send(fault.status, json.dumps({"error": {"message": f"injected {fault.status}"}}).encode())
                return
            digests = [hashlib.sha256(t.encode()).digest() for t in texts]
            data = [{"object": "embedding", "index": i, "embedding": [b / 255 + 0.01 for b in d[:8]]} for i, d in enumerate(digests)]
            tokens = sum(len(t) // 4 for t in texts)
            body = {"object": "list", "data": data, "model": payload.get("model"),
                    "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}
            self._send(200, json.dumps(body).encode())

        def _key_refused(self) -> bool:
            if double.required_key is None or self.headers.get("Authorization") == f"Bearer {double.required_key}":
                return False
            self._send(401, b'{"error": {"message": "invalid API key", "type": "authentication_error"}}')
            return True

        def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
            if self._batch_api("GET"):
                return
            if self.path != "/stats" and self._key_refused():
                return
            if self.path == "/stats":
                self._send(200, json.dumps({"requests": double.count(), "by_task": double.counts()}).encode())
            elif self.path.endswith("/models"):
                with double._lock:
                    double.listed_by.append(self.headers.get("Authorization", ""))
                listed = [{"id": name, "object": "model", "max_model_len": double.max_model_len} for name in double.served_models]
                self._send(200, json.dumps({"object": "list", "data": listed}).encode())
            else:
                self._send(404, b'{"error": {"message": "not found"}}')

        def _batch_api(self, method: str) -> bool:
            if "/files" not in self.path and "/batches" not in self.path:
                return False
            body = self.rfile.read(int(self.headers.get("Content-Length", 0))) if method == "POST" else b""
            self._send(*double.batch_api.handle(method, self.path, self.headers, body))
            return True

        def do_POST(self) -> None:  # noqa: N802
            if self._batch_api("POST"):
                return
            length = int(self.headers.get("Content-Length", 0))
            payload = json.loads(self.rfile.read(length) or b"{}")
            with double._lock:
                double.models.append(payload.get("model", ""))
            if self._key_refused():
                return
            if double.only_served_models and payload.get("model") not in double.served_models:
                body = {"error": {"message": f"The model `{payload.get('model')}` does not exist.", "type": "NotFoundError"}}
                self._send(404, json.dumps(body).encode())
                return
            if self.path.endswith("/embeddings"):
                self._embed(payload)
                return
            chat = self.path.endswith("/chat/completions")
            if not self.path.endswith("/completions"):
                self._send(404, b'{"error": {"message": "not found"}}')
                return
            raw = payload["messages"][-1]["content"] if chat else payload["prompt"]
            content = message_text(raw)
            request = Request(task_of(content) if chat else "completion", payload.get("temperature"), content, time.monotonic(),
                              cache_control=isinstance(raw, list) and any("cache_control" in p for p in raw))
            with double._lock:
                double.requests.append(request)
                index = len(double.requests) - 1
                double.in_flight += 1
                double.max_in_flight = max(double.max_in_flight, double.in_flight)
                double.authorization.append(self.headers.get("Authorization", ""))
            try:
                if double.latency_s:
                    time.sleep(double.latency_s)
                fault = double._next_fault(request, index)
                if fault is not None and fault.kind == "status":
                    message = f"injected {fault.status}"
                    if fault.status == 401:  # providers quote the refused key back
                        message += f": incorrect API key provided: {self.headers.get('Authorization', '')}"
                    if fault.status == 400:
                        message += ": this model's maximum context length is exceeded"
                    body = json.dumps({"error": {"message": message, "type": "injected"}})
                    headers = {"Retry-After": fault.retry_after} if fault.retry_after else {}
                    self._send(fault.status, body.encode(), headers=headers)
                    return
                if fault is not None and fault.kind == "drop":
                    self.close_connection = True
                    self.connection.shutdown(socket.SHUT_RDWR)
                    return
                if fault is not None and fault.kind == "timeout":
                    time.sleep(double.timeout_sleep_s)
                if fault is not None and fault.kind == "broken_body":
                    self._send(200, b'{"choices": [ this is not json')
                    return
                n = int(payload.get("n") or 1)
                if n > 1 and double.n_mode == "refuse":
                    body = json.dumps({"error": {"message": "n > 1 is not supported by this server", "type": "invalid_request"}})
                    self._send(400, body.encode())
                    return
                body = double.completion(request, payload, index, chat, fault)
                try:
                    self._send(200, json.dumps(body).encode())
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up (timeout): nothing to answer
            finally:
                with double._lock:
                    double.in_flight -= 1

    return Handler


class _Server(ThreadingHTTPServer):
    request_queue_size = 512  # the default backlog (5) drops bursts of concurrent connections
    daemon_threads = True


class JudgeServer:
    """Runs a JudgeDouble on 127.0.0.1 (ephemeral port) in a background thread."""

    def __init__(self, double: JudgeDouble | None = None):
        self.double = double or JudgeDouble()
        self._server = _Server(("127.0.0.1", 0), _make_handler(self.double))
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def api_base(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}/v1"

    def __enter__(self) -> JudgeServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._server.shutdown()
        self._server.server_close()


def main() -> None:
    """Serve the double in its own process: `python -m longreward_testing.judge_double --latency 0.1`.

    Prints the API base on the first line of stdout, then serves until killed.
    """
    import argparse

    parser = argparse.ArgumentParser()
    parser.add_argument("--latency", type=float, default=0.0)
    args = parser.parse_args()
    server = JudgeServer(JudgeDouble(latency_s=args.latency))
    print(server.api_base, flush=True)
    server._server.serve_forever()


if __name__ == "__main__":
    main()

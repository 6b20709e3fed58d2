"""A real OpenAI-compatible server for tests: `transformers serve` on loopback, and a recording
proxy in front of it that keeps what the server answered (status and usage of every request).

The server runs as its own process group (its model runs in a child process), so stopping it
stops both. It is given a bounded time to become ready; if it exits or never answers, the test
fails with the server's own output.
"""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

READY_TIMEOUT_S = 300.0  # loading the model takes seconds alone, minutes on cores shared with other work


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _log_tail(log: Path, chars: int = 6000) -> str:
    return log.read_text(errors="replace")[-chars:] if log.exists() else "(no output)"


@contextmanager
def transformers_serve(model_dir: Path, log: Path, max_model_len: int) -> Iterator[str]:
    """Serves `model_dir` with `transformers serve` on a free loopback port; yields its API base
    (`http://127.0.0.1:PORT/v1`). Requests are logged (`--enable-log-requests`) into `log`."""
    port = free_port()
    command = [str(Path(sys.executable).parent / "transformers"), "serve", str(model_dir), "--host", "127.0.0.1",
               "--port", str(port), "--max-model-len", str(max_model_len), "--enable-log-requests"]
    # One thread: on cores shared with other processes, two OpenMP threads wait on each other
    # at every operation and run several times slower.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    with log.open("wb") as out:
        try:
            server = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        except OSError as exc:
            pytest.fail(f"`transformers serve` could not be started ({exc}); it comes with transformers[serving] "
                        "(pyproject.toml's dev extras)")
    try:
        _wait_ready(server, f"http://127.0.0.1:{port}/health", log)
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        _stop(server)


def _wait_ready(server: subprocess.Popen, health: str, log: Path) -> None:
    deadline = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < deadline:
        if server.poll() is not None:
            pytest.fail(f"`transformers serve` exited with code {server.returncode} before it was ready:\n{_log_tail(log)}")
        try:
            with urllib.request.urlopen(health, timeout=2) as answer:
                if answer.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    pytest.fail(f"`transformers serve` did not answer {health} within {READY_TIMEOUT_S:.0f} s:\n{_log_tail(log)}")


def _stop(server: subprocess.Popen) -> None:
    for sig, grace in ((signal.SIGTERM, 30), (signal.SIGKILL, 10)):
        try:
            os.killpg(server.pid, sig)
        except ProcessLookupError:
            return
        try:
            server.wait(timeout=grace)
            return
        except subprocess.TimeoutExpired:
            continue


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 64  # the default backlog of 5 drops connections under a client's concurrency


@dataclass
class Exchange:
    """One request the proxy forwarded, and what the server answered."""

    method: str
    path: str
    status: int
    usage: dict[str, Any] | None


@dataclass
class RecordingProxy:
    """Forwards every request to `upstream` (an http://host:port/v1 base) unchanged and records
    the server's answers. `api_base` is the proxy's own base, to hand to the client."""

    upstream: str
    exchanges: list[Exchange] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._lock = threading.Lock()
        self._server = _Server(("127.0.0.1", 0), self._handler())
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def api_base(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}/v1"

    def posts(self, status: int | None = None) -> list[Exchange]:
        with self._lock:
            return [e for e in self.exchanges if e.method == "POST" and (status is None or e.status == status)]

    def clear(self) -> None:
        with self._lock:
            self.exchanges.clear()

    def __enter__(self) -> RecordingProxy:
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._server.shutdown()
        self._server.server_close()

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        proxy = self
        host, port = proxy.upstream.split("//", 1)[1].split("/", 1)[0].split(":")

        class Handler(BaseHTTPRequestHandler):
            def _forward(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                headers = {k: v for k, v in self.headers.items() if k.lower() not in ("host", "connection")}
                upstream = http.client.HTTPConnection(host, int(port), timeout=600)
                try:
                    upstream.request(self.command, self.path, body=body or None, headers=headers)
                    answer = upstream.getresponse()
                    payload = answer.read()
                    content_type = answer.getheader("Content-Type", "application/json")
                finally:
                    upstream.close()
                usage = None
                if answer.status == 200 and content_type.startswith("application/json"):
                    usage = json.loads(payload).get("usage")
                with proxy._lock:
                    proxy.exchanges.append(Exchange(self.command, self.path, answer.status, usage))
                self.send_response(answer.status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            do_GET = do_POST = _forward

            def log_message(self, *args: Any) -> None:
                pass

        return Handler

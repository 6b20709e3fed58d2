"""Prefect's UI as a user's browser shows it: headless Chromium (Debian's `chromium`), driven over
the DevTools protocol, logs in the way the UI's login page does (the auth string, base64, in the
page's `prefect-password` local storage), loads a page of the stack's UI, lets its scripts run,
and gives back the rendered DOM or a screenshot."""

from __future__ import annotations

import base64
import itertools
import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from websockets.sync.client import ClientConnection, connect

FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--disable-quic", "--hide-scrollbars",
    "--remote-debugging-port=0",
]
# How long a page gets to fetch from the API and render (the SPA loads in a few seconds).
RENDER_S = 60


def ui_url(path: str) -> str:
    return os.environ["PREFECT_API_URL"].removesuffix("/api") + path


class Page:
    """One Chromium tab over the DevTools protocol."""

    def __init__(self, connection: ClientConnection):
        self._connection = connection
        self._ids = itertools.count(1)

    def send(self, method: str, **params: Any) -> dict[str, Any]:
        call_id = next(self._ids)
        self._connection.send(json.dumps({"id": call_id, "method": method, "params": params}))
        while True:
            message = json.loads(self._connection.recv(timeout=RENDER_S))
            if message.get("id") == call_id:
                assert "error" not in message, f"{method}: {message['error']}"
                return message["result"]

    def evaluate(self, expression: str) -> Any:
        return self.send("Runtime.evaluate", expression=expression, returnByValue=True)["result"].get("value")

    def open(self, path: str, until: str) -> str:
        """Load `path` of the UI and wait until its rendered DOM contains `until`; the DOM."""
        self.send("Page.navigate", url=ui_url(path))
        deadline = time.monotonic() + RENDER_S
        while True:
            dom = self.evaluate("document.documentElement.outerHTML") or ""
            if until in dom:
                return dom
            assert time.monotonic() < deadline, f"{path} did not show {until!r} within {RENDER_S} s:\n{dom[-3000:]}"
            time.sleep(0.5)

    def log_in(self, auth_string: str) -> None:
        """What the login page stores once the auth string is accepted."""
        token = base64.b64encode(auth_string.encode()).decode()
        self.evaluate(f"localStorage.setItem('prefect-password', {json.dumps(token)})")

    def screenshot(self, target: Path, width: int, height: int) -> Path:
        self.send("Emulation.setDeviceMetricsOverride", width=width, height=height, deviceScaleFactor=1, mobile=False)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(base64.b64decode(self.send("Page.captureScreenshot", format="png")["data"]))
        return target


def _end_group(process: subprocess.Popen) -> None:
    """End Chromium and every helper process it started, so its profile folder can be removed."""
    os.killpg(process.pid, signal.SIGTERM)
    process.wait(timeout=30)
    started = time.monotonic()
    while time.monotonic() - started < 40:  # past that only unreaped zombies can be left: they write nothing
        try:
            os.killpg(process.pid, signal.SIGKILL if time.monotonic() - started > 30 else 0)
        except ProcessLookupError:
            return
        time.sleep(0.1)


@contextmanager
def browser() -> Iterator[Page]:
    """A fresh headless Chromium (its own profile: nothing stored from an earlier page) and its tab."""
    binary = shutil.which("chromium")
    assert binary, "chromium is not installed (infra/stack/stack.sh up installs Debian's package)"
    with tempfile.TemporaryDirectory() as profile:
        # Its own process group: the renderer and GPU helpers write into the profile until they end too.
        process = subprocess.Popen([binary, *FLAGS, f"--user-data-dir={profile}", "about:blank"],
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        try:
            port_file = Path(profile) / "DevToolsActivePort"
            deadline = time.monotonic() + 60
            while not (port_file.is_file() and port_file.read_text().strip()):
                assert process.poll() is None and time.monotonic() < deadline, "chromium did not start"
                time.sleep(0.2)
            port = port_file.read_text().split()[0]
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=10) as response:
                (tab,) = [t for t in json.load(response) if t["type"] == "page"]
            with connect(tab["webSocketDebuggerUrl"], max_size=None) as connection:
                yield Page(connection)
        finally:
            _end_group(process)


@contextmanager
def logged_in() -> Iterator[Page]:
    """A browser that has given the UI the stack's auth string."""
    with browser() as page:
        page.open("/", until="</body>")
        page.log_in(os.environ["PREFECT_API_AUTH_STRING"])
        yield page

"""Prefect's UI as a user's browser shows it: headless Chromium (Debian's `chromium`) loads a page
of the stack's UI, lets its scripts run, and gives back the rendered DOM or a screenshot."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--disable-quic", "--hide-scrollbars",
]
# Virtual time the page gets to fetch from the API and render (the SPA loads in a few seconds).
RENDER_MS = 30_000


def ui_url(path: str) -> str:
    return os.environ["PREFECT_API_URL"].removesuffix("/api") + path


def _chromium(*args: str) -> subprocess.CompletedProcess:
    binary = shutil.which("chromium")
    assert binary, "chromium is not installed (infra/stack/stack.sh up installs Debian's package)"
    with tempfile.TemporaryDirectory() as profile:
        return subprocess.run([binary, *FLAGS, f"--user-data-dir={profile}", f"--virtual-time-budget={RENDER_MS}", *args],
                              capture_output=True, text=True, timeout=180)


def rendered_dom(path: str) -> str:
    done = _chromium("--dump-dom", ui_url(path))
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def screenshot(path: str, target: Path, width: int = 1400, height: int = 1200) -> Path:
    target.parent.mkdir(parents=True, exist_ok=True)
    done = _chromium(f"--window-size={width},{height}", f"--screenshot={target}", ui_url(path))
    assert done.returncode == 0 and target.is_file(), done.stderr[-2000:]
    return target

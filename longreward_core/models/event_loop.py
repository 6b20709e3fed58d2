"""The process's one background event loop, where every model request runs."""

from __future__ import annotations

import asyncio
import threading
from typing import Any

_loop: asyncio.AbstractEventLoop | None = None
_loop_lock = threading.Lock()


def run_async(coroutine: Any) -> Any:
    """Run a coroutine on this process's one background event loop and wait for its result.

    litellm keeps per-event-loop state (its logging worker); shards scored in parallel threads
    therefore share one loop instead of each starting its own with asyncio.run.
    """
    global _loop
    with _loop_lock:
        if _loop is None or _loop.is_closed():
            _loop = asyncio.new_event_loop()
            threading.Thread(target=_loop.run_forever, name="longreward-io", daemon=True).start()
    return asyncio.run_coroutine_threadsafe(coroutine, _loop).result()

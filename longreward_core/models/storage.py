"""What a run does when it cannot store what it was paid for.

An answer is paid for when it arrives; it is kept only once the call cache stores it, and a
score only once the output folder takes it. When a store fails (a database restarting, a full
disk), sending more requests would only put more paid answers at risk: `StorageGuard` closes
the gate that every request passes before it is sent, keeps the failed writes (and the answers
they hold) in memory and retries them with backoff. Storage back within the window: the gate
opens and the run goes on as if nothing happened. Still down at its end: every write waiting and
every later request raise `StorageUnavailable`, whose one line names what failed and what a
re-run reuses, so at most the requests that were in flight when storage failed are paid again.
"""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections.abc import Callable
from typing import TypeVar

from longreward_core.models.call_cache import CallCacheUnavailable
from longreward_core.models.secrets import redact

T = TypeVar("T")

# What a store raises when the storage, not the data, is at fault: a PostgreSQL cache that cannot
# be reached, SQLite's "database or disk is full" / "attempt to write a readonly database", and
# the operating system's write errors (no space left, I/O error, read-only filesystem).
STORAGE_FAULTS = (CallCacheUnavailable, sqlite3.OperationalError, OSError)

BACKOFF_INITIAL_S = 0.1
BACKOFF_MAX_S = 5.0


class StorageUnavailable(RuntimeError):
    """Storage (the call cache, the output folder) kept failing for the whole retry window. The
    run sent no request after the first failure; running the same command again once storage is
    fixed repeats at most the requests that were in flight then."""


class StorageGuard:
    """The gate requests pass before they are sent, and the retries of failed stores.

    `retry_s`: how long from the first failure of an outage the stores are retried before the run
    stops. `reuse`: what a re-run reuses, for the message (e.g. the call cache's location).
    Create it, and use it, inside one event loop.
    """

    def __init__(self, retry_s: float, reuse: str):
        self.retry_s = retry_s
        self.reuse = reuse
        self._open = asyncio.Event()
        self._open.set()
        self._down_since: float | None = None
        self._waiting = 0  # operations under way
        self._failing = 0  # operations that failed and are being retried: the gate opens when none is left
        self._failed: StorageUnavailable | None = None

    async def wait_open(self) -> None:
        """Return when requests may be sent; raises StorageUnavailable once storage has failed for good."""
        await self._open.wait()
        if self._failed is not None:
            raise self._failed

    async def use(self, what: str, operation: Callable[[], T]) -> T:
        """`operation()`'s result (a read or a write of the storage named by `what`: the cache or
        the file, with its location). While it fails on storage, the gate stays closed and it is
        retried with backoff until `retry_s` after the outage began; then raises StorageUnavailable
        naming `what`. Other errors pass through untouched."""
        if self._failed is not None:
            raise self._failed
        delay = BACKOFF_INITIAL_S
        failed = False
        self._waiting += 1
        try:
            while True:
                try:
                    return operation()
                except STORAGE_FAULTS as exc:
                    if self._failed is not None:
                        raise self._failed from None
                    now = time.monotonic()
                    if self._down_since is None:
                        self._down_since = now
                        self._open.clear()
                    if not failed:
                        failed = True
                        self._failing += 1
                    left = self._down_since + self.retry_s - now
                    if left <= 0:
                        raise self._give_up(what, exc) from None
                    await asyncio.sleep(min(delay, left))
                    delay = min(2 * delay, BACKOFF_MAX_S)
        finally:
            self._waiting -= 1
            if failed:
                self._failing -= 1
                # Every operation kept back is done (stored, or cancelled with its run): requests may go.
                if not self._failing and self._failed is None:
                    self._down_since = None
                    self._open.set()

    def _give_up(self, what: str, exc: BaseException) -> StorageUnavailable:
        reason = redact(f"{type(exc).__name__}: {exc}")
        others = self._waiting - 1
        lost = f"; {others} other store(s) waiting were given up" if others else ""
        self._failed = StorageUnavailable(
            f"storage failed: {what} kept failing for {self.retry_s:g} s ({reason}){lost}. No request was "
            f"sent after the first failure. Fix the storage and run the same command again: it reuses {self.reuse}"
        )
        self._open.set()  # the requests waiting at the gate raise it
        return self._failed

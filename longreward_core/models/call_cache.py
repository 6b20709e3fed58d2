"""Where answered requests are kept: a local SQLite file, or a PostgreSQL database several hosts share.

`open_call_cache(location)` is the one way to open a call cache: a `postgresql://` (or
`postgres://`) URL opens `PostgresCallCache`, anything else is a file path opened as the SQLite
`CallCache` (the default, `call_cache.sqlite` in the output folder). Both keep the same rows under
the same keys (`call_key`) with the same rule: the first answer stored for a key wins and
every later writer gets the stored one back, so two workers that answered the same request both
report the answer a re-run reproduces. Which answers are stored (only those that parsed) and the
coalescing of identical requests in flight are the client's (`LLMClient.complete`), whatever the
backend.

A database URL may carry a password; it is never logged: messages name the URL with the password
replaced by `***` (`redact_url`), and the password is registered with `register_secret` so any
log record that would contain it is redacted. Prefer leaving it out of the URL: libpq reads
`PGPASSWORD` or `~/.pgpass`, and the flows read it from a Prefect Secret block.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
import threading
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import quote, unquote, urlsplit, urlunsplit

from tenacity import Retrying, retry_if_exception, stop_after_delay, wait_exponential_jitter

from longreward_core.models.secrets import redact, register_secret

CALL_CACHE_FILE = "call_cache.sqlite"  # the request cache's file name, in every output folder
DATABASE_SCHEMES = ("postgresql", "postgres")
TABLE = "longreward_calls"


class CallStore(Protocol):
    """What the client needs of a call cache (both backends below)."""

    label: str  # where it is, as messages name it (a database URL without its password)

    def get(self, key: str) -> tuple[str, int, int, float] | None: ...

    def put(self, key: str, text: str, prompt_tokens: int, completion_tokens: int, cost: float) -> str: ...

    def close(self) -> None: ...


def call_key(model: str, messages: list[dict[str, Any]], params: dict[str, Any], attempt: int) -> str:
    """The cache key of a request: a hash of (model, messages, params, attempt), the same in every
    backend and process (the model string as given, whatever characters a served id holds)."""
    blob = json.dumps(
        {"model": model, "messages": messages, "params": params, "attempt": attempt},
        sort_keys=True,
        ensure_ascii=False,
    )
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


class CallCache:
    """The call cache in a local SQLite file: key -> (answer text, token usage, cost). Safe across processes."""

    key = staticmethod(call_key)

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.label = str(self.path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(self.path, check_same_thread=False, timeout=60)
        # Switching to WAL takes the file's write lock and does not wait for it: shards opening the
        # same new cache from several processes at once get "database is locked"; wait and retry.
        Retrying(
            retry=retry_if_exception(lambda exc: isinstance(exc, sqlite3.OperationalError) and "locked" in str(exc)),
            wait=wait_exponential_jitter(initial=0.05, max=1.0), stop=stop_after_delay(60), reraise=True,
        )(self._db.execute, "PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS calls (key TEXT PRIMARY KEY, text TEXT NOT NULL,"
            " prompt_tokens INTEGER, completion_tokens INTEGER, cost REAL)"
        )
        self._db.commit()

    def get(self, key: str) -> tuple[str, int, int, float] | None:
        with self._lock:
            row = self._db.execute(
                "SELECT text, prompt_tokens, completion_tokens, cost FROM calls WHERE key = ?", (key,)
            ).fetchone()
        return row

    def put(self, key: str, text: str, prompt_tokens: int, completion_tokens: int, cost: float) -> str:
        """Store an answer unless the key already has one (another process may have answered it
        first); returns the stored answer, so a run reports what a re-run reproduces."""
        with self._lock:
            self._db.execute(
                "INSERT OR IGNORE INTO calls VALUES (?, ?, ?, ?, ?)",
                (key, text, prompt_tokens, completion_tokens, cost),
            )
            self._db.commit()
            return self._db.execute("SELECT text FROM calls WHERE key = ?", (key,)).fetchone()[0]

    def close(self) -> None:
        with self._lock:
            self._db.close()


class CallCacheUnavailable(RuntimeError):
    """The call cache's database cannot be reached or refused a statement (the message names it,
    without its password)."""


def is_database_url(location: str | Path | None) -> bool:
    return isinstance(location, str) and urlsplit(location).scheme in DATABASE_SCHEMES


def redact_url(url: str) -> str:
    """`url` with its password, if any, replaced by `***` (the form every message uses)."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.netloc.rpartition("@")[2]
    return urlunsplit(parts._replace(netloc=f"{parts.username or ''}:***@{host}"))


def url_password(url: str) -> str | None:
    password = urlsplit(url).password
    return unquote(password) if password else None


def with_password(url: str, password: str | None) -> str:
    """`url` carrying `password` (for a password read from a secret store at run time; the result
    is a secret itself: pass it on, never log it)."""
    if not password:
        return url
    parts = urlsplit(url)
    user = parts.username or ""
    host = parts.netloc.rpartition("@")[2]
    register_secret(password)
    register_secret(quote(password, safe=""))
    return urlunsplit(parts._replace(netloc=f"{user}:{quote(password, safe='')}@{host}"))


def describe_location(location: str | Path) -> str:
    """How a message names a cache location (a database URL without its password)."""
    return redact_url(location) if is_database_url(location) else str(location)


def check_cache_url(url: str | None) -> str | None:
    """A call-cache URL as a parameter or an option takes it: empty, or a PostgreSQL URL without a
    password (parameters are stored and shown by the orchestrator, options land in shell histories)."""
    if not url:
        return None
    if not is_database_url(url):
        raise ValueError(f"cache URL {describe_location(url)!r}: expected postgresql://user@host:port/database")
    if urlsplit(url).password is not None:
        raise ValueError(
            f"cache URL {redact_url(url)!r} carries a password: leave it out and set PGPASSWORD (or ~/.pgpass) "
            "where the work runs, or name a Prefect Secret block holding it (cache_password_secret)"
        )
    return url


def open_call_cache(location: str | Path) -> CallStore:
    """The call cache at `location`: a PostgreSQL URL, or the path of a SQLite file."""
    if is_database_url(location):
        return PostgresCallCache(str(location))
    if isinstance(location, str) and "://" in location:
        scheme = location.split("://", 1)[0]
        raise ValueError(
            f"call cache {describe_location(location)!r}: unsupported scheme '{scheme}' "
            "(use postgresql://user@host:port/database, or a file path for SQLite)"
        )
    return CallCache(location)


class PostgresCallCache:
    """The call cache in a PostgreSQL table (`longreward_calls`), shared by every process and host
    that opens the same URL. Same keys and first-writer-wins rule as the SQLite `CallCache`:
    `INSERT ... ON CONFLICT DO NOTHING`, then the stored answer is read back."""

    key = staticmethod(call_key)

    def __init__(self, url: str):
        self.url = url
        self.label = redact_url(url)
        register_secret(url_password(url))
        register_secret(urlsplit(url).password)  # as the URL carries it (percent-encoded)
        self._lock = threading.Lock()
        self._db: Any = None
        with self._lock:
            self._connect()

    def _fail(self, doing: str, exc: Exception) -> CallCacheUnavailable:
        # psycopg's messages can quote the connection string: redact both forms of the password.
        reason = redact(f"{type(exc).__name__}: {exc}".strip())
        if (password := url_password(self.url)) is not None:
            reason = reason.replace(password, "***")
        return CallCacheUnavailable(f"call cache {self.label}: {doing} failed: {reason}")

    def _connect(self) -> None:
        import psycopg  # only for a database cache

        try:
            self._db = psycopg.connect(self.url, autocommit=True, connect_timeout=30)
            try:
                self._db.execute(
                    f"CREATE TABLE IF NOT EXISTS {TABLE} (key TEXT PRIMARY KEY, text TEXT NOT NULL,"
                    " prompt_tokens INTEGER, completion_tokens INTEGER, cost DOUBLE PRECISION)"
                )
            except (psycopg.errors.UniqueViolation, psycopg.errors.DuplicateTable):
                pass  # another process created it at the same moment
        except psycopg.Error as exc:
            raise self._fail("connecting", exc) from None

    def _run(self, doing: str, sql: str, args: tuple[Any, ...]) -> tuple[Any, ...] | None:
        """One statement's first row; a dropped connection is opened again once."""
        import psycopg

        with self._lock:
            for attempt in (1, 2):
                try:
                    if self._db is None or self._db.closed:
                        self._connect()
                    return self._db.execute(sql, args).fetchone()
                except psycopg.OperationalError as exc:
                    if attempt == 2:
                        raise self._fail(doing, exc) from None
                    self._db = None
                except psycopg.Error as exc:
                    raise self._fail(doing, exc) from None
        return None  # unreachable

    def get(self, key: str) -> tuple[str, int, int, float] | None:
        return self._run(
            "reading", f"SELECT text, prompt_tokens, completion_tokens, cost FROM {TABLE} WHERE key = %s", (key,)
        )

    def put(self, key: str, text: str, prompt_tokens: int, completion_tokens: int, cost: float) -> str:
        """Store an answer unless the key already has one; returns the stored answer."""
        self._run(
            "writing",
            f"INSERT INTO {TABLE} (key, text, prompt_tokens, completion_tokens, cost) VALUES (%s, %s, %s, %s, %s)"
            " ON CONFLICT (key) DO NOTHING RETURNING key",
            (key, text, prompt_tokens, completion_tokens, cost),
        )
        # A separate statement: it sees a row another writer committed after the INSERT began.
        row = self._run("reading", f"SELECT text FROM {TABLE} WHERE key = %s", (key,))
        return row[0] if row else text

    def close(self) -> None:
        with self._lock:
            if self._db is not None:
                self._db.close()
                self._db = None

"""Where answered requests are kept: a local SQLite file, or a PostgreSQL database several hosts share.

`open_call_cache(location)` is the one way to open a call cache: a `postgresql://` (or
`postgres://`) URL opens `PostgresCallCache`, anything else is a file path opened as the SQLite
`CallCache` (the default, `call_cache.sqlite` in the output folder). Both keep the same rows under
the same keys (`call_key`) with the same rule: the first answer stored for a key wins and
every later writer gets the stored one back, so two workers that answered the same request both
report the answer a re-run reproduces. Which answers are stored (only those that parsed) and the
coalescing of identical requests in flight are the client's (`LLMClient.complete`), whatever the
backend.

Each answer carries when it was stored and last used (`stored_at`, `used_at`: seconds since the
epoch) and the model that gave it, so a cache can be measured (`stats`) and bounded (`prune`:
answers not used since a cutoff are deleted in short chunks, safe while builds read and write).
A cache made before these columns existed is migrated in place when opened: the columns are
added, its rows stamped with the migration time and their model unknown. A hit rewrites `used_at`
only when the stored stamp is older than `TOUCH_INTERVAL_S`: a stamp on every hit would turn every
read into a write (SQLite's one writer lock shared by every shard process, a new row version in
PostgreSQL), and retention counted in days does not need it finer.

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
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import quote, unquote, urlsplit, urlunsplit

from tenacity import Retrying, retry_if_exception, stop_after_delay, wait_exponential_jitter

from longreward_core.data.records import CallCacheSize
from longreward_core.models.secrets import redact, register_secret

CALL_CACHE_FILE = "call_cache.sqlite"  # the request cache's file name, in every output folder
DATABASE_SCHEMES = ("postgresql", "postgres")
TABLE = "longreward_calls"
TOUCH_INTERVAL_S = 3600.0  # a hit rewrites an answer's `used_at` at most this often
PRUNE_CHUNK = 5000  # answers deleted per transaction: each write lock is short while builds run
VACUUM_STEP = 2000  # SQLite pages given back per incremental-vacuum transaction
DAY_S = 86400.0
# Buckets of `stats` by last use: (label, upper bound of the age in seconds); the rest is older.
AGE_BUCKETS: tuple[tuple[str, float], ...] = (
    ("under 1 day", DAY_S), ("1-7 days", 7 * DAY_S), ("7-30 days", 30 * DAY_S), ("30-90 days", 90 * DAY_S),
)
OLDEST_BUCKET = "90 days or more"
# One schema in both dialects (SQLite reads DOUBLE PRECISION as REAL).
_COLUMNS = (
    "key TEXT PRIMARY KEY, text TEXT NOT NULL, prompt_tokens INTEGER, completion_tokens INTEGER, cost DOUBLE PRECISION,"
    " stored_at DOUBLE PRECISION NOT NULL, used_at DOUBLE PRECISION NOT NULL, model TEXT"
)


class CallStore(Protocol):
    """What the client needs of a call cache (both backends below)."""

    label: str  # where it is, as messages name it (a database URL without its password)

    def get(self, key: str) -> tuple[str, int, int, float] | None: ...

    def put(
        self, key: str, text: str, prompt_tokens: int, completion_tokens: int, cost: float, model: str | None = None
    ) -> str: ...

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


@dataclass(frozen=True)
class CacheStats:
    """What a call cache holds: answers, bytes it takes, answers (and bytes of answer text) per
    model, answers per age of last use (`AGE_BUCKETS`, then `OLDEST_BUCKET`)."""

    size: CallCacheSize
    by_model: list[tuple[str, int, int]]
    by_age: list[tuple[str, int]]


@dataclass(frozen=True)
class CachePruned:
    """What `prune` removed: answers, bytes of their text, the cache's size before and after, and
    how the freed space is given back (`space`, a sentence)."""

    rows: int
    text_bytes: int
    bytes_before: int
    bytes_after: int
    space: str


def _migration(table: str, columns: set[str], now: float) -> list[str]:
    """Statements that add the columns a cache made before them lacks: its answers stamped as
    stored and used at `now` (a constant default: no row is rewritten), their model unknown."""
    added = {
        "stored_at": f"DOUBLE PRECISION NOT NULL DEFAULT {now!r}",
        "used_at": f"DOUBLE PRECISION NOT NULL DEFAULT {now!r}",
        "model": "TEXT",
    }
    return [f"ALTER TABLE {table} ADD COLUMN {name} {kind}" for name, kind in added.items() if name not in columns]


class _CallTable(ABC):
    """The rows and rules both backends share, in SQL both dialects read; a backend runs the
    statements (`_query`), measures its storage (`_bytes`) and gives freed space back (`_reclaim`)."""

    table: str
    param: str  # the driver's placeholder
    text_bytes: str  # SQL: the bytes of an answer's text
    row_id: str  # SQL: the column a chunked delete selects rows by

    @abstractmethod
    def _query(self, doing: str, sql: str, args: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        ...

    @abstractmethod
    def _bytes(self) -> int:
        ...

    @abstractmethod
    def _reclaim(self) -> str:
        ...

    def get(self, key: str) -> tuple[str, int, int, float] | None:
        """The stored answer (text, prompt tokens, completion tokens, cost), or None; marks it used."""
        rows = self._query(
            "reading", f"SELECT text, prompt_tokens, completion_tokens, cost, used_at FROM {self.table} WHERE key = {self.param}",
            (key,),
        )
        if not rows:
            return None
        text, prompt_tokens, completion_tokens, cost, used_at = rows[0]
        now = time.time()
        if used_at < now - TOUCH_INTERVAL_S:
            p = self.param
            self._query("writing", f"UPDATE {self.table} SET used_at = {p} WHERE key = {p} AND used_at < {p}",
                        (now, key, now - TOUCH_INTERVAL_S))
        return text, prompt_tokens, completion_tokens, cost

    def put(
        self, key: str, text: str, prompt_tokens: int, completion_tokens: int, cost: float, model: str | None = None
    ) -> str:
        """Store an answer (of `model`) unless the key already has one (another process may have
        answered it first); returns the stored answer, so a run reports what a re-run reproduces."""
        now = time.time()
        marks = ", ".join([self.param] * 8)
        self._query(
            "writing",
            f"INSERT INTO {self.table} (key, text, prompt_tokens, completion_tokens, cost, stored_at, used_at, model)"
            f" VALUES ({marks}) ON CONFLICT (key) DO NOTHING",
            (key, text, prompt_tokens, completion_tokens, cost, now, now, model),
        )
        # A separate statement: it sees a row another writer committed after the INSERT began.
        rows = self._query("reading", f"SELECT text FROM {self.table} WHERE key = {self.param}", (key,))
        return rows[0][0] if rows else text

    def size(self) -> CallCacheSize:
        """Answers held and bytes the cache takes (the file with its WAL, or the table with its indexes)."""
        ((rows,),) = self._query("measuring", f"SELECT COUNT(*) FROM {self.table}")
        return CallCacheSize(rows=rows, bytes=self._bytes())

    def stats(self) -> CacheStats:
        """The cache's size, by model and by age of last use."""
        now = time.time()
        by_model = self._query(
            "measuring",
            f"SELECT COALESCE(model, 'unknown'), COUNT(*), COALESCE(SUM({self.text_bytes}), 0) FROM {self.table}"
            " GROUP BY 1 ORDER BY 2 DESC, 1",
        )
        case = " ".join(f"WHEN used_at >= {self.param} THEN {i}" for i in range(len(AGE_BUCKETS)))
        counted = dict(self._query(
            "measuring", f"SELECT CASE {case} ELSE {len(AGE_BUCKETS)} END, COUNT(*) FROM {self.table} GROUP BY 1",
            tuple(now - age for _, age in AGE_BUCKETS),
        ))
        labels = [label for label, _ in AGE_BUCKETS] + [OLDEST_BUCKET]
        return CacheStats(
            size=self.size(),
            by_model=[(m, int(n), int(b)) for m, n, b in by_model],
            by_age=[(label, int(counted.get(i, 0))) for i, label in enumerate(labels)],
        )

    def prune(self, cutoff: float) -> CachePruned:
        """Delete the answers last used before `cutoff` (seconds since the epoch), `PRUNE_CHUNK` per
        transaction, so builds reading and writing the cache meanwhile wait at most one chunk; an
        answer stored or used after `cutoff` is never deleted, even one a chunk selected just before
        a hit marked it used."""
        before = self._bytes()
        rows = text_bytes = 0
        t, p = self.table, self.param
        while True:
            deleted = self._query(
                "pruning",
                f"DELETE FROM {t} WHERE {self.row_id} IN (SELECT {self.row_id} FROM {t} WHERE used_at < {p} LIMIT {p})"
                f" AND used_at < {p} RETURNING {self.text_bytes}",
                (cutoff, PRUNE_CHUNK, cutoff),
            )
            rows += len(deleted)
            text_bytes += sum(n or 0 for (n,) in deleted)
            if len(deleted) < PRUNE_CHUNK:
                break
        space = self._reclaim() if rows else "nothing to give back"
        return CachePruned(rows=rows, text_bytes=text_bytes, bytes_before=before, bytes_after=self._bytes(), space=space)


class CallCache(_CallTable):
    """The call cache in a local SQLite file: key -> (answer text, token usage, cost, model,
    stored/used stamps). Safe across processes: WAL, so readers never wait for the writer."""

    key = staticmethod(call_key)
    table = "calls"
    param = "?"
    text_bytes = "length(CAST(text AS BLOB))"
    row_id = "rowid"

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.label = str(self.path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(self.path, check_same_thread=False, timeout=60)
        # Only a new file takes it (before its first table): pruning then gives pages back to the
        # file system; an older file reuses them for new answers.
        self._db.execute("PRAGMA auto_vacuum=INCREMENTAL")
        # Switching to WAL takes the file's write lock and does not wait for it: shards opening the
        # same new cache from several processes at once get "database is locked"; wait and retry.
        Retrying(
            retry=retry_if_exception(lambda exc: isinstance(exc, sqlite3.OperationalError) and "locked" in str(exc)),
            wait=wait_exponential_jitter(initial=0.05, max=1.0), stop=stop_after_delay(60), reraise=True,
        )(self._db.execute, "PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        # One write transaction: processes opening an old cache at once migrate it once.
        self._db.execute("BEGIN IMMEDIATE")
        self._db.execute(f"CREATE TABLE IF NOT EXISTS calls ({_COLUMNS})")
        columns = {row[1] for row in self._db.execute("PRAGMA table_info(calls)")}
        for statement in _migration("calls", columns, time.time()):
            self._db.execute(statement)
        self._db.execute("CREATE INDEX IF NOT EXISTS calls_used_at ON calls (used_at)")
        self._db.commit()

    def _query(self, doing: str, sql: str, args: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        with self._lock:
            rows = self._db.execute(sql, args).fetchall()
            self._db.commit()
        return rows

    def _bytes(self) -> int:
        wal = self.path.with_name(self.path.name + "-wal")
        return self.path.stat().st_size + (wal.stat().st_size if wal.exists() else 0)

    def _reclaim(self) -> str:
        ((mode,),) = self._query("reading", "PRAGMA auto_vacuum")
        ((free,),) = self._query("reading", "PRAGMA freelist_count")
        ((page,),) = self._query("reading", "PRAGMA page_size")
        if mode != 2:  # not INCREMENTAL: a file made before it, or by another tool
            return (f"{free * page} bytes of free pages stay in the file and are reused by new answers "
                    "(`VACUUM` while no build runs shrinks it)")
        while free:
            self._query("vacuuming", f"PRAGMA incremental_vacuum({VACUUM_STEP})")
            ((free,),) = self._query("reading", "PRAGMA freelist_count")
        # The file shrinks when the WAL is checkpointed, and the WAL when it is truncated: both wait
        # (the busy timeout at most) for the readers of builds, whose statements are short.
        self._query("vacuuming", "PRAGMA wal_checkpoint(TRUNCATE)")
        return "freed pages given back to the file system (incremental vacuum)"

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


def open_call_cache(location: str | Path) -> CallCache | PostgresCallCache:
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


class PostgresCallCache(_CallTable):
    """The call cache in a PostgreSQL table (`longreward_calls`), shared by every process and host
    that opens the same URL. Same keys, columns and first-writer-wins rule as the SQLite
    `CallCache`: `INSERT ... ON CONFLICT DO NOTHING`, then the stored answer is read back."""

    key = staticmethod(call_key)
    table = TABLE
    param = "%s"
    text_bytes = "octet_length(text)"
    row_id = "key"

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
            self._ddl(f"CREATE TABLE IF NOT EXISTS {TABLE} ({_COLUMNS})")
            columns = {row[0] for row in self._db.execute(
                "SELECT column_name FROM information_schema.columns WHERE table_schema = current_schema()"
                " AND table_name = %s", (TABLE,),
            )}
            for statement in _migration(TABLE, columns, time.time()):
                self._ddl(statement)
            # Looked up first: CREATE INDEX takes a lock that waits for every writer, even when it exists.
            if self._db.execute("SELECT to_regclass(%s)", (f"{TABLE}_used_at",)).fetchone()[0] is None:
                self._ddl(f"CREATE INDEX IF NOT EXISTS {TABLE}_used_at ON {TABLE} (used_at)")
        except psycopg.Error as exc:
            raise self._fail("connecting", exc) from None

    def _ddl(self, statement: str) -> None:
        import psycopg

        try:
            self._db.execute(statement)
        except (psycopg.errors.UniqueViolation, psycopg.errors.DuplicateTable, psycopg.errors.DuplicateColumn,
                psycopg.errors.DuplicateObject):
            pass  # another process made the same change at the same moment

    def _query(self, doing: str, sql: str, args: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        """One statement's rows; a dropped connection is opened again once."""
        import psycopg

        with self._lock:
            for attempt in (1, 2):
                try:
                    if self._db is None or self._db.closed:
                        self._connect()
                    cursor = self._db.execute(sql, args)
                    return cursor.fetchall() if cursor.description else []
                except psycopg.OperationalError as exc:
                    if attempt == 2:
                        raise self._fail(doing, exc) from None
                    self._db = None
                except psycopg.Error as exc:
                    raise self._fail(doing, exc) from None
        return []  # unreachable

    def _bytes(self) -> int:
        ((size,),) = self._query("measuring", "SELECT pg_total_relation_size(to_regclass(%s))", (TABLE,))
        return int(size or 0)

    def _reclaim(self) -> str:
        return "the deleted rows' space is reused by new answers once (auto)vacuum has passed; the table keeps its size"

    def close(self) -> None:
        with self._lock:
            if self._db is not None:
                self._db.close()
                self._db = None

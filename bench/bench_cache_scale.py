"""The judge call cache at a million and ten million answers: lookups per second of `CallCache`
(SQLite) and `PostgresCallCache`, through their own `get` and `put`.

Per backend, in a new temporary folder, the cache grows to each size of `--rows` in turn (1M, then
9M more), filled with bulk SQL rather than `put`: SQLite by `executemany` in one transaction per
step (its fill connection without a journal and with a 2 GB page cache), PostgreSQL by `COPY`
followed by `VACUUM ANALYZE` and a `CHECKPOINT`. Keys are SHA-256 hex digests like `call_key`'s,
in random order; answers are judge verdicts of about 500 bytes, stored and used just now, so a
hit is a read that rewrites nothing. At each size, one client in this process:

- hits: `get` of random stored keys (after a warm-up), lookups per second, median and p99 latency;
- misses: `get` of random absent keys, likewise;
- puts: `put` of new answers, one statement pair each as a shard stores them, likewise;

and the fill's wall time (of the answers added since the size before) and the cache's size as
`size()` measures it after the fill (SQLite: file and WAL; PostgreSQL: the table with its
indexes). The files are freshly written, so they are in the OS page cache: these are warm-cache
figures.

PostgreSQL runs in a private cluster the bench starts (`initdb -A trust`, on 127.0.0.1 at a free
port, as the `postgres` user when run as root) with the newest binaries under
/usr/lib/postgresql/*/bin, default settings otherwise, and stops and removes at the end.

    .venv/bin/python bench/bench_cache_scale.py [--rows 1000000 10000000] [--backends sqlite postgres]
        [--out bench/results/cache-scale.json]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import multiprocessing
import os
import platform
import random
import shutil
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import closing, contextmanager
from pathlib import Path

import psycopg

from longreward_core.models.call_cache import TABLE, CallCache, PostgresCallCache

MODEL = "openai/judge"
VERDICT = (
    "The response answers the question from the passage in the third section and cites the figure the "
    "context gives for it; it leaves out the second condition the question names, which the context "
    "states two paragraphs later, and it adds one claim the context does not support. Helpfulness is "
    "adequate, faithfulness is mostly kept, completeness misses one of the two conditions, and the "
    "logic holds for what it covers. Rating: [[6]] (answer %09d of the bench fill, padded to the size "
    "of a judge verdict of a few hundred characters, no more)."
)
COLUMNS = "key, text, prompt_tokens, completion_tokens, cost, stored_at, used_at, model"
WARMUP = 2_000


def key(space: str, i: int) -> str:
    """A key shaped like `call_key`'s (a SHA-256 hex digest); `space` keeps stored, absent and new keys apart."""
    return hashlib.sha256(f"{space}:{i}".encode()).hexdigest()


def answers(start: int, stop: int, now: float) -> Iterator[tuple]:
    for i in range(start, stop):
        yield key("stored", i), VERDICT % i, 2400, 180, 0.0, now, now, MODEL


def fill_sqlite(path: Path, start: int, stop: int) -> None:
    CallCache(path).close()  # the project's schema and indexes, WAL mode
    with closing(sqlite3.connect(path)) as db:
        db.execute("PRAGMA journal_mode=OFF")  # a bench's fill: a failed one is made again
        db.execute("PRAGMA cache_size=-2000000")  # random keys touch every index page: keep them in memory
        with db:
            db.executemany(f"INSERT INTO calls ({COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                           answers(start, stop, time.time()))
    CallCache(path).close()  # back to WAL, as every shard opens it


def fill_postgres(url: str, start: int, stop: int) -> None:
    PostgresCallCache(url).close()  # the project's table and indexes
    with psycopg.connect(url) as db, db.cursor() as cursor, cursor.copy(f"COPY {TABLE} ({COLUMNS}) FROM STDIN") as copy:
        for row in answers(start, stop, time.time()):
            copy.write_row(row)
    with psycopg.connect(url, autocommit=True) as db:
        # What autovacuum would otherwise do during the lookups (hint bits, visibility map).
        db.execute(f"VACUUM ANALYZE {TABLE}")
        db.execute("CHECKPOINT")


def timed(call: Callable[[str], object], keys: list[str], check: Callable[[str, object], bool]) -> dict[str, float]:
    """Calls per second over `keys`, with median and p99 latency; every result must pass `check`."""
    latencies = []
    failed = 0
    started = time.perf_counter()
    for k in keys:
        t = time.perf_counter()
        result = call(k)
        latencies.append(time.perf_counter() - t)
        failed += not check(k, result)
    wall = time.perf_counter() - started
    if failed:
        raise SystemExit(f"{failed} of {len(keys)} calls gave a wrong result")
    latencies.sort()
    return {
        "calls": len(keys),
        "per_s": round(len(keys) / wall),
        "median_us": round(1e6 * statistics.median(latencies), 1),
        "p99_us": round(1e6 * latencies[int(0.99 * (len(latencies) - 1))], 1),
    }


def measure(cache: CallCache | PostgresCallCache, rows: int, args: argparse.Namespace, rng: random.Random) -> dict:
    """Hits, misses and puts of one client on a cache holding `rows` fill answers."""
    stored = [key("stored", i) for i in rng.sample(range(rows), WARMUP + args.lookups)]
    absent = [key("absent", i) for i in rng.sample(range(10**9), args.lookups)]
    new = [key(f"new-{rows}", i) for i in range(args.puts)]
    size = cache.size()
    for k in stored[:WARMUP]:
        cache.get(k)
    load_before = os.getloadavg()[0]
    hits = timed(cache.get, stored[WARMUP:], lambda k, got: got is not None and got[0].startswith("The response"))
    misses = timed(cache.get, absent, lambda k, got: got is None)
    puts = timed(lambda k: cache.put(k, f"{VERDICT % 0} {k}", 2400, 180, 0.0, model=MODEL), new,
                 lambda k, got: got.endswith(k))
    return {"rows": size.rows, "bytes": size.bytes, "hits": hits, "misses": misses, "puts": puts,
            "load_average": [round(load_before, 2), round(os.getloadavg()[0], 2)]}


def grow(backend: str, fill: Callable[[int, int], None], open_cache: Callable[[], CallCache | PostgresCallCache],
         args: argparse.Namespace) -> list[dict]:
    """The cache grown to each size in `--rows`, measured at each."""
    rng = random.Random(20261206)
    results = []
    filled = 0
    for rows in args.rows:
        started = time.perf_counter()
        fill(filled, rows)
        fill_s = time.perf_counter() - started
        filled = rows
        with closing(open_cache()) as cache:
            measured = measure(cache, rows, args, rng)
        result = {"backend": backend, "fill_rows": rows, "fill_s": round(fill_s, 1), **measured}
        print(json.dumps(result), flush=True)
        results.append(result)
    return results


def pg_bin() -> Path:
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/pg_ctl"), key=lambda p: int(p.parent.parent.name))
    if not found:
        print("bench_cache_scale: no PostgreSQL binaries under /usr/lib/postgresql/*/bin: install PostgreSQL "
              "(apt-get install postgresql) or run with --backends sqlite", file=sys.stderr)
        raise SystemExit(2)
    return found[-1].parent


@contextmanager
def postgres_cluster(folder: Path) -> Iterator[str]:
    """The URL of a new database in a private cluster under `folder`, stopped at the end."""
    bin_dir = pg_bin()
    as_postgres = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []  # PostgreSQL refuses root
    data, run = folder / "data", folder / "run"
    folder.mkdir()
    run.mkdir()
    if as_postgres:
        os.chmod(folder.parent, 0o755)
        shutil.chown(folder, "postgres", "postgres")
        shutil.chown(run, "postgres", "postgres")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    quiet = {"check": True, "stdout": subprocess.DEVNULL}
    subprocess.run([*as_postgres, bin_dir / "initdb", "-D", data, "-U", "postgres", "-A", "trust"], **quiet)
    pg_ctl = [*as_postgres, bin_dir / "pg_ctl", "-D", data, "-l", folder / "server.log"]
    options = f"-c listen_addresses=127.0.0.1 -c port={port} -c unix_socket_directories={run}"
    subprocess.run([*pg_ctl, "-w", "-o", options, "start"], **quiet)
    admin = f"postgresql://postgres@127.0.0.1:{port}/postgres"
    try:
        with psycopg.connect(admin, autocommit=True) as db:
            db.execute("CREATE DATABASE longreward_bench")
        yield f"postgresql://postgres@127.0.0.1:{port}/longreward_bench"
        with psycopg.connect(admin, autocommit=True) as db:
            db.execute("DROP DATABASE longreward_bench")
    finally:
        subprocess.run([*pg_ctl, "-m", "fast", "stop"], **quiet)


def postgres_version() -> str:
    out = subprocess.run([pg_bin() / "postgres", "--version"], check=True, capture_output=True, text=True).stdout
    return out.split()[2]  # "postgres (PostgreSQL) 15.18 (Debian ...)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[1_000_000, 10_000_000], help="Sizes, ascending.")
    parser.add_argument("--backends", nargs="+", choices=["sqlite", "postgres"], default=["sqlite", "postgres"])
    parser.add_argument("--lookups", type=int, default=20_000, help="Timed hits, and timed misses, per size.")
    parser.add_argument("--puts", type=int, default=5_000, help="Timed puts of new answers per size.")
    parser.add_argument("--out", type=Path, default=Path("bench/results/cache-scale.json"))
    args = parser.parse_args()
    if args.rows != sorted(set(args.rows)):
        parser.error(f"--rows {args.rows}: give the sizes ascending, each once (the cache grows from one to the next)")
    machine = (f"{platform.machine()} {multiprocessing.cpu_count()} CPUs, Python {platform.python_version()}, "
               f"SQLite {sqlite3.sqlite_version}, psycopg {psycopg.__version__}")
    if "postgres" in args.backends:
        machine += f", PostgreSQL {postgres_version()}"
    results = []
    if "sqlite" in args.backends:
        with tempfile.TemporaryDirectory(prefix="cache-scale-") as folder:
            path = Path(folder) / "call_cache.sqlite"
            results += grow("sqlite", lambda a, b: fill_sqlite(path, a, b), lambda: CallCache(path), args)
    if "postgres" in args.backends:
        with tempfile.TemporaryDirectory(prefix="cache-scale-") as folder:
            with postgres_cluster(Path(folder) / "pg") as url:
                results += grow("postgres", lambda a, b: fill_postgres(url, a, b), lambda: PostgresCallCache(url), args)
    result = {"date": time.strftime("%Y-%m-%d"), "machine": machine, "lookups": args.lookups, "puts": args.puts,
              "results": results}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()

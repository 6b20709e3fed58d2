"""The SQLite call cache's upkeep: `stats`, `prune` beside a busy reader-writer, and what a hit that
marks its answer used costs.

Fills a new cache with R answers (about 1 KB of text each), half last used 40 days ago, then:

- `stats`: the wall time of `CallCache.stats()` (rows, bytes, by model, by age);
- hits: the wall time per `get` of answers whose "last used" is fresh (a read) and of answers last
  used two hours ago (the read plus the one write that marks them used);
- prune: `CallCache.prune` of the old half while another process keeps storing a new answer and
  reading it back; the other process's latency per put+get before and during the pruning
  (median, 99th percentile, most), the pruning's wall time, the file's size before and after.

    .venv/bin/python bench/bench_cache_retention.py [--rows 200000] [--out bench/results/cache-retention.json]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import platform
import sqlite3
import statistics
import tempfile
import time
from pathlib import Path

from longreward_core.models.call_cache import DAY_S, TOUCH_INTERVAL_S, CallCache

TEXT = "An answer of about a kilobyte. " * 33


def fill(path: Path, rows: int) -> None:
    """`rows` answers in one transaction: even keys used 40 days ago, odd keys now."""
    CallCache(path).close()
    now = time.time()
    old = now - 40 * DAY_S
    with sqlite3.connect(path) as db:
        db.executemany(
            "INSERT INTO calls (key, text, prompt_tokens, completion_tokens, cost, stored_at, used_at, model)"
            " VALUES (?, ?, 100, 10, 0.0, ?, ?, 'openai/judge')",
            ((f"k{i}", TEXT, old if i % 2 == 0 else now, old if i % 2 == 0 else now) for i in range(rows)),
        )


def per_get(cache: CallCache, keys: list[str]) -> float:
    started = time.perf_counter()
    for key in keys:
        cache.get(key)
    return (time.perf_counter() - started) / len(keys)


def busy_client(path: str, stop: multiprocessing.Event, out: multiprocessing.Queue) -> None:
    """Store a new answer and read it back until `stop`; sends (start time, latency) per pair."""
    cache = CallCache(path)
    timings = []
    i = 0
    while not stop.is_set():
        started = time.time()
        cache.put(f"new{i}", TEXT, 100, 10, 0.0, model="openai/judge")
        cache.get(f"new{i}")
        timings.append((started, time.time() - started))
        i += 1
    cache.close()
    out.put(timings)


def summary(latencies: list[float]) -> dict[str, float]:
    ordered = sorted(latencies)
    return {
        "pairs": len(ordered),
        "median_ms": round(1000 * statistics.median(ordered), 3),
        "p99_ms": round(1000 * ordered[int(0.99 * (len(ordered) - 1))], 3),
        "max_ms": round(1000 * ordered[-1], 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=200_000)
    parser.add_argument("--baseline-s", type=float, default=5.0, help="How long the busy client runs before the pruning.")
    parser.add_argument("--out", type=Path, default=Path("bench/results/cache-retention.json"))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "call_cache.sqlite"
        fill(path, args.rows)
        cache = CallCache(path)
        started = time.perf_counter()
        stats = cache.stats()
        stats_s = time.perf_counter() - started
        fresh = per_get(cache, [f"k{i}" for i in range(1, 4001, 2)])
        marked = [f"k{i}" for i in range(4001, 8001, 2)]
        with sqlite3.connect(path) as db:  # used two hours ago: a hit marks them used again
            db.executemany("UPDATE calls SET used_at = ? WHERE key = ?", [(time.time() - 2 * TOUCH_INTERVAL_S, k) for k in marked])
        touching = per_get(cache, marked)

        stop, out = multiprocessing.Event(), multiprocessing.Queue()
        client = multiprocessing.Process(target=busy_client, args=(str(path), stop, out))
        client.start()
        time.sleep(args.baseline_s)
        prune_start = time.time()
        pruned = cache.prune(time.time() - 30 * DAY_S)
        prune_end = time.time()
        stop.set()
        timings = out.get(timeout=120)
        client.join()
        cache.close()
    before = [t for s, t in timings if s < prune_start]
    during = [t for s, t in timings if prune_start <= s < prune_end]
    result = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{platform.machine()} {multiprocessing.cpu_count()} CPUs, Python {platform.python_version()}, "
                   f"SQLite {sqlite3.sqlite_version}",
        "rows": stats.size.rows,
        "bytes": stats.size.bytes,
        "stats_s": round(stats_s, 3),
        "get_fresh_us": round(1e6 * fresh, 1),
        "get_marking_used_us": round(1e6 * touching, 1),
        "pruned_rows": pruned.rows,
        "prune_s": round(prune_end - prune_start, 3),
        "bytes_before": pruned.bytes_before,
        "bytes_after": pruned.bytes_after,
        "busy_client_before": summary(before),
        "busy_client_during": summary(during),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()

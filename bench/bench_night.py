"""A night at scale: the preference-build flow over P prompts in shards of 50, against the
zero-latency judge double, measured from the flow process and from Prefect's own database.

Each size runs in a fresh subprocess on fresh folders, under Prefect's temporary server (SQLite),
with the defaults a nightly uses: 4 shards in flight, judge concurrency 16 per shard, the SQLite
call cache, the embedded embedding model. Documents are short (about 8 sentences, one or two
retrieval chunks) and each prompt has 3 candidates, so 2,000 prompts fit in about 20 minutes on
2 cores (a pair needs 3 scored candidates here; candidate k invents k + 1 sentences, so rewards
differ). Per size it records:

- wall, CPU (user + system) and peak RSS of the flow process, and its RSS sampled every half
  second (shards run on threads inside it, so a shard's CPU is the process's CPU over the shards);
- the task runs by kind: count, median and total run time, from Prefect's task_run table;
- Prefect's overhead: the API requests the flow process made (count, total seconds waited) and
  the rows each table of Prefect's database gained, per shard and per task run;
- the size of the manifest, of the Prefect artifacts, of the stage results and of the call cache.

    .venv/bin/python bench/bench_night.py                # 200 and 2,000 prompts
    .venv/bin/python bench/bench_night.py --sizes 200    # one size
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import resource
import shutil
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARD_SIZE = 50
CANDIDATES = 3
SENTENCES = 8


def _rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


class RssSampler(threading.Thread):
    def __init__(self, every_s: float = 0.5):
        super().__init__(daemon=True)
        self.every_s, self.samples, self.stop = every_s, [], threading.Event()
        self.started = time.perf_counter()

    def run(self) -> None:
        while not self.stop.wait(self.every_s):
            self.samples.append((time.perf_counter() - self.started, _rss_mib()))


class PrefectRequests:
    """Counts the flow process's requests to Prefect's API (and the time spent waiting on them),
    by wrapping httpx's send: Prefect's clients are httpx clients."""

    def __init__(self, api_url: str):
        import httpx

        self.api_url, self.count, self.seconds, self.by_route = api_url, 0, 0.0, {}
        self._lock = threading.Lock()
        async_send, sync_send = httpx.AsyncClient.send, httpx.Client.send
        counter = self

        async def counted_async(client, request, *args, **kwargs):
            started = time.perf_counter()
            try:
                return await async_send(client, request, *args, **kwargs)
            finally:
                counter._add(request, time.perf_counter() - started)

        def counted_sync(client, request, *args, **kwargs):
            started = time.perf_counter()
            try:
                return sync_send(client, request, *args, **kwargs)
            finally:
                counter._add(request, time.perf_counter() - started)

        httpx.AsyncClient.send, httpx.Client.send = counted_async, counted_sync

    def _add(self, request, seconds: float) -> None:
        url = str(request.url)
        if not url.startswith(self.api_url):
            return  # the judge double's requests go through httpx too
        path = url[len(self.api_url):].split("?")[0]
        route = f"{request.method} " + "/".join("{id}" if _is_id(p) else p for p in path.split("/"))
        with self._lock:
            self.count += 1
            self.seconds += seconds
            self.by_route[route] = self.by_route.get(route, 0) + 1


def _is_id(part: str) -> bool:
    return len(part) == 36 and part.count("-") == 4


def _table_rows(db: Path) -> dict[str, int]:
    with sqlite3.connect(db) as con:
        tables = [r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%'")]
        return {t: con.execute(f'SELECT count(*) FROM "{t}"').fetchone()[0] for t in tables}


def _task_runs(db: Path) -> dict[str, dict[str, float]]:
    with sqlite3.connect(db) as con:
        rows = con.execute("SELECT name, total_run_time FROM task_run").fetchall()
        artifacts = con.execute("SELECT count(*), coalesce(sum(length(data)), 0) + coalesce(sum(length(description)), 0) FROM artifact").fetchone()
    kinds: dict[str, list[float]] = {}
    for name, total in rows:
        kind = re.sub(r"-(shard-\d{4}|[0-9a-f]{3})$", "", name)  # index-shard-0007, build-pairs-3fa
        kinds.setdefault(kind, []).append(_seconds(total))
    out = {k: {"count": len(v), "median_s": round(statistics.median(v), 3), "total_s": round(sum(v), 1)} for k, v in sorted(kinds.items())}
    out["_artifacts"] = {"count": artifacts[0], "bytes": artifacts[1]}
    return out


def _seconds(value) -> float:
    """task_run.total_run_time as stored by Prefect's SQLite backend (an interval: a datetime after
    the epoch, or seconds)."""
    if isinstance(value, (int, float)):
        return float(value)
    from datetime import datetime, timezone

    text = str(value).replace(" ", "T")
    moment = datetime.fromisoformat(text)
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=timezone.utc)
    return (moment - datetime(1970, 1, 1, tzinfo=timezone.utc)).total_seconds()


def _folder_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.exists() else 0


def worker(prompts: int, api_base: str) -> dict:
    """Runs in a fresh process: one build of `prompts` prompts through the flow."""
    import prefect.settings
    from prefect.testing.utilities import prefect_test_harness

    from bench_scoring import write_inputs
    from flows.preference_build import preference_build
    from flows.params import BuildParams
    from longreward_core.data.pairs import PairConfig
    from longreward_core.reward.judge import JudgeConfig
    from longreward_core.reward.scorer import ScoringConfig

    work = Path(tempfile.mkdtemp(prefix="longreward-night-bench-"))
    prompts_path, candidates_path = write_inputs(work, prompts, CANDIDATES, sentences=SENTENCES, varied=True)
    judge = JudgeConfig(model="openai/judge-double", api_base=api_base, api_key="bench", concurrency=16)
    result: dict = {"prompts": prompts, "candidates": prompts * CANDIDATES}
    started = time.perf_counter()
    with prefect_test_harness(server_startup_timeout=120):
        result["server_start_s"] = round(time.perf_counter() - started, 1)
        db = Path(prefect.settings.PREFECT_SERVER_DATABASE_CONNECTION_URL.value().split(":///", 1)[1])
        requests = PrefectRequests(prefect.settings.PREFECT_API_URL.value())
        before = _table_rows(db)
        params = BuildParams(prompts=str(prompts_path), candidates=str(candidates_path), output_dir=str(work / "builds"),
                             shard_size=SHARD_SIZE, shards_in_flight=4, judge=judge, scoring=ScoringConfig(),
                             pairs=PairConfig(min_candidates=CANDIDATES))
        sampler = RssSampler()
        rss_before = _rss_mib()
        cpu_before = os.times()
        sampler.start()
        flow_started = time.perf_counter()
        manifest = preference_build(params)
        result["flow_wall_s"] = round(time.perf_counter() - flow_started, 1)
        cpu_after = os.times()
        sampler.stop.set()
        result["flow_cpu_s"] = round(cpu_after.user + cpu_after.system - cpu_before.user - cpu_before.system, 1)
        result["rss_mib"] = {"before_flow": round(rss_before), "peak_process": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
                             "quartiles_of_the_run": _quartiles(sampler.samples), "after_flow": round(_rss_mib())}
        result["prefect_api"] = {"requests": requests.count, "seconds_waited": round(requests.seconds, 1),
                                 "by_route": dict(sorted(requests.by_route.items(), key=lambda kv: -kv[1]))}
        time.sleep(5)  # events are sent in the background: let them land before counting rows
        after = _table_rows(db)
        result["prefect_rows_added"] = {t: after[t] - before.get(t, 0) for t in sorted(after) if after[t] != before.get(t, 0)}
        result["task_runs"] = _task_runs(db)
    build = Path(manifest["manifest_path"]).parent
    counts = manifest["counts"]
    result["counts"] = {k: counts[k] for k in ("shards", "candidates", "scored", "failed", "pairs")}
    result["judge_requests"] = manifest["judge_accounting"]["total"]["calls"]
    result["bytes"] = {
        "manifest": Path(manifest["manifest_path"]).stat().st_size,
        "build_folder": _folder_bytes(build),
        "stage_results": _folder_bytes(work / "builds" / ".prefect-results"),
        "call_cache": manifest["call_cache"]["bytes"],
    }
    result["call_cache_rows"] = manifest["call_cache"]["rows"]
    shutil.rmtree(work, ignore_errors=True)
    return result


def _quartiles(samples: list[tuple[float, float]]) -> list[int]:
    """The most RSS seen in each quarter of the run (a process that grows shows a rising line)."""
    if not samples:
        return []
    end = samples[-1][0]
    return [round(max([rss for t, rss in samples if q * end / 4 <= t <= (q + 1) * end / 4] or [0])) for q in range(4)]


def run_worker(prompts: int, api_base: str) -> dict:
    out = subprocess.run(
        [sys.executable, __file__, "--worker", str(prompts), "--api-base", api_base],
        cwd=ROOT, stdout=subprocess.PIPE, text=True, check=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "PREFECT_SERVER_ANALYTICS_ENABLED": "false"},
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--worker", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--api-base", help=argparse.SUPPRESS)
    parser.add_argument("--sizes", type=int, nargs="+", default=[200, 2000], help="prompts per build")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "night.json")
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.api_base)))
        return

    server = subprocess.Popen([sys.executable, "-m", "longreward_testing.judge_double"], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        api_base = server.stdout.readline().strip()
        runs = [run_worker(p, api_base) for p in args.sizes]
    finally:
        server.terminate()
        server.wait()
    result = {
        "date": date.today().isoformat(),
        "machine": f"{platform.machine()}, {os.cpu_count()} cpus, python {platform.python_version()}",
        "shard_size": SHARD_SIZE, "candidates_per_prompt": CANDIDATES, "sentences_per_document": SENTENCES,
        "runs": runs,
    }
    if len(runs) > 1:
        result["peak_rss_ratio_largest_to_smallest"] = round(runs[-1]["rss_mib"]["peak_process"] / runs[0]["rss_mib"]["peak_process"], 3)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()

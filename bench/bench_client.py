"""The LLM client's own CPU per request, against a zero-latency loopback judge, and start-up.

Sends R distinct judge-like requests (a rendered helpfulness prompt each) through
`LLMClient.complete` at concurrency C, with the call cache and accounting as in a real run, and
reports the client process's CPU (`time.process_time`) per request and the wall time. The judge
double runs in its own process, so its CPU is not counted. Every route runs in a fresh process
of its own, one after the other, against the same judge:

- `before`: the client of git revision `--before` (exported to a temporary folder), every
  request through litellm;
- `litellm`: this tree's client with `direct=False` (every request through litellm);
- `direct`: this tree's client as it runs by default (OpenAI-compatible servers through the
  OpenAI SDK).

The routes take turns, `--rounds` times (the machine's load varies); the figures are the median
and the least of the rounds. A warm-up of 100 requests per run comes first (connection pools,
lazy imports).
`--profile ROUTE` writes a cProfile of that route's timed run next to the results.

Start-up: the wall time of `import flows.cli` (what `longreward score` loads before it runs) in a
fresh interpreter, best of 3, for the `--before` revision and this tree.

    .venv/bin/python bench/bench_client.py [--requests 2000] [--concurrency 32] [--before main] [--profile direct]
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import json
import os
import platform
import pstats
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")

from longreward_core.models.accounting import RunAccounting  # noqa: E402
from longreward_core.models.call_cache import CallCache  # noqa: E402
from longreward_core.models.client import LLMClient, LLMConfig  # noqa: E402
from longreward_core.reward.prompts import render  # noqa: E402

ROUTES = ("before", "litellm", "direct")


def judge_requests(requests: int, offset: int) -> list[list[dict[str, str]]]:
    """Distinct helpfulness prompts, rendered before timing (rendering is not the client's work)."""
    return [
        render("helpfulness", "en", question=f"What happened to pump {offset + i}?",
               response=f"The pump {offset + i} was repaired in {1900 + i % 120}.")
        for i in range(requests)
    ]


async def send_all(client: LLMClient, prompts: list[list[dict[str, str]]]) -> None:
    await asyncio.gather(*(client.complete("helpfulness", messages, 0.0, 0) for messages in prompts))


def run_route(route: str, api_base: str, args: argparse.Namespace, work: Path, offset: int) -> dict:
    """One route's timed run, in this process."""
    config = LLMConfig(model="openai/judge-double", api_base=api_base, api_key="bench-key-not-secret",
                       concurrency=args.concurrency, timeout_s=30)
    choice = {} if route == "before" else {"direct": route == "direct"}  # `before` has no choice

    async def main() -> dict:
        cache = CallCache(work / f"{route}-warmup.sqlite")
        await send_all(LLMClient(config, cache, **choice), judge_requests(100, offset))
        cache.close()
        cache = CallCache(work / f"{route}.sqlite")
        accounting = RunAccounting()
        client = LLMClient(config, cache, accounting, **choice)
        prompts = judge_requests(args.requests, offset + 100)
        profiler = cProfile.Profile() if args.profile == route else None
        cpu0, wall0 = time.process_time(), time.perf_counter()
        if profiler:
            profiler.enable()
        await send_all(client, prompts)
        if profiler:
            profiler.disable()
            path = args.out.with_name(f"client-{route}.prof")
            profiler.dump_stats(path)
            pstats.Stats(str(path)).sort_stats("cumulative").print_stats(40)
        cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
        cache.close()
        total = accounting.purpose("helpfulness")
        return {
            "requests": args.requests,
            "calls": total.calls,
            "failed": total.failed_calls,
            "transport_errors": total.transport_errors,
            "cpu_ms_per_request": round(1000 * cpu / args.requests, 2),
            "wall_seconds": round(wall, 2),
            "requests_per_second": round(args.requests / wall, 1),
            "profiled": profiler is not None,
            "route": getattr(client, "route", "litellm"),
        }

    return asyncio.run(main())


def import_seconds(module: str, code: Path) -> float:
    """Wall time of `import module` from the tree `code`, in a fresh interpreter, best of 3."""
    probe = f"import time; t = time.perf_counter(); import {module}; print(time.perf_counter() - t)"
    env = {**os.environ, "PYTHONPATH": str(code)}
    best = min(
        float(subprocess.run([sys.executable, "-c", probe], cwd=code, env=env, capture_output=True, text=True,
                             check=True).stdout.strip())
        for _ in range(3)
    )
    return round(best, 2)


def export(revision: str, folder: Path) -> Path:
    """The tree of `revision`, written to `folder` (git archive)."""
    folder.mkdir(parents=True, exist_ok=True)
    archive = subprocess.run(["git", "archive", revision], cwd=ROOT, capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(folder)], input=archive, check=True)
    return folder


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3, help="the routes run in turn, this many times")
    parser.add_argument("--routes", nargs="+", default=list(ROUTES), choices=ROUTES)
    parser.add_argument("--before", default="main", help="git revision whose client is the `before` route")
    parser.add_argument("--profile", choices=ROUTES, default=None)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "client.json")
    parser.add_argument("--child", choices=ROUTES, help=argparse.SUPPRESS)  # run one route, print its figures
    parser.add_argument("--api-base", help=argparse.SUPPRESS)
    parser.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--offset", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(run_route(args.child, args.api_base, args, args.work, args.offset)))
        return

    server = subprocess.Popen([sys.executable, "-m", "longreward_testing.judge_double", "--latency", "0"],
                              cwd=ROOT, stdout=subprocess.PIPE, text=True)
    routes, startup = {}, {}
    try:
        api_base = server.stdout.readline().strip()
        with tempfile.TemporaryDirectory(prefix="longreward-bench-client-") as work:
            before = export(args.before, Path(work) / "before")
            runs: dict[str, list[dict]] = {route: [] for route in args.routes}
            for turn in range(args.rounds * len(args.routes)):
                route = args.routes[turn % len(args.routes)]
                code = before if route == "before" else ROOT
                child = [sys.executable, str(Path(__file__).resolve()), "--child", route, "--api-base", api_base,
                         "--work", work, "--offset", str(turn * 1_000_000), "--requests", str(args.requests),
                         "--concurrency", str(args.concurrency), "--out", str(args.out)]
                if args.profile and turn < len(args.routes):
                    child += ["--profile", args.profile]
                env = {**os.environ, "PYTHONPATH": str(code)}  # whose longreward_core the route runs
                done = subprocess.run(child, cwd=ROOT, env=env, capture_output=True, text=True, check=True)
                runs[route].append(json.loads(done.stdout.strip().splitlines()[-1]))
                print(route, runs[route][-1], flush=True)
            for route, figures in runs.items():
                cpu = sorted(f["cpu_ms_per_request"] for f in figures)
                wall = sorted(f["wall_seconds"] for f in figures)
                routes[route] = {
                    "route": figures[0]["route"],
                    "cpu_ms_per_request_median": cpu[len(cpu) // 2],
                    "cpu_ms_per_request_min": cpu[0],
                    "wall_seconds_median": wall[len(wall) // 2],
                    "failed": sum(f["failed"] + f["transport_errors"] for f in figures),
                    "rounds": figures,
                }
            startup = {"before": import_seconds("flows.cli", before), "after": import_seconds("flows.cli", ROOT)}
    finally:
        server.terminate()
        server.wait()
    result = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{platform.machine()}, {os.cpu_count()} vCPU, python {platform.python_version()}",
        "before": subprocess.run(["git", "rev-parse", "--short", args.before], cwd=ROOT, capture_output=True,
                                 text=True).stdout.strip(),
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()
                 if k not in ("child", "api_base", "work", "offset")},
        "routes": routes,
        "cpu_median_before_over_direct": round(
            routes["before"]["cpu_ms_per_request_median"] / routes["direct"]["cpu_ms_per_request_median"], 2
        ) if {"before", "direct"} <= routes.keys() else None,
        "import_flows_cli_seconds": startup,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()

"""Orchestration overhead of the preference-build flow, and its peak memory as shards grow.

1. Overhead: the same P prompts x N candidates (zero-latency judge in its own process) scored by
   `score_files` in one process and by the flow (shards of S prompts on threads), each in a fresh
   subprocess on fresh folders. Overhead per candidate = (flow wall - score wall) / candidates.
   The flow's wall is timed inside the run, after Prefect's temporary server has started; that
   start-up is reported on its own.
2. Memory: the flow's peak RSS with the input (and so the number of shards) grown 4x at a fixed
   shard size.

    .venv/bin/python bench/bench_flow.py
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def worker(mode: str, prompts: int, candidates: int, shard_size: int, api_base: str) -> dict:
    """Runs in a fresh process: one scoring of the synthetic input, by `mode`."""
    from bench_scoring import write_inputs
    from longreward_core.reward.judge import JudgeConfig
    from longreward_core.reward.scorer import ScoringConfig

    work = Path(tempfile.mkdtemp(prefix="longreward-flow-bench-"))
    prompts_path, candidates_path = write_inputs(work, prompts, candidates, sentences=12)
    judge = JudgeConfig(model="openai/judge-double", api_base=api_base, api_key="bench", concurrency=16)
    scoring = ScoringConfig()
    result: dict = {"mode": mode, "candidates": prompts * candidates}
    if mode == "score":
        from longreward_core.pipeline.score_files import score_files

        started = time.perf_counter()
        run = score_files(prompts_path, candidates_path, work / "out", judge, scoring)
        result["wall_seconds"] = time.perf_counter() - started
        result["scored"] = run.summary.scored
    else:
        from prefect.testing.utilities import prefect_test_harness

        from flows.preference_build import BuildParams, preference_build

        started = time.perf_counter()
        with prefect_test_harness(server_startup_timeout=120):
            result["server_start_seconds"] = time.perf_counter() - started
            params = BuildParams(
                prompts=str(prompts_path), candidates=str(candidates_path), output_dir=str(work / "builds"),
                shard_size=shard_size, shards_in_flight=4, judge_slots=None, judge=judge, scoring=scoring,
            )
            flow_started = time.perf_counter()
            manifest = preference_build(params)
            result["wall_seconds"] = time.perf_counter() - flow_started
        result["scored"] = manifest["counts"]["scored"]
        result["shards"] = manifest["counts"]["shards"]
    result["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return result


def run_worker(mode: str, prompts: int, candidates: int, shard_size: int, api_base: str) -> dict:
    out = subprocess.run(
        [sys.executable, __file__, "--worker", mode, "--prompts", str(prompts), "--candidates", str(candidates),
         "--shard-size", str(shard_size), "--api-base", api_base],
        cwd=ROOT, stdout=subprocess.PIPE, text=True, check=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "PREFECT_SERVER_ANALYTICS_ENABLED": "false"},
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--worker", choices=["score", "flow"])
    parser.add_argument("--prompts", type=int, default=200)
    parser.add_argument("--candidates", type=int, default=10)
    parser.add_argument("--shard-size", type=int, default=25)
    parser.add_argument("--api-base")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "flow.json")
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.prompts, args.candidates, args.shard_size, args.api_base)))
        return

    server = subprocess.Popen([sys.executable, "-m", "longreward_testing.judge_double"], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        api_base = server.stdout.readline().strip()
        score = run_worker("score", args.prompts, args.candidates, args.shard_size, api_base)
        flow = run_worker("flow", args.prompts, args.candidates, args.shard_size, api_base)
        small = run_worker("flow", args.prompts // 4, args.candidates, args.shard_size, api_base)
    finally:
        server.terminate()
        server.wait()
    n = score["candidates"]
    result = {
        "date": date.today().isoformat(),
        "machine": f"{platform.machine()}, {os.cpu_count()} cpus, python {platform.python_version()}",
        "candidates": n,
        "shard_size_prompts": args.shard_size,
        "score_wall_seconds": round(score["wall_seconds"], 2),
        "flow_wall_seconds": round(flow["wall_seconds"], 2),
        "flow_server_start_seconds": round(flow["server_start_seconds"], 2),
        "overhead_ms_per_candidate": round(1000 * (flow["wall_seconds"] - score["wall_seconds"]) / n, 2),
        "peak_rss_mib": {
            f"flow, {small['shards']} shards ({small['candidates']} candidates)": round(small["peak_rss_mib"]),
            f"flow, {flow['shards']} shards ({flow['candidates']} candidates)": round(flow["peak_rss_mib"]),
            f"score_files, one process ({n} candidates)": round(score["peak_rss_mib"]),
        },
        "peak_rss_ratio_4x_shards": round(flow["peak_rss_mib"] / small["peak_rss_mib"], 3),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()

"""The judge-fault scenarios that the fault tests (tests/faults) assert on and bench_faults.py
measures: 4 prompts x 3 candidates (80 judge requests when nothing fails), faults injected into a
share of requests, bursts of answers without a verdict, and a scoring process killed mid-run."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import polars as pl

from longreward_core.models.secrets import JUDGE_API_KEY_ENV
from longreward_core.pipeline.score_files import ScoreRun, score_files
from longreward_core.reward.judge import JudgeConfig
from longreward_core.reward.scorer import ScoringConfig
from longreward_testing.judge_double import KINDS, JudgeDouble, JudgeServer, fault_mix
from longreward_testing.scenarios import TEST_API_KEY, judge_config_for

ROOT = Path(__file__).resolve().parents[1]
SCORING = ScoringConfig(retrieval_chunk_tokens=32, completeness_chunk_tokens=96)
PROMPTS, CANDIDATES = 4, 3
RATE = 0.2
TRANSPORT = ("500", "429", "hang", "truncated", "drop")  # retried by the client, counted as transport errors
NO_VERDICT = ("garbage", "null")  # answered without a verdict: asked again by the judge, counted as parse failures
KILL_CONCURRENCY = 2


def faulty_judge(server: JudgeServer, **overrides) -> JudgeConfig:
    """A judge config for faulty runs: a 1 s timeout (the double's hangs outlast it), and retries
    enough that 20% faults never exhaust them (0.2^9 per call), so every candidate is scored."""
    settings = dict(timeout_s=1.0, transport_retries=8, max_attempts=9)
    settings.update(overrides)
    return judge_config_for(server, **settings)


def inject(double: JudgeDouble, kinds: list[str], rate: float = RATE, seed: int = 0) -> None:
    """Give `rate` of the double's requests one of `kinds` (seeded); a hang outlasts faulty_judge's timeout."""
    double.fault_rule = fault_mix(rate, kinds, seed)
    double.timeout_sleep_s = 2.5


def garbage_burst(spared: tuple[str, ...] = ()):
    """A fault rule: every request answers without a verdict, except those of the `spared` tasks."""
    return lambda request, index: None if request.task in spared else KINDS["garbage"]


def injected(double: JudgeDouble) -> Counter:
    return Counter(name for _, name in double.injected)


def answered(double: JudgeDouble) -> set[tuple[str, float | None]]:
    """(content, temperature) of every request the double answered without a fault (its scripted
    answers always hold a verdict)."""
    faulted = {index for index, _ in double.injected}
    return {(r.content, r.temperature) for i, r in enumerate(double.requests) if i not in faulted}


def asked(double: JudgeDouble) -> list[tuple[str, float | None]]:
    return [(r.content, r.temperature) for r in double.requests]


def read_scores(run_or_dir: ScoreRun | Path) -> pl.DataFrame:
    path = run_or_dir.scores_path if isinstance(run_or_dir, ScoreRun) else run_or_dir / "scores.parquet"
    return pl.read_parquet(path)


def score_command(server: JudgeServer, inputs: tuple[Path, Path], out: Path) -> list[str]:
    return [
        sys.executable, "-m", "flows.cli", "score", "--prompts", str(inputs[0]), "--candidates", str(inputs[1]),
        "--out", str(out), "--judge-model", "openai/judge-double", "--judge-api-base", server.api_base,
        "--judge-concurrency", str(KILL_CONCURRENCY), "--judge-timeout", "5",
        "--retrieval-chunk-tokens", str(SCORING.retrieval_chunk_tokens),
        "--completeness-chunk-tokens", str(SCORING.completeness_chunk_tokens),
    ]


def kill_then_rerun(server: JudgeServer, inputs: tuple[Path, Path], out: Path, answered_before_kill: int = 10) -> dict:
    """`longreward score` in a subprocess, SIGKILLed once the judge (0.2 s per request) has answered
    `answered_before_kill` requests, then the same scoring run again to completion (in this
    process: what the command calls, with the same request keys, without a second start-up).
    Returns the requests of both runs, how many were in flight at the kill, and the re-run."""
    double = server.double
    double.latency_s = 0.2
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", JUDGE_API_KEY_ENV: TEST_API_KEY}
    process = subprocess.Popen(score_command(server, inputs, out), env=env, cwd=ROOT,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while double.count() - double.in_flight < answered_before_kill:
        assert process.poll() is None and time.monotonic() < deadline, "the scoring process ended before the kill"
        time.sleep(0.01)
    in_flight_at_kill = double.in_flight
    process.send_signal(signal.SIGKILL)
    process.wait()
    while double.in_flight:  # the double finishes the killed process's requests into closed sockets
        time.sleep(0.01)
    before = asked(double)
    double.reset()
    double.latency_s = 0.0
    rerun = score_files(*inputs, out, judge_config_for(server, concurrency=KILL_CONCURRENCY), SCORING)
    return {"before": before, "in_flight_at_kill": in_flight_at_kill, "rerun_requests": asked(double), "rerun": rerun}

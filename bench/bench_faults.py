"""Scoring under injected judge faults: requests, scored candidates, repeats on a re-run, lost rows.

The scenarios of `tests/faults` (`longreward_testing.faults`) (4 prompts x 3 candidates against the loopback judge double, 80
requests when nothing fails), each compared with a clean run:

- each fault kind alone, and all mixed, on 20% of requests (seeded); then the same scoring again
  against the healthy judge;
- a burst of answers without a verdict on every request (and on every grading request), then a
  re-run against the healthy judge;
- `longreward score` killed with SIGKILL after 10 answers, then run again.

"Repeats on re-run" counts re-run requests whose (content, temperature) the first run had already
had answered; "lost rows" counts rows of the clean run's scores.parquet missing or different.

    .venv/bin/python bench/bench_faults.py
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import polars as pl

from longreward_core.pipeline.score_files import score_files
from longreward_testing.faults import (
    CANDIDATES,
    KILL_CONCURRENCY,
    NO_VERDICT,
    PROMPTS,
    RATE,
    SCORING,
    TRANSPORT,
    answered,
    asked,
    faulty_judge,
    garbage_burst,
    inject,
    injected,
    kill_then_rerun,
    read_scores,
)
from longreward_testing.judge_double import KINDS, JudgeServer
from longreward_testing.scenarios import judge_config_for, write_inputs

ROOT = Path(__file__).resolve().parents[1]


def lost_rows(scores: pl.DataFrame, clean: pl.DataFrame) -> int:
    return clean.join(scores, on=clean.columns, how="anti", nulls_equal=True).height


def faulted_then_rerun(work: Path, inputs, clean: pl.DataFrame, label: str, rate: str, rule, judge) -> dict:
    """One faulted scoring, then the same scoring against the healthy judge, in the same folder."""
    with JudgeServer() as server:
        double = server.double
        rule(double)
        first = score_files(*inputs, work / label, judge(server), SCORING)
        requests, faults, verdicts = double.count(), injected(double), answered(double)
        total = first.summary.judge.total
        double.reset()
        double.fault_rule = None
        second = score_files(*inputs, work / label, judge_config_for(server), SCORING)
        repeats = sum(1 for key in asked(double) if key in verdicts)
    return {
        "fault": label, "rate": rate, "requests": requests, "injected": sum(faults.values()),
        "counted": total.transport_errors + total.parse_failures,
        "scored": f"{first.summary.scored} -> {second.summary.scored}",
        "rerun_requests": double.count(), "repeats": repeats, "lost_rows": lost_rows(read_scores(second), clean),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "faults.json")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="longreward-faults-bench-"))
    inputs = write_inputs(work, n_prompts=PROMPTS, n_candidates=CANDIDATES)
    with JudgeServer() as server:
        clean = read_scores(score_files(*inputs, work / "clean", judge_config_for(server), SCORING))
    rows = []
    for label, kinds in [*[(k, [k]) for k in KINDS], ("mixed", list(KINDS))]:
        rows.append(faulted_then_rerun(work, inputs, clean, label, f"{RATE:.0%}",
                                       lambda d, kinds=kinds: inject(d, kinds, seed=len(kinds)), faulty_judge))
    for label, spared in [("garbage burst", ()), ("garbage burst, grading only", ("statements", "support"))]:
        def burst(double, spared=spared):
            double.fault_rule = garbage_burst(spared)
        rows.append(faulted_then_rerun(work, inputs, clean, label, "100%", burst,
                                       lambda server: judge_config_for(server, max_attempts=2)))
    with JudgeServer() as server:
        killed = kill_then_rerun(server, inputs, work / "killed")
    before = set(killed["before"])
    rows.append({
        "fault": f"kill -9 after 10 answers (concurrency {KILL_CONCURRENCY})", "rate": "-",
        "requests": len(killed["before"]), "injected": 1, "counted": "-",
        "scored": f"0 -> {killed['rerun'].summary.scored}", "rerun_requests": len(killed["rerun_requests"]),
        "repeats": sum(1 for key in killed["rerun_requests"] if key in before),
        "lost_rows": lost_rows(read_scores(killed["rerun"]), clean),
    })
    print(f"transport kinds {TRANSPORT}: counted as transport errors; {NO_VERDICT}: as parse failures")
    print("| fault kind | rate | requests | faults injected / counted | scored (run -> re-run) "
          "| re-run requests | repeats on re-run | lost rows |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['fault']} | {r['rate']} | {r['requests']} | {r['injected']} / {r['counted']} | {r['scored']} "
              f"| {r['rerun_requests']} | {r['repeats']} | {r['lost_rows']} |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()

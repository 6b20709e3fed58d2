"""Our own cost per candidate: CPU and peak memory of `longreward score`, embedding backends side by side.

Runs the real command line (`longreward score`, a subprocess) against the loopback judge double
(`longreward_testing/judge_double.py`, its own process) at zero latency, so the judge costs the scorer nothing
but its own client work. Inputs: P prompts x N candidates; each document 20k-60k characters of
sentences; each candidate 4-12 statements, each a document sentence or an altered one.

Per backend of the embedded MiniLM (`LONGREWARD_EMBEDDING_BACKEND`: "torch" is sentence-transformers,
the former default; "onnx" is ONNX Runtime, the default now) and input size:
- CPU seconds (user + sys) of the score process per candidate, from `os.wait4` on that process
  in a small launcher process (the judge double's CPU is not counted);
- its peak RSS (ru_maxrss; the launcher keeps this process's RSS out of it);
- the wall time, and at `--latency` (500 ms) with concurrency 16 and 64 the wall time against the
  floor max(critical path, calls x latency / concurrency).
Retrieval agreement: for every distinct statement of the bench (the double's statement extraction:
one per sentence), its top-5 chunks with the torch vectors against the ONNX vectors (chunk vectors
read from each run's own Qdrant folder); and whether the two runs wrote the same scores.

    .venv/bin/python bench/bench_cpu.py [--sizes 20,80] [--baseline-sizes 20] [--rss-320] [--no-latency]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

import numpy as np
import polars as pl

from bench_scoring import synthetic_document
from longreward_core.models.embeddings import EMBEDDING_BACKEND_ENV, OnnxEmbedder, SentenceTransformerEmbedder
from longreward_core.reward.retrieval import content_hash
from longreward_core.reward.documents import retrieval_chunking
from longreward_core.reward.scorer import ScoringConfig
from longreward_testing.judge_double import sentences

ROOT = Path(__file__).resolve().parents[1]

BACKENDS = ("torch", "onnx")


def write_inputs(folder: Path, n_prompts: int, n_candidates: int, seed: int = 5) -> tuple[Path, Path]:
    """Documents of 20k-60k characters (~150 per sentence); candidates of 4-12 statements, each a
    document sentence or (a share drawn per candidate) the same sentence with a wrong year."""
    rng = random.Random(seed)
    prompts, candidates = [], []
    for p in range(n_prompts):
        doc = synthetic_document(rng, rng.randint(135, 400))
        prompts.append({"id": f"p{p:04d}", "context": " ".join(doc), "query": f"What happened in item {rng.randrange(100)}?"})
        for k in range(n_candidates):
            quality = rng.random()
            said = [s if rng.random() < quality else s.replace("In 1", "In 2", 1) for s in rng.sample(doc, rng.randint(4, 12))]
            candidates.append({"prompt_id": f"p{p:04d}", "candidate_id": f"p{p:04d}-{k}", "response": " ".join(said)})
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "prompts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in prompts))
    (folder / "candidates.jsonl").write_text("".join(json.dumps(r) + "\n" for r in candidates))
    return folder / "prompts.jsonl", folder / "candidates.jsonl"


class Judge:
    """The judge double in its own process."""

    def __init__(self, latency: float):
        self.process = subprocess.Popen(
            [sys.executable, "-m", "longreward_testing.judge_double", "--latency", str(latency)], cwd=ROOT, stdout=subprocess.PIPE, text=True
        )
        self.api_base = self.process.stdout.readline().strip()

    def close(self) -> None:
        self.process.terminate()
        self.process.wait()


# Starts the command from a small process and reports its rusage. A child's ru_maxrss starts from
# its parent's RSS at fork (Linux keeps the larger across exec), so forking from this process,
# which loads both embedding models for the agreement check, would report this process's memory.
_LAUNCHER = """
import json, os, subprocess, sys, time
started = time.perf_counter()
process = subprocess.Popen(sys.argv[1:], stdout=subprocess.DEVNULL)
_, status, usage = os.wait4(process.pid, 0)
wall = time.perf_counter() - started
print(json.dumps({"user": usage.ru_utime, "sys": usage.ru_stime, "maxrss_kb": usage.ru_maxrss, "wall": wall}))
sys.exit(os.waitstatus_to_exitcode(status))
"""


def score(backend: str, prompts: Path, candidates: Path, out: Path, api_base: str, concurrency: int) -> dict:
    """One `longreward score` process: its CPU seconds, peak RSS and wall time (from wait4)."""
    script = Path(sys.executable).with_name("longreward")
    command = [str(script)] if script.exists() else [sys.executable, "-m", "flows.cli"]
    env = dict(os.environ, PYTHONPATH=str(ROOT), LITELLM_LOCAL_MODEL_COST_MAP="True", HF_HUB_OFFLINE="1",
               LONGREWARD_JUDGE_API_KEY="bench", PREFECT_SERVER_ANALYTICS_ENABLED="false")
    env[EMBEDDING_BACKEND_ENV] = backend
    done = subprocess.run(
        [sys.executable, "-c", _LAUNCHER] + command
        + ["score", "--prompts", str(prompts), "--candidates", str(candidates), "--out", str(out),
           "--judge-model", "openai/judge-double", "--judge-api-base", api_base, "--judge-concurrency", str(concurrency)],
        cwd=ROOT, env=env, capture_output=True, text=True,
    )
    if done.returncode != 0:
        raise RuntimeError(f"longreward score ({backend}) exited {done.returncode}: {done.stderr[-2000:]!r}")
    usage = json.loads(done.stdout.strip().splitlines()[-1])
    summary = json.loads((out / "accounting.json").read_text())
    return {
        "cpu_seconds": round(usage["user"] + usage["sys"], 2),
        "user_seconds": round(usage["user"], 2),
        "sys_seconds": round(usage["sys"], 2),
        "peak_rss_mb": round(usage["maxrss_kb"] / 1024),
        "wall_seconds": round(usage["wall"], 2),
        "judge_calls": summary["judge"]["total"]["calls"],
        "candidates": summary["candidates"],
        "scored": summary["scored"],
        "embedding_seconds": summary["embedding_seconds"],
        "chunk_embeddings": summary["chunk_embeddings"],
        "statement_embeddings": summary["statement_embeddings"],
    }


def chunk_vectors(qdrant_folder: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Every document's chunk indices and vectors as a run stored them (one local store per
    document, `documents/<id[:2]>/<id>`)."""
    from qdrant_client import QdrantClient

    by_doc: dict[str, list[tuple[int, list[float]]]] = {}
    for store in sorted((qdrant_folder / "documents").glob("*/*")):
        client = QdrantClient(path=str(store))
        try:
            (collection,) = [c.name for c in client.get_collections().collections]
            offset = None
            while True:
                points, offset = client.scroll(collection, limit=4096, offset=offset, with_payload=True, with_vectors=True)
                for p in points:
                    by_doc.setdefault(p.payload["doc_id"], []).append((int(p.payload["index"]), p.vector))
                if offset is None:
                    break
        finally:
            client.close()
    return {d: (np.asarray([i for i, _ in v]), np.asarray([x for _, x in v], dtype=np.float32)) for d, v in by_doc.items()}


def top_k(statement_vectors: np.ndarray, indices: np.ndarray, vectors: np.ndarray, k: int) -> list[tuple[int, ...]]:
    """As `ChunkIndex.query` ranks: exact cosine, stable order, the top k in document order."""
    order = np.argsort(-(statement_vectors @ vectors.T), axis=1, kind="stable")[:, :k]
    return [tuple(sorted(int(indices[j]) for j in row)) for row in order]


def agreement(prompts: Path, candidates: Path, outs: dict[str, Path]) -> dict:
    """Top-5 agreement per distinct statement, torch vectors against ONNX vectors, each side with
    the chunk vectors its own run stored."""
    config = ScoringConfig()
    docs = {json.loads(line)["id"]: content_hash(json.loads(line)["context"]) for line in prompts.read_text().splitlines()}
    per_doc: dict[str, set[str]] = {}
    for line in candidates.read_text().splitlines():
        row = json.loads(line)
        per_doc.setdefault(docs[row["prompt_id"]], set()).update(sentences(row["response"]))
    stored = {b: chunk_vectors(outs[b] / "qdrant") for b in BACKENDS}
    embedders = {"torch": SentenceTransformerEmbedder(), "onnx": OnnxEmbedder()}
    statements = same = 0
    for doc_id, said in per_doc.items():
        said = sorted(said)
        hits = {}
        for backend in BACKENDS:
            indices, vectors = stored[backend][doc_id]
            hits[backend] = top_k(embedders[backend].embed(said), indices, vectors, config.top_k)
        statements += len(said)
        same += sum(a == b for a, b in zip(hits["torch"], hits["onnx"], strict=True))
    frames = {b: pl.read_parquet(outs[b] / "scores.parquet") for b in BACKENDS}
    return {
        "chunking": retrieval_chunking(config),
        "statements": statements,
        "top5_identical": same,
        "top5_agreement": round(same / statements, 4),
        "scores_identical": frames["torch"].equals(frames["onnx"]),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", default="20,80", help="prompt counts scored with the default (ONNX) backend")
    parser.add_argument("--baseline-sizes", default="20", help="prompt counts also scored with the torch backend")
    parser.add_argument("--candidates", type=int, default=10)
    parser.add_argument("--concurrency", type=int, default=32, help="judge concurrency of the zero-latency runs")
    parser.add_argument("--rss-320", action="store_true", help="also score 320 prompts (ONNX) for peak RSS")
    parser.add_argument("--latency", type=float, default=0.5)
    parser.add_argument("--latency-concurrency", default="16,64")
    parser.add_argument("--latency-prompts", type=int, default=20)
    parser.add_argument("--no-latency", action="store_true", help="skip the runs at --latency")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "cpu.json")
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",") if s] + ([320] if args.rss_320 else [])
    baseline = [int(s) for s in args.baseline_sizes.split(",") if s]

    OnnxEmbedder()  # the one-off export happens here, not in a measured run
    work = Path(tempfile.mkdtemp(prefix="longreward-cpu-"))
    runs: dict[str, dict[str, dict]] = {b: {} for b in BACKENDS}
    try:
        judge = Judge(0.0)
        try:
            for n in sorted(set(sizes) | set(baseline)):
                prompts, candidates = write_inputs(work / f"in-{n}", n, args.candidates)
                for backend in BACKENDS:
                    if (backend == "torch" and n not in baseline) or (backend == "onnx" and n not in sizes):
                        continue
                    out = work / f"out-{backend}-{n}"
                    run = score(backend, prompts, candidates, out, judge.api_base, args.concurrency)
                    run["cpu_ms_per_candidate"] = round(1000 * run["cpu_seconds"] / run["candidates"])
                    runs[backend][str(n)] = run
                    print(f"{backend} {n} prompts: {run}", flush=True)
        finally:
            judge.close()
        retrieval = None  # needs a size scored with both backends
        if set(sizes) & set(baseline):
            n = min(set(sizes) & set(baseline))
            retrieval = agreement(work / f"in-{n}" / "prompts.jsonl", work / f"in-{n}" / "candidates.jsonl",
                                  {b: work / f"out-{b}-{n}" for b in BACKENDS})
            print(f"agreement at {n} prompts: {retrieval}", flush=True)

        latency_runs = {}
        if not args.no_latency:
            judge = Judge(args.latency)
            try:
                prompts, candidates = write_inputs(work / "in-latency", args.latency_prompts, args.candidates)
                for concurrency in [int(c) for c in args.latency_concurrency.split(",")]:
                    run = score("onnx", prompts, candidates, work / f"out-latency-{concurrency}", judge.api_base, concurrency)
                    floor = max(2 * args.latency, run["judge_calls"] * args.latency / concurrency)
                    latency_runs[str(concurrency)] = {**run, "floor_seconds": round(floor, 2),
                                                      "wall_over_floor": round(run["wall_seconds"] / floor, 3)}
                    print(f"latency {args.latency}s concurrency {concurrency}: {latency_runs[str(concurrency)]}", flush=True)
            finally:
                judge.close()
    finally:
        shutil.rmtree(work, ignore_errors=True)

    onnx_rss = {n: r["peak_rss_mb"] for n, r in runs["onnx"].items()}
    result = {
        "date": date.today().isoformat(),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, python {platform.python_version()}",
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "runs": runs,
        "retrieval": retrieval,
        "latency_runs": latency_runs,
        "targets": {
            "<= 120 ms CPU per candidate (20 prompts, default backend)": runs["onnx"].get("20", {}).get("cpu_ms_per_candidate", 1e9) <= 120,
            "peak RSS <= 1.2 GB": max(onnx_rss.values()) <= 1200,
            "peak RSS flat within 10%": max(onnx_rss.values()) <= 1.1 * min(onnx_rss.values()),
            ">= 98% top-5 agreement": retrieval["top5_agreement"] >= 0.98 if retrieval else None,
        },
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()

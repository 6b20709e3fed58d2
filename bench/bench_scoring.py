"""Scoring benchmark against the loopback judge with a fixed latency.

Scores P prompts x N candidates three times on one output folder: cold; again with the
documents already indexed but the judge cache emptied (every judge call made again: the
scheduler against the floor, without the one-off document embedding); and a plain re-run. Reports: judge calls and tokens per prompt; wall time against the floor
max(critical path, total calls x latency / concurrency); chunk embeddings per document chunk
(target 1 on the cold run, 0 on the re-run); judge calls on the re-run (target 0).

Models (tokenizer, embedding model) are loaded before timing: the figures are for scoring, not
for process start-up, which is reported separately.

    .venv/bin/python bench/bench_scoring.py [--prompts 20] [--candidates 10] [--latency 0.1] [--concurrency 16]
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from datetime import date
from pathlib import Path

from longreward_core.models.embeddings import EMBEDDED_EMBEDDING, make_embedder
from longreward_core.models.tokenizers import load_tokenizer
from longreward_core.pipeline.score_files import score_files
from longreward_core.reward.chunking import chunk_document
from longreward_core.reward.judge import JudgeConfig
from longreward_core.reward.scorer import ScoringConfig

ROOT = Path(__file__).resolve().parents[1]

WORDS = (
    "river station pump council budget flood culvert reservoir engineer valve pipe survey report "
    "winter summer repair contract tender inspection pressure capacity turbine motor cable road "
    "bridge village harbour archive library school museum market railway canal mill quarry"
).split()


def synthetic_document(rng: random.Random, sentences: int) -> list[str]:
    out = []
    for i in range(sentences):
        words = rng.sample(WORDS, 7)
        out.append(f"In {1900 + rng.randrange(120)} the {words[0]} near the {words[1]} was linked to the "
                   f"{words[2]} and the {words[3]}, costing {rng.randrange(10, 999)} thousand euros (item {i}).")
    return out


def write_inputs(
    folder: Path, n_prompts: int, n_candidates: int, sentences: int, seed: int = 7, varied: bool = False
) -> tuple[Path, Path]:
    """Synthetic prompts and candidates: each candidate copies 3 sentences of its document and
    invents 1 (with `varied`, candidate k invents k + 1, so rewards differ and pairs form)."""
    rng = random.Random(seed)
    prompts, candidates = [], []
    for p in range(n_prompts):
        doc = synthetic_document(rng, sentences)
        prompts.append({"id": f"p{p:03d}", "context": " ".join(doc), "query": f"What happened to the {rng.choice(WORDS)}?"})
        for k in range(n_candidates):
            copied = rng.sample(doc, 3)  # supported statements
            invented = [f"The {rng.choice(WORDS)} was painted blue in {rng.randrange(1800, 1900)}." for _ in range(k + 1 if varied else 1)]
            candidates.append({"prompt_id": f"p{p:03d}", "candidate_id": f"p{p:03d}-{k}", "response": " ".join(copied + invented)})
    prompts_path, candidates_path = folder / "prompts.jsonl", folder / "candidates.jsonl"
    prompts_path.write_text("".join(json.dumps(r) + "\n" for r in prompts))
    candidates_path.write_text("".join(json.dumps(r) + "\n" for r in candidates))
    return prompts_path, candidates_path


def requests_seen(api_base: str) -> int:
    stats_url = api_base.rsplit("/v1", 1)[0] + "/stats"
    with urllib.request.urlopen(stats_url) as response:
        return json.load(response)["requests"]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--prompts", type=int, default=20)
    parser.add_argument("--candidates", type=int, default=10)
    parser.add_argument("--sentences", type=int, default=160, help="sentences per document (~30 tokens each)")
    parser.add_argument("--latency", type=float, default=0.1)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "scoring.json")
    args = parser.parse_args()

    started = time.perf_counter()
    tokenizer = load_tokenizer(None)
    make_embedder(EMBEDDED_EMBEDDING)  # loads the shared model once (the backend scoring uses)
    startup_s = time.perf_counter() - started

    work = Path(tempfile.mkdtemp(prefix="longreward-bench-"))
    try:
        prompts_path, candidates_path = write_inputs(work, args.prompts, args.candidates, args.sentences)
        contexts = [json.loads(line)["context"] for line in prompts_path.read_text().splitlines()]
        config = ScoringConfig()
        retrieval_chunks = sum(len(chunk_document(c, tokenizer, config.retrieval_chunk_tokens)) for c in contexts)
        doc_tokens = sum(len(tokenizer(c, add_special_tokens=False)["input_ids"]) for c in contexts) / len(contexts)

        # The judge runs in its own process, as a remote judge would: in this process its
        # request handling would compete with the scorer for the interpreter lock.
        server = subprocess.Popen(
            [sys.executable, "-m", "longreward_testing.judge_double", "--latency", str(args.latency)],
            cwd=ROOT, stdout=subprocess.PIPE, text=True,
        )
        try:
            api_base = server.stdout.readline().strip()
            judge = JudgeConfig(model="openai/judge-double", api_base=api_base, api_key="bench", concurrency=args.concurrency)
            runs = []
            for label in ("cold", "warm-index", "rerun"):
                if label == "warm-index":  # documents stay indexed; every judge call is made again
                    for path in (work / "out").glob("call_cache.sqlite*"):
                        path.unlink()
                before = requests_seen(api_base)
                t0 = time.perf_counter()
                run = score_files(prompts_path, candidates_path, work / "out", judge, config)
                wall = time.perf_counter() - t0
                runs.append((label, wall, requests_seen(api_base) - before, run.summary))
        finally:
            server.terminate()
            server.wait()

        cold_label, cold_wall, cold_requests, cold = runs[0]
        _, warm_wall, warm_requests, warm = runs[1]
        _, rerun_wall, rerun_requests, rerun = runs[2]
        total = cold.judge.total
        calls = total.calls
        floor_throughput = calls * args.latency / args.concurrency
        critical_path = 2 * args.latency  # statement extraction -> verification (or key points -> judgement)
        floor = max(critical_path, floor_throughput)
        # Embeddings run one batch at a time on the CPU, so their total is a floor of its own.
        embedding_floor = cold.embedding_seconds
        result = {
            "date": date.today().isoformat(),
            "machine": f"{platform.machine()}, {platform.processor() or 'cpu'}, python {platform.python_version()}",
            "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
            "document_tokens_mean": round(doc_tokens),
            "startup_seconds": round(startup_s, 2),
            "judge_calls": calls,
            "judge_requests_seen_by_server": cold_requests,
            "judge_calls_per_prompt": calls / args.prompts,
            "judge_calls_per_purpose": {d: v.calls for d, v in cold.judge.per_purpose.items()},
            "prompt_tokens_per_prompt": total.prompt_tokens / args.prompts,
            "completion_tokens_per_prompt": total.completion_tokens / args.prompts,
            "wall_seconds": round(cold_wall, 2),
            "floor_seconds": round(floor, 2),
            "wall_over_floor": round(cold_wall / floor, 3),
            "embedding_seconds": embedding_floor,
            "wall_over_floor_with_embedding": round(cold_wall / max(floor, embedding_floor), 3),
            "warm_index_wall_seconds": round(warm_wall, 2),
            "warm_index_judge_requests": warm_requests,
            "warm_index_embedding_seconds": warm.embedding_seconds,
            "warm_index_wall_over_floor": round(warm_wall / floor, 3),
            "retrieval_chunks": retrieval_chunks,
            "chunk_embeddings_cold": cold.chunk_embeddings,
            "chunk_embeddings_per_chunk_cold": cold.chunk_embeddings / retrieval_chunks,
            "chunk_embeddings_rerun": rerun.chunk_embeddings,
            "judge_requests_rerun": rerun_requests,
            "rerun_wall_seconds": round(rerun_wall, 2),
            "scored": cold.scored,
            "failed": cold.failed,
        }
    finally:
        shutil.rmtree(work, ignore_errors=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()

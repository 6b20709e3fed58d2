"""The embedded model's decoding on the demo's workload: two versions of `models/embedded_llm.py` side by side.

The workload is what `make demo` asks of the embedded SmolLM2-135M:
- policy: 5 candidates per prompt in one request (`n=5`, temperature 0.8, 64 new tokens) on each
  prompt of the bundled sample;
- judge: the requests a scoring run makes for one candidate (the sample's first, English; all four
  dimensions, verdicts constrained), recorded from a real `score_files` run through the LLM client
  (`--judge-requests FILE` keeps them for the next run) and replayed to each version.

Each version is `models/embedded_llm.py` at a git revision (or this tree's file), loaded as a module of
its own with its own prefix cache; all drive the same loaded model. The versions take turns request
by request (the order rotates), each round from empty prefix caches, so a change in the machine's
load falls on all of them alike; the figures are seconds per phase and part, and their ratio to the
first version's in the same round. Per part: seconds inside `_decode_many` (policy),
`_decode` (judge analysis and list answers), `_constrained_choice`; model forwards and the tokens
they ran. Judge answers are compared (the first attempt is greedy): equal texts per version.

Last, a check of transformers' prompt-lookup drafting from a reused cache: greedy tokens of
`generate(prompt_lookup_num_tokens=8)` from a cache that already holds most of the prompt against
`generate` without drafting from the same cache.

    .venv/bin/python bench/bench_embedded.py [--versions 3dda35a 6255ace worktree] [--rounds 1] [--judge-requests F]
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import importlib.util
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch  # noqa: E402

from longreward_core.data.pairs import user_message  # noqa: E402
from longreward_core.data.records import Prompt  # noqa: E402
from longreward_core.models import embedded_llm as embedded  # noqa: E402

MODULE = "longreward_core/models/embedded_llm.py"
OLD_MODULE = "longreward_core/models/embedded.py"  # its name at revisions before the rename
SAMPLE = ROOT / "longreward_core" / "sample"
PARTS = ("_decode_many", "_decode", "_constrained_choice")


def load_version(rev: str, folder: Path) -> object:
    """`models/embedded_llm.py` at git revision `rev` ('worktree': this tree's file) as a module of its own."""
    if rev == "worktree":
        source = (ROOT / MODULE).read_text()
    else:
        shown = [subprocess.run(["git", "show", f"{rev}:{name}"], cwd=ROOT, capture_output=True, text=True)
                 for name in (MODULE, OLD_MODULE)]
        found = [s for s in shown if s.returncode == 0]
        if not found:
            raise SystemExit(f"no {MODULE} (or {OLD_MODULE}) at revision {rev}")
        source = found[0].stdout
    path = folder / f"embedded_{rev.replace('/', '_')}.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[path.stem] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    module._load = embedded._load  # one loaded model for both versions
    return module


def policy_requests() -> list[dict]:
    prompts = [Prompt(**json.loads(line)) for line in (SAMPLE / "prompts.jsonl").read_text().splitlines() if line.strip()]
    return [{"messages": [{"role": "user", "content": user_message(p)}], "temperature": 0.8, "max_tokens": 64,
             "constraint": None, "n": 5} for p in prompts]


def judge_requests(folder: Path) -> list[dict]:
    """The embedded judge's requests in a scoring run of the sample's first candidate (English)."""
    from longreward_core.pipeline.score_files import score_files
    from longreward_core.reward.judge import JudgeConfig
    from longreward_core.reward.scorer import ScoringConfig

    first = (SAMPLE / "candidates.jsonl").read_text().splitlines()[0]
    candidates = folder / "candidates.jsonl"
    candidates.write_text(first + "\n")
    recorded: list[dict] = []
    answer = embedded.generate

    def recording(messages, temperature, max_tokens, constraint, n=1):
        recorded.append({"messages": copy.deepcopy(messages), "temperature": temperature, "max_tokens": max_tokens,
                         "constraint": copy.deepcopy(constraint), "n": n})
        return answer(messages, temperature, max_tokens, constraint, n)

    embedded.generate = recording
    try:
        score_files(SAMPLE / "prompts.jsonl", candidates, folder / "score", JudgeConfig(concurrency=1), ScoringConfig())
    finally:
        embedded.generate = answer
    return recorded


@contextlib.contextmanager
def measured(module: object, model: object):
    """Seconds per part of `module`, and the model's forwards and the tokens they ran."""
    seconds = dict.fromkeys(PARTS, 0.0)
    forwards = {"forwards": 0, "tokens": 0}
    originals = {name: getattr(module, name) for name in PARTS}

    def timed(name, function):
        def run(*args, **kwargs):
            started = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                seconds[name] += time.perf_counter() - started
        return run

    for name, function in originals.items():
        setattr(module, name, timed(name, function))
    forward = model.forward

    def counting(*args, **kwargs):
        forwards["forwards"] += 1
        forwards["tokens"] += int(kwargs["input_ids"].numel()) if kwargs.get("input_ids") is not None else 0
        return forward(*args, **kwargs)

    model.forward = counting
    try:
        yield seconds, forwards
    finally:
        del model.forward
        for name, function in originals.items():
            setattr(module, name, function)


def add(total: dict, seconds: dict, forwards: dict, phase: str, elapsed: float) -> None:
    total[phase] = total.get(phase, 0.0) + elapsed
    for part, value in seconds.items():
        total["parts_s"][part] = total["parts_s"].get(part, 0.0) + value
    for key, value in forwards.items():
        total[key] = total.get(key, 0) + value


def run_round(versions: dict, model: object, policy: list[dict], judge: list[dict], seed: int) -> dict:
    """Every request to every version, the versions taking turns request by request (the order
    rotates), each version from its own empty prefix cache."""
    names = list(versions)
    totals = {name: {"policy_s": 0.0, "judge_s": 0.0, "parts_s": {}, "answers": []} for name in names}
    for module in versions.values():
        module._prefixes = module._PrefixCache()
    requests = [("policy_s", r) for r in policy] + [("judge_s", r) for r in judge]
    for i, (phase, request) in enumerate(requests):
        shift = (i + seed) % len(names)
        for name in names[shift:] + names[:shift]:
            torch.manual_seed(seed * 1000 + i)
            with measured(versions[name], model) as (seconds, forwards):
                started = time.perf_counter()
                texts = versions[name].generate(**request)[0]
                elapsed = time.perf_counter() - started
            add(totals[name], seconds, forwards, phase, elapsed)
            if phase == "judge_s":
                totals[name]["answers"].append(texts[0])
    return totals


def prompt_lookup_from_a_cache(module: object, tokenizer: object, model: object, request: dict) -> dict:
    """Greedy tokens of generate with and without prompt lookup, both from a cache holding all but 8 prompt tokens."""
    from transformers import DynamicCache

    ids = module._prompt_ids(tokenizer, request["messages"])
    tokens = {}
    for name, options in (("plain", {}), ("prompt_lookup", {"prompt_lookup_num_tokens": 8, "max_matching_ngram_size": 3})):
        cache = DynamicCache()
        with torch.no_grad():
            model(input_ids=torch.tensor([ids[:-8]]), cache=cache, use_cache=True)
            inputs = torch.tensor([ids])
            out = model.generate(inputs, attention_mask=torch.ones_like(inputs), cache=cache, max_new_tokens=16,
                                 do_sample=False, eos_token_id=tokenizer.eos_token_id, **options)
        tokens[name] = out[0, len(ids):].tolist()
    return {**tokens, "equal": tokens["plain"] == tokens["prompt_lookup"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--versions", nargs="+", default=["3dda35a", "worktree"],
                        help="git revisions of models/embedded_llm.py ('worktree': this tree's file); the first is the baseline")
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--judge-requests", type=Path, help="the recorded judge requests: read if the file exists, else recorded into it")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "embedded.json")
    args = parser.parse_args()

    tokenizer, model = embedded._load()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        versions = {rev: load_version(rev, folder) for rev in args.versions}
        policy = policy_requests()
        if args.judge_requests and args.judge_requests.exists():
            judge = json.loads(args.judge_requests.read_text())
        else:
            judge = judge_requests(folder)
            embedded._prefixes = embedded._PrefixCache()  # the recording run's caches
            if args.judge_requests:
                args.judge_requests.write_text(json.dumps(judge, ensure_ascii=False))
        print(f"workload: {len(policy)} policy requests (n=5, 64 tokens), {len(judge)} judge requests", flush=True)
        baseline = args.versions[0]
        rounds = []
        for r in range(args.rounds):
            totals = run_round(versions, model, policy, judge, seed=r)
            base = totals[baseline]
            summary = {}
            for name, res in totals.items():
                seconds = {"policy": res["policy_s"], "judge": res["judge_s"], **res["parts_s"]}
                base_seconds = {"policy": base["policy_s"], "judge": base["judge_s"], **base["parts_s"]}
                ratios = {key: seconds[key] / base_seconds[key] for key in seconds if base_seconds.get(key)}
                same = sum(a == b for a, b in zip(base["answers"], res["answers"]))
                summary[name] = {**{k: v for k, v in res.items() if k != "answers"}, "ratios": ratios, "judge_answers_equal": same}
            rounds.append(summary)
            print(json.dumps({"round": r, **summary}, indent=1), flush=True)
        lookup = prompt_lookup_from_a_cache(versions[baseline], tokenizer, model, judge[0]) if judge else None
    result = {
        "date": date.today().isoformat(), "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
        "torch_threads": torch.get_num_threads(), "dtype": str(model.dtype), "versions": args.versions,
        "policy_requests": len(policy), "judge_requests": len(judge),
        "median_ratios": {name: {k: statistics.median(r[name]["ratios"][k] for r in rounds) for k in rounds[0][name]["ratios"]}
                          for name in args.versions[1:]},
        "prompt_lookup_from_a_cache": lookup, "rounds": rounds,
    }
    print(json.dumps({k: v for k, v in result.items() if k != "rounds"}, indent=1))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()

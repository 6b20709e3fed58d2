"""Judge bill benchmark: the full schedule, exact pair pruning and batch mode, side by side in one run.

P prompts x N candidates against the loopback judge (longreward_testing/judge_double.py, in this process). Each
document is a few thousand tokens of sentences; each candidate makes 4-12 statements, each one a
document sentence (supported) with a probability equal to the candidate's grounding, else an
altered sentence (a wrong year and sum: not supported). Grounding is drawn per candidate (mixed
quality), and the judge's helpfulness / logicality / completeness ratings follow it with noise, so
rewards vary as a document-grounded judge's would. Both runs score the same inputs against the
same judge, each with an empty call cache (the chunk index is shared: it costs no judge call).

Reported per mode: judge calls, support calls, prompt / cached / completion tokens, the cacheable
share (tokens of the configured tokenizer: the longest prefix each request shares with an earlier
one to the same model), the bill at list prices uncached and at cached prices (as litellm prices
the double's reported cached tokens), USD per published pair; and whether every mode published the
full run's pairs. Batch modes (the double's Batch API, answers priced at the model's batch prices)
also report their waves, online requests (0 expected), lines submitted twice; one runs under 20%
failed lines and an expired batch, one is killed (SIGKILL, in a process of its own) while a wave
waits and then run again.

    .venv/bin/python bench/bench_cost.py [--prompts 20] [--candidates 10] [--seed 11] [--prices gpt-4.1-mini]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import zlib
from datetime import date
from pathlib import Path

import litellm

from longreward_core.data.pairs import PairConfig
from longreward_core.data.records import CallAccounting
from longreward_core.models.batch import LEDGER_FILE, BatchLedger
from longreward_core.pipeline.score_files import pairs_files, score_files
from longreward_core.reward.judge import JudgeConfig
from longreward_core.reward.scorer import ScoringConfig
from longreward_testing.judge_double import JudgeDouble, JudgeServer, fault_mix, normal_text, slot

ROOT = Path(__file__).resolve().parents[1]

# The prices the double's answers are billed at: a model's entry in litellm's bundled price table
# (USD per token), its batch prices included where the table has them (`--prices`).
PRICE_KEYS = ("input_cost_per_token", "cache_read_input_token_cost", "output_cost_per_token",
              "input_cost_per_token_batches", "output_cost_per_token_batches", "cache_read_input_token_cost_batches")
PRICES: dict[str, float] = {}


def model_prices(model: str) -> dict[str, float]:
    entry = litellm.model_cost.get(model)
    if not entry or entry.get("input_cost_per_token_batches") is None:
        raise SystemExit(f"--prices {model}: litellm's price table has no batch prices for this model")
    return {k: entry[k] for k in PRICE_KEYS if entry.get(k) is not None}
PRICED_MODEL = "judge-double-bench"
# A real judge writes a short analysis before its verdict; the double's answers carry one of this length.
ANALYSIS = "Analysis: " + ("the response is weighed against the question and the material given; " * 6).strip()

WORDS = (
    "river station pump council budget flood culvert reservoir engineer valve pipe survey report "
    "winter summer repair contract tender inspection pressure capacity turbine motor cable road "
    "bridge village harbour archive library school museum market railway canal mill quarry"
).split()


def write_inputs(folder: Path, n_prompts: int, n_candidates: int, sentences: int, seed: int = 11):
    rng = random.Random(seed)
    prompts, candidates, grounding = [], [], {}
    for p in range(n_prompts):
        doc = []
        for i in range(sentences):
            w = rng.sample(WORDS, 4)
            doc.append(f"In {1900 + rng.randrange(120)} the {w[0]} near the {w[1]} was linked to the {w[2]} "
                       f"and the {w[3]}, costing {rng.randrange(10, 999)} thousand euros (item {p}.{i}).")
        prompts.append({"id": f"p{p:03d}", "context": " ".join(doc), "query": f"What happened to the {rng.choice(WORDS)}?"})
        for k in range(n_candidates):
            quality = rng.betavariate(2, 2)  # mixed quality: most in the middle, some very good or bad
            statements = []
            for s in rng.sample(doc, rng.randint(4, 12)):
                if rng.random() < quality:
                    statements.append(s)
                else:  # the same sentence with a wrong year and sum: not in the document
                    statements.append(s.replace("In 1", "In 2", 1).replace("costing ", "costing 1", 1))
            response = " ".join(statements)
            candidates.append({"prompt_id": f"p{p:03d}", "candidate_id": f"p{p:03d}-{k}", "response": response})
            grounding[normal_text(response)] = quality
    (folder / "prompts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in prompts))
    (folder / "candidates.jsonl").write_text("".join(json.dumps(r) + "\n" for r in candidates))
    return folder / "prompts.jsonl", folder / "candidates.jsonl", grounding


def scripted_judge(grounding: dict[str, float]) -> JudgeDouble:
    def rating(request) -> str:
        response = slot(request.content, "response")
        quality = grounding.get(normal_text(response), 0.5)
        noise = (zlib.crc32((request.task + response).encode()) % 5 - 2) / 2  # -1 .. +1, deterministic
        return f"{ANALYSIS}\nRating: [[{max(0, min(10, round(1 + 8 * quality + noise)))}]]"

    def support(request) -> str:
        statement, evidence = slot(request.content, "statement"), slot(request.content, "document_excerpts")
        verdict = "[[Fully supported]]" if normal_text(statement) in normal_text(evidence) else "[[No support]]"
        return f"{ANALYSIS}\n{verdict}"

    return JudgeDouble(answers={"helpfulness": rating, "logicality": rating, "completeness": rating, "support": support})


# (mode, prune, batch): the online runs, the batch runs, and the batch run under faults / killed mid-wave.
MODES = (
    ("full", False, False), ("pruned", True, False), ("batch", False, True), ("pruned_batch", True, True),
    ("pruned_batch_faults", True, True), ("pruned_batch_killed", True, True),
)
# The same run in a process of its own, killed (SIGKILL) while it waits for a wave.
KILLED_RUN = """
import sys
from longreward_core.data.pairs import PairConfig
from longreward_core.pipeline.score_files import score_files
from longreward_core.reward.judge import JudgeConfig
from longreward_core.reward.scorer import ScoringConfig
score_files(sys.argv[1], sys.argv[2], sys.argv[3], JudgeConfig.model_validate_json(sys.argv[4]), ScoringConfig(prune=True),
            cache_path=sys.argv[5], pair_config=PairConfig(min_candidates=int(sys.argv[6])))
"""


def kill_mid_wave(server: JudgeServer, prompts: Path, candidates: Path, work: Path, config: JudgeConfig, mode: str,
                  min_candidates: int) -> dict:
    """Start the run in a subprocess, kill -9 it once its second wave is submitted and waiting;
    the batch ids it left live (the rerun that follows must poll these, submitting none of their lines)."""
    api = server.double.batch_api
    api.delay_s = 3.0
    ledger = work / "out" / LEDGER_FILE
    settings = config.model_dump_json(exclude={"api_key"})
    env = {**os.environ, "LONGREWARD_JUDGE_API_KEY": "bench"}
    process = subprocess.Popen(
        [sys.executable, "-c", KILLED_RUN, str(prompts), str(candidates), str(work / "out"), settings,
         str(work / f"cache-{mode}.sqlite"), str(min_candidates)], env=env,
    )
    try:
        while process.poll() is None and BatchLedger(ledger).waves() < 2:
            time.sleep(0.1)
        time.sleep(0.5)
        process.send_signal(signal.SIGKILL)
    finally:
        process.wait()
    api.delay_s = 0.0
    live = [r.batch_id for r in BatchLedger(ledger).live()]
    return {"killed_with_live_batches": live, "lines_submitted_before_the_kill": len(api.submitted)}


def bill(total: CallAccounting) -> float:
    return total.prompt_tokens * PRICES["input_cost_per_token"] + total.completion_tokens * PRICES["output_cost_per_token"]


def batch_bill_stacked(total: CallAccounting) -> float:
    """The bill of batch answers if the batch discount also halved the cached-input price, as
    Anthropic's does (where litellm's table has no batch price for cached input, as for
    gpt-4.1-mini, it bills cached input in a batch at the online cached price)."""
    uncached = total.prompt_tokens - total.cached_tokens
    cached = PRICES.get("cache_read_input_token_cost_batches", PRICES["cache_read_input_token_cost"] / 2)
    return (uncached * PRICES["input_cost_per_token_batches"] + total.cached_tokens * cached
            + total.completion_tokens * PRICES["output_cost_per_token_batches"])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--prompts", type=int, default=20)
    parser.add_argument("--candidates", type=int, default=10)
    parser.add_argument("--sentences", type=int, default=160, help="sentences per document (~35 tokens each)")
    parser.add_argument("--min-candidates", type=int, default=PairConfig().min_candidates)
    parser.add_argument("--seed", type=int, default=11, help="draws the documents, candidates and their grounding")
    parser.add_argument("--prices", default="gpt-4.1-mini", help="the model of litellm's price table to bill at")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "cost.json")
    args = parser.parse_args()
    PRICES.update(model_prices(args.prices))
    litellm.register_model({PRICED_MODEL: {**PRICES, "litellm_provider": "openai", "mode": "chat", "max_tokens": 4096}})

    work = Path(tempfile.mkdtemp(prefix="longreward-cost-"))
    result: dict = {}
    try:
        prompts, candidates, grounding = write_inputs(work, args.prompts, args.candidates, args.sentences, args.seed)
        pair_config = PairConfig(min_candidates=args.min_candidates)
        modes = {}
        with JudgeServer(scripted_judge(grounding)) as server:
            judge = JudgeConfig(model=f"openai/{PRICED_MODEL}", api_base=server.api_base, api_key="bench", concurrency=16)
            api = server.double.batch_api
            for mode, prune, batch in MODES:
                server.double.reset()
                api.reset()
                api.line_fault, api.expire = (fault_mix(0.2, ["500"], seed=5), {1}) if mode == "pruned_batch_faults" else (None, set())
                server.double._prompts.clear()  # each mode meets a cold provider cache
                (work / "out" / LEDGER_FILE).unlink(missing_ok=True)
                config = judge.model_copy(update={"batch": batch, "batch_poll_s": 0.05})
                scoring = ScoringConfig(prune=prune)
                t0 = time.perf_counter()
                killed = kill_mid_wave(server, prompts, candidates, work, config, mode, args.min_candidates) if mode == "pruned_batch_killed" else None
                run = score_files(prompts, candidates, work / "out", config, scoring,
                                  cache_path=work / f"cache-{mode}.sqlite", pair_config=pair_config)
                wall = time.perf_counter() - t0
                pairs = pairs_files(run.scores_path, prompts, candidates, work / f"pairs-{mode}.parquet", pair_config)
                s, total = run.summary, run.summary.judge.total
                modes[mode] = {
                    "judge_calls": total.calls,
                    "online_chat_requests": server.double.count(),
                    "batch_lines_answered": api.count(),
                    "support_calls": server.double.count("support") + api.count("support"),
                    "judge_calls_per_prompt": total.calls / args.prompts,
                    "prompt_tokens": total.prompt_tokens,
                    "provider_cached_tokens": total.cached_tokens,
                    "completion_tokens": total.completion_tokens,
                    "cacheable_share": round(total.cacheable_share, 4),
                    "cacheable_share_per_dimension": {
                        d: round(v.cacheable_share, 4) for d, v in s.judge.per_purpose.items() if v.cacheable_share is not None
                    },
                    "usd_uncached": round(bill(total), 6),
                    "usd_at_cached_prices": round(total.cost_usd, 6),
                    "pairs": len(pairs.pairs),
                    "prompts_without_pair": dict(pairs.skipped),
                    "scored": s.scored, "pruned": s.pruned, "failed": s.failed,
                    "support_checks_saved": s.support_checks_saved,
                    "wall_seconds": round(wall, 2),
                    "_pairs": sorted((p.prompt_id, p.chosen_id, p.rejected_id, p.chosen_reward, p.rejected_reward) for p in pairs.pairs),
                }
                if batch:
                    modes[mode].update(
                        usd_if_the_batch_discount_stacked_with_caching=round(batch_bill_stacked(total), 6),
                        waves=s.batch.waves, batches=len(s.batch.batch_ids), batch_pricing=s.batch.pricing,
                        lines_submitted=len(api.submitted), lines_submitted_twice=len(api.submitted) - len(set(api.submitted)),
                        failed_lines=total.batch_failed_lines,
                        expired_batches=sum(b["status"] == "expired" for b in api.batches.values()),
                    )
                if killed is not None:
                    modes[mode].update(killed)
        full, pruned = modes["full"], modes["pruned"]
        reference = (full["_pairs"], full["prompts_without_pair"])
        identical = {mode: (m.pop("_pairs"), m["prompts_without_pair"]) == reference for mode, m in modes.items()}
        same = identical["pruned"]
        for m in modes.values():
            m["usd_per_pair_uncached"] = round(m["usd_uncached"] / m["pairs"], 6) if m["pairs"] else None
            m["usd_per_pair_at_cached_prices"] = round(m["usd_at_cached_prices"] / m["pairs"], 6) if m["pairs"] else None
        pruned_batch = modes["pruned_batch"]
        result = {
            "date": date.today().isoformat(),
            "machine": f"{platform.machine()}, {platform.processor() or 'cpu'}, python {platform.python_version()}",
            "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
            "prices_usd_per_million_tokens": {k: round(v * 1e6, 4) for k, v in PRICES.items()},
            **modes,
            "pairs_identical": same,
            "pairs_identical_to_the_full_run": identical,
            "support_calls_saved_share": round(1 - pruned["support_calls"] / full["support_calls"], 4),
            "pruned_cached_bill_over_full_uncached_bill": round(pruned["usd_at_cached_prices"] / full["usd_uncached"], 4),
            "pruned_batch_bill_over_full_uncached_bill": round(pruned_batch["usd_at_cached_prices"] / full["usd_uncached"], 4),
            "pruned_batch_bill_over_full_uncached_bill_if_the_discount_stacked": round(
                pruned_batch["usd_if_the_batch_discount_stacked_with_caching"] / full["usd_uncached"], 4
            ),
            "targets": {
                "pairs identical in 100% of prompts": same,
                ">= 25% fewer support calls": 1 - pruned["support_calls"] / full["support_calls"] >= 0.25,
                ">= 60% cacheable share (pruned run)": pruned["cacheable_share"] >= 0.60,
                "bill at cached prices <= 0.5x the full uncached bill": pruned["usd_at_cached_prices"] <= 0.5 * full["usd_uncached"],
                "batch modes: pairs identical to the full run": all(identical.values()),
                "pruned batch bill <= 0.25x the full uncached bill": pruned_batch["usd_at_cached_prices"] <= 0.25 * full["usd_uncached"],
                "batch modes: 0 online chat requests": all(m["online_chat_requests"] == 0 for k, m in modes.items() if "batch" in k),
                "kill -9 mid-wave: 0 lines submitted twice": modes["pruned_batch_killed"]["lines_submitted_twice"] == 0,
                "20% failed lines + an expired batch: every candidate scored or pruned": (
                    modes["pruned_batch_faults"]["failed"] == 0 and identical["pruned_batch_faults"]
                ),
            },
        }
    finally:
        shutil.rmtree(work, ignore_errors=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()

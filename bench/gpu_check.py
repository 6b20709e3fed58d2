"""The GPU check: long-context DPO with the LongReward loss beside plain TRL, and LongBench generation.

Run by `bench/gpu_check.sh` on a machine that reaches no network; nothing is downloaded:

1. a model of SmolLM2's architecture scaled to ~1B parameters (SmolLM2-1.7B's width, 14 of its
   24 layers; the embedded 49,152-token vocabulary and tokenizer), random weights, bf16;
2. `longreward eval longbench --backend transformers` with that model on the test suite's small
   LongBench-format data (`longreward_testing/longbench_fixtures.py`): the GPU generation path;
3. for pairs of 1k, 4k, 8k and 16k tokens: DPO with the LongReward loss through the real launch
   (`launch_training`, `infra/accelerate/zero3-single-node.yaml`, 1 process: DeepSpeed ZeRO-3,
   gradient checkpointing, bf16), then the same DPOConfig on TRL's own `DPOTrainer` in a plain
   `python` process (no launcher, no length check, no pair log), side by side: tokens per
   second, peak GPU memory, and the longest pair that fits.

Results go to `OUT/gpu-check.json`, rewritten after every step, so a run stopped at its time
limit keeps what it finished. `--dry-run` runs the same steps on the CPU with a tiny model, short
pairs, ZeRO-3 on CPU (`zero3-cpu`) and 20 optimiser steps in all.

    bench/gpu_check.sh [--dry-run]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]  # gpu_check.sh puts it on PYTHONPATH (the package is not installed there)

# SmolLM2-1.7B's width (hidden 2048, MLP 8192, 32 heads, no grouped KV, rope theta 130000), 14 layers: ~1.04B parameters.
GPU = dict(
    model=dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=14, num_attention_heads=32,
               num_key_value_heads=32),
    lengths=[1024, 4096, 8192, 16384], steps=3, accelerate="zero3-single-node", eval_limit=None,
)
DRY_RUN = dict(
    model=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4),
    lengths=[64, 128, 256, 512], steps=2, accelerate="zero3-cpu", eval_limit=1,
)
STEP_BUDGET = 20  # optimiser steps of the dry run, all runs together
EVAL_DATA = {"hotpotqa": 3, "trec": 3, "passage_count": 3}


def build_model(path: Path, size: dict[str, Any], context: int) -> int:
    """Save a randomly initialised SmolLM2-architecture model with the embedded tokenizer; return its parameter count."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from longreward_core.models.tokenizers import load_tokenizer

    tokenizer = load_tokenizer(None)
    config = LlamaConfig(vocab_size=len(tokenizer), max_position_embeddings=context, rope_theta=130_000.0,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=True, **size["model"])
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(torch.bfloat16 if torch.cuda.is_available() else torch.float32)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return sum(p.numel() for p in model.parameters())


def write_pairs(path: Path, model: Path, length: int, count: int) -> Path:
    """`count` conversational pairs of about `length` tokens (prompt + the longer response)."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model)
    words = "river station pump valve reservoir report council engineer budget repair".split()
    text_ids = tokenizer(" ".join(words[i % len(words)] for i in range(length)))["input_ids"]
    response = max(8, min(512, length // 8))
    prompt = tokenizer.decode(text_ids[: length - response - 32])  # the chat template adds ~30 tokens
    rows = [{
        "prompt": [{"role": "user", "content": f"{i} {prompt}\nQuestion: what was repaired?"}],
        "chosen": [{"role": "assistant", "content": tokenizer.decode(text_ids[:response])}],
        "rejected": [{"role": "assistant", "content": tokenizer.decode(text_ids[response: 2 * response])}],
    } for i in range(count)]
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def train_config(pairs: Path, out: Path, model: Path, steps: int, deepspeed: Path | None = None) -> Any:
    from longreward_core.training.config import TrainConfig

    overrides: dict[str, Any] = {"save_strategy": "no"}  # a ZeRO-3 checkpoint of a 1B model is ~14 GB
    if deepspeed is not None:
        overrides["deepspeed"] = str(deepspeed)
    return TrainConfig(pairs=pairs, output_dir=out, base_model=str(model), max_steps=steps, effective_batch_size=1,
                       learning_rate=1e-6, dpo_overrides=overrides)


def run_longreward(pairs: Path, model: Path, steps: int, work: Path, accelerate: str) -> dict[str, Any]:
    """DPO with the LongReward loss through the launch the project uses."""
    from longreward_core.training.launch import TrainingFailed, launch_training

    out = work / "longreward"
    lines: list[str] = []
    started = time.perf_counter()
    try:
        manifest = launch_training(train_config(pairs, out, model, steps), accelerate, 1, on_line=lines.append)
    except TrainingFailed as err:
        return failure(lines, str(err))
    finally:
        shutil.rmtree(out, ignore_errors=True)
    return {
        "fits": True,
        "longest_pair_tokens": manifest.lengths["longest"],
        "tokens_per_second": manifest.tokens_per_second,
        "peak_gpu_memory_gib": gib(manifest.peak_gpu_memory_bytes),
        "steps": manifest.steps,
        "deepspeed_stage": manifest.deepspeed_stage,
        "wall_seconds": round(time.perf_counter() - started, 1),
    }


def run_plain_trl(pairs: Path, model: Path, steps: int, work: Path, deepspeed: Path) -> dict[str, Any]:
    """The same DPOConfig on TRL's DPOTrainer in a plain `python` process (see `plain_trl`)."""
    spec = work / "plain-trl.json"
    spec.write_text(json.dumps({"pairs": str(pairs), "out": str(work / "plain-trl"), "model": str(model),
                                "steps": steps, "deepspeed": str(deepspeed)}))
    with socket.socket() as probe:  # a free port for the one-process group DeepSpeed sets up
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {**os.environ, "RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1",
           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "TQDM_DISABLE": "1"}
    started = time.perf_counter()
    done = subprocess.run([sys.executable, __file__, "--plain-trl", str(spec)], capture_output=True, text=True, env=env)
    shutil.rmtree(work / "plain-trl", ignore_errors=True)
    lines = (done.stdout + done.stderr).splitlines()
    if done.returncode != 0:
        return failure(lines, f"exited with code {done.returncode}")
    result = json.loads(next(line for line in reversed(lines) if line.startswith("{")))
    return {"fits": True, **result, "wall_seconds": round(time.perf_counter() - started, 1)}


def plain_trl(spec: dict[str, Any]) -> dict[str, Any]:
    """Inside the plain process: TRL's DPOTrainer, our DPOConfig, nothing else of ours."""
    import pyarrow.parquet as pq
    import torch
    from datasets import Dataset
    from transformers import AutoTokenizer
    from trl import DPOTrainer

    from longreward_core.training.data import measure_lengths, plan_lengths
    from longreward_core.training.trainer import dpo_config

    dataset = Dataset(pq.read_table(spec["pairs"]))
    tokenizer = AutoTokenizer.from_pretrained(spec["model"])
    config = train_config(Path(spec["pairs"]), Path(spec["out"]), Path(spec["model"]), spec["steps"], Path(spec["deepspeed"]))
    longest = plan_lengths(measure_lengths(dataset, tokenizer), None, None).longest
    configured_state = not torch.cuda.is_available()
    if configured_state:
        from accelerate import PartialState

        # As the project's trainer does: accelerate names no process-group backend for DeepSpeed without a GPU.
        os.environ["ACCELERATE_USE_DEEPSPEED"] = "true"
        PartialState(backend="gloo")
    args = dpo_config(config, longest, configured_state=configured_state)
    trainer = DPOTrainer(model=spec["model"], args=args, train_dataset=dataset, processing_class=tokenizer)
    metrics = trainer.train().metrics
    tokens = next(log["num_tokens"] for log in reversed(trainer.state.log_history) if "num_tokens" in log)
    return {
        "longest_pair_tokens": longest,
        "tokens_per_second": round(tokens / metrics["train_runtime"], 1),
        "peak_gpu_memory_gib": gib(torch.cuda.max_memory_allocated()) if torch.cuda.is_available() else None,
        "steps": trainer.state.global_step,
        "deepspeed_stage": trainer.accelerator.state.deepspeed_plugin.zero_stage if trainer.is_deepspeed_enabled else None,
    }


def run_eval(model: Path, work: Path, limit: int | None) -> dict[str, Any]:
    """`longreward eval longbench --backend transformers` on the test suite's LongBench-format data."""
    from longreward_testing.longbench_fixtures import write_longbench

    data = write_longbench(work / "longbench", EVAL_DATA)
    out = work / "eval"
    command = [sys.executable, "-c", "from flows.cli import app; app()", "eval", "longbench", "--model", str(model),
               "--backend", "transformers", "--name", "gpu-check", "--data", str(data), "--out", str(out),
               "--datasets", ",".join(EVAL_DATA), *(["--limit", str(limit)] if limit else [])]
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True)
    result = {"command": "longreward " + " ".join(command[3:]).replace(str(work), "WORK"), "exit_code": done.returncode,
              "wall_seconds": round(time.perf_counter() - started, 1)}
    if done.returncode != 0:
        return {**result, "last_lines": (done.stdout + done.stderr).splitlines()[-15:]}
    answers = {path.stem: len(path.read_text().splitlines()) for path in (out / "gpu-check").glob("*.jsonl")}
    scores = json.loads((out / "gpu-check" / "result.json").read_text())
    return {**result, "answers": answers, "scores": scores}  # random weights: the scores only show the path ran


def failure(lines: list[str], reason: str) -> dict[str, Any]:
    oom = any("out of memory" in line.lower() for line in lines)
    errors = [line for line in lines if "Error" in line and "ChildFailedError" not in line]
    return {"fits": False, "reason": "out of memory" if oom else (errors[-1] if errors else reason)[-400:]}


def gib(value: int | None) -> float | None:
    return round(value / 2**30, 2) if value else None


def machine() -> str:
    import torch

    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name(0)}, {os.cpu_count()} CPU cores"
    return f"{platform.machine()} CPU, {os.cpu_count()} cores, no GPU"


def check(out: Path, dry_run: bool, budget_s: float) -> dict[str, Any]:
    import deepspeed
    import torch
    import transformers
    import trl

    if not dry_run and not torch.cuda.is_available():
        raise SystemExit("gpu_check: no GPU is visible; on a CPU run `bench/gpu_check.sh --dry-run`")
    size = DRY_RUN if dry_run else GPU
    started = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    target = out / "gpu-check.json"
    result: dict[str, Any] = {
        "date": date.today().isoformat(), "machine": machine(), "dry_run": dry_run,
        "command": " ".join(["bench/gpu_check.sh", *(["--dry-run"] if dry_run else [])]),
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__, "trl": trl.__version__,
                     "deepspeed": deepspeed.__version__},
        "setup": f"1 process, 1 pair per optimiser step, {size['steps']} steps per run, gradient checkpointing, "
                 f"{'fp32' if dry_run else 'bf16'}, DeepSpeed ZeRO-3 ({size['accelerate']}); the plain TRL run uses the "
                 "same DPOConfig and DeepSpeed file in a plain python process",
        "runs": [],
    }

    def save() -> None:
        result["seconds"] = round(time.perf_counter() - started, 1)
        target.write_text(json.dumps(result, indent=2) + "\n")

    work = Path(tempfile.mkdtemp(prefix="longreward-gpu-check-"))
    try:
        model = work / "model"
        result["model_parameters"] = build_model(model, size, max(size["lengths"]) + 1024)
        save()
        result["eval"] = run_eval(model, work, size["eval_limit"])
        save()
        deepspeed_file = ROOT / "infra" / "deepspeed" / "zero3.json"
        steps_left = STEP_BUDGET if dry_run else None
        fits = {"longreward": True, "plain_trl": True}
        for length in size["lengths"]:
            pairs = write_pairs(work / f"pairs-{length}.parquet", model, length, size["steps"])
            row: dict[str, Any] = {"length": length}
            for path, run in (("longreward", lambda: run_longreward(pairs, model, size["steps"], work, size["accelerate"])),
                              ("plain_trl", lambda: run_plain_trl(pairs, model, size["steps"], work, deepspeed_file))):
                elapsed = time.perf_counter() - started
                if not fits[path]:
                    row[path] = {"fits": False, "reason": "a shorter pair did not fit"}
                elif elapsed > budget_s or (steps_left is not None and steps_left < size["steps"]):
                    row[path] = {"skipped": f"budget spent ({elapsed:.0f} s of {budget_s:.0f} s, steps left {steps_left})"}
                else:
                    row[path] = run()
                    fits[path] = row[path]["fits"]
                    if steps_left is not None:
                        steps_left -= row[path].get("steps", size["steps"])
                print(json.dumps({"length": length, path: row[path]}), flush=True)
            result["runs"].append(row)
            save()
        for path in fits:
            fitting = [r["length"] for r in result["runs"] if r[path].get("fits")]
            result[f"longest_fitting_{path}"] = max(fitting) if fitting else None
        save()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dry-run", action="store_true", help="CPU, tiny sizes, 20 optimiser steps in all")
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT") or ROOT / "bench" / "results" / "gpu-check"))
    parser.add_argument("--budget-s", type=float, help="start no further run after this many seconds "
                        "(default: 420 on a GPU, within the 8 minutes; 1700 for the dry run on a CPU)")
    parser.add_argument("--plain-trl", type=Path, help=argparse.SUPPRESS)  # the plain TRL process's own entry
    args = parser.parse_args()
    if args.plain_trl:
        print(json.dumps(plain_trl(json.loads(args.plain_trl.read_text()))), flush=True)
        return
    budget_s = args.budget_s or (1700.0 if args.dry_run else 420.0)
    print(json.dumps(check(args.out, args.dry_run, budget_s), indent=2))


if __name__ == "__main__":
    main()

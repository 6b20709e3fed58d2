"""Long-context DPO on one GPU: throughput, peak memory, and the longest pair that fits.

A Llama-architecture model of ~0.5B parameters is built from a config (no download) and
trained through the real launch path (`accelerate launch`, DeepSpeed ZeRO-3, gradient
checkpointing, bf16) on synthetic pairs of a fixed length: a prompt of L - 512 tokens and two
512-token responses. For each L (16k up), a few optimiser steps run; a run that fails (out of
memory) marks the limit. Tokens per second and peak GPU memory come from each run's manifest.

    .venv/bin/python bench/bench_train.py                  # GPU: 16k, 24k, 32k, 48k, 64k, 96k, 128k
    .venv/bin/python bench/bench_train.py --smoke          # CPU: a tiny model, short pairs (checks the script)
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

RESPONSE_TOKENS = 512


def build_model(path: Path, smoke: bool, context: int) -> int:
    """Save a from-scratch Llama (with the embedded tokenizer) to `path`; return its parameter count."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from longreward_core.models.tokenizers import load_tokenizer

    tokenizer = load_tokenizer(None)
    size = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2) \
        if smoke else dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                           num_key_value_heads=8)
    config = LlamaConfig(vocab_size=len(tokenizer), max_position_embeddings=context, rope_theta=1_000_000.0,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=True, **size)
    model = LlamaForCausalLM(config).to(torch.bfloat16 if not smoke else torch.float32)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return sum(p.numel() for p in model.parameters())


def write_pairs(path: Path, length: int, count: int) -> Path:
    """`count` pairs whose longer side is about `length` tokens (a word is ~1 token here)."""
    import polars as pl

    words = "river station pump valve reservoir report council engineer budget repair".split()
    prompt = " ".join(words[i % len(words)] for i in range(length - RESPONSE_TOKENS - 64))
    rows = [{
        "prompt": [{"role": "user", "content": f"{i} {prompt}\nQuestion: what was repaired?"}],
        "chosen": [{"role": "assistant", "content": " ".join(["the pump"] * (RESPONSE_TOKENS // 2))}],
        "rejected": [{"role": "assistant", "content": " ".join(["the valve"] * (RESPONSE_TOKENS // 2))}],
    } for i in range(count)]
    pl.DataFrame(rows).write_parquet(path)
    return path


def run_length(model: Path, length: int, steps: int, work: Path, smoke: bool) -> dict:
    from longreward_core.training.config import TrainConfig
    from longreward_core.training.launch import TrainingFailed, launch_training

    out = work / f"run-{length}"
    pairs = write_pairs(work / f"pairs-{length}.parquet", length, steps)
    config = TrainConfig(pairs=pairs, output_dir=out, base_model=str(model), max_steps=steps, effective_batch_size=1,
                         save_steps=10_000, learning_rate=1e-6)
    started = time.perf_counter()
    lines: list[str] = []
    try:
        manifest = launch_training(config, "cpu" if smoke else "zero3-single-node", 1, on_line=lines.append)
    except TrainingFailed as err:
        oom = any("out of memory" in line.lower() for line in lines)
        errors = [line for line in lines if "Error" in line and "CalledProcessError" not in line]
        return {"length": length, "fits": False,
                "reason": "out of memory" if oom else (errors[-1] if errors else str(err))[-400:]}
    finally:
        shutil.rmtree(out / "checkpoints", ignore_errors=True)
    return {
        "length": length,
        "fits": True,
        "longest_pair_tokens": manifest.lengths["longest"],
        "tokens_per_second": manifest.tokens_per_second,
        "peak_gpu_memory_gib": round(manifest.peak_gpu_memory_bytes / 2**30, 2) if manifest.peak_gpu_memory_bytes else None,
        "steps": manifest.steps,
        "wall_seconds": round(time.perf_counter() - started, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="tiny model, short pairs, CPU")
    parser.add_argument("--lengths", type=int, nargs="*", help="pair lengths in tokens")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "train-gpu.json")
    args = parser.parse_args()
    lengths = args.lengths or ([1024, 2048] if args.smoke else [16_384, 24_576, 32_768, 49_152, 65_536, 98_304, 131_072])

    import torch

    work = Path(tempfile.mkdtemp(prefix="longreward-train-bench-"))
    parameters = build_model(work / "model", args.smoke, max(lengths) + 1024)
    runs = []
    for length in lengths:
        runs.append(run_length(work / "model", length, args.steps, work, args.smoke))
        print(json.dumps(runs[-1]), flush=True)
        if not runs[-1]["fits"]:
            break  # longer pairs will not fit either
    fitting = [r["length"] for r in runs if r["fits"]]
    result = {
        "date": date.today().isoformat(),
        "machine": torch.cuda.get_device_name(0) if torch.cuda.is_available() else platform.processor() or platform.machine(),
        "command": " ".join(["bench/bench_train.py", *sys.argv[1:]]),
        "model_parameters": parameters,
        "setup": "accelerate launch, DeepSpeed ZeRO-3, gradient checkpointing, bf16, 1 process, 1 pair per step"
        if not args.smoke else "CPU, fp32, 1 process",
        "runs": runs,
        "longest_fitting_length": max(fitting) if fitting else None,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()

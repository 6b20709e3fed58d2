"""Several training processes on the CPU, through `longreward train` as a user runs it: two gloo
ranks (one of them killed and the run resumed), and DeepSpeed ZeRO-3 on two CPU ranks.

The embedded SmolLM2-135M trains on short pairs (about 50 tokens): every launch loads it twice
per rank (policy and reference) and writes ~1.6 GB per checkpoint, so the launches are few and
each check reads their output files. On 2 shared cores a launch takes minutes: the tests that
launch have a longer time limit than the suite's.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from longreward_core.training.config import TrainConfig
from longreward_core.training.recording import read_rank_logs, rank_log
from longreward_core.training.trainer import read_metrics, train
from tests.test_training import pair_row, save_tiny_llama, write_pairs

LONGREWARD = str(Path(sys.executable).parent / "longreward")
PAIRS = 16
BATCH = dict(effective_batch_size=4, per_device_batch_size=2)  # 4 pairs per step: 2 accumulated, or 2 ranks x 2


def train_command(pairs: Path, out: Path, *options: str) -> list[str]:
    return [LONGREWARD, "train", "--pairs", str(pairs), "--out", str(out), "--effective-batch-size", "4",
            "--per-device-batch-size", "2", "--learning-rate", "1e-3", *options]


def run(command: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(command, capture_output=True, text=True, timeout=600)


def wait_for_step(out: Path, rank: int, step: int, process: subprocess.Popen) -> None:
    """Until process `rank` has started optimiser step `step` (its pair log says so)."""
    log = rank_log(out, rank)
    deadline = time.monotonic() + 900
    while time.monotonic() < deadline and process.poll() is None:
        if log.exists() and any(json.loads(line)["step"] >= step for line in log.read_text().splitlines()):
            return
        time.sleep(0.1)
    raise AssertionError(f"rank {rank} never reached step {step}; exit code {process.poll()}")


def steps_of(logs: list[dict]) -> dict[int, list[int]]:
    """step -> the pairs one process trained on in that optimiser step."""
    by_step: dict[int, list[int]] = {}
    for line in logs:
        by_step.setdefault(line["step"], []).extend(line["pairs"])
    return by_step


@pytest.fixture(scope="module")
def pairs_file(tmp_path_factory):
    return write_pairs(tmp_path_factory.mktemp("pairs") / "pairs.parquet", [pair_row(i) for i in range(PAIRS)])


@pytest.fixture(scope="module")
def one_process(pairs_file, tmp_path_factory):
    """The first step of a one-process run on the same pairs (2 pairs per pass, 2 passes per step)."""
    out = tmp_path_factory.mktemp("one-process")
    manifest = train(TrainConfig(pairs=pairs_file, output_dir=out, max_steps=1, learning_rate=1e-3,
                                 dpo_overrides={"save_strategy": "no"}, **BATCH))
    return manifest, out


@pytest.fixture(scope="module")
def two_ranks(pairs_file, tmp_path_factory):
    """`longreward train --num-processes 2` (cpu config): rank 1 is killed with SIGKILL during step 3,
    after checkpoint-2; the same command is then run again."""
    out = tmp_path_factory.mktemp("two-ranks") / "run"
    command = train_command(pairs_file, out, "--max-steps", "4", "--save-steps", "2", "--accelerate-config", "cpu",
                            "--num-processes", "2")
    with (out.parent / "first.log").open("w") as log:
        first = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, text=True)
        try:
            wait_for_step(out, 0, 3, first)  # rank 0 starts step 3 once checkpoint-2 is written
            killed_pid = json.loads(rank_log(out, 1).read_text().splitlines()[-1])["pid"]
            os.kill(killed_pid, signal.SIGKILL)
            first.wait(timeout=120)
        finally:
            if first.poll() is None:
                first.kill()
    again = run(command)
    return out, first.returncode, (out.parent / "first.log").read_text(), killed_pid, again


@pytest.mark.timeout(1800)
def test_two_cpu_ranks_split_the_pairs_and_resume_after_a_killed_rank(two_ranks, one_process):
    out, first_code, first_output, killed_pid, again = two_ranks
    assert first_code != 0 and "training exited with code" in first_output  # the lost rank fails the run
    assert again.returncode == 0, again.stdout + again.stderr
    manifest = json.loads((out / "manifest.json").read_text())
    assert (manifest["num_processes"], manifest["world_size"], manifest["deepspeed_stage"]) == (2, 2, None)
    assert manifest["steps"] == 4 and manifest["resumed_from"].endswith("checkpoint-2")

    logs = read_rank_logs(out)
    assert sorted(logs) == [0, 1] and all(line["world_size"] == 2 for lines in logs.values() for line in lines)
    ranks = {rank: steps_of(lines) for rank, lines in logs.items()}
    assert sorted(ranks[0]) == sorted(ranks[1]) == [1, 2, 3, 4]
    seen = [set(ranks[0][step]) for step in ranks[0]], [set(ranks[1][step]) for step in ranks[1]]
    assert set().union(*seen[0]).isdisjoint(set().union(*seen[1]))  # one epoch: each pair on one rank only
    assert set().union(*seen[0], *seen[1]) == set(range(PAIRS))
    # Steps 3 and 4 were trained again by new processes; the killed one's lines stop at step 3.
    assert all(line["pid"] != killed_pid for line in logs[1] if line["step"] >= 3)

    # Pairs per optimiser step: the one-process run's 4 (2 passes of 2), here 2 ranks x 2.
    single_manifest, single_out = one_process
    single = steps_of(read_rank_logs(single_out)[0])
    assert single_manifest.world_size == single_manifest.num_processes == 1
    for step in range(1, 5):
        assert len(ranks[0][step]) + len(ranks[1][step]) == len(single[1]) == 4
    assert set(ranks[0][1]) | set(ranks[1][1]) == set(single[1])  # the same first pairs, split over the ranks
    losses = read_metrics(out)
    assert [log["step"] for log in losses] == [1, 2, 3, 4]  # logged once, by rank 0
    assert losses[0]["loss"] == pytest.approx(read_metrics(single_out)[0]["loss"], abs=1e-4)

    # Checkpoints are written by rank 0 alone: one model and optimizer each, a random state per rank.
    checkpoints = sorted((out / "checkpoints").glob("checkpoint-*"))
    assert [c.name for c in checkpoints] == ["checkpoint-2", "checkpoint-4"]
    for checkpoint in checkpoints:
        names = sorted(p.name for p in checkpoint.iterdir())
        assert [n for n in names if n.startswith(("model", "optimizer", "rng_state"))] == [
            "model.safetensors", "optimizer.pt", "rng_state_0.pth", "rng_state_1.pth"]


@pytest.mark.timeout(1800)
def test_zero3_on_two_cpu_ranks_trains_resumes_and_saves_a_loadable_model(pairs_file, two_ranks, tmp_path):
    out = tmp_path / "zero3"
    options = ("--accelerate-config", "zero3-cpu", "--num-processes", "2", "--save-steps", "2")
    first = run(train_command(pairs_file, out, "--max-steps", "2", *options))
    assert first.returncode == 0, first.stdout + first.stderr
    shards = sorted(p.name for p in (out / "checkpoints" / "checkpoint-2" / "global_step2").iterdir())
    assert shards == [f"zero_pp_rank_{r}_mp_rank_00_{kind}_states.pt" for r in (0, 1) for kind in ("model", "optim")]

    more = run(train_command(pairs_file, out, "--max-steps", "3", *options))
    assert more.returncode == 0, more.stdout + more.stderr
    manifest = json.loads((out / "manifest.json").read_text())
    assert (manifest["num_processes"], manifest["world_size"], manifest["deepspeed_stage"]) == (2, 2, 3)
    assert manifest["steps"] == 3 and manifest["resumed_from"].endswith("checkpoint-2")

    # The same pairs and first update as the plain two-rank run: the same losses.
    zero3, plain = read_metrics(out), read_metrics(two_ranks[0])
    assert [log["step"] for log in zero3] == [1, 2, 3]
    for step in (0, 1):
        assert zero3[step]["loss"] == pytest.approx(plain[step]["loss"], abs=1e-3)

    trained = AutoModelForCausalLM.from_pretrained(manifest["model_dir"])
    base = AutoModelForCausalLM.from_pretrained(manifest["base_model"])
    trained_weights = trained.state_dict()
    assert trained_weights.keys() == base.state_dict().keys()
    assert any(not torch.equal(value, trained_weights[name]) for name, value in base.state_dict().items())


@pytest.mark.timeout(900)
def test_a_process_count_the_launch_cannot_honour_stops_the_run(tmp_path):
    pairs = write_pairs(tmp_path / "pairs.parquet", [pair_row(i) for i in range(4)])
    model = save_tiny_llama(tmp_path / "policy", seed=0)
    single = tmp_path / "single.yaml"
    single.write_text("compute_environment: LOCAL_MACHINE\ndistributed_type: 'NO'\nnum_processes: 1\nuse_cpu: false\n")
    refused = run(train_command(pairs, tmp_path / "refused", "--base-model", str(model), "--max-steps", "1",
                                "--accelerate-config", str(single), "--num-processes", "2"))
    assert refused.returncode == 2 and "distributed_type NO starts one process, not 2" in refused.stdout

    # A config that names several CPU processes but that accelerate starts as one: the process stops.
    mpi_only = tmp_path / "multi-cpu.yaml"
    mpi_only.write_text("compute_environment: LOCAL_MACHINE\ndistributed_type: MULTI_CPU\nnum_processes: 2\n"
                        "num_machines: 1\nuse_cpu: false\nmixed_precision: 'no'\n")
    alone = run(train_command(pairs, tmp_path / "alone", "--base-model", str(model), "--max-steps", "1",
                              "--accelerate-config", str(mpi_only)))
    assert alone.returncode == 2, alone.stdout + alone.stderr
    assert "2 training processes were asked for, but they do not train together (each sees a world of 1)" in alone.stdout
    assert not (tmp_path / "alone" / "manifest.json").exists()

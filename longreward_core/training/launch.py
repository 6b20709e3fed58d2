"""Start DPO training under `accelerate launch` (or `torchrun`) and stream its output line by line.

The data are checked once, here or by the caller (schema, quarantine, lengths), so that a run that
would drop or truncate pairs is refused before any GPU process starts. The launched processes run
`python -m longreward_core.training.trainer OUTPUT/train_config.json`, read the length report and
quarantine written by that check instead of tokenising the pairs again, and resume from the newest
checkpoint in the output folder, so launching the same config again continues a stopped run.

Several CPU processes (the `cpu` config with `--num-processes N`) start under `torchrun`, which
accelerate's own launcher uses for GPUs and DeepSpeed: for CPUs it starts one process and leaves
the others to mpirun. Each process checks that it trains with all the others, so a process count
that the launch did not honour stops the run instead of training with fewer.
"""

from __future__ import annotations

import collections
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, Field

from longreward_core.data.io import atomic_write_bytes
from longreward_core.data.records import TrainingManifest
from longreward_core.training.config import MANIFEST, NUM_PROCESSES_ENV, RUN_CONFIG, TrainConfig
from longreward_core.training.data import LengthReport
from longreward_core.training.trainer import prepare_run

ACCELERATE_CONFIGS = ("cpu", "zero3-cpu", "zero3-single-node", "zero3-multi-node")


class LaunchConfig(BaseModel):
    """How training processes are started: the accelerate config and how many processes."""

    accelerate_config: str = Field(
        "auto",
        description="auto (ZeRO-3 on this machine's GPUs, else CPU), cpu, zero3-cpu (ZeRO-3 on CPU processes), "
        "zero3-single-node, zero3-multi-node, or a file.",
    )
    num_processes: int | None = Field(None, ge=1, description="Processes in all (default: every visible GPU).")


class TrainingFailed(RuntimeError):
    """The launched training exited with an error; the message ends with its last output lines."""


def infra_dir() -> Path:
    """The project's infra/ folder: beside the package in a checkout or editable install, else in the
    working directory (a worker image installs the package and runs flows from the project root)."""
    for root in (Path(__file__).resolve().parents[2], Path.cwd()):
        if (root / "infra" / "accelerate").is_dir():
            return root / "infra"
    raise FileNotFoundError("infra/accelerate not found beside the package or in the working directory; run from the project root")


def accelerate_config_path(name: str) -> Path:
    """A named config from infra/accelerate ("auto": ZeRO-3 on this machine's GPUs, else CPU), or a path."""
    if name == "auto":
        import torch

        name = "zero3-single-node" if torch.cuda.is_available() else "cpu"
    if name in ACCELERATE_CONFIGS:
        return infra_dir() / "accelerate" / f"{name}.yaml"
    path = Path(name)
    if not path.is_file():
        raise FileNotFoundError(
            f"accelerate config {name!r}: neither one of {', '.join(('auto', *ACCELERATE_CONFIGS))} nor a file"
        )
    return path


def resolved_accelerate_config(name: str, num_processes: int | None, out: Path) -> Path:
    """The chosen accelerate config written into the run folder, with absolute DeepSpeed paths
    and the process count (given, or every visible GPU for a single-node ZeRO-3 run on GPUs).

    Raises ValueError when the config cannot start that many processes as one run."""
    source = accelerate_config_path(name)
    config = yaml.safe_load(source.read_text())
    deepspeed = config.get("deepspeed_config") or {}
    ds_file = deepspeed.get("deepspeed_config_file")
    if ds_file and not Path(ds_file).is_absolute():
        deepspeed["deepspeed_config_file"] = str(infra_dir().parent / ds_file)
    if num_processes is None and config.get("distributed_type") == "DEEPSPEED" and config.get("num_machines", 1) == 1:
        import torch

        num_processes = torch.cuda.device_count() or None
    if num_processes is not None:
        config["num_processes"] = num_processes
    processes = config.get("num_processes", 1)
    if processes > 1 and config.get("distributed_type", "NO") == "NO" and not config.get("use_cpu"):
        raise ValueError(
            f"accelerate config {source}: distributed_type NO starts one process, not {processes}; "
            "choose a distributed config (zero3-single-node, or cpu for CPU processes)"
        )
    if processes > 1 and config.get("use_cpu") and config.get("num_machines", 1) > 1:
        raise ValueError(f"accelerate config {source}: CPU processes start on one machine only (num_machines is "
                         f"{config['num_machines']})")
    target = out / "accelerate.yaml"
    atomic_write_bytes(target, yaml.safe_dump(config, sort_keys=False).encode())
    return target


def launch_command(launch_config: Path, run_config: Path) -> tuple[list[str], dict[str, str]]:
    """The command that starts the training processes the resolved accelerate config describes,
    and the variables it adds to their environment: `torchrun` for several CPU processes
    (accelerate's launcher would start only one), else `accelerate launch`."""
    config = yaml.safe_load(launch_config.read_text())
    processes = config.get("num_processes", 1)
    env = {NUM_PROCESSES_ENV: str(processes)}
    trainer = ["-m", "longreward_core.training.trainer", str(run_config)]
    if config.get("use_cpu"):
        env["ACCELERATE_USE_CPU"] = "true"
        # CPU processes share the cores; torchrun's default of one thread each wastes them on big hosts.
        env["OMP_NUM_THREADS"] = os.environ.get("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // processes)))
        if processes > 1:
            command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(processes)]
            return [*command, *trainer], env
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(launch_config)]
    for variable, flag in (("MACHINE_RANK", "--machine_rank"), ("MAIN_PROCESS_IP", "--main_process_ip")):
        if os.environ.get(variable):
            command += [flag, os.environ[variable]]
    return [*command, *trainer], env


def launch_training(
    config: TrainConfig,
    accelerate_config: str = "auto",
    num_processes: int | None = None,
    on_line: Callable[[str], Any] = print,
    report: LengthReport | None = None,
) -> TrainingManifest:
    """Run training in `accelerate launch` subprocesses, passing each output line to `on_line`.

    `report` is what `prepare_run(config)` returned when the caller already checked the pairs
    (its run files are in the output folder); without it the pairs are checked here, once.
    Returns the output manifest. Raises TrainingRefused before launching when pairs would be
    lost, ValueError when the accelerate config cannot start `num_processes` as one run, and
    TrainingFailed when the processes exit with an error. Multi-node runs take the machine's rank
    and the rank-0 address from MACHINE_RANK and MAIN_PROCESS_IP.
    """
    launch_config = resolved_accelerate_config(accelerate_config, num_processes, config.output_dir)
    if report is None:
        prepare_run(config)
    command, launch_env = launch_command(launch_config, config.output_dir / RUN_CONFIG)
    # Progress bars redraw with carriage returns: noise in a line-by-line log.
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "TQDM_DISABLE": "1", "HF_DATASETS_DISABLE_PROGRESS_BARS": "1",
           **launch_env}
    tail: collections.deque[str] = collections.deque(maxlen=40)
    process = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1, env=env
    )
    try:
        assert process.stdout is not None
        for line in process.stdout:
            line = line.rstrip("\n")
            tail.append(line)
            on_line(line)
        code = process.wait()
    finally:
        if process.poll() is None:  # cancelled or interrupted: do not leave GPU processes behind
            process.terminate()
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
    if code != 0:
        raise TrainingFailed(f"training exited with code {code}; last lines:\n" + "\n".join(tail))
    return TrainingManifest.model_validate_json((config.output_dir / MANIFEST).read_text())

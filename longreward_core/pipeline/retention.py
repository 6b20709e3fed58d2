"""Keeping an output root bounded: what builds leave behind that no later run needs, removed once
it is older than a retention.

Under an output root (`BuildParams.output_dir`: dated build folders, `.prefect-results`, the call
cache) three things grow every night besides the published datasets, which are never touched here:

- Prefect result records in `.prefect-results`: a finished stage's record, read to skip the stage
  when the same inputs come again. Without it the stage runs again and its model requests are
  answered by the call cache; records past the stages' cache expiration are read by nobody.
- The Qdrant local stores of builds (`<build>/shards/<shard>/qdrant`): the scorer indexes again
  whatever document it needs.
- Score spools (`.scores.*.spool.jsonl`) that a killed scoring run left behind.

The call cache itself is pruned by its backend (`CallStore.prune`, by last use).
"""

from __future__ import annotations

import os
import re
import shutil
import time
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

from longreward_core.models.call_cache import DAY_S, TOUCH_INTERVAL_S

RESULTS_DIR = ".prefect-results"
SPOOL_GLOB = ".scores.*.spool.jsonl"
_DURATION = re.compile(r"(\d+)([smhd])")
_UNIT_S = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_duration(text: str) -> timedelta:
    """A retention as written on the command line: a whole number and a unit, s, m, h or d (0s, 90m, 12h, 30d)."""
    match = _DURATION.fullmatch(text.strip())
    if match is None:
        raise ValueError(f"duration {text!r}: expected a whole number and a unit, s, m, h or d (e.g. 0s, 12h, 30d)")
    return timedelta(seconds=int(match[1]) * _UNIT_S[match[2]])


def retention_cutoff(days: int, started: float) -> float:
    """The cutoff of a build's own pruning after it published: `days` ago, and never later than an
    hour (the cache's `TOUCH_INTERVAL_S`) before the build started, so nothing the build stored or
    used goes, however long it ran."""
    return min(time.time() - days * DAY_S, started - TOUCH_INTERVAL_S)


@dataclass(frozen=True)
class RemovedOutput:
    """One thing `prune_outputs` removed: what it was (`kind`), where, and the bytes it took."""

    kind: str  # "prefect result", "qdrant store" or "spool"
    path: Path
    bytes: int


def prune_outputs(root: str | Path, cutoff: float, keep: str | Path | None = None) -> list[RemovedOutput]:
    """Remove under the output root `root` the Prefect result records, Qdrant local stores and
    score spools last modified before `cutoff` (seconds since the epoch); returns what went.

    The running build's are never removed: nothing under `keep` (a build folder), nothing under the
    newest build folder (by name: dated folders sort by date), and nothing modified since that
    folder's shards were laid out, when its run began."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"output root not found: {root}")
    builds = sorted(d for d in root.iterdir() if (d / "shards").is_dir())
    protected = [Path(p).resolve() for p in (keep, builds[-1] if builds else None) if p is not None]
    if builds:
        cutoff = min(cutoff, (builds[-1] / "shards").stat().st_mtime)

    def kept(path: Path) -> bool:
        return any(path.resolve().is_relative_to(p) for p in protected)

    removed: list[RemovedOutput] = []
    candidates = [("prefect result", p) for p in sorted((root / RESULTS_DIR).rglob("*")) if p.is_file()]
    candidates += [("qdrant store", p) for p in sorted(root.glob("*/shards/*/qdrant")) if p.is_dir()]
    candidates += [("spool", p) for p in sorted(root.rglob(SPOOL_GLOB))]
    for kind, path in candidates:
        if kept(path):
            continue
        try:
            newest, size = _newest_and_size(path)
            if newest >= cutoff:
                continue
            if path.is_dir():
                shutil.rmtree(path)
            else:
                path.unlink()
        except FileNotFoundError:
            continue  # removed meanwhile (another prune, or the run that owned it)
        removed.append(RemovedOutput(kind, path, size))
    return removed


def _newest_and_size(path: Path) -> tuple[float, int]:
    """The latest modification time and the bytes of a file, or of the files under a folder (an
    empty folder: its own time)."""
    if not path.is_dir():
        stat = path.stat()
        return stat.st_mtime, stat.st_size
    stats = [os.stat(os.path.join(folder, name)) for folder, _, files in os.walk(path) for name in files]
    if not stats:
        return path.stat().st_mtime, 0
    return max(s.st_mtime for s in stats), sum(s.st_size for s in stats)

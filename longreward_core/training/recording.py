"""Which pairs each training process trained on, step by step.

`PairLoggingDPOTrainer` is TRL's DPOTrainer plus one line per forward/backward pass in
`OUT/ranks/rank-R.jsonl`: the optimiser step it belongs to, the positions of its pairs among the
run's trainable pairs, the process id and the world size. With several processes this shows that
they trained on disjoint pairs and how many pairs made one optimiser step; a resumed run first
forgets the lines of the steps it trains again.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from trl import DPOTrainer

from longreward_core.training.config import RANKS

PAIR_INDEX = "pair_index"  # the dataset column: a pair's position among the trainable pairs


def rank_log(output_dir: Path, rank: int) -> Path:
    """The pair log of process `rank` in a run's output folder."""
    return Path(output_dir) / RANKS / f"rank-{rank}.jsonl"


def read_rank_logs(output_dir: Path) -> dict[int, list[dict[str, Any]]]:
    """Every process's pair log: rank -> its lines ({step, pairs, pid, world_size}), in order."""
    logs = {}
    for path in sorted((Path(output_dir) / RANKS).glob("rank-*.jsonl")):
        logs[int(path.stem.split("-")[1])] = [json.loads(line) for line in path.read_text().splitlines()]
    return logs


class PairLoggingDPOTrainer(DPOTrainer):
    """DPOTrainer that appends the pairs of each training step to its process's pair log.

    The train dataset carries a `pair_index` column; it rides through TRL's tokenisation and the
    collator and is taken off the batch before the loss sees it.
    """

    def __init__(self, *args: Any, pair_log: Path, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.pair_log = pair_log
        pair_log.parent.mkdir(parents=True, exist_ok=True)
        collate = self.data_collator

        def collate_with_pair_index(examples: list[dict[str, Any]]) -> dict[str, Any]:
            indices = [example.pop(PAIR_INDEX) for example in examples]
            return {**collate(examples), PAIR_INDEX: torch.tensor(indices)}

        self.data_collator = collate_with_pair_index

    def _set_signature_columns_if_needed(self) -> None:
        super()._set_signature_columns_if_needed()
        if PAIR_INDEX not in self._signature_columns:
            self._signature_columns = [*self._signature_columns, PAIR_INDEX]

    def training_step(self, model: Any, inputs: dict[str, Any], *args: Any, **kwargs: Any) -> Any:
        pairs = inputs.pop(PAIR_INDEX).tolist()
        line = {"step": self.state.global_step + 1, "pairs": pairs, "pid": os.getpid(), "world_size": self.args.world_size}
        with self.pair_log.open("a") as fh:
            fh.write(json.dumps(line) + "\n")
        return super().training_step(model, inputs, *args, **kwargs)

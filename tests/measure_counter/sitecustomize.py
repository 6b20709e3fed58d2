"""Counts the tokenisations of a run's pairs in every process that has this folder on PYTHONPATH.

Python imports `sitecustomize` at start-up, so the processes `accelerate launch` starts count too:
each `measure_lengths` call appends "PID PAIRS" to the file named by $LONGREWARD_MEASURE_LOG.
"""

from __future__ import annotations

import os

import longreward_core.training.data as data


def counting(measure):
    def measure_lengths(dataset, tokenizer):
        with open(os.environ["LONGREWARD_MEASURE_LOG"], "a") as log:
            log.write(f"{os.getpid()} {len(dataset)}\n")
        return measure(dataset, tokenizer)

    return measure_lengths


if __name__ == "sitecustomize" and os.environ.get("LONGREWARD_MEASURE_LOG"):
    data.measure_lengths = counting(data.measure_lengths)

"""Evaluation on the benchmarks of the LongReward paper: LongBench, LongBench-E, LongBench v2 and
LongBench-Chat, plus the paper's judged variant of LongBench.

One file per concern: `tasks` (the 21 LongBench tasks), `metrics` (the official metrics),
`scoring` (prediction folders -> result.json, as LongBench's eval.py), `data` (loading the
official datasets), `predict` (generating answers with the model under test), `v2`, `judging`
(LLM-judged scores), `evaluate` (one model on one benchmark, end to end), `compare` (tables and
the bar chart across models) and `cli` (`longreward eval ...`). No Prefect here.
"""

"""The 21 LongBench (v1) tasks: prompt template, answer length, metric, and how they are run.

Prompt templates and maximum generation lengths are in `longbench.json` beside this file, with the
same text and numbers as LongBench's `config/dataset2prompt.json` and `dataset2maxlen.json`
(including the official narrativeqa template's "asconcisely", so predictions stay comparable).
The rest is LongBench's code, restated as data:
- the task-to-metric map (`eval.py`'s `dataset2metric`);
- `first_line_only`: trec, triviaqa, samsum and lsht are scored on the prediction's first line
  (`eval.py`), because these few-shot prompts invite the model to continue with more examples;
- `chat_template`: the official `pred.py` wraps every prompt in the model's chat template except
  for trec, triviaqa, samsum, lsht, lcc and repobench-p (few-shot and code completion);
- LongBench-E covers 13 of the tasks (English), scored in 0-4k / 4-8k / 8k+ length buckets;
- the LongReward authors judged 12 QA and summarisation tasks with an LLM instead.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from importlib import resources

from longreward_core.evaluation.metrics import METRICS, Metric

_METRIC_OF = {
    "narrativeqa": "qa_f1",
    "qasper": "qa_f1",
    "multifieldqa_en": "qa_f1",
    "multifieldqa_zh": "qa_f1_zh",
    "hotpotqa": "qa_f1",
    "2wikimqa": "qa_f1",
    "musique": "qa_f1",
    "dureader": "rouge_zh",
    "gov_report": "rouge",
    "qmsum": "rouge",
    "multi_news": "rouge",
    "vcsum": "rouge_zh",
    "trec": "classification",
    "triviaqa": "qa_f1",
    "samsum": "rouge",
    "lsht": "classification",
    "passage_count": "count",
    "passage_retrieval_en": "retrieval",
    "passage_retrieval_zh": "retrieval_zh",
    "lcc": "code_sim",
    "repobench-p": "code_sim",
}

# LongBench's six task categories, in the order of its result tables.
CATEGORIES = {
    "Single-Doc QA": ("narrativeqa", "qasper", "multifieldqa_en", "multifieldqa_zh"),
    "Multi-Doc QA": ("hotpotqa", "2wikimqa", "musique", "dureader"),
    "Summarization": ("gov_report", "qmsum", "multi_news", "vcsum"),
    "Few-shot Learning": ("trec", "triviaqa", "samsum", "lsht"),
    "Synthetic Tasks": ("passage_count", "passage_retrieval_en", "passage_retrieval_zh"),
    "Code Completion": ("lcc", "repobench-p"),
}

_FIRST_LINE_ONLY = frozenset({"trec", "triviaqa", "samsum", "lsht"})
_NO_CHAT_TEMPLATE = frozenset({"trec", "triviaqa", "samsum", "lsht", "lcc", "repobench-p"})
_CHINESE = frozenset({"multifieldqa_zh", "dureader", "vcsum", "lsht", "passage_retrieval_zh"})

LONGBENCH_E_DATASETS = (
    "qasper", "multifieldqa_en", "hotpotqa", "2wikimqa", "gov_report", "multi_news",
    "trec", "triviaqa", "samsum", "passage_count", "passage_retrieval_en", "lcc", "repobench-p",
)
# The LongReward paper's judged LongBench: QA rated 1-3, summaries rated 1-5.
JUDGED_QA_DATASETS = CATEGORIES["Single-Doc QA"] + CATEGORIES["Multi-Doc QA"]
JUDGED_SUMMARY_DATASETS = CATEGORIES["Summarization"]


@dataclass(frozen=True)
class LongBenchDataset:
    """One LongBench dataset and how it is prompted and scored."""

    name: str
    prompt: str  # str.format template over the row's fields ({context}, {input})
    max_new_tokens: int
    metric_name: str
    category: str
    language: str  # 'en' or 'zh'
    first_line_only: bool
    chat_template: bool

    @property
    def metric(self) -> Metric:
        return METRICS[self.metric_name]

    def render(self, row: dict) -> str:
        """The prompt for one dataset row, before truncation."""
        return self.prompt.format(**row)


@functools.cache
def all_datasets() -> dict[str, LongBenchDataset]:
    """Every LongBench task by dataset name, in the official order."""
    specs = json.loads((resources.files("longreward_core.evaluation") / "longbench.json").read_text(encoding="utf-8"))
    category_of = {name: category for category, names in CATEGORIES.items() for name in names}
    if set(specs) != set(_METRIC_OF) or set(specs) != set(category_of):
        raise RuntimeError("longbench.json, the metric map and the categories must name the same 21 datasets")
    return {
        name: LongBenchDataset(
            name=name,
            prompt=spec["prompt"],
            max_new_tokens=spec["max_new_tokens"],
            metric_name=_METRIC_OF[name],
            category=category_of[name],
            language="zh" if name in _CHINESE else "en",
            first_line_only=name in _FIRST_LINE_ONLY,
            chat_template=name not in _NO_CHAT_TEMPLATE,
        )
        for name, spec in specs.items()
    }


def get_dataset(name: str) -> LongBenchDataset:
    """The task named `name`; ValueError naming the valid names when there is none."""
    tasks = all_datasets()
    if name not in tasks:
        raise ValueError(f"unknown LongBench dataset '{name}' (known: {', '.join(tasks)})")
    return tasks[name]


def resolve_datasets(names: list[str] | None, *, longbench_e: bool = False) -> list[str]:
    """Validated dataset names; None means every dataset of LongBench (or of LongBench-E)."""
    if not names:
        return list(LONGBENCH_E_DATASETS if longbench_e else all_datasets())
    for name in names:
        get_dataset(name)
        if longbench_e and name not in LONGBENCH_E_DATASETS:
            raise ValueError(f"'{name}' is not part of LongBench-E (its datasets: {', '.join(LONGBENCH_E_DATASETS)})")
    return list(dict.fromkeys(names))

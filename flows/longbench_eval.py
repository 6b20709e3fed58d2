"""Compare models (e.g. the SFT and the DPO checkpoint) on the LongBench family of benchmarks.

For each model and each chosen benchmark, one task generates the model's answers (resumably:
answers already on disk are not generated again) and scores them with the official metrics or
the judge. The models run one after the other, so a GPU worker holds one local checkpoint at a
time. At the end the flow writes, under `output_dir`:
- `<benchmark>/<model>/`: predictions in LongBench's format and each benchmark's result file;
- `comparison.json` (every score, plus one row per task and average with a column per model and
  the delta last - first), `comparison.md` and `comparison.png` (bar chart of headline numbers);
- `results.json`: the parameters, each task's summary and the failures;
and publishes the comparison as Prefect artifacts (a Markdown table with the chart, and a table).
A benchmark that fails for one model does not stop the others; the run then ends Failed and
names them. A result computed from a subset of the cases (requests refused for good) counts as
failed unless `allow_partial`; allowed, it is marked partial in the comparison. Deployed as `longbench-eval` on the `gpu` pool.

    python flows/longbench_eval.py params.json     # EvalParams as JSON, run in this process
"""

from __future__ import annotations

import json
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.states import Failed
from pydantic import BaseModel, ConfigDict, Field, model_validator

from flows.params import refuse_keys
from longreward_core.data.form import form_order
from longreward_core.data.io import atomic_write_bytes
from longreward_core.data.records import EvaluationSummary
from longreward_core.evaluation.compare import write_comparison
from longreward_core.evaluation.evaluate import Benchmark, DataSources
from longreward_core.evaluation.predict import ModelSpec
from longreward_core.evaluation.longbench import resolve_datasets
from longreward_core.reward.judge import JudgeConfig
from tasks.caching import configuration_fault
from tasks.evaluate import evaluate_model


class EvalParams(BaseModel):
    """Parameters of an evaluation run (the form the Prefect UI shows)."""

    model_config = ConfigDict(json_schema_extra=form_order)  # the form shows required fields first

    models: list[ModelSpec] = Field(
        min_length=1, description="Models to evaluate, baseline first (e.g. SFT, then DPO): deltas are last - first."
    )
    output_dir: str = Field("out/eval", description="Root folder: predictions, results, the comparison and the request cache.")
    benchmarks: list[Benchmark] = Field(
        default_factory=lambda: ["longbench", "longbench-v2"], min_length=1,
        description="longbench, longbench-e, longbench-judged (the paper's judge on 12 tasks), longbench-v2, longbench-chat.",
    )
    datasets: list[str] | None = Field(None, description="LongBench datasets to run (default: all of each LongBench benchmark).")
    limit: int | None = Field(None, ge=1, description="At most this many examples per dataset (smoke runs; not comparable with published scores).")
    data: DataSources = Field(default_factory=DataSources, description="Where the benchmark data is read from.")
    judge: JudgeConfig = Field(default_factory=JudgeConfig, description="Judge for longbench-chat and longbench-judged.")
    judge_key_secret: str | None = Field(None, description="Prefect Secret block holding the judge's API key (else the environment).")
    model_key_secret: str | None = Field(
        None, description="Prefect Secret block holding the API key of the evaluated models served behind an API "
        "(else the environment: $LONGREWARD_POLICY_API_KEY or the provider's variable).",
    )
    allow_partial: bool = Field(
        False, description="Keep a result computed from a subset of the cases (some requests refused for good), marked "
        "partial in the comparison; otherwise that evaluation fails.",
    )

    @model_validator(mode="before")
    @classmethod
    def _no_keys(cls, data: Any) -> Any:
        return refuse_keys(data, {"models": "model_key_secret", "judge": "judge_key_secret"})

    @model_validator(mode="after")
    def _consistent(self) -> EvalParams:
        labels = [m.label for m in self.models]
        if len(set(labels)) != len(labels):
            raise ValueError(f"model labels must differ (they name folders and columns): {labels}; set `name`")
        if self.datasets:
            resolve_datasets(self.datasets)
        if "longbench-chat" in self.benchmarks and not self.data.longbench_chat:
            raise ValueError("longbench-chat needs data.longbench_chat (its test_cases.json and few_shots.json are not on the Hub)")
        return self


@flow(name="longbench-eval")  # no log_prints: the run log holds log records only
def longbench_eval(params: EvalParams) -> dict[str, Any]:
    """Evaluate every model on every benchmark and compare them; returns the comparison's paths
    and the scores (`{model: {benchmark: scores}}`)."""
    logger = get_run_logger()
    results: dict[str, dict[str, Any]] = {m.label: {} for m in params.models}
    partial: dict[str, dict[str, dict[str, int]]] = {}
    summaries: list[EvaluationSummary] = []
    failed: dict[str, str] = {}
    fix: str | None = None  # the error of an evaluation that failed on the configuration
    for model in params.models:
        for benchmark in params.benchmarks:
            state = evaluate_model(
                model, benchmark, params.output_dir, params.data, params.judge,
                datasets=params.datasets, limit=params.limit, judge_key_secret=params.judge_key_secret,
                model_key_secret=params.model_key_secret,
                allow_partial=params.allow_partial, return_state=True,
            )
            if state.is_completed():
                summary = state.result()
                summaries.append(summary)
                results[model.label][benchmark] = summary.scores
                if summary.partial:
                    partial.setdefault(model.label, {})[benchmark] = {"cases": summary.cases, "scored": summary.scored}
            else:
                failed[f"{benchmark}-{model.label}"] = state.message or state.name
                fix = fix or (state.message if configuration_fault(state) else None)

    comparison = write_comparison(results, params.output_dir, partial)
    create_markdown_artifact(key="longbench-comparison", markdown=comparison["markdown_text"],
                             description=f"{', '.join(results)} on {', '.join(params.benchmarks)}")
    create_table_artifact(key="longbench-scores", table=comparison["rows"], description="Scores per task and averages, per model")
    results_path = atomic_write_bytes(
        Path(params.output_dir) / "results.json",
        json.dumps({"finished_at": datetime.now(timezone.utc).isoformat(), "parameters": params.model_dump(mode="json"),
                    "summaries": [s.model_dump(mode="json") for s in summaries], "failed": failed},
                   indent=2, ensure_ascii=False, default=str).encode("utf-8"),
    )
    logger.info("comparison: %s (chart %s)", comparison["markdown"], comparison["chart"])
    if failed:
        for name, reason in sorted(failed.items()):
            logger.error("%s failed: %s", name, reason)
        advice = (f"a re-run fails alike until the configuration is fixed: {fix}" if fix
                  else "run again: finished answers are kept and requests are cached")
        return Failed(message=f"{len(failed)} evaluations failed: {', '.join(sorted(failed))}; {advice}")
    return {"results": results, "results_path": str(results_path),
            **{k: comparison[k] for k in ("json", "markdown", "chart")}}


if __name__ == "__main__":
    print(longbench_eval(EvalParams.model_validate_json(Path(sys.argv[1]).read_text())))

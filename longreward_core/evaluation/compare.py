"""Comparing models across benchmarks: a table (per task and averages) and a bar chart.

Input: `{model: {benchmark: scores}}` with each benchmark's `scores` as `evaluate_benchmark`
returns them. Every number is on a 0-100 scale except LongBench-Chat's mean rating (1-10).
Averages are plain means over the tasks a model has a score for (NaN buckets left out). With two
or more models the table has a delta column: the last model minus the first (e.g. DPO - SFT).

A result that stands on a subset of its benchmark's cases (`partial`: `{model: {benchmark:
{cases, scored}}}`) is marked: its rows name the model under `partial`, the table shows its
values with a `*` and a note says how many cases each partial result stands on.
"""

from __future__ import annotations

import base64
import io
import json
import math
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from longreward_core.data.io import atomic_write_bytes
from longreward_core.evaluation.grading import BUCKETS
from longreward_core.evaluation.longbench import (
    CATEGORIES,
    JUDGED_QA_DATASETS,
    JUDGED_SUMMARY_DATASETS,
)

V2_KEYS = ("overall", "easy", "hard", "short", "medium", "long")


def _mean(values: Iterable[Any]) -> float | None:
    kept = [v for v in values if isinstance(v, (int, float)) and not math.isnan(v)]
    return round(sum(kept) / len(kept), 2) if kept else None


def _rows_for(benchmark: str, scores: dict[str, Any]) -> list[tuple[str, float | None, bool]]:
    """(metric label, value, headline) rows of one model's scores on one benchmark."""
    rows: list[tuple[str, float | None, bool]] = []
    if benchmark == "longbench":
        rows += [(name, value, False) for name, value in scores.items()]
        for category, names in CATEGORIES.items():
            if any(n in scores for n in names):
                rows.append((f"avg {category}", _mean(scores.get(n) for n in names), False))
        rows.append(("avg all tasks", _mean(scores.values()), True))
    elif benchmark == "longbench-e":
        for name, buckets in scores.items():
            rows += [(f"{name} {b}", buckets.get(b), False) for b in BUCKETS]
        rows += [(f"avg {b}", _mean(s.get(b) for s in scores.values()), False) for b in BUCKETS]
        rows.append(("avg all", _mean(v for s in scores.values() for v in s.values()), True))
    elif benchmark == "longbench-judged":
        rows += [(name, value, False) for name, value in scores.items()]
        rows.append(("avg QA", _mean(scores.get(n) for n in JUDGED_QA_DATASETS), False))
        rows.append(("avg summarization", _mean(scores.get(n) for n in JUDGED_SUMMARY_DATASETS), False))
        rows.append(("avg all", _mean(scores.values()), True))
    elif benchmark == "longbench-v2":
        rows += [(key, scores.get(key), key == "overall") for key in V2_KEYS]
    elif benchmark == "longbench-chat":
        rows += [("score", scores.get("score"), True), ("mean rating (1-10)", scores.get("mean_rating"), False)]
    else:
        raise ValueError(f"unknown benchmark '{benchmark}'")
    return rows


Partial = dict[str, dict[str, dict[str, int]]]  # model -> benchmark -> {"cases", "scored"}


def comparison_rows(results: dict[str, dict[str, dict[str, Any]]], partial: Partial | None = None) -> list[dict[str, Any]]:
    """One row per (benchmark, metric): a column per model, `delta` (last - first) with two or
    more models, `headline` for the benchmark's summary number, and `partial`: the models whose
    value stands on a subset of the benchmark's cases."""
    partial = partial or {}
    models = list(results)
    table: dict[tuple[str, str], dict[str, Any]] = {}
    for model in models:
        for benchmark, scores in results[model].items():
            for metric, value, headline in _rows_for(benchmark, scores):
                row = table.setdefault((benchmark, metric), {"benchmark": benchmark, "metric": metric, "headline": headline})
                row[model] = value if _is_number(value) else None  # NaN (an empty bucket) is no value
    rows = []
    for row in table.values():
        values = {m: row.get(m) for m in models}
        first, last = values[models[0]], values[models[-1]]
        delta = round(last - first, 2) if len(models) > 1 and _is_number(first) and _is_number(last) else None
        rows.append({"benchmark": row["benchmark"], "metric": row["metric"], **values,
                     **({"delta": delta} if len(models) > 1 else {}), "headline": row["headline"],
                     "partial": [m for m in models if row["benchmark"] in partial.get(m, {})]})
    return rows


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not math.isnan(value)


def _cell(value: Any) -> str:
    return f"{value:.2f}" if _is_number(value) else "-"


def markdown_table(rows: list[dict[str, Any]], models: list[str]) -> str:
    """The comparison as a Markdown table (headline rows in bold; a partial result's values with `*`)."""
    delta = len(models) > 1
    header = ["benchmark", "metric", *models] + ([f"Δ ({models[-1]} − {models[0]})"] if delta else [])
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        cells = [row["benchmark"], row["metric"], *(_cell(row.get(m)) + ("*" if m in row["partial"] else "") for m in models)]
        if delta:
            cells.append(f"{row['delta']:+.2f}" if _is_number(row.get("delta")) else "-")
        if row["headline"]:
            cells = [f"**{c}**" for c in cells]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def bar_chart_png(rows: list[dict[str, Any]], models: list[str]) -> bytes:
    """A grouped bar chart of the headline numbers, one bar per model, as PNG bytes."""
    import matplotlib

    matplotlib.use("Agg")  # no display on workers
    import matplotlib.pyplot as plt

    headline = [r for r in rows if r["headline"]]
    labels = [f"{r['benchmark']}\n{r['metric']}" for r in headline]
    width = 0.8 / max(len(models), 1)
    fig, ax = plt.subplots(figsize=(max(4.0, 1.6 * len(headline) + 1.5), 3.6), dpi=100)
    for i, model in enumerate(models):
        values = [r.get(model) if _is_number(r.get(model)) else 0.0 for r in headline]
        positions = [x + (i - (len(models) - 1) / 2) * width for x in range(len(headline))]
        bars = ax.bar(positions, values, width, label=model)
        ax.bar_label(bars, labels=[_cell(r.get(model)) for r in headline], fontsize=7, padding=1)
    ax.set_xticks(range(len(headline)), labels, fontsize=8)
    ax.set_ylabel("score (0-100)")
    ax.set_ylim(0, 100)
    ax.legend(fontsize=8)
    ax.set_title("Long-context benchmarks", fontsize=10)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    return buffer.getvalue()


def partial_note(partial: Partial) -> str:
    """The note under the table naming each partial result and the cases it stands on ('' if none)."""
    results = [f"{model} on {benchmark}: {counts['scored']} of {counts['cases']} cases"
               for model, benchmarks in partial.items() for benchmark, counts in benchmarks.items()]
    return f"\\* partial result, from a subset of the cases ({'; '.join(results)})." if results else ""


def write_comparison(results: dict[str, dict[str, dict[str, Any]]], out_dir: str | Path, partial: Partial | None = None) -> dict[str, Any]:
    """Write `comparison.json` (results, rows and the partial results), `comparison.md` (the table
    with the chart embedded) and `comparison.png` into `out_dir`; returns the paths, rows and
    Markdown. `partial` names the results that stand on a subset of their cases."""
    out = Path(out_dir)
    models = list(results)
    partial = partial or {}
    rows = comparison_rows(results, partial)
    png = bar_chart_png(rows, models)
    chart_path = atomic_write_bytes(out / "comparison.png", png)
    note = partial_note(partial)
    markdown = (
        "## Long-context evaluation\n\n"
        + markdown_table(rows, models)
        + (f"\n\n{note}" if note else "")
        + "\n\n![headline scores](data:image/png;base64," + base64.b64encode(png).decode("ascii") + ")\n"
    )
    markdown_path = atomic_write_bytes(out / "comparison.md", markdown.encode("utf-8"))
    json_path = atomic_write_bytes(
        out / "comparison.json", json.dumps({"models": models, "results": results, "partial": partial, "rows": rows}, indent=2, ensure_ascii=False).encode("utf-8")
    )
    return {"json": str(json_path), "markdown": str(markdown_path), "chart": str(chart_path), "rows": rows, "markdown_text": markdown}

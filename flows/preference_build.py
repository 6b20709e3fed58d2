"""The nightly preference build: prompts -> shards -> candidates -> LongReward scores -> DPO pairs.

Shards fan out on a bounded task runner (threads in this process by default, or a Dask cluster);
each shard runs index -> (sample) -> score as its own tasks. A failed shard does not stop the
others: the run ends Failed and names them. Every stage task is cached by the content of its
inputs and its config, and every judge and policy request by its content, so retrying the run,
or starting a new one with the same parameters, re-executes only unfinished shards and repeats no
judge call.

    python flows/preference_build.py     # runs on the bundled sample with the embedded models
"""

from __future__ import annotations

import base64
import hashlib
import time
from pathlib import Path
from typing import Any

import polars as pl
from prefect import flow, get_run_logger
from prefect.artifacts import (
    create_markdown_artifact,
    create_progress_artifact,
    create_table_artifact,
    update_progress_artifact,
)
from prefect.deployments import run_deployment
from prefect.events import emit_event
from prefect.filesystems import LocalFileSystem
from prefect.futures import as_completed
from prefect.runtime import flow_run
from prefect.states import Failed
from prefect.task_runners import ThreadPoolTaskRunner
from prefect.variables import Variable

from flows.params import BuildParams
from longreward_core.data.records import BuildCounts, BuildModels
from longreward_core.models.accounting import RunAccounting
from longreward_core.reward.scorer import budget_share
from longreward_core.pipeline.build import (
    RewardDistribution,
    build_manifest,
    reward_distribution,
)
from tasks.caching import configuration_fault
from tasks.index import index_documents
from tasks.pairs import build_pairs
from tasks.publish import publish
from tasks.retention import call_cache_size, prune_retention
from tasks.sample import sample_candidates
from tasks.preflight import check_configuration
from tasks.score import score_shard
from tasks.shard import load_and_shard

# A published build with more than this share of its candidates without a reward (refused by the
# provider, or failed for good) emits NEEDS_REVIEW_EVENT; infra/stack/automations.py sends it to
# the webhook. The Prefect Variable of that name, when set, replaces the default.
NEEDS_REVIEW_EVENT = "longreward.build.needs-review"
FAILED_SHARE_VARIABLE = "longreward_notify_failed_share"
DEFAULT_FAILED_SHARE = 0.05


# No log_prints: the run log holds log records only. (With it, whatever a library prints lands
# there: `datasets` fingerprinting a table through dill disassembles a function with print().)
@flow(name="preference-build")
def preference_build(params: BuildParams) -> dict[str, Any]:
    """Build a DPO preference dataset; returns the manifest (longreward_core.pipeline.build.build_manifest)
    with `manifest_path` and `dataset_dir`."""
    logger = get_run_logger()
    started = time.time()
    # What fails every shard and every retry alike fails here, before anything is indexed or paid for.
    check_configuration(params.judge, None if params.candidates else params.policy, params.judge_slots,
                        params.judge_limit_strict, params.judge_key_secret, params.policy_key_secret)
    build = params.build_dir()
    cache_path = str(params.cache_path())
    # Task results (the cache records of finished stages) live beside the outputs they point to:
    # deleting an output root forgets its cached stages too. Or in a block every worker reaches.
    stored = {"result_storage": _result_storage(params)}
    load_and_shard_task, build_pairs_task = (t.with_options(**stored) for t in (load_and_shard, build_pairs))
    plan = load_and_shard_task(params.prompts, params.candidates, params.shard_size, str(build / "shards"))
    names = [Path(d).name for d in plan.shard_dirs]
    progress = create_progress_artifact(progress=0.0, description=f"Shards scored of {len(names)} ({_attempt()})")

    results: dict[str, dict[str, Any]] = {}
    failed: dict[str, str] = {}
    fix: BaseException | None = None  # the error of a shard that failed on what a re-run cannot fix
    retried = {"retries": params.task_retries, **stored}
    index_task, sample_task, score_task = (t.with_options(**retried) for t in (index_documents, sample_candidates, score_shard))
    # The judge budget is split evenly over the shards (each shard's run checks its own share).
    shard_scoring = budget_share(params.scoring, len(names))
    with _task_runner(params) as runner:
        score_futures = {}
        for shard_dir, name in zip(plan.shard_dirs, names):
            shard = str(shard_dir)
            indexed = runner.submit(index_task, parameters={"shard_dir": shard, "shard_name": name, "scoring": params.scoring,
                                                            "cache_path": cache_path,
                                                            "cache_password_secret": params.cache_password_secret})
            upstream = [indexed]
            if params.candidates is None:
                upstream.append(
                    runner.submit(
                        sample_task,
                        parameters={"shard_dir": shard, "shard_name": name, "policy": params.policy,
                                    "cache_path": cache_path, "min_candidates": params.pairs.min_candidates,
                                    "policy_key_secret": params.policy_key_secret,
                                    "cache_password_secret": params.cache_password_secret},
                    )
                )
            score_futures[name] = runner.submit(
                score_task,
                parameters={"shard_dir": shard, "shard_name": name, "judge": params.judge, "scoring": shard_scoring,
                            "cache_path": cache_path, "judge_slots": params.judge_slots,
                            "judge_limit_strict": params.judge_limit_strict, "judge_key_secret": params.judge_key_secret,
                            "cache_password_secret": params.cache_password_secret,
                            "pairs": params.pairs},
                wait_for=upstream,
            )
        by_future = {f.task_run_id: name for name, f in score_futures.items()}
        for done, future in enumerate(as_completed(list(score_futures.values())), start=1):
            name = by_future[future.task_run_id]
            future.wait()
            state = future.state
            if state.is_completed():
                results[name] = future.result()
            else:
                failed[name] = state.message or state.name
                fix = fix or (state.result(raise_on_failure=False) if configuration_fault(state) else None)
            update_progress_artifact(progress, 100.0 * done / len(names))

    _shard_table(results, failed)
    if failed:
        for name, reason in sorted(failed.items()):
            logger.error("%s failed: %s", name, reason)
        advice = (f"a retry fails alike until the configuration is fixed: {fix}" if fix
                  else "retry the run: finished shards are cached and no judge call is repeated")
        # The fault travels with the state: the command line exits 2 on it.
        return Failed(message=f"{len(failed)} of {len(names)} shards failed: {', '.join(sorted(failed))}; {advice}",
                      data=fix)

    unscored = {n: results[n]["summary"] for n in names if results[n]["summary"].not_scored_prompts}
    if unscored:
        prompts_left = sorted(p for s in unscored.values() for p in s.not_scored_prompts)
        reached = "; ".join(sorted({f"{n}: {s.budget_reached}" for n, s in unscored.items()}))
        message = (f"budget reached ({reached}): {len(prompts_left)} prompt(s) not scored: {', '.join(prompts_left[:20])}"
                   + (" ..." if len(prompts_left) > 20 else "")
                   + ". Run again with a larger budget: everything done is cached and no judge call is repeated")
        logger.error("%s", message)
        return Failed(message=message)

    shard_dirs = [str(d) for d in plan.shard_dirs]
    pairs = build_pairs_task(shard_dirs, params.pairs, str(build / "pairs.parquet"))
    manifest = build_manifest(
        plan, [results[n]["summary"] for n in names],
        pairs=pairs["count"], prompts_without_pair=pairs["skipped"],
        prompts_path=params.prompts, candidates_path=params.candidates,
        parameters=params.model_dump(mode="json"),
        models=BuildModels(policy=None if params.candidates else params.policy.model, judge=params.judge.model,
                           embedding=params.scoring.embedding_model),
        call_cache=call_cache_size(cache_path, params.cache_password_secret),
    )
    scores = pl.scan_parquet([results[n]["scores"] for n in names])
    _score_artifacts(reward_distribution(scores), RunAccounting.from_dict(manifest.judge_accounting))
    manifest_path = publish(pairs["pairs"], str(build), manifest)
    logger.info("dataset published in %s", build)
    _report_failed_share(build, manifest.counts)
    published = {**manifest.model_dump(mode="json", exclude={"pairs_sha256"}), "manifest_path": manifest_path,
                 "dataset_dir": str(build / "dataset")}
    if params.train_deployment and pairs["count"]:
        training = run_deployment(
            params.train_deployment,
            parameters={"params": {"pairs": str(build), "output_dir": str(build / "dpo"),
                                   "base_model": params.train_base_model}},
            timeout=0,  # start it and finish this build; training runs on its own pool
        )
        logger.info("started %s: flow run %s", params.train_deployment, training.id)
        published["training_flow_run"] = str(training.id)
    if params.retention_days:
        published["pruned"] = prune_retention(params.output_dir, cache_path, params.cache_password_secret,
                                              params.retention_days, str(build), started)
    return published


def _report_failed_share(build: Path, counts: BuildCounts) -> None:
    """Emit NEEDS_REVIEW_EVENT with the build's counts when more than the threshold of its
    candidates have no reward."""
    threshold = float(Variable.get(FAILED_SHARE_VARIABLE, default=DEFAULT_FAILED_SHARE))
    share = counts.failed / counts.candidates if counts.candidates else 0.0
    if share <= threshold:
        return
    get_run_logger().warning("%d of %d candidates have no reward (%.1f%%, threshold %.1f%%): see %s/shards/*/scores.parquet",
                             counts.failed, counts.candidates, 100 * share, 100 * threshold, build)
    emit_event(
        event=NEEDS_REVIEW_EVENT,
        resource={"prefect.resource.id": f"longreward.build.{build}", "prefect.resource.name": str(build)},
        payload={"build": str(build), "candidates": counts.candidates, "failed": counts.failed,
                 "rejected": counts.rejected, "quarantined_rows": counts.quarantined_rows, "pairs": counts.pairs,
                 "failed_percent": f"{100 * share:.1f}", "threshold_percent": f"{100 * threshold:.1f}"},
    )


def _result_storage(params: BuildParams) -> str:
    """Slug of the block that stores the stage tasks' results: the one named by the parameters
    (checked here, so a missing block fails the run before any work), else a LocalFileSystem at
    `<output_dir>/.prefect-results`."""
    if not params.result_storage_block:
        return _results_block(params.results_path())
    from prefect.blocks.core import Block
    from prefect.filesystems import WritableFileSystem

    try:
        block = Block.load(params.result_storage_block)
    except ValueError as exc:
        raise ValueError(f"result_storage_block '{params.result_storage_block}' cannot be loaded ({exc}); create "
                         "it first, e.g. a RemoteFileSystem block whose basepath every worker reaches") from None
    if not isinstance(block, WritableFileSystem):
        raise ValueError(f"result_storage_block '{params.result_storage_block}' is a {type(block).__name__}, "
                         "not a filesystem block results can be written to")
    return params.result_storage_block


def _results_block(path: Path) -> str:
    """Slug of a saved LocalFileSystem block at `path` (Prefect stores results only in saved blocks)."""
    path = path.resolve()
    name = "longreward-results-" + hashlib.sha256(str(path).encode()).hexdigest()[:16]
    LocalFileSystem(basepath=str(path)).save(name, overwrite=True)
    return f"local-file-system/{name}"


def _task_runner(params: BuildParams):
    if params.dask_address:
        from prefect_dask import DaskTaskRunner

        return DaskTaskRunner(address=params.dask_address)
    return ThreadPoolTaskRunner(max_workers=params.shards_in_flight)


def _shard_table(results: dict[str, dict[str, Any]], failed: dict[str, str]) -> None:
    rows = []
    for name in sorted(set(results) | set(failed)):
        if name in results:
            s = results[name]["summary"]
            t = s.judge.total
            rows.append({"shard": name, "status": "completed", "candidates": s.candidates, "scored": s.scored,
                         "failed": s.failed, "judge requests": t.calls, "cache hits": t.cache_hits,
                         "batches": len(s.batch.batch_ids) if s.batch else 0})
        else:
            rows.append({"shard": name, "status": "failed", "candidates": None, "scored": None, "failed": None,
                         "judge requests": None, "cache hits": None, "batches": None, "reason": failed[name][:200]})
    create_table_artifact(key="shards", table=rows, description=f"Shards of this build ({_attempt()})")


def _attempt() -> str:
    """Which attempt of the flow run this is: a retried run shows the artifacts of every attempt."""
    return f"attempt {flow_run.run_count or 1}"


def _score_artifacts(distribution: RewardDistribution, accounting: RunAccounting) -> None:
    # The UI cannot reach the worker's disk: the picture travels inside the artifact.
    image = base64.b64encode(distribution.histogram_png()).decode()
    bins = distribution.histogram
    top = max(bins) or 1
    histogram = "\n".join(f"| {i}-{i + 1} | {n} | {'█' * round(30 * n / top)} |" for i, n in enumerate(bins))
    by_dimension = "\n".join(
        f"| {r['dimension']} | {r['mean']:.2f} | {r['p10']:.2f} | {r['median']:.2f} | {r['p90']:.2f} |"
        for r in distribution.by_dimension.iter_rows(named=True)
    )
    create_markdown_artifact(
        key="rewards",
        markdown=f"## Reward histogram ({_attempt()})\n\n![reward histogram](data:image/png;base64,{image})\n\n"
        + "| reward | candidates | |\n|---|---|---|\n" + histogram
        + "\n\n## Scores by dimension\n\n| dimension | mean | p10 | median | p90 |\n|---|---|---|---|---|\n"
        + by_dimension,
        description=f"{distribution.scored} scored candidates ({_attempt()})",
    )
    create_table_artifact(
        key="judge-accounting",
        table=[{"dimension": k, **v.model_dump()} for k, v in accounting.per_purpose.items()] + [{"dimension": "total", **accounting.total.model_dump()}],
        description=f"Judge requests, cache hits, tokens, cost, failures ({_attempt()})",
    )


if __name__ == "__main__":
    from importlib import resources

    sample = resources.files("longreward_core") / "sample"
    print(preference_build(BuildParams(
        prompts=str(sample / "prompts.jsonl"), candidates=str(sample / "candidates.jsonl"), output_dir="out/flow-example",
    )))

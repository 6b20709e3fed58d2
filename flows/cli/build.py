"""`longreward build` and `longreward demo`: the preference-build flow, run in this process.

Without PREFECT_API_URL, Prefect starts a temporary local server for the run; with it, the run
reports to that server.
"""

from __future__ import annotations

from datetime import date
from importlib import resources
from pathlib import Path
from typing import Optional

import typer

from flows.cli.options import (
    BATCH_JUDGE,
    POLICY,
    SCORING,
    cache_url_option,
    console,
    fail,
    grouped_options,
    input_errors,
    option,
)
from flows.params import BuildParams, TrainParams
from longreward_core.data.pairs import PairConfig
from longreward_core.pipeline.sampling import PolicyConfig
from longreward_core.reward.judge import JudgeConfig
from longreward_core.reward.scorer import ScoringConfig

app = typer.Typer()


def _run_build(params: BuildParams) -> dict:
    from flows.preference_build import preference_build
    from tasks.caching import NOT_FIXED_BY_RETRY

    state = preference_build(params, return_state=True)
    if state.is_failed():
        # What no re-run fixes (configuration, input, the server's setup) exits 2, like bad options.
        fixed_by_retry = not isinstance(state.result(raise_on_failure=False), NOT_FIXED_BY_RETRY)
        fail(f"build failed: {state.message}", 1 if fixed_by_retry else 2)
    manifest = state.result()
    counts = manifest["counts"]
    console.print(
        f"{counts['prompts']} prompts, {counts['candidates']} candidates, {counts['scored']} scored, "
        f"{counts['pairs']} pairs; judge: {manifest['judge_accounting']['total']['calls']} requests, "
        f"{manifest['judge_accounting']['total']['cache_hits']} cache hits"
    )
    console.print(f"dataset:  {manifest['dataset_dir']}  (datasets.load_from_disk)")
    console.print(f"pairs:    {Path(manifest['manifest_path']).parent / 'pairs.parquet'}")
    console.print(f"manifest: {manifest['manifest_path']}")
    return manifest


@app.command()
@grouped_options
def build(
    prompts: Path = option(BuildParams, "prompts", "--prompts"),
    out: Path = option(BuildParams, "output_dir", "--out"),
    candidates: Optional[Path] = option(BuildParams, "candidates", "--candidates"),
    policy: PolicyConfig = POLICY,
    judge: JudgeConfig = BATCH_JUDGE,
    shard_size: int = option(BuildParams, "shard_size"),
    shards_in_flight: int = option(BuildParams, "shards_in_flight"),
    min_candidates: int = option(PairConfig, "min_candidates"),
    scoring: ScoringConfig = SCORING.only("prune", "max_judge_cost_usd", "max_judge_tokens"),
    dask_address: Optional[str] = option(BuildParams, "dask_address"),
    run_date: Optional[str] = option(BuildParams, "run_date", help="YYYY-MM-DD (default: today, UTC)."),
    cache_url: Optional[str] = cache_url_option(),
) -> None:
    """Build a DPO preference dataset: shard, sample, score, pair, publish (a Prefect flow)."""
    with input_errors():
        params = BuildParams(
            prompts=str(prompts),
            candidates=str(candidates) if candidates else None,
            output_dir=str(out),
            run_date=date.fromisoformat(run_date) if run_date else None,
            shard_size=shard_size,
            shards_in_flight=shards_in_flight,
            dask_address=dask_address,
            cache_url=cache_url,
            policy=policy,
            judge=judge,
            pairs=PairConfig(min_candidates=min_candidates),
            scoring=scoring,
        )
    _run_build(params)


@app.command()
def demo(
    out: Path = typer.Option(Path("out/demo"), "--out", help="Output root."),
    train: bool = typer.Option(False, "--train", help="Then one DPO step of SmolLM2-135M on the pairs (CPU, a few minutes)."),
) -> None:
    """The whole build on the bundled English + Chinese sample, offline, with the embedded models:
    5 candidates per prompt sampled from SmolLM2-135M, scored by the same model as judge."""
    console.print(
        "[bold]LongReward demo[/bold]: policy and judge are the embedded SmolLM2-135M-Instruct on the CPU. "
        "A model this small grades poorly; real runs point --judge-model at a capable model."
    )
    sample = resources.files("longreward_core") / "sample"
    manifest = _run_build(BuildParams(
        prompts=str(sample / "prompts.jsonl"),
        output_dir=str(out),
        shard_size=1,
        shards_in_flight=2,
        policy=PolicyConfig(candidates_per_prompt=5, max_new_tokens=64, concurrency=1, sample_in_one_request=True),
        judge=JudgeConfig(concurrency=1),
    ))
    if train:
        _run_demo_training(Path(manifest["manifest_path"]).parent)


def _run_demo_training(build: Path) -> None:
    from flows.dpo_train import dpo_train

    # Sample documents make ~5k-token pairs: one step of the 135M model with its reference
    # takes minutes on two cores.
    params = TrainParams(pairs=build, output_dir=build / "dpo", max_steps=1, effective_batch_size=1, save_steps=1,
                         accelerate_config="cpu", retries=0)
    state = dpo_train(params, return_state=True)
    if state.is_failed():
        fail(f"training failed: {state.message or ''}", 1)
    manifest = state.result()
    last = manifest.last_log or {}
    console.print(f"DPO: {manifest.steps} step(s), loss {last.get('loss', float('nan')):.4f}; model: {manifest.model_dir}")

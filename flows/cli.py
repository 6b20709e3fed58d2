"""The installed `longreward` command: the library's commands plus the orchestrated ones.

`longreward build` runs the preference-build flow in this process. Without PREFECT_API_URL,
Prefect starts a temporary local server for the run; with it, the run reports to that server.
"""

from __future__ import annotations

from datetime import date
from importlib import resources
from pathlib import Path
from typing import Annotated, Optional

import typer
from pydantic import ValidationError
from rich.markup import escape

from longreward_core.cli import Concurrency, JudgeApiBase, JudgeModel, Rpm, _judge_config, app, console
from longreward_core.judge import EMBEDDED_JUDGE
from longreward_core.longbench.cli import eval_app
from longreward_core.pairs import PairConfig
from longreward_core.sampling import PolicyConfig

__all__ = ["app"]

app.add_typer(eval_app, name="eval")


def _run_build(params) -> dict:
    from flows.preference_build import preference_build

    state = preference_build(params, return_state=True)
    if state.is_failed():
        console.print(f"[red]build failed:[/red] {state.message}")
        raise typer.Exit(1)
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
def build(
    prompts: Annotated[Path, typer.Option("--prompts", help="Prompts: JSONL or Parquet.")],
    out: Annotated[Path, typer.Option("--out", help="Output root; the build goes to OUT/<run date>.")],
    candidates: Annotated[Optional[Path], typer.Option("--candidates", help="Candidates to score instead of sampling.")] = None,
    policy_model: Annotated[str, typer.Option("--policy-model", help="litellm model string of the policy.")] = EMBEDDED_JUDGE,
    policy_api_base: Annotated[Optional[str], typer.Option("--policy-api-base", help="OpenAI-compatible base URL.")] = None,
    candidates_per_prompt: Annotated[int, typer.Option(min=1)] = 10,
    max_new_tokens: Annotated[int, typer.Option(min=1, help="Longest sampled response.")] = 512,
    temperature: Annotated[float, typer.Option(min=0)] = 0.8,
    top_p: Annotated[float, typer.Option(min=0, max=1)] = 0.95,
    judge_model: JudgeModel = EMBEDDED_JUDGE,
    judge_api_base: JudgeApiBase = None,
    concurrency: Concurrency = 8,
    rpm: Rpm = None,
    shard_size: Annotated[int, typer.Option(min=1)] = 200,
    shards_in_flight: Annotated[int, typer.Option(min=1)] = 4,
    min_candidates: Annotated[int, typer.Option(min=2)] = 5,
    dask_address: Annotated[Optional[str], typer.Option(help="Dask scheduler address.")] = None,
    run_date: Annotated[Optional[str], typer.Option(help="YYYY-MM-DD (default: today, UTC).")] = None,
) -> None:
    """Build a DPO preference dataset: shard, sample, score, pair, publish (a Prefect flow)."""
    from flows.preference_build import BuildParams

    try:
        params = BuildParams(
            prompts=str(prompts),
            candidates=str(candidates) if candidates else None,
            output_dir=str(out),
            run_date=date.fromisoformat(run_date) if run_date else None,
            shard_size=shard_size,
            shards_in_flight=shards_in_flight,
            dask_address=dask_address,
            policy=PolicyConfig(model=policy_model, api_base=policy_api_base, candidates_per_prompt=candidates_per_prompt,
                                max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p),
            judge=_judge_config(judge_model, judge_api_base, concurrency, rpm),
            pairs=PairConfig(min_candidates=min_candidates),
        )
    except (ValidationError, ValueError) as exc:
        console.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(2) from None
    _run_build(params)


@app.command()
def demo(
    out: Annotated[Path, typer.Option("--out", help="Output root.")] = Path("out/demo"),
    train: Annotated[bool, typer.Option("--train", help="Then one DPO step of SmolLM2-135M on the pairs (CPU, a few minutes).")] = False,
) -> None:
    """The whole build on the bundled English + Chinese sample, offline, with the embedded models:
    5 candidates per prompt sampled from SmolLM2-135M, scored by the same model as judge."""
    from flows.preference_build import BuildParams

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
        policy=PolicyConfig(candidates_per_prompt=5, max_new_tokens=64, concurrency=1),
        judge=_judge_config(EMBEDDED_JUDGE, None, 1, None),
    ))
    if train:
        _run_demo_training(Path(manifest["manifest_path"]).parent)


def _run_demo_training(build: Path) -> None:
    from flows.dpo_train import TrainParams, dpo_train

    # Sample documents make ~5k-token pairs: one step of the 135M model with its reference
    # takes minutes on two cores.
    params = TrainParams(pairs=build, output_dir=build / "dpo", max_steps=1, effective_batch_size=1, save_steps=1,
                         accelerate_config="cpu", retries=0)
    state = dpo_train(params, return_state=True)
    if state.is_failed():
        console.print(f"[red]training failed:[/red] {escape(state.message or '')}")
        raise typer.Exit(1)
    manifest = state.result()
    last = manifest["last_log"] or {}
    console.print(f"DPO: {manifest['steps']} step(s), loss {last.get('loss', float('nan')):.4f}; model: {manifest['model_dir']}")

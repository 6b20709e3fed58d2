"""The dpo-train flow on Prefect's test server, its launch configs, and the build's training trigger."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from flows.cli import app
from flows.dpo_train import TrainParams, dpo_train
from longreward_core.training.launch import (
    ACCELERATE_CONFIGS,
    accelerate_config_path,
    resolved_accelerate_config,
)
from tests.test_training import pair_row, save_tiny_llama, write_pairs

pytestmark = pytest.mark.usefixtures("prefect_harness")


@pytest.fixture(scope="module")
def tiny_policy(tmp_path_factory):
    return save_tiny_llama(tmp_path_factory.mktemp("models") / "policy", seed=0)


def read_artifacts(flow_run_id) -> dict[str, object]:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    with get_client(sync_client=True) as client:
        found = client.read_artifacts(artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id])))
    return {a.key: a.data for a in found}


def test_flow_trains_and_publishes_curves_and_the_model(tiny_policy, tmp_path, measured_pairs):
    pairs = write_pairs(tmp_path / "pairs.parquet", [pair_row(i) for i in range(4)])
    params = TrainParams(pairs=pairs, output_dir=tmp_path / "run", base_model=str(tiny_policy), max_steps=2,
                         effective_batch_size=2, per_device_batch_size=2, save_steps=1, learning_rate=1e-3,
                         accelerate_config="cpu", retries=0)
    state = dpo_train(params, return_state=True)
    assert state.is_completed(), state.message
    manifest = state.result()
    assert manifest.steps == 2 and Path(manifest.model_dir, "config.json").exists()
    assert measured_pairs() == [4]  # tokenised once, by check-pairs: neither train-dpo nor the rank again
    artifacts = read_artifacts(state.state_details.flow_run_id)
    assert {"dpo-lengths", "dpo-metrics", "dpo-model"} <= set(artifacts)
    metrics = json.loads(artifacts["dpo-metrics"])
    assert [row["step"] for row in metrics] == [1, 2] and all("rewards/margins" in row for row in metrics)
    assert json.loads(artifacts["dpo-lengths"])[0]["pairs"] == 4
    assert manifest.model_dir in artifacts["dpo-model"] and "data:image/png;base64," in artifacts["dpo-model"]
    assert (tmp_path / "run" / "metrics.png").read_bytes()[:4] == b"\x89PNG"


def test_flow_refuses_to_drop_pairs(tiny_policy, tmp_path):
    pairs = write_pairs(tmp_path / "pairs.parquet", [pair_row(0), pair_row(1, context="A long report. " * 40)])
    params = TrainParams(pairs=pairs, output_dir=tmp_path / "run", base_model=str(tiny_policy), max_length=64,
                         accelerate_config="cpu", retries=0)
    state = dpo_train(params, return_state=True)
    assert state.is_failed()
    assert "would drop 1 and truncate 0 of 2 pairs" in state.message
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_run_form_refuses_a_dpo_override_trl_would_not_apply(tmp_path):
    from pydantic import ValidationError

    form = {"pairs": str(tmp_path / "pairs.parquet"), "output_dir": str(tmp_path / "run")}
    with pytest.raises(ValidationError, match="dpo_overrides: padding_free=True is refused: TRL's DPOTrainer switches"):
        TrainParams.model_validate({**form, "dpo_overrides": {"padding_free": True}})
    assert TrainParams.model_validate({**form, "dpo_overrides": {"warmup_steps": 5}}).train_config().dpo_overrides


def test_accelerate_configs(tmp_path, monkeypatch):
    from accelerate.commands.config.config_args import load_config_from_file

    monkeypatch.chdir(tmp_path)  # the resolved config must not depend on the working directory
    for name in ACCELERATE_CONFIGS:
        resolved = resolved_accelerate_config(name, 4 if name != "cpu" else None, tmp_path / name)
        config = load_config_from_file(str(resolved))  # accelerate's own loader and checks
        if name == "cpu":
            assert config.use_cpu and config.num_processes == 1 and config.distributed_type == "NO"
            continue
        assert config.distributed_type == "DEEPSPEED" and config.num_processes == 4
        ds_file = Path(config.deepspeed_config["deepspeed_config_file"])
        assert ds_file.is_absolute()
        deepspeed = json.loads(ds_file.read_text())
        assert deepspeed["zero_optimization"]["stage"] == 3
        # Batch sizes and precision come from the DPOConfig (TrainingArguments fill "auto").
        assert deepspeed["train_micro_batch_size_per_gpu"] == deepspeed["gradient_accumulation_steps"] == "auto"
    assert yaml.safe_load(accelerate_config_path("zero3-multi-node").read_text())["num_machines"] == 2
    with pytest.raises(FileNotFoundError, match="accelerate config 'zero5'"):
        accelerate_config_path("zero5")


def test_cli_trains_the_embedded_model_by_default(tmp_path, monkeypatch):
    """`longreward train` without --base-model: SmolLM2-135M converted from the packaged GGUF."""
    pairs = write_pairs(tmp_path / "pairs.parquet", [pair_row(i) for i in range(2)])
    result = CliRunner().invoke(app, ["train", "--pairs", str(pairs), "--out", str(tmp_path / "run"), "--max-steps", "1",
                                      "--effective-batch-size", "2", "--per-device-batch-size", "2",
                                      "--accelerate-config", "cpu"])
    assert result.exit_code == 0, result.output
    assert "1 steps; loss" in result.output
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert manifest["base_model"].endswith("smollm2-135m-instruct-hf")
    config = json.loads(Path(manifest["model_dir"], "config.json").read_text())
    assert "quantization_config" not in config and config["num_hidden_layers"] == 30

    bad = CliRunner().invoke(app, ["train", "--pairs", str(tmp_path / "missing.parquet"), "--out", str(tmp_path / "x")])
    assert bad.exit_code == 2 and "no such file" in bad.output


def test_build_starts_the_training_deployment(tmp_path, judge_server):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId

    from flows.preference_build import preference_build
    from longreward_testing.scenarios import write_inputs
    from tests.test_flow import helpfulness_by_length, params_for

    with get_client(sync_client=True) as client:
        try:
            client.create_work_pool(WorkPoolCreate(name="gpu", type="process"))
        except Exception:  # noqa: BLE001 - already there from another test
            pass
    deployment_id = dpo_train.to_deployment(name="dpo-train", work_pool_name="gpu").apply()
    judge_server.double.answers = {"helpfulness": helpfulness_by_length}
    prompts, candidates = write_inputs(tmp_path, n_prompts=2)
    manifest = preference_build(params_for(judge_server, tmp_path, prompts, candidates,
                                           train_deployment="dpo-train/dpo-train", train_base_model="/models/sft"))
    with get_client(sync_client=True) as client:
        (run,) = client.read_flow_runs(deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[deployment_id])))
    assert str(run.id) == manifest["training_flow_run"]
    build = tmp_path / "builds" / "2026-11-21"
    assert run.parameters["params"] == {"pairs": str(build), "output_dir": str(build / "dpo"), "base_model": "/models/sft"}

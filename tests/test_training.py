"""DPO training on CPU with tiny Llama models built from a config (nothing is downloaded)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import polars as pl
import pytest
import torch
import torch.nn.functional as F
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    TrainerCallback,
)

from longreward_core.data.io import InputError
from longreward_core.data.records import PreferencePair, QuarantinedRow
from longreward_core.models.tokenizers import load_tokenizer
from longreward_core.training.config import TrainConfig
from longreward_core.training.data import (
    PairsSchemaError,
    TrainingRefused,
    check_lengths,
    load_pairs,
    measure_lengths,
)
from longreward_core.training.launch import TrainingFailed, launch_training
from longreward_core.training.trainer import build_trainer, prepare_run, train


def save_tiny_llama(path: Path, seed: int, max_positions: int = 512) -> Path:
    """A 2-layer Llama with the embedded model's tokenizer (and chat template), saved to `path`."""
    tokenizer = load_tokenizer(None)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=max_positions,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    return save_tiny_llama(root / "policy", seed=0), save_tiny_llama(root / "reference", seed=1)


def pair_row(i: int, context: str = "", chosen: str = "The sky is blue.", rejected: str = "It is green, obviously.") -> dict:
    return PreferencePair(
        prompt_id=f"p{i}",
        prompt=[{"role": "user", "content": f"{context}Document {i}: the sky is blue. What colour is the sky?"}],
        chosen=[{"role": "assistant", "content": chosen}],
        rejected=[{"role": "assistant", "content": rejected}],
        chosen_id=f"p{i}-0", rejected_id=f"p{i}-1", chosen_reward=9.0, rejected_reward=2.0,
    ).to_row()


def write_pairs(path: Path, rows: list[dict]) -> Path:
    pl.DataFrame(rows).write_parquet(path)
    return path


@pytest.fixture
def pairs_file(tmp_path):
    return write_pairs(tmp_path / "pairs.parquet", [pair_row(i) for i in range(8)])


def config_for(pairs: Path, out: Path, model: Path, **overrides) -> TrainConfig:
    settings = dict(
        pairs=pairs, output_dir=out, base_model=str(model), max_steps=2, effective_batch_size=2,
        per_device_batch_size=2, save_steps=2, learning_rate=1e-3,
    )
    settings.update(overrides)
    return TrainConfig(**settings)


def weights(model_dir: Path) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in AutoModelForCausalLM.from_pretrained(model_dir).state_dict().items()}


def test_two_steps_change_the_parameters_and_log_metrics(tiny_models, pairs_file, tmp_path):
    policy, _ = tiny_models
    out = tmp_path / "run"
    manifest = train(config_for(pairs_file, out, policy))

    before, after = weights(policy), weights(out / "model")
    changed = [name for name in before if not torch.equal(before[name], after[name])]
    assert len(changed) == len(before)  # every tensor moved (tied embeddings count once)
    logs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [log for log in logs if "loss" in log]
    assert [log["step"] for log in steps] == [1, 2]
    assert all(math.isfinite(log["loss"]) for log in steps)
    assert {"rewards/margins", "rewards/accuracies", "rewards/chosen", "logps/chosen"} <= set(steps[0])
    assert manifest.steps == 2 and manifest.base_model == str(policy)
    assert manifest.dpo_config["loss_type"] == ["sigmoid", "sft"]
    assert manifest.dpo_config["loss_weights"] == [1.0, 0.1] and manifest.dpo_config["beta"] == 0.15
    assert manifest.lengths["dropped"] == 0 and manifest.lengths["truncated"] == 0
    assert manifest.model_dump(mode="json") == json.loads((out / "manifest.json").read_text())


def test_paper_defaults_and_effective_batch():
    from longreward_core.training.trainer import dpo_config

    config = TrainConfig(pairs="x", output_dir="y", per_device_batch_size=2)
    args = dpo_config(config, max_length=4096, world_size=4)
    assert (args.beta, args.loss_type, args.loss_weights, args.learning_rate) == (0.15, ["sigmoid", "sft"], [1.0, 0.1], 1e-6)
    assert args.gradient_accumulation_steps == 2  # 2 per device x 4 processes x 2 = 16
    assert args.activation_checkpointing and args.gradient_checkpointing and args.max_length == 4096
    assert args.bf16 is False  # no GPU here: fp32
    with pytest.raises(ValueError, match="not a multiple"):
        dpo_config(config, max_length=4096, world_size=3)
    with pytest.raises(ValueError, match="not DPOConfig fields: warmup_ratoi"):
        dpo_config(TrainConfig(pairs="x", output_dir="y", dpo_overrides={"warmup_ratoi": 0.1}), 128)
    assert dpo_config(TrainConfig(pairs="x", output_dir="y", dpo_overrides={"warmup_steps": 7}), 128).warmup_steps == 7


def test_dpo_overrides_that_trl_would_not_apply_are_refused(tiny_models, pairs_file, tmp_path):
    from longreward_core.training.trainer import dpo_config

    policy, _ = tiny_models
    args = dpo_config(config_for(pairs_file, tmp_path / "run", policy), max_length=128)
    assert not args.padding_free and not args.use_liger_kernel  # our own settings ask for nothing TRL drops
    for key in ("padding_free", "use_liger_kernel"):
        with pytest.raises(ValueError, match=rf"dpo_overrides: {key}=True is refused: TRL's DPOTrainer"):
            config_for(pairs_file, tmp_path / "run", policy, dpo_overrides={key: True})
    assert config_for(pairs_file, tmp_path / "run", policy, dpo_overrides={"padding_free": False}).dpo_overrides

    # What the refusals say is what the installed TRL does with them.
    unchecked = config_for(pairs_file, tmp_path / "run", policy).model_copy(
        update={"dpo_overrides": {"padding_free": True, "use_liger_kernel": True}})
    loaded = load_pairs(pairs_file)
    with pytest.warns(FutureWarning, match="use_liger_kernel=True` is deprecated"):
        trainer = build_trainer(unchecked, loaded, str(policy), check_lengths(unchecked, loaded, str(policy)))
    assert trainer.args.padding_free and not trainer.padding_free
    assert trainer.args.liger_kernel_config == {"fused_linear_cross_entropy": False}


def completion_logps(model, prompt_ids: list[int], full_ids: list[int]) -> torch.Tensor:
    """Per-token log-probabilities of the completion (the tokens after the prompt), by hand."""
    with torch.no_grad():
        logits = model(torch.tensor([full_ids])).logits[0, :-1].float()
    logps = torch.log_softmax(logits, dim=-1).gather(1, torch.tensor(full_ids[1:]).unsqueeze(1)).squeeze(1)
    return logps[len(prompt_ids) - 1:]


def test_reported_loss_is_dpo_sigmoid_plus_a_tenth_of_chosen_cross_entropy(tiny_models, tmp_path):
    policy_dir, reference_dir = tiny_models
    rows = [pair_row(0), pair_row(1, chosen="Blue.", rejected="The document does not say what colour it is."),
            pair_row(2, chosen="Blue, as stated in the document.", rejected="Red."), pair_row(3)]
    pairs = write_pairs(tmp_path / "pairs.parquet", rows)
    config = config_for(pairs, tmp_path / "run", policy_dir, ref_model=str(reference_dir), max_steps=1,
                        effective_batch_size=4, per_device_batch_size=4)
    loaded = load_pairs(pairs)
    trainer = build_trainer(config, loaded, str(policy_dir), check_lengths(config, loaded, str(policy_dir)))
    trainer.train()
    reported = trainer.state.log_history[0]["loss"]

    # Independently: the initial policy and the (different) reference, token by token.
    tokenizer = AutoTokenizer.from_pretrained(policy_dir)
    policy, reference = (AutoModelForCausalLM.from_pretrained(d).eval() for d in (policy_dir, reference_dir))
    dpo_terms, chosen_token_logps = [], []
    for row in rows:
        prompt_ids = tokenizer.apply_chat_template(row["prompt"], add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
        sums = {}
        for side in ("chosen", "rejected"):
            full = tokenizer.apply_chat_template(row["prompt"] + row[side], tokenize=True, return_dict=True)["input_ids"]
            assert full[: len(prompt_ids)] == prompt_ids
            policy_logps = completion_logps(policy, prompt_ids, full)
            sums[side] = (policy_logps.sum(), completion_logps(reference, prompt_ids, full).sum())
            if side == "chosen":
                chosen_token_logps.append(policy_logps)
        margin = (sums["chosen"][0] - sums["chosen"][1]) - (sums["rejected"][0] - sums["rejected"][1])
        dpo_terms.append(-F.logsigmoid(0.15 * margin))
    expected = torch.stack(dpo_terms).mean() + 0.1 * -torch.cat(chosen_token_logps).mean()
    assert abs(margin) > 0.1  # a different reference: the DPO term is not the trivial log 2
    assert reported == pytest.approx(expected.item(), abs=1e-4)


def test_too_long_pairs_are_counted_and_refused(tiny_models, tmp_path):
    policy, _ = tiny_models
    long_context = "The report runs on for pages. " * 40
    rows = [pair_row(0), pair_row(1, context=long_context), pair_row(2, chosen="Blue. " * 60), pair_row(3)]
    pairs = write_pairs(tmp_path / "pairs.parquet", rows)
    loaded = load_pairs(pairs)
    lengths = measure_lengths(loaded.dataset, AutoTokenizer.from_pretrained(policy))
    # Our counts are TRL's: the trainer's own tokenisation gives the same prompt/completion split.
    config = config_for(pairs, tmp_path / "run", policy, max_length=None)
    trainer = build_trainer(config, loaded, str(policy), check_lengths(config, loaded, str(policy)))
    assert [(len(r["prompt_ids"]), len(r["chosen_ids"]), len(r["rejected_ids"])) for r in trainer.train_dataset] == [
        (x.prompt, x.chosen, x.rejected) for x in lengths
    ]

    cap = 100
    assert lengths[1].prompt >= cap and lengths[2].prompt < cap < lengths[2].sequence
    refused = config_for(pairs, tmp_path / "refused", policy, max_length=cap)
    with pytest.raises(TrainingRefused, match=r"drop 1 and truncate 1 of 4 pairs") as err:
        prepare_run(refused)
    assert err.value.report.dropped_rows == [1] and err.value.report.truncated_rows == [2]
    assert not (tmp_path / "refused" / "train_config.json").exists()  # nothing launched

    allowed = config_for(pairs, tmp_path / "allowed", policy, max_length=cap, allow_truncation=True)
    _, report = prepare_run(allowed)
    assert (report.dropped, report.truncated) == (1, 1)
    assert json.loads((tmp_path / "allowed" / "lengths.json").read_text())["dropped_rows"] == [1]

    small_model = save_tiny_llama(tmp_path / "small", seed=0, max_positions=64)
    with pytest.raises(TrainingRefused, match="model limit: 64"):
        prepare_run(config_for(pairs, tmp_path / "small-run", small_model))  # sized from the data, capped


def test_bad_schema_and_bad_rows(tiny_models, tmp_path):
    good = pair_row(0)
    missing = write_pairs(tmp_path / "missing.parquet", [{k: v for k, v in good.items() if k != "rejected"}])
    with pytest.raises(PairsSchemaError, match=r"missing\.parquet: missing column\(s\) rejected"):
        load_pairs(missing)
    plain = write_pairs(tmp_path / "plain.parquet", [{**good, "chosen": "The sky is blue."}])
    with pytest.raises(PairsSchemaError, match=r"column 'chosen' is (large_)?string, expected a list of \{role, content\}"):
        load_pairs(plain)
    renamed = write_pairs(tmp_path / "renamed.parquet", [{**good, "rejected": [{"speaker": "assistant", "text": "Green."}]}])
    with pytest.raises(PairsSchemaError, match=r"column 'rejected' holds struct<speaker"):
        load_pairs(renamed)
    with pytest.raises(InputError, match="no such file"):
        load_pairs(tmp_path / "nowhere.parquet")
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(InputError, match="not a preference dataset"):
        load_pairs(tmp_path / "notes.txt")

    rows = [pair_row(0), {**pair_row(1), "chosen": []}, {**pair_row(2), "rejected": [{"role": "assistant", "content": "  "}]},
            {**pair_row(3), "prompt": [{"role": "assistant", "content": "hi"}]}, pair_row(4)]
    loaded = load_pairs(write_pairs(tmp_path / "mixed.parquet", rows))
    assert len(loaded.dataset) == 2
    assert [(q.line, q.row_id, q.reason) for q in loaded.quarantined] == [
        (2, "p1", "chosen must be assistant messages"), (3, "p2", "rejected is empty"),
        (4, "p3", "prompt must end with a user message"),
    ]
    _, report = prepare_run(config_for(tmp_path / "mixed.parquet", tmp_path / "run", tiny_models[0]))
    assert report.pairs == 2
    written = (tmp_path / "run" / "quarantine.jsonl").read_text().splitlines()
    assert [QuarantinedRow.model_validate_json(line) for line in written] == loaded.quarantined


def test_pairs_whose_messages_are_not_utf8_are_quarantined(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.Table.from_pylist([pair_row(i) for i in range(3)])
    # Row 2's chosen message holds the UTF-8 encoding of a lone surrogate (Arrow writes it unchecked).
    chosen = table.column("chosen").combine_chunks()
    contents = chosen.values.field("content").to_pylist()
    contents[chosen.offsets[1].as_py()] = "Blue \udc80."
    content = pa.array([c.encode("utf-8", "surrogatepass") for c in contents], pa.binary()).view(pa.string())
    messages = pa.StructArray.from_arrays([chosen.values.field("role"), content], names=["role", "content"])
    table = table.set_column(table.schema.get_field_index("chosen"), "chosen", pa.ListArray.from_arrays(chosen.offsets, messages))
    pq.write_table(table, tmp_path / "pairs.parquet")

    loaded = load_pairs(tmp_path / "pairs.parquet")
    assert loaded.dataset["prompt_id"] == ["p0", "p2"]
    assert [(q.line, q.reason) for q in loaded.quarantined] == [
        (2, "field 'chosen' holds text that is not valid UTF-8 (invalid continuation byte at byte 5)"),
    ]
    assert json.loads(loaded.quarantined[0].raw)["prompt_id"] == "p1"


def test_reads_a_published_build(tiny_models, tmp_path, empty_build_manifest):
    from longreward_core.data.io import file_hash
    from longreward_core.pipeline.build import publish_dataset

    build = tmp_path / "build"
    publish_dataset(write_pairs(tmp_path / "pairs.parquet", [pair_row(i) for i in range(3)]), build, empty_build_manifest)
    for source in (build, build / "pairs.parquet", build / "dataset"):
        loaded = load_pairs(source)
        assert len(loaded.dataset) == 3
        assert loaded.dataset_manifest_sha256 == file_hash(build / "manifest.json")


class CrashBeforeStep(TrainerCallback):
    """Stops the run like a lost machine would: after a checkpoint, in the middle of training."""

    def __init__(self, step: int):
        self.step = step

    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            raise RuntimeError("simulated crash")


def test_a_stopped_run_resumes_from_its_last_checkpoint(tiny_models, pairs_file, tmp_path):
    policy, _ = tiny_models
    straight = train(config_for(pairs_file, tmp_path / "straight", policy, max_steps=4))

    config = config_for(pairs_file, tmp_path / "resumed", policy, max_steps=4)
    with pytest.raises(RuntimeError, match="simulated crash"):
        train(config, callbacks=[CrashBeforeStep(3)])  # after checkpoint-2, before step 3
    assert sorted(p.name for p in (tmp_path / "resumed" / "checkpoints").glob("checkpoint-*")) == ["checkpoint-2"]

    resumed = train(config)
    assert resumed.resumed_from.endswith("checkpoint-2") and resumed.steps == 4
    logged = [json.loads(line)["step"] for line in (tmp_path / "resumed" / "metrics.jsonl").read_text().splitlines()
              if "loss" in json.loads(line)]
    assert logged == [1, 2, 3, 4]
    # The resumed run ends where the uninterrupted one does.
    a, b = weights(tmp_path / "straight" / "model"), weights(tmp_path / "resumed" / "model")
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    assert resumed.last_log["loss"] == pytest.approx(straight.last_log["loss"], abs=1e-6)

    # Running a finished run again trains no further step and keeps the model.
    again = train(config)
    assert again.steps == 4 and again.final_metrics == {}
    assert sorted(p.name for p in (tmp_path / "resumed" / "checkpoints").glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]
    c = weights(tmp_path / "resumed" / "model")
    assert all(torch.equal(b[k], c[k]) for k in b)


def test_accelerate_launch_streams_the_run_and_reports_failures(tiny_models, pairs_file, tmp_path, measured_pairs):
    policy, _ = tiny_models
    lines: list[str] = []
    manifest = launch_training(config_for(pairs_file, tmp_path / "run", policy), accelerate_config="cpu",
                               on_line=lines.append)
    assert measured_pairs() == [8]  # the 8 pairs were tokenised once, by the launcher, not again by the rank
    assert manifest.steps == 2 and (tmp_path / "run" / "model" / "config.json").exists()
    assert any("'rewards/margins'" in line for line in lines)  # the trainer's own log lines, as they came
    assert any("8 pairs, longest" in line for line in lines)

    # A launched run that fails: its last lines are in the error.
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "config.json").write_text("{}")
    with pytest.raises(TrainingFailed, match="exited with code"):
        launch_training(config_for(pairs_file, tmp_path / "run-broken", policy, ref_model=str(tmp_path / "broken")),
                        accelerate_config="cpu", on_line=lambda line: None)

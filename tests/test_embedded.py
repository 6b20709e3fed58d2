"""The embedded judge (SmolLM2-135M on the CPU) end to end on one small prompt."""

from __future__ import annotations

import json

import polars as pl

from longreward_core.models.embedded import embedded_stats
from longreward_core.pipeline.score import score_files
from longreward_core.reward.judge import JudgeConfig
from longreward_core.reward.scorer import ScoringConfig


def test_embedded_judge_scores_a_small_prompt(tmp_path):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({
        "id": "mill",
        "context": "The Orrin mill opened in 1901 and ground wheat for three villages. It closed in 1968 after a fire.",
        "query": "When did the mill close, and why?",
    }) + "\n")
    candidates = tmp_path / "c.jsonl"
    candidates.write_text(json.dumps({"prompt_id": "mill", "candidate_id": "mill-0", "response": "It closed in 1968 after a fire."}) + "\n")
    before = embedded_stats()
    run = score_files(prompts, candidates, tmp_path / "out", JudgeConfig(concurrency=1), ScoringConfig())
    row = pl.read_parquet(run.scores_path).row(0, named=True)
    # The embedded judge always yields a parseable verdict: every dimension is scored.
    assert row["status"] == "scored", row["error"]
    for dimension in ("helpfulness", "logicality", "faithfulness", "completeness"):
        assert 0.0 <= row[dimension] <= 10.0
    total = run.summary.judge["total"]
    assert total["parse_failures"] == 0 and total["failed_calls"] == 0
    after = run.summary.embedded_judge
    verdicts = (after["verdicts_unaided"] + after["verdicts_constrained"]) - (
        before["verdicts_unaided"] + before["verdicts_constrained"]
    )
    assert verdicts == total["calls"] >= 5


def test_decoding_stops_only_at_a_verdict_the_parser_reads():
    from longreward_core.models.embedded import _has_verdict
    from longreward_core.reward.dimensions.faithfulness import STATEMENTS
    from longreward_core.reward.verdicts import RATING

    cases = [
        (RATING, "The reference would earn [[7]]", False),
        (RATING, "Analysis.\nRating: [[7]]", True),
        (STATEMENTS, "[[statements]]\n- The sky is bl", False),
        (STATEMENTS, "[[statements]]\n- The sky is blue.\n", False),
        (STATEMENTS, "[[statements]]\n- Statements:\n[[end]]", False),
        (STATEMENTS, "[[statements]]\n- The sky is blue.\n[[end]]", True),
    ]
    for verdict, text, stops in cases:
        assert _has_verdict(text, verdict.constraint()) is stops, text
        if stops:
            verdict.parse(text)


def test_the_growing_cache_gives_the_same_logits_as_transformers_dynamic_cache():
    """Decoding into spare room (with the copy and crop the prefix cache does) changes no number."""
    import copy

    import torch
    from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

    from longreward_core.models.embedded import _ROOM_TOKENS, _growing_cache_class

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024)
    model = LlamaForCausalLM(config).eval()
    prompt = torch.randint(0, 97, (1, 40))

    def decode(cache: object) -> torch.Tensor:
        logits = []
        with torch.no_grad():
            out = model(input_ids=prompt, cache=cache, use_cache=True)
            logits.append(out.logits[0, -1])
            for i in range(_ROOM_TOKENS + 60):  # past the first room, so it grows once
                if i == 30:
                    cache = copy.deepcopy(cache)
                    cache.crop(-7)
                step = model(input_ids=torch.tensor([[i % 97]]), cache=cache, use_cache=True)
                logits.append(step.logits[0, -1])
        return torch.stack(logits)

    assert torch.equal(decode(DynamicCache()), decode(_growing_cache_class()()))


def test_the_embedded_dtype_is_chosen_by_the_environment_or_the_cpu(monkeypatch):
    import pytest

    from longreward_core.models.embedded import DTYPE_ENV, embedded_dtype

    monkeypatch.setenv(DTYPE_ENV, "float32")
    assert embedded_dtype() == "float32"
    monkeypatch.setenv(DTYPE_ENV, "BFloat16")
    assert embedded_dtype() == "bfloat16"
    monkeypatch.setenv(DTYPE_ENV, "float16")
    with pytest.raises(ValueError, match=f"{DTYPE_ENV}='float16': expected float32 or bfloat16"):
        embedded_dtype()
    monkeypatch.delenv(DTYPE_ENV)
    assert embedded_dtype() in ("float32", "bfloat16")


def test_the_embedded_model_answers_n_choices_in_one_request():
    """The policy's `n` (sample_in_one_request): n samples decoded side by side, each its own text."""
    import asyncio

    from longreward_core.models.accounting import RunAccounting
    from longreward_core.models.client import LLMClient, PolicyClientConfig

    client = LLMClient(PolicyClientConfig(model="embedded/smollm2", max_tokens=16, concurrency=1), None, RunAccounting())
    messages = [{"role": "user", "content": "Name a river."}]
    answer = asyncio.run(client.complete("sampling", messages, 1.0, 0, top_p=0.95, n=3))
    texts = json.loads(answer)
    assert len(texts) == 3 and all(isinstance(t, str) and t.strip() for t in texts)
    usage = client.accounting.per_purpose["sampling"]
    assert usage.calls == 1 and 3 <= usage.completion_tokens <= 48


def test_decoding_from_a_remembered_cache_picks_the_same_tokens_as_one_token_at_a_time(monkeypatch):
    """Greedy decoding through generate, from an empty and from a remembered prefix cache."""
    import torch
    from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

    from longreward_core.models import embedded

    torch.manual_seed(3)
    config = LlamaConfig(vocab_size=50, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048)
    model = LlamaForCausalLM(config).eval()

    class Tokenizer:
        eos_token_id = -1  # never chosen

        def decode(self, tokens, skip_special_tokens=True):
            return " ".join(map(str, tokens))

    original_forward = model.forward
    monkeypatch.setattr(embedded, "_prefixes", embedded._PrefixCache())
    phrase = [7, 3, 9, 21, 4, 16, 30, 2, 11, 5]
    prompt = phrase * 6 + [7, 3, 9]

    def one_at_a_time(max_new):
        cache, ids, chosen = DynamicCache(), torch.tensor([prompt]), []
        with torch.no_grad():
            for _ in range(max_new):
                logits = original_forward(input_ids=ids, cache=cache, use_cache=True).logits[0, -1]
                chosen.append(int(torch.argmax(logits)))
                ids = torch.tensor([[chosen[-1]]])
        return chosen

    def assert_remembered(answer):
        # The remembered cache holds exactly the prompt and the answer (not what ran past a stop);
        # the answer's last token may be missing (generate never runs the token it ends on).
        seq, cache = embedded._prefixes.entries[0]
        assert cache.get_seq_length() == len(seq) and seq == (prompt + answer)[: len(seq)]
        assert len(prompt) + len(answer) - 1 <= len(seq)

    greedy = embedded._decode(model, Tokenizer(), prompt, 40, 0.0)
    assert greedy == one_at_a_time(40)
    assert_remembered(greedy)
    stopped = embedded._decode(model, Tokenizer(), prompt, 40, 0.0, stop=lambda text: len(text.split()) >= 5)
    assert stopped == greedy[:5]  # from the remembered cache
    assert_remembered(stopped)

"""The embedded judge (SmolLM2-135M on the CPU) end to end on one small prompt."""

from __future__ import annotations

import json

import polars as pl

from longreward_core.models.embedded_llm import embedded_stats
from longreward_core.pipeline.score_files import score_files
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
    total = run.summary.judge.total
    assert total.parse_failures == 0 and total.failed_calls == 0
    after = run.summary.embedded_judge
    verdicts = (after.verdicts_unaided + after.verdicts_constrained) - (before.verdicts_unaided + before.verdicts_constrained)
    assert verdicts == total.calls >= 5


def test_decoding_stops_only_at_a_verdict_the_parser_reads():
    from longreward_core.models.embedded_llm import _has_verdict
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

    from longreward_core.models.embedded_llm import _ROOM_TOKENS, _growing_cache_class

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

    from longreward_core.models.embedded_llm import DTYPE_ENV, embedded_dtype

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


def test_drafted_decoding_picks_the_same_tokens_as_one_token_at_a_time(monkeypatch):
    """Prompt-lookup drafts change how many forwards run, not the tokens chosen (greedy here)."""
    import torch
    from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

    from longreward_core.models import embedded_llm as embedded

    torch.manual_seed(3)
    config = LlamaConfig(vocab_size=50, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048)
    model = LlamaForCausalLM(config).eval()

    class Tokenizer:
        eos_token_id = -1  # never chosen

        def decode(self, tokens, skip_special_tokens=True):
            return " ".join(map(str, tokens))

    forwards = []
    original_forward = model.forward
    monkeypatch.setattr(model, "forward", lambda *a, **k: forwards.append(k["input_ids"].shape[1]) or original_forward(*a, **k))
    monkeypatch.setattr(embedded, "_prefixes", embedded._PrefixCache())
    phrase = [7, 3, 9, 21, 4, 16, 30, 2, 11, 5]
    prompt = phrase * 6 + [7, 3, 9]  # the model is likely to continue the phrase: drafts get taken

    def one_at_a_time(max_new):
        cache, ids, chosen = DynamicCache(), torch.tensor([prompt]), []
        with torch.no_grad():
            for _ in range(max_new):
                logits = original_forward(input_ids=ids, cache=cache, use_cache=True).logits[0, -1]
                chosen.append(int(torch.argmax(logits)))
                ids = torch.tensor([[chosen[-1]]])
        return chosen

    drafted = embedded._decode(model, Tokenizer(), prompt, 40, 0.0)
    assert drafted == one_at_a_time(40)
    assert len(forwards) < 1 + 40 and max(forwards[1:]) > 1  # fewer forwards than tokens: drafts were taken
    # The remembered cache holds exactly the prompt and the answer (drafts not taken were cropped).
    assert embedded._prefixes.entries[0][1].get_seq_length() == len(prompt) + 40
    stopped = embedded._decode(model, Tokenizer(), prompt, 40, 0.0, stop=lambda text: len(text.split()) >= 5)
    assert stopped == drafted[:5]
    assert embedded._prefixes.entries[0][1].get_seq_length() == len(prompt) + 5


def test_the_verdict_choice_is_greedy_decoding_among_the_allowed_sequences(monkeypatch):
    """The constrained verdict (generate with prefix_allowed_tokens_fn) is what greedy decoding
    picks token by token when every token outside the live `choice + suffix` sequences is masked."""
    import torch
    from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

    from longreward_core.models import embedded_llm as embedded

    torch.manual_seed(5)
    config = LlamaConfig(vocab_size=50, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
    model = LlamaForCausalLM(config).eval()
    monkeypatch.setattr(embedded, "_prefixes", embedded._PrefixCache())
    sequences = {"1]]": [11, 40], "10]]": [11, 12, 40], "7]]": [17, 40], "8]]": [18, 41, 40]}

    class Tokenizer:
        eos_token_id = 2

        def __call__(self, text, add_special_tokens=False):
            return {"input_ids": sequences[text]}

    def masked_greedy(prompt):
        cache, ids, chosen = DynamicCache(), torch.tensor([prompt]), []
        with torch.no_grad():
            while not any(seq == chosen for seq in sequences.values()):
                logits = model(input_ids=ids, cache=cache, use_cache=True).logits[0, -1]
                allowed = [seq[len(chosen)] for seq in sequences.values() if seq[: len(chosen)] == chosen]
                chosen.append(max(allowed, key=lambda token: logits[token]))
                ids = torch.tensor([[chosen[-1]]])
        return next(text.removesuffix("]]") for text, seq in sequences.items() if seq == chosen)

    picked = set()
    for seed in range(6):
        prompt = torch.randint(3, 50, (30,), generator=torch.Generator().manual_seed(seed)).tolist()
        choice = embedded._constrained_choice(model, Tokenizer(), prompt, ["1", "10", "7", "8"], "]]")
        assert choice == masked_greedy(prompt)
        picked.add(choice)
    assert len(picked) > 1  # the prompts lead to different verdicts: the choice follows the logits

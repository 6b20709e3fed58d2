"""Prompts and prefix caching: the cacheable share (models.prefix_share), the provider's cached
tokens and their price, and Anthropic cache_control breakpoints, against the loopback judge."""

from __future__ import annotations

import json
import random

import litellm
import pytest

from longreward_core.models.prefix_share import PrefixShare
from longreward_core.pipeline.score_files import score_files
from longreward_testing.scenarios import judge_config_for
from tests.test_scoring import SCORING, small_input  # noqa: F401 (a fixture)


class CharTokenizer:
    """One token per character: shared prefixes are easy to count by hand."""

    def __call__(self, text: str, add_special_tokens: bool = False) -> dict:
        return {"input_ids": [ord(c) for c in text]}


def test_shared_prefix_is_the_longest_with_any_earlier_prompt_of_the_same_model() -> None:
    rng = random.Random(0)
    share = PrefixShare(CharTokenizer())
    seen: dict[str, list[str]] = {"a": [], "b": []}
    for _ in range(300):
        model = rng.choice("ab")
        text = "".join(rng.choice("xyz") for _ in range(rng.randint(0, 12)))
        counted, shared = share.observe(model, [{"role": "user", "content": text}])
        full = "user\n" + text
        expected = max((len(_common(full, earlier)) for earlier in seen[model]), default=0)
        seen[model].append(full)
        assert (counted, shared) == (len(full), expected)


def _common(a: str, b: str) -> str:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return a[:n]


PRICE = {"input_cost_per_token": 4e-7, "cache_read_input_token_cost": 1e-7, "output_cost_per_token": 1.6e-6}


@pytest.fixture
def priced_model():
    name = "judge-double-priced"
    litellm.register_model({name: {**PRICE, "litellm_provider": "openai", "mode": "chat", "max_tokens": 4096}})
    return f"openai/{name}"


def test_accounting_reports_cacheable_share_cached_tokens_and_cached_price(judge_server, small_input, tmp_path, priced_model):
    prompts, candidates = small_input
    judge_server.double.cache_min_tokens = 256  # the test's prompts are shorter than OpenAI's 1024
    judge = judge_config_for(judge_server, model=priced_model)
    run = score_files(prompts, candidates, tmp_path / "out", judge, SCORING)
    accounting = json.loads(run.accounting_path.read_text())["judge"]
    total = accounting["total"]
    requests = judge_server.double.requests
    # What the provider reported as cached is what the accounting records.
    assert total["cached_tokens"] == sum(r.cached_tokens for r in requests) > 0
    # Cost at cached prices, as litellm computes it from the reported usage.
    prompt = sum(len(r.content) // 4 for r in requests)
    cached = total["cached_tokens"]
    expected = (prompt - cached) * PRICE["input_cost_per_token"] + cached * PRICE["cache_read_input_token_cost"] \
        + total["completion_tokens"] * PRICE["output_cost_per_token"]
    assert total["cost_usd"] == pytest.approx(expected, rel=1e-6)
    # Every prompt after the first of a template shares at least its instructions.
    assert 0.5 < total["cacheable_share"] < 1
    for dimension in ("helpfulness", "logicality", "faithfulness", "completeness"):
        purpose = accounting["per_purpose"][dimension]
        assert 0 < purpose["cacheable_tokens"] < purpose["tokenized_prompt_tokens"]
        assert purpose["cacheable_share"] == purpose["cacheable_tokens"] / purpose["tokenized_prompt_tokens"]


def test_cache_control_marks_the_shared_instructions(judge_server, small_input, tmp_path):
    prompts, candidates = small_input
    plain = score_files(prompts, candidates, tmp_path / "plain", judge_config_for(judge_server), SCORING)
    judge_server.double.reset()
    marked = score_files(prompts, candidates, tmp_path / "marked", judge_config_for(judge_server, cache_control=True), SCORING)
    requests = judge_server.double.requests
    assert requests and all(r.cache_control for r in requests)
    # The same prompts, the same verdicts: the breakpoint changes nothing the judge reads.
    assert plain.summary.mean_by_dimension == marked.summary.mean_by_dimension


def test_cache_breakpoint_splits_at_the_template_text() -> None:
    from longreward_core.reward.prompts import render, with_cache_breakpoint

    messages = render("helpfulness", "en", question="Why?", response="Because.")
    marked = with_cache_breakpoint(messages)
    first, rest = marked[0]["content"]
    assert first["cache_control"] == {"type": "ephemeral"} and "cache_control" not in rest
    assert first["text"] + rest["text"] == messages[0]["content"]
    assert first["text"].startswith("[Task: grade HELPFULNESS]") and "Why?" not in first["text"] and "Why?" in rest["text"]


def test_every_judge_template_puts_shared_text_first_and_per_candidate_text_last() -> None:
    """Prefix-cache layout: instructions and examples (shared by every prompt of a template) open
    the template, then the per-prompt slots, then the per-candidate ones."""
    import re

    from longreward_core.reward.prompts import DIMENSION_PROMPTS, LANGUAGES, load_template

    per_prompt, per_candidate = {"question", "chunk", "key_points"}, {"response", "evidence", "statement"}
    names = sorted({p.name.split(".")[0] for p in DIMENSION_PROMPTS.iterdir() if p.name.endswith(".txt")})
    assert len(names) == 6
    for name in names:
        for language in LANGUAGES:
            template = load_template(name, language)
            slots = re.findall(r"\{\{(\w+)\}\}", template)
            assert set(slots) <= per_prompt | per_candidate, (name, slots)
            kinds = [0 if s in per_prompt else 1 for s in slots]
            assert kinds == sorted(kinds), (name, language, slots)
            # The shared opening is most of the template: what a provider's cache can reuse.
            assert template.index("{{") > 0.6 * len(template), name


class SmallVocabularyTokenizer(CharTokenizer):
    """A vocabulary that fits 2 bytes a token, then a token past it (the keys widen to 4 bytes)."""

    def __len__(self) -> int:
        return 1000


def test_two_bytes_a_token_when_the_vocabulary_fits_with_the_same_counts() -> None:
    narrow, wide = PrefixShare(SmallVocabularyTokenizer()), PrefixShare(CharTokenizer())
    assert narrow._dtype == ">u2" and wide._dtype == ">u4"
    rng = random.Random(1)
    for i in range(200):
        text = "".join(rng.choice("xyz\u0101" if i < 120 else "xyz\U0001f600") for _ in range(rng.randint(0, 12)))
        messages = [{"role": "user", "content": text}]
        assert narrow.observe("m", messages) == wide.observe("m", messages)
    assert narrow._dtype == ">u4"  # widened at the first token past 65,535


def test_only_the_most_recent_window_of_prompts_is_kept() -> None:
    """Memory stays bounded: a prompt shares nothing with one that left the window."""
    share = PrefixShare(SmallVocabularyTokenizer(), window_bytes=3 * 2 * 25)  # three 25-token prompts
    first = [{"role": "user", "content": "a" * 20}]  # "user\n" + 20 characters: 25 tokens
    assert share.observe("m", first) == (25, 0)
    for filler in "bc":
        share.observe("m", [{"role": "system", "content": filler * 18}])
    assert share.observe("m", first) == (25, 25)  # the first is still among the last three
    for filler in "def":
        share.observe("m", [{"role": "system", "content": filler * 18}])
    assert share.observe("m", first) == (25, 0)  # both copies have left the window
    assert share._bytes <= share.window_bytes and len(share._order) == 3
    assert sum(map(len, share._seen.values())) == 3

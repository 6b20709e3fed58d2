"""Sampling a prompt's candidates in one request (`n`), with the fallback to one request each,
against the loopback server."""

from __future__ import annotations

import itertools

import pytest

from longreward_core.data.records import Prompt
from longreward_core.models.call_cache import CallCache
from longreward_core.models.client import LLMClient
from longreward_core.models.event_loop import run_async
from longreward_core.pipeline.sampling import PolicyConfig, sample_candidates

PROMPTS = [Prompt(id=f"p{i}", context=f"Document {i}: the mill opened in {1900 + i}.", query="When did the mill open?")
           for i in range(3)]


def sample(server, cache, **overrides):
    config = PolicyConfig(model="openai/policy-double", api_base=server.api_base, api_key="k", candidates_per_prompt=4,
                          max_context_tokens=4096, max_new_tokens=32, sample_in_one_request=True,
                          transport_retries=0, **overrides)

    async def run():
        return await sample_candidates(LLMClient(config.client_config(), cache), PROMPTS, config)

    return run_async(run())


@pytest.fixture
def counting_answers(judge_server):
    counter = itertools.count()
    judge_server.double.answers = {"unknown": lambda r: f"The mill opened long ago ({next(counter)})."}
    return judge_server


def test_one_request_per_prompt_and_a_rerun_samples_nothing(counting_answers, tmp_path):
    server = counting_answers
    cache = CallCache(tmp_path / "cache.sqlite")
    candidates, reports = sample(server, cache)
    assert server.double.count("unknown") == 3  # one request per prompt, not four
    assert len(candidates) == 12 and len({c.response for c in candidates}) == 12
    assert [c.candidate_id for c in candidates if c.prompt_id == "p0"] == ["p0-0", "p0-1", "p0-2", "p0-3"]
    assert all(r.sampled == 4 and r.failed == 0 for r in reports)
    server.double.reset()
    again, _ = sample(server, cache)
    assert server.double.count() == 0 and [c.response for c in again] == [c.response for c in candidates]


@pytest.mark.parametrize("mode", ["refuse", "ignore"])
def test_a_server_without_n_gets_one_request_per_candidate(counting_answers, tmp_path, mode):
    server = counting_answers
    server.double.n_mode = mode
    cache = CallCache(tmp_path / "cache.sqlite")
    candidates, reports = sample(server, cache)
    assert len(candidates) == 12 and all(r.sampled == 4 and r.error is None for r in reports)
    # At most one `n` request per prompt (those in flight before the first refusal), then one each.
    assert 12 < server.double.count("unknown") <= 12 + 3
    server.double.reset()
    sample(server, cache)
    # The re-run: the refused or short `n` answers were never cached, so each prompt asks `n` once
    # more, the candidates come from the cache.
    assert server.double.count("unknown") <= 3

"""The direct route (OpenAI SDK) against the litellm route, request for request, on the loopback
double: the same answers, accounting, cost and cached tokens, and every fault maps to the same
outcome (retried, rejected, refused), with the same retry counts."""

from __future__ import annotations

import asyncio

import litellm
import pytest

from longreward_core.models.client import LLMClient
from longreward_core.models.errors import AuthenticationFailed, ConfigurationError, LLMCallFailed, RequestRejected
from longreward_core.models.direct import direct_model
from longreward_testing.judge_double import Fault
from longreward_testing.scenarios import TEST_API_KEY, judge_config_for

MESSAGES = [{"role": "user", "content": "[Task: grade HELPFULNESS]\n<question>\nq\n</question>"}]
# Long enough for the double's prefix cache (whole 128-token blocks of a shared prefix).
LONG = [{"role": "user", "content": MESSAGES[0]["content"] + "\n<response>\n" + "words " * 300 + "\n</response>"}]
ROUTES = ("direct", "litellm")


def send(server, route, messages=MESSAGES, times=1, **overrides):
    """`times` distinct requests through one client (a call cache: `cache`); (answers or the
    exception, the accounting)."""
    sampling = overrides.pop("sampling", {})
    raw_prompt = overrides.pop("raw_prompt", False)
    cache = overrides.pop("cache", None)

    async def run():
        client = LLMClient(judge_config_for(server, **overrides), cache, direct=route == "direct")
        assert client.route == route
        out = []
        for attempt in range(times):
            try:
                out.append(await client.complete("helpfulness", messages, 0.0, attempt, raw_prompt=raw_prompt, **sampling))
            except LLMCallFailed as exc:
                out.append(exc)
        return out, client.accounting.purpose("helpfulness")

    return asyncio.run(run())


def test_the_direct_route_is_taken_only_for_plain_openai_models_at_a_server(monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    base = "http://127.0.0.1:1/v1"
    assert direct_model("openai/judge-double", base, "k") == "judge-double"
    assert direct_model("openai/Qwen/Qwen2.5-7B-Instruct", base, "k") == "Qwen/Qwen2.5-7B-Instruct"
    assert direct_model("openai/gpt-4o", None, "k") is None  # no server of our own: litellm
    assert direct_model("anthropic/claude-sonnet-4", base, "k") is None
    assert direct_model("hosted_vllm/m", base, "k") is None
    assert direct_model("openai/o3-mini", base, "k") is None  # litellm translates its parameters
    assert direct_model("openai/gpt-5-mini", base, "k") is None
    assert direct_model("openai/m", base, None) is None  # no key: litellm decides what to send
    monkeypatch.setenv("OPENAI_API_KEY", "sk-from-the-environment-123")
    assert direct_model("openai/m", base, None) == "m"


@pytest.mark.parametrize("route", ROUTES)
def test_answers_tokens_and_cached_tokens_match(judge_server, route):
    judge_server.double.cache_min_tokens = 4
    answers, acc = send(judge_server, route, LONG, times=3)
    assert answers[0].endswith("Rating: [[7]]") and len(set(answers)) == 1
    assert acc.calls == 3 and acc.prompt_tokens == 3 * (len(LONG[0]["content"]) // 4)
    assert acc.cached_tokens == sum(r.cached_tokens for r in judge_server.double.requests) > 0


@pytest.mark.parametrize("route", ROUTES)
def test_cost_is_litellms_price_on_both_routes(judge_server, route):
    name = "judge-double-direct-priced"
    price = {"input_cost_per_token": 3e-7, "cache_read_input_token_cost": 1e-7, "output_cost_per_token": 2e-6}
    litellm.register_model({name: {**price, "litellm_provider": "openai", "mode": "chat"}})
    judge_server.double.cache_min_tokens = 4
    _, acc = send(judge_server, route, LONG, times=3, model=f"openai/{name}")
    assert acc.cached_tokens > 0
    expected = (acc.prompt_tokens - acc.cached_tokens) * price["input_cost_per_token"] \
        + acc.cached_tokens * price["cache_read_input_token_cost"] + acc.completion_tokens * price["output_cost_per_token"]
    assert acc.cost_usd == pytest.approx(expected, rel=1e-9)
    _, unpriced = send(judge_server, route)  # a model litellm has no price for costs 0
    assert unpriced.cost_usd == 0.0


@pytest.mark.parametrize("route", ROUTES)
def test_text_completions_and_several_choices(judge_server, route):
    judge_server.double.n_mode = "serve"
    [raw], acc = send(judge_server, route, raw_prompt=True)
    assert isinstance(raw, str) and judge_server.double.requests[-1].task == "completion"
    [several], _ = send(judge_server, route, sampling={"n": 3, "top_p": 0.9})
    assert several.startswith("[") and len(__import__("json").loads(several)) == 3


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("fault", [Fault("status", 500), Fault("status", 429, retry_after="0"), Fault("status", 503),
                                   Fault("broken_body"), Fault("drop"), Fault("timeout")])
def test_transient_faults_are_retried(judge_server, route, fault):
    judge_server.double.timeout_sleep_s = 1.5
    judge_server.double.faults = [fault, fault]
    [answer], acc = send(judge_server, route, timeout_s=0.5)
    assert isinstance(answer, str) and answer.endswith("Rating: [[7]]")
    assert acc.transport_errors == 2 and acc.calls == 1 and judge_server.double.count() == 3


@pytest.mark.parametrize("route", ROUTES)
def test_retry_after_is_waited_for(judge_server, route):
    judge_server.double.faults = [Fault("status", 429, retry_after="0.4")]
    import time

    started = time.perf_counter()
    [answer], acc = send(judge_server, route, backoff_max_s=5.0)
    assert isinstance(answer, str) and acc.transport_errors == 1
    assert time.perf_counter() - started >= 0.4


@pytest.mark.parametrize("route", ROUTES)
def test_transient_faults_after_every_retry_are_a_transport_failure(judge_server, route):
    judge_server.double.faults = [Fault("status", 500)] * 3
    [failed], acc = send(judge_server, route, transport_retries=2)
    assert type(failed) is LLMCallFailed and failed.transport
    assert acc.transport_errors == 3 and acc.failed_calls == 1 and judge_server.double.count() == 3


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("status", [400, 422])
def test_a_refusal_is_not_retried(judge_server, route, status):
    judge_server.double.faults = [Fault("status", status)]
    [rejected], acc = send(judge_server, route)
    assert isinstance(rejected, RequestRejected) and not rejected.transport
    assert f"HTTP {status}" in str(rejected) and acc.rejected == 1 and judge_server.double.count() == 1
    if status == 400:
        assert "maximum context length" in str(rejected)


@pytest.mark.parametrize("route", ROUTES)
def test_an_unknown_model_is_a_configuration_error_that_stops_the_client(judge_server, route):
    judge_server.double.faults = [Fault("status", 404)]
    [unknown, again], acc = send(judge_server, route, times=2)
    assert isinstance(unknown, ConfigurationError) and not isinstance(unknown, RequestRejected) and again is unknown
    assert "HTTP 404" in str(unknown) and "openai/<id>" in str(unknown) and "again" not in str(unknown)
    assert judge_server.double.count() == 1 and acc.transport_errors == 0 and acc.rejected == 0


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("status", [401, 403])
def test_refused_credentials_stop_every_later_request(judge_server, route, status):
    judge_server.double.faults = [Fault("status", status)]
    [refused, again], acc = send(judge_server, route, times=2)
    assert isinstance(refused, AuthenticationFailed) and again is refused
    assert f"HTTP {status}" in str(refused) and TEST_API_KEY not in str(refused)
    assert judge_server.double.count() == 1 and acc.failed_calls == 2


def test_the_shipped_price_table_gives_litellms_prices():
    """Before litellm is imported, the direct route reads the price table litellm ships."""
    from longreward_core.models.direct import shipped_prices

    for served in ("gpt-4o", "gpt-4o-mini", "gpt-4.1", "gpt-4.1-nano"):
        ours, theirs = shipped_prices(f"openai/{served}", served), litellm.get_model_info(f"openai/{served}")
        for price in ("input_cost_per_token", "output_cost_per_token", "cache_read_input_token_cost"):
            assert ours[price] == theirs[price] and ours[price] > 0, (served, price)
    assert shipped_prices("openai/judge-double", "judge-double") is None


def test_the_score_command_starts_without_litellm_or_the_openai_sdk():
    """Importing the command line loads neither litellm nor the OpenAI SDK nor transformers: they
    are imported by the first request (or tokenizer) that needs them."""
    import subprocess
    import sys
    from pathlib import Path

    code = ("import sys, flows.cli; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in {'litellm', 'openai', 'transformers', 'prefect'}))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            cwd=Path(__file__).resolve().parents[1], timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"

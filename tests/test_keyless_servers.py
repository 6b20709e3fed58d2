"""Keyless OpenAI-compatible servers and the configuration faults a re-run cannot fix, against the
loopback double: a model at an api_base with no key anywhere is sent the placeholder key, refused
or missing credentials and unknown models stop the client without a retry, bad configuration is
refused before anything starts, and served ids that are paths reach the server as they are."""

from __future__ import annotations

import asyncio
import logging
import os

import openai
import pytest
from pydantic import ValidationError
from typer.testing import CliRunner

from flows.cli import app
from longreward_core.evaluation.predict import ModelSpec
from longreward_core.models.call_cache import CallCache
from longreward_core.models.client import LLMClient, LLMConfig
from longreward_core.models.errors import (
    AuthenticationFailed,
    ConfigurationError,
    LLMCallFailed,
    classify_failure,
    is_transient,
)
from longreward_core.models.secrets import KEYLESS_API_KEY
from longreward_core.pipeline.sampling import PolicyConfig
from longreward_core.reward.judge import JudgeConfig
from longreward_testing.judge_double import Fault
from tests.test_direct_route import MESSAGES, ROUTES, send

runner = CliRunner()


@pytest.fixture
def no_keys(monkeypatch):
    """An environment with no API key of any provider, nor ours."""
    for name in list(os.environ):
        if name.endswith("API_KEY"):
            monkeypatch.delenv(name)


def ask(server, route, times=1, **overrides):
    """`times` distinct requests through one client with no key configured."""
    return send(server, route, times=times, api_key=None, **overrides)


@pytest.mark.parametrize("route", ROUTES)
def test_a_keyless_server_gets_the_placeholder_and_the_log_says_so_once(judge_server, route, no_keys, caplog):
    caplog.set_level(logging.INFO, logger="longreward_core.models.secrets")
    answers, acc = ask(judge_server, route, times=3)
    again, _ = ask(judge_server, route, times=2)  # a second client for the same model: no second line
    assert answers + again == ["Analysis: looks fine.\nRating: [[7]]"] * 5
    assert judge_server.double.authorization == [f"Bearer {KEYLESS_API_KEY}"] * 5
    told = [r.getMessage() for r in caplog.records if "placeholder key" in r.getMessage()]
    assert len(told) == 1 and "openai/judge-double" in told[0] and "$LONGREWARD_JUDGE_API_KEY" in told[0]
    assert acc.transport_errors == 0


def test_a_key_in_the_environment_is_sent_instead_of_the_placeholder(judge_server, no_keys, monkeypatch):
    monkeypatch.setenv("LONGREWARD_JUDGE_API_KEY", "sk-judge-from-the-environment-1")
    ask(judge_server, "direct")
    monkeypatch.delenv("LONGREWARD_JUDGE_API_KEY")
    monkeypatch.setenv("OPENAI_API_KEY", "sk-openai-from-the-environment-2")
    ask(judge_server, "litellm")
    assert judge_server.double.authorization == [
        "Bearer sk-judge-from-the-environment-1", "Bearer sk-openai-from-the-environment-2"
    ]


@pytest.mark.parametrize("route", ROUTES)
def test_a_server_that_wants_a_key_refuses_the_placeholder_once(judge_server, route, no_keys):
    judge_server.double.faults = [Fault("status", 401)]
    [refused, again], acc = ask(judge_server, route, times=2, transport_retries=3)
    assert isinstance(refused, AuthenticationFailed) and again is refused
    assert "placeholder 'EMPTY' was sent" in str(refused) and "again" not in str(refused)
    assert judge_server.double.count() == 1 and acc.transport_errors == 0 and acc.calls == 0


def test_missing_credentials_are_not_a_transport_error(no_keys):
    """A hosted model with no key anywhere: the OpenAI SDK refuses to send (litellm passes that on
    as a 500); nothing is retried and the message names where a key goes."""

    async def run():
        client = LLMClient(LLMConfig(model="openai/gpt-4o-mini", transport_retries=3, backoff_initial_s=0.01), None)
        results = []
        for attempt in range(2):
            try:
                await client.complete("helpfulness", MESSAGES, 0.0, attempt)
            except LLMCallFailed as exc:
                results.append(exc)
        return results, client.accounting.purpose("helpfulness")

    [missing, again], acc = asyncio.run(run())
    assert isinstance(missing, AuthenticationFailed) and again is missing
    assert "no API key" in str(missing) and "$LONGREWARD_JUDGE_API_KEY" in str(missing) and "again" not in str(missing)
    assert acc.transport_errors == 0 and acc.failed_calls == 2


def test_the_sdks_own_missing_key_error_is_a_credentials_error():
    """The OpenAI SDK's error as the direct route would meet it (raised before any request)."""
    sdk_error = openai.OpenAIError("The api_key client option must be set either by passing api_key to the client "
                                   "or by setting the OPENAI_API_KEY environment variable")
    assert not is_transient(sdk_error)
    failure = classify_failure(sdk_error, model="openai/m", api_base=None, api_key=None, key_variables="$K")
    assert isinstance(failure, AuthenticationFailed) and "Set $K" in str(failure)


@pytest.mark.parametrize("route", ROUTES)
def test_an_unknown_model_stops_the_client_without_a_retry(judge_server, route, no_keys):
    judge_server.double.only_served_models = True
    [unknown, again], acc = ask(judge_server, route, times=2, model="openai/no-such-model")
    assert isinstance(unknown, ConfigurationError) and again is unknown
    assert "HTTP 404" in str(unknown) and "GET /models" in str(unknown) and "again" not in str(unknown)
    assert judge_server.double.models == ["no-such-model"] and acc.transport_errors == 0


def test_a_model_litellm_cannot_route_stops_the_client_without_a_retry(judge_server, no_keys):
    [unknown, again], acc = ask(judge_server, "litellm", times=2, model="nosuch/judge", transport_retries=3)
    assert isinstance(unknown, ConfigurationError) and again is unknown
    assert "<provider>/<model>" in str(unknown) and "again" not in str(unknown)
    assert judge_server.double.models == [] and acc.transport_errors == 0


@pytest.mark.parametrize("base", ["127.0.0.1:8000/v1", "localhost:8000", "ftp://host/v1", "http:///v1", "http//x"])
def test_a_malformed_api_base_is_refused_when_the_config_is_built(base):
    for config in (JudgeConfig, PolicyConfig):
        with pytest.raises(ValidationError, match="is not a server URL"):
            config(model="openai/m", api_base=base)
    with pytest.raises(ValidationError, match="is not a server URL"):
        ModelSpec(model="openai/m", api_base=base)
    assert JudgeConfig(model="openai/m", api_base="https://judge.example:8443/v1").api_base == "https://judge.example:8443/v1"


def _score(server, sample_paths, out, *options):
    prompts, candidates = sample_paths
    return runner.invoke(
        app, ["score", "--prompts", str(prompts), "--candidates", str(candidates), "--out", str(out), *options,
              "--judge-api-base", server.api_base, "--judge-concurrency", "1", "--judge-timeout", "5"],
    )


def test_score_exits_2_with_the_fix_for_an_unknown_model(judge_server, sample_paths, tmp_path, no_keys):
    judge_server.double.only_served_models = True
    result = _score(judge_server, sample_paths, tmp_path / "out", "--judge-model", "openai/no-such-model")
    assert result.exit_code == 2, result.output
    text = " ".join(result.output.split())
    assert "HTTP 404" in text and "openai/<id>" in text and "again" not in text and "could not be reached" not in text
    assert judge_server.double.models == ["no-such-model"]  # one request, then the client stopped


def test_score_exits_2_for_a_malformed_api_base(sample_paths, tmp_path, no_keys):
    prompts, candidates = sample_paths
    result = runner.invoke(app, ["score", "--prompts", str(prompts), "--candidates", str(candidates), "--out",
                                 str(tmp_path), "--judge-model", "openai/m", "--judge-api-base", "127.0.0.1:8000/v1"])
    assert result.exit_code == 2 and "is not a server URL" in " ".join(result.output.split())


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("served", ["/root/.cache/longreward/smollm2-135m-instruct-hf", "HuggingFaceTB/SmolLM2-135M-Instruct"])
def test_a_served_id_with_slashes_reaches_the_server_as_it_is(judge_server, route, served, no_keys, tmp_path):
    judge_server.double.served_models = (served,)
    judge_server.double.only_served_models = True
    cache = CallCache(tmp_path / "cache.sqlite")
    answers, _ = ask(judge_server, route, cache=cache, model=f"openai/{served}")
    again, acc = ask(judge_server, route, cache=cache, model=f"openai/{served}")  # from the cache
    assert answers == again == ["Analysis: looks fine.\nRating: [[7]]"]
    assert judge_server.double.models == [served] and acc.cache_hits == 1


def test_the_score_command_takes_a_served_id_that_is_a_path(judge_server, sample_paths, tmp_path, no_keys):
    served = "/root/.cache/longreward/smollm2-135m-instruct-hf"
    judge_server.double.served_models = (served,)
    judge_server.double.only_served_models = True
    result = _score(judge_server, sample_paths, tmp_path / "out", "--judge-model", f"openai/{served}")
    assert result.exit_code == 0, result.output
    assert set(judge_server.double.models) == {served} and judge_server.double.count() > 0


def test_model_labels_are_safe_folder_names_that_never_collide():
    plain = ModelSpec(model="openai/gpt-4o-mini")
    a, b = ModelSpec(model="openai//root/a/model"), ModelSpec(model="openai//root/b/model")
    hub = ModelSpec(model="openai/HuggingFaceTB/SmolLM2-135M-Instruct")
    assert plain.label == "gpt-4o-mini"  # an id without a path keeps its name
    assert a.label.startswith("model-") and b.label.startswith("model-") and a.label != b.label
    assert hub.label.startswith("SmolLM2-135M-Instruct-")
    assert all("/" not in s.label and not s.label.startswith(".") for s in (plain, a, b, hub))
    assert ModelSpec(model="openai//root/a/model").label == a.label  # stable across runs


def test_the_context_probe_asks_the_server_through_the_client(judge_server, no_keys):
    """The policy's context window from the server's `GET /models`, asked with the client's key
    (here the keyless placeholder)."""
    from longreward_core.pipeline.sampling import policy_context

    judge_server.double.max_model_len = 4096
    config = PolicyConfig(model="openai/policy-double", api_base=judge_server.api_base, timeout_s=5)
    assert asyncio.run(policy_context(config)) == 4096
    assert judge_server.double.listed_by == [f"Bearer {KEYLESS_API_KEY}"]

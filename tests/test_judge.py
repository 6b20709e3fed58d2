"""The judge client against the loopback double: retries, backoff, limits, cache, secrets."""

from __future__ import annotations

import asyncio

import pytest

from longreward_core.evaluation.judging import CHAT_RATING
from longreward_core.models.call_cache import CallCache
from longreward_core.models.errors import AuthenticationFailed, LLMCallFailed, RequestRejected
from longreward_core.reward.dimensions.faithfulness import parse_support
from longreward_core.reward.judge import Judge, JudgeCallFailed
from longreward_core.reward.verdicts import (
    RATING,
    VerdictParseError,
    parse_marked_list,
    parse_rating,
)
from longreward_testing.judge_double import Fault
from longreward_testing.scenarios import TEST_API_KEY, judge_config_for

MESSAGES = [{"role": "user", "content": "[Task: grade HELPFULNESS]\n<question>\nq\n</question>"}]


def judge_once(server, cache=None, **overrides):
    async def run():
        client = Judge(judge_config_for(server, **overrides), cache)
        try:
            return await client.verdict("helpfulness", MESSAGES, RATING), client.accounting.purpose("helpfulness")
        except LLMCallFailed as exc:
            return exc, client.accounting.purpose("helpfulness")

    return asyncio.run(run())


def test_parsers_take_the_last_verdict_and_reject_out_of_range():
    assert parse_rating("I'd say [[3]] at first... Rating: [[7]]") == 7.0
    assert parse_rating("Rating: [[ 8.5 ]]") == 8.5
    for bad in ["Rating: 7", "Rating: [[11]]", "[[seven]]", ""]:
        with pytest.raises(VerdictParseError):
            parse_rating(bad)
    assert parse_support("maybe [[No support]] ... final [[Partially supported]]") == 0.5
    with pytest.raises(VerdictParseError):
        parse_support("Fully supported")  # a label without the judge's brackets is not a verdict
    items = parse_marked_list("thinking\n[[statements]]\n- a\n2. b\n* c\n[[end]]", open_marker="[[statements]]", none_marker="[[no statements]]")
    assert items == ["a", "b", "c"]
    assert parse_marked_list("[[no statements]]", open_marker="[[statements]]", none_marker="[[no statements]]") == []
    # Cut at max_tokens after a whole line: the complete items are kept.
    assert parse_marked_list("[[statements]]\n- a\n- b\n", open_marker="[[statements]]", none_marker="[[no statements]]") == ["a", "b"]
    with pytest.raises(VerdictParseError):
        parse_marked_list("- a\n- b", open_marker="[[statements]]", none_marker="[[no statements]]")


def test_a_rating_is_read_from_the_verdict_line_only():
    assert parse_rating("Rating: [[6]]\nA perfect answer would have earned [[10]].") == 6.0
    assert parse_rating("Analysis: fine.\n**Rating:** [[4]]") == 4.0
    assert CHAT_RATING.parse("Rating: [[6]]\nThe reference answer deserves [[10]].") == 6.0
    with pytest.raises(VerdictParseError, match="no 'Rating: \\[\\[N\\]\\]' verdict"):
        parse_rating("The answer deserves [[7]].")


STATEMENTS = {"open_marker": "[[statements]]", "none_marker": "[[no statements]]"}


def test_a_list_item_cut_off_by_max_tokens_is_not_read():
    assert parse_marked_list("[[statements]]\n- The sky is blue.\n- The sea is gr", **STATEMENTS) == ["The sky is blue."]
    with pytest.raises(VerdictParseError, match="stops in the middle of an item"):
        parse_marked_list("[[statements]]\n- The sky is bl", **STATEMENTS)
    # With its close marker the list is whole, whatever follows it.
    assert parse_marked_list("[[statements]]\n- a\n- b[[end]] done", **STATEMENTS) == ["a", "b"]


def test_a_header_line_is_not_a_list_item():
    answer = "[[statements]]\nHere are the statements:\n- The sky is blue.\nStatements:\n2. The sea is green.\n[[end]]"
    assert parse_marked_list(answer, **STATEMENTS) == ["The sky is blue.", "The sea is green."]
    assert parse_marked_list("[[information]]\n关键信息：\n- 一\n[[end]]", open_marker="[[information]]", none_marker="[[none]]") == ["一"]
    with pytest.raises(VerdictParseError):
        parse_marked_list("[[statements]]\n- Statements:\n[[end]]", **STATEMENTS)


@pytest.mark.parametrize("fault", [Fault("status", 429), Fault("status", 500), Fault("status", 503), Fault("timeout"), Fault("broken_body")])
def test_transport_faults_are_retried(judge_server, fault):
    judge_server.double.faults = [fault, fault]
    judge_server.double.timeout_sleep_s = 4.0
    value, acc = judge_once(judge_server, timeout_s=2.0)
    assert value == 7.0
    assert acc.transport_errors == 2 and acc.calls == 1 and acc.failed_calls == 0
    assert judge_server.double.count() == 3


def test_backoff_grows_between_retries(judge_server):
    judge_server.double.faults = [Fault("status", 429)] * 3
    value, _ = judge_once(judge_server, backoff_initial_s=0.2, backoff_max_s=5.0)
    assert value == 7.0
    at = [r.at for r in judge_server.double.requests]
    gaps = [b - a for a, b in zip(at, at[1:])]
    # Waits are 0.2*2^n plus up to 0.2 of jitter: at least 0.2, 0.4, 0.8 seconds.
    assert gaps[0] >= 0.2 and gaps[1] >= 0.4 and gaps[2] >= 0.8


def test_transport_retries_exhausted_fail_the_call(judge_server):
    judge_server.double.faults = [Fault("status", 500)] * 10
    result, acc = judge_once(judge_server, transport_retries=2)
    assert isinstance(result, LLMCallFailed)
    assert judge_server.double.count() == 3
    assert acc.transport_errors == 3 and acc.failed_calls == 1


def test_client_errors_are_not_retried(judge_server):
    judge_server.double.faults = [Fault("status", 401)] * 10
    result, acc = judge_once(judge_server)
    assert isinstance(result, LLMCallFailed)
    assert judge_server.double.count() == 1
    assert TEST_API_KEY not in str(result)


def test_unparseable_answers_are_retried_hotter(judge_server):
    judge_server.double.faults = [Fault("no_verdict"), Fault("no_verdict")]
    value, acc = judge_once(judge_server)
    assert value == 7.0
    assert acc.parse_failures == 2 and acc.calls == 3
    assert [r.temperature for r in judge_server.double.requests] == [0.0, 0.95, 0.95]


def test_cache_makes_the_second_call_free(judge_server, tmp_path):
    cache = CallCache(tmp_path / "cache.sqlite")
    judge_server.double.faults = [Fault("no_verdict")]  # attempt 0 fails to parse, attempt 1 succeeds
    first, _ = judge_once(judge_server, cache)
    assert judge_server.double.count() == 2
    second, acc = judge_once(judge_server, cache)
    assert second == first and judge_server.double.count() == 2
    # Only the answer that parsed (attempt 1) was cached: the re-run reads it and asks nothing.
    assert acc.cache_hits == 1 and acc.calls == 0 and acc.parse_failures == 0
    cache.close()
    assert TEST_API_KEY.encode() not in (tmp_path / "cache.sqlite").read_bytes()


def test_concurrency_limit_holds(judge_server):
    judge_server.double.latency_s = 0.1

    async def run():
        client = Judge(judge_config_for(judge_server, concurrency=3), None)
        messages = [[{"role": "user", "content": MESSAGES[0]["content"] + str(i)}] for i in range(12)]
        return await asyncio.gather(*(client.verdict("helpfulness", m, RATING) for m in messages))

    assert asyncio.run(run()) == [7.0] * 12
    assert judge_server.double.max_in_flight == 3


def test_requests_per_minute_limit_spaces_requests(judge_server):
    async def run():
        client = Judge(judge_config_for(judge_server, rpm=120), None)  # one every 0.5 s
        messages = [[{"role": "user", "content": MESSAGES[0]["content"] + str(i)}] for i in range(4)]
        await asyncio.gather(*(client.verdict("helpfulness", m, RATING) for m in messages))

    asyncio.run(run())
    at = sorted(r.at for r in judge_server.double.requests)
    assert len(at) == 4
    # The limiter spaces the sends 0.5 s apart; arrivals at the server jitter by the first
    # request's connection set-up (tens of ms on a loaded machine), so the bound leaves 0.2 s.
    # Without the limit the four arrive within a few milliseconds of each other.
    assert at[-1] - at[0] >= 3 * 0.5 - 0.2


def test_a_refused_request_fails_at_once_with_the_providers_reason(judge_server):
    judge_server.double.faults = [Fault("status", 400)] * 10
    result, acc = judge_once(judge_server)
    assert isinstance(result, RequestRejected) and not result.transport
    assert "HTTP 400" in str(result) and "maximum context length" in str(result)
    assert judge_server.double.count() == 1  # neither retried as a fault nor asked again for a verdict
    assert acc.rejected == 1 and acc.failed_calls == 1


def test_refused_credentials_stop_every_later_request(judge_server):
    judge_server.double.faults = [Fault("status", 401)] * 10

    async def run():
        client = Judge(judge_config_for(judge_server, concurrency=1), None)
        messages = [[{"role": "user", "content": MESSAGES[0]["content"] + str(i)}] for i in range(6)]
        return await asyncio.gather(*(client.verdict("helpfulness", m, RATING) for m in messages), return_exceptions=True)

    results = asyncio.run(run())
    assert all(isinstance(r, AuthenticationFailed) for r in results)
    assert judge_server.double.count() == 1
    assert all(TEST_API_KEY not in str(r) for r in results)


def test_retry_after_is_honoured_and_capped(judge_server):
    judge_server.double.faults = [Fault("status", 429, retry_after="2")]
    value, _ = judge_once(judge_server, backoff_initial_s=0.1, backoff_max_s=5.0)
    at = [r.at for r in judge_server.double.requests]
    assert value == 7.0 and at[1] - at[0] >= 2.0
    judge_server.double.reset()
    judge_server.double.faults = [Fault("status", 429, retry_after="30")]
    value, _ = judge_once(judge_server, backoff_initial_s=0.1, backoff_max_s=0.5)
    at = [r.at for r in judge_server.double.requests]
    assert value == 7.0 and 0.5 <= at[1] - at[0] < 10.0  # capped well below the 30 s asked for


def test_identical_requests_in_flight_are_sent_once(judge_server, tmp_path):
    judge_server.double.latency_s = 0.2
    cache = CallCache(tmp_path / "cache.sqlite")

    async def run():
        client = Judge(judge_config_for(judge_server), cache)
        values = await asyncio.gather(*(client.verdict("helpfulness", MESSAGES, RATING) for _ in range(5)))
        return values, client.accounting.purpose("helpfulness")

    values, acc = asyncio.run(run())
    cache.close()
    assert values == [7.0] * 5 and judge_server.double.count() == 1 and acc.coalesced == 4


def test_unparsed_answers_are_not_cached_so_a_rerun_asks_again(judge_server, tmp_path):
    cache = CallCache(tmp_path / "cache.sqlite")
    judge_server.double.faults = [Fault("no_verdict")] * 3 + [Fault("null")] * 2
    failed, _ = judge_once(judge_server, cache)
    assert isinstance(failed, JudgeCallFailed) and judge_server.double.count() == 5
    healthy, acc = judge_once(judge_server, cache)  # the judge is healthy again
    assert healthy == 7.0 and judge_server.double.count() == 6 and acc.calls == 1
    again, acc = judge_once(judge_server, cache)
    assert again == 7.0 and judge_server.double.count() == 6 and acc.cache_hits == 1
    cache.close()


def test_secrets_of_the_environment_are_redacted_from_errors(judge_server, monkeypatch):
    provider_key = "sk-provider-variable-0a1b2c3d4e"
    monkeypatch.setenv("OPENAI_API_KEY", provider_key)
    judge_server.double.faults = [Fault("status", 401)]
    result, _ = judge_once(judge_server, api_key=None)  # litellm sends the provider's variable
    assert isinstance(result, AuthenticationFailed)
    assert judge_server.double.authorization == [f"Bearer {provider_key}"]
    assert provider_key not in str(result) and "***" in str(result)


def test_log_records_never_carry_a_known_secret(judge_server, caplog):
    import logging

    judge_once(judge_server)  # a client installs the redaction; TEST_API_KEY is now a known secret
    with caplog.at_level(logging.INFO):
        logging.getLogger("litellm").info("sending with key %s", TEST_API_KEY)
    assert TEST_API_KEY not in caplog.text and "sending with key ***" in caplog.text

"""The PostgreSQL call cache against a real server: shared across processes and runs, first writer
wins, only parsed answers stored, identical requests in flight sent once; an old table migrated in
place, stats by model and age, pruning while another connection writes, `longreward cache` by URL.

Needs $LONGREWARD_TEST_PG_URL (e.g. postgresql://lr@127.0.0.1:5432/lrcache, the password from
PGPASSWORD or ~/.pgpass): a role that may create schemas in that database. Each test works in a
schema of its own, dropped afterwards. `make test-stack` sets it; run alone with

    LONGREWARD_TEST_PG_URL=postgresql://... python -m pytest tests/stack/test_call_cache_pg.py
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from urllib.parse import quote, unquote, urlsplit, urlunsplit

import pytest

from longreward_core.models import call_cache
from longreward_core.models.call_cache import (
    DAY_S,
    TABLE,
    PostgresCallCache,
    open_call_cache,
)
from longreward_core.reward.judge import Judge
from longreward_core.reward.verdicts import RATING
from longreward_testing.judge_double import Fault
from longreward_testing.scenarios import TEST_API_KEY, judge_config_for
from tests.stack.cache_client import question
from tests.test_retention import check_stats_by_model_and_age, prune_beside_a_writer

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def pg_url():
    """A URL whose connections work in a fresh schema (search_path), dropped after the test."""
    import psycopg

    url = os.environ.get("LONGREWARD_TEST_PG_URL")
    if not url:
        pytest.fail(
            "LONGREWARD_TEST_PG_URL is not set: these tests need a PostgreSQL server "
            "(postgresql://user@host:port/database; `make test-stack` starts one and sets it)",
            pytrace=False,
        )
    schema = f"lrtest_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(url, autocommit=True) as admin:
        admin.execute(f"CREATE SCHEMA {schema}")
    separator = "&" if "?" in url else "?"
    try:
        yield f"{url}{separator}options={quote(f'-csearch_path={schema}')}"
    finally:
        with psycopg.connect(url, autocommit=True) as admin:
            admin.execute(f"DROP SCHEMA {schema} CASCADE")


def split_password(url: str) -> tuple[str, str | None]:
    """`url` without its password, and the password: options and parameters refuse a URL that
    carries one (it goes in PGPASSWORD or a Secret block)."""
    parts = urlsplit(url)
    if parts.password is None:
        return url, None
    host = parts.netloc.rpartition("@")[2]
    return urlunsplit(parts._replace(netloc=f"{parts.username}@{host}")), unquote(parts.password)


def rows(url: str) -> list[tuple]:
    import psycopg

    with psycopg.connect(url) as db:
        return db.execute(f"SELECT key, text, prompt_tokens, completion_tokens, cost FROM {TABLE} ORDER BY key").fetchall()


def ask_in_a_process(url: str, api_base: str, first: int, last: int) -> subprocess.Popen:
    env = {**os.environ, "LONGREWARD_JUDGE_API_KEY": TEST_API_KEY, "PYTHONPATH": str(REPO)}
    return subprocess.Popen([sys.executable, "-m", "tests.stack.cache_client", url, api_base, str(first), str(last)],
                            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finished(process: subprocess.Popen) -> dict:
    out, err = process.communicate(timeout=300)
    assert process.returncode == 0, err
    return json.loads(out.strip().splitlines()[-1])


def numbered_ratings(double):
    """Each request to the double is rated differently (1..9 in turn), so two answers to the
    same question tell which writer won."""
    double.answers = {"helpfulness": lambda r: f"Rating: [[{1 + double.count() % 9}]]"}


def test_a_request_answered_in_one_process_is_never_paid_again_in_another(judge_server, pg_url):
    numbered_ratings(judge_server.double)
    first = finished(ask_in_a_process(pg_url, judge_server.api_base, 0, 6))
    assert first["calls"] == 6 and first["cache_hits"] == 0 and judge_server.double.count() == 6
    second = finished(ask_in_a_process(pg_url, judge_server.api_base, 0, 10))
    # Questions 0-5 come from the cache; only 6-9 are paid.
    assert second["cache_hits"] == 6 and second["calls"] == 4 and judge_server.double.count() == 10
    assert second["values"][:6] == first["values"]
    stored = rows(pg_url)
    assert len(stored) == 10 and len({key for key, *_ in stored}) == 10  # one row per request
    assert all(TEST_API_KEY not in text for _, text, *_ in stored)


def test_two_processes_at_once_report_the_same_stored_answers(judge_server, pg_url):
    judge_server.double.latency_s = 0.2  # requests overlap when both processes ask at once
    numbered_ratings(judge_server.double)
    a, b = (ask_in_a_process(pg_url, judge_server.api_base, 0, 8) for _ in range(2))
    first, second = finished(a), finished(b)
    # Whoever stored an answer first, both report it (the answer a re-run reproduces).
    assert first["values"] == second["values"]
    assert first["calls"] + first["cache_hits"] == 8 and second["calls"] + second["cache_hits"] == 8
    stored = rows(pg_url)
    assert len(stored) == 8
    assert sorted(float(text.split("[[")[1].split("]]")[0]) for _, text, *_ in stored) == sorted(first["values"])


def test_the_first_writer_wins_and_every_writer_gets_its_answer(pg_url):
    caches = [PostgresCallCache(pg_url) for _ in range(6)]
    start = threading.Barrier(len(caches))
    got: list[str] = [""] * len(caches)

    def write(i: int) -> None:
        start.wait()
        got[i] = caches[i].put("same-key", f"answer from writer {i}", 10 + i, 5, 0.001)

    threads = [threading.Thread(target=write, args=(i,)) for i in range(len(caches))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(got)) == 1 and got[0].startswith("answer from writer ")
    assert caches[0].get("same-key")[0] == got[0]
    ((key, text, prompt_tokens, completion_tokens, cost),) = rows(pg_url)
    assert key == "same-key" and text == got[0] and prompt_tokens == 10 + int(text.rsplit(" ", 1)[1])
    assert caches[1].put("same-key", "a later answer", 1, 1, 0.0) == got[0]
    for cache in caches:
        cache.close()


def judge_with(server, cache, messages=None, **overrides):
    async def run():
        judge = Judge(judge_config_for(server, **overrides), cache)
        value = await judge.verdict("helpfulness", messages or question(0), RATING)
        return value, judge.accounting.purpose("helpfulness")

    return asyncio.run(run())


def test_only_answers_that_parsed_are_stored(judge_server, pg_url):
    judge_server.double.faults = [Fault("no_verdict")]  # attempt 0 does not parse, attempt 1 does
    cache = open_call_cache(pg_url)
    value, acc = judge_with(judge_server, cache)
    assert value == 7.0 and acc.parse_failures == 1 and judge_server.double.count() == 2
    stored = rows(pg_url)
    assert [text for _, text, *_ in stored] == ["Analysis: looks fine.\nRating: [[7]]"]
    cache.close()
    again = open_call_cache(pg_url)  # a new client, as a re-run makes: reads the stored verdict
    value, acc = judge_with(judge_server, again)
    assert value == 7.0 and acc.cache_hits == 1 and acc.calls == 0 and judge_server.double.count() == 2
    again.close()


def test_identical_requests_in_flight_are_sent_once(judge_server, pg_url):
    judge_server.double.latency_s = 0.2
    cache = open_call_cache(pg_url)

    async def run():
        judge = Judge(judge_config_for(judge_server), cache)
        values = await asyncio.gather(*(judge.verdict("helpfulness", question(0), RATING) for _ in range(5)))
        return values, judge.accounting.purpose("helpfulness")

    values, acc = asyncio.run(run())
    cache.close()
    assert values == [7.0] * 5 and judge_server.double.count() == 1 and acc.coalesced == 4
    assert len(rows(pg_url)) == 1


def test_two_score_runs_share_the_cache_by_url(judge_server, sample_paths, tmp_path, pg_url, monkeypatch):
    from typer.testing import CliRunner

    from flows.cli import app

    monkeypatch.setenv("LONGREWARD_JUDGE_API_KEY", TEST_API_KEY)
    url, password = split_password(pg_url)
    if password:
        monkeypatch.setenv("PGPASSWORD", password)  # libpq's own variable
    prompts, candidates = sample_paths
    runner = CliRunner()

    def score(out: Path):
        return runner.invoke(app, [
            "score", "--prompts", str(prompts), "--candidates", str(candidates), "--out", str(out),
            "--judge-model", "openai/judge-double", "--judge-api-base", judge_server.api_base, "--cache-url", url,
        ])

    first = score(tmp_path / "first")
    assert first.exit_code == 0, first.output
    paid = judge_server.double.count()
    assert paid > 0 and not (tmp_path / "first" / "call_cache.sqlite").exists()
    second = score(tmp_path / "second")  # another output folder, as another host would have
    assert second.exit_code == 0, second.output
    assert judge_server.double.count() == paid
    accounting = json.loads((tmp_path / "second" / "accounting.json").read_text())
    assert accounting["judge"]["total"]["calls"] == 0 and accounting["judge"]["total"]["cache_hits"] > 0
    assert len(rows(pg_url)) == paid  # every answer of the double parsed: one row per request


def stamp(url: str, used_days_ago: float, keys: list[str] | None = None) -> None:
    """Set the answers' last use (all, or `keys`) to `used_days_ago` days ago, as time would."""
    import psycopg

    used = time.time() - used_days_ago * DAY_S
    with psycopg.connect(url, autocommit=True) as db:
        if keys is None:
            db.execute(f"UPDATE {TABLE} SET used_at = %s, stored_at = %s", (used, used))
        for key in keys or []:
            db.execute(f"UPDATE {TABLE} SET used_at = %s, stored_at = %s WHERE key = %s", (used, used, key))


def stamps(url: str) -> dict[str, tuple]:
    import psycopg

    with psycopg.connect(url) as db:
        return {k: rest for k, *rest in db.execute(f"SELECT key, stored_at, used_at, model FROM {TABLE}").fetchall()}


def test_an_old_table_is_migrated_in_place_with_its_answers_stamped_now(pg_url):
    import psycopg

    with psycopg.connect(pg_url, autocommit=True) as db:  # the table as made before stamps and models
        db.execute(f"CREATE TABLE {TABLE} (key TEXT PRIMARY KEY, text TEXT NOT NULL, prompt_tokens INTEGER,"
                   " completion_tokens INTEGER, cost DOUBLE PRECISION)")
        for i in range(3):
            db.execute(f"INSERT INTO {TABLE} VALUES (%s, %s, 3, 4, 0.5)", (f"old{i}", f"answer {i}"))
    before = time.time()
    caches = [PostgresCallCache(pg_url) for _ in range(2)]  # a second opener finds it migrated
    after = time.time()
    assert caches[1].get("old1") == ("answer 1", 3, 4, 0.5)
    assert caches[0].put("new", "fresh", 1, 2, 0.0, model="openai/judge") == "fresh"
    found = stamps(pg_url)
    assert all(before <= found[f"old{i}"][0] <= after and found[f"old{i}"][2] is None for i in range(3))
    assert found["new"][0] >= after and found["new"][2] == "openai/judge"
    assert caches[0].stats().by_model == [("unknown", 3, 24), ("openai/judge", 1, 5)]
    with psycopg.connect(pg_url) as db:
        assert db.execute("SELECT to_regclass(%s)", (f"{TABLE}_used_at",)).fetchone()[0] is not None
    for cache in caches:
        cache.close()


def test_stats_count_answers_by_model_and_by_age_of_last_use(pg_url):
    cache = PostgresCallCache(pg_url)
    check_stats_by_model_and_age(cache, lambda days, keys: stamp(pg_url, days, keys))
    cache.close()


def test_prune_while_another_connection_writes_loses_no_new_answer(pg_url, monkeypatch):
    """Old answers go in many short chunks while another connection keeps storing and reading:
    every answer it stored is kept, and so is an old answer used lately."""
    import psycopg

    monkeypatch.setattr(call_cache, "PRUNE_CHUNK", 200)
    PostgresCallCache(pg_url).close()
    with psycopg.connect(pg_url, autocommit=True) as db:
        db.execute(f"INSERT INTO {TABLE} (key, text, stored_at, used_at, model) SELECT 'old' || i, repeat('y', 200),"
                   " 0, 0, 'judge' FROM generate_series(0, 2999) AS i")
    stamp(pg_url, 40)
    stamp(pg_url, 10, ["old7"])
    pruned, stored = prune_beside_a_writer(lambda: PostgresCallCache(pg_url), time.time() - 30 * DAY_S)
    assert pruned.rows == 2999 and pruned.text_bytes == 2999 * 200
    assert set(stamps(pg_url)) == {"old7", *stored}
    assert pruned.space.startswith("the deleted rows' space is reused by new answers")


def test_cache_commands_by_url_read_the_password_from_pgpassword(pg_url, monkeypatch):
    from typer.testing import CliRunner

    from flows.cli import app

    url, password = split_password(pg_url)
    if password:
        monkeypatch.setenv("PGPASSWORD", password)
    cache = open_call_cache(pg_url)
    for i in range(4):
        cache.put(f"k{i}", "answer", 1, 1, 0.0, model="openai/judge-model")
    cache.close()
    stamp(pg_url, 45, ["k0", "k1"])
    runner = CliRunner()
    shown = runner.invoke(app, ["cache", "stats", url], env={"COLUMNS": "200"})
    assert shown.exit_code == 0, shown.output
    assert ": 4 answers" in shown.output and "openai/judge-model" in shown.output and "30-90 days      │ 2" in shown.output
    pruned = runner.invoke(app, ["cache", "prune", url, "--older-than", "30d"], env={"COLUMNS": "200"})
    assert pruned.exit_code == 0, pruned.output
    assert "removed 2 answers not used for 30d (12 B of answer text)" in pruned.output
    assert set(stamps(pg_url)) == {"k2", "k3"}
    bad = runner.invoke(app, ["cache", "prune", url, "--older-than", "30days"], env={"COLUMNS": "200"})
    assert bad.exit_code == 2 and "duration '30days'" in bad.output


# Two builds sharing the cache through the flow's `cache_url`, on two workers of a real stack with
# the password in a Secret block: tests/stack/test_shared_cache.py.

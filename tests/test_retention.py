"""Caches that stay bounded: the SQLite call cache's stamps, its migration, stats and pruning while
another connection writes; `longreward cache ...`; an output root's pruning; the nightly's
manifest size and retention. (The PostgreSQL backend: tests/stack/test_call_cache_pg.py.)"""

from __future__ import annotations

import json
import os
import sqlite3
import threading
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from flows.cli import app
from longreward_core.models import call_cache
from longreward_core.models.call_cache import DAY_S, TOUCH_INTERVAL_S, CachePruned, CallCache, open_call_cache
from longreward_core.pipeline.retention import parse_duration, prune_outputs

OLD_SCHEMA = "CREATE TABLE calls (key TEXT PRIMARY KEY, text TEXT NOT NULL, prompt_tokens INTEGER, completion_tokens INTEGER, cost REAL)"


def stamp(path: Path, used_days_ago: float, keys: list[str] | None = None) -> None:
    """Set the answers' last use (all, or `keys`) to `used_days_ago` days ago, as time would."""
    used = time.time() - used_days_ago * DAY_S
    with sqlite3.connect(path) as db:
        if keys is None:
            db.execute("UPDATE calls SET used_at = ?, stored_at = ?", (used, used))
        else:
            db.executemany("UPDATE calls SET used_at = ?, stored_at = ? WHERE key = ?", [(used, used, k) for k in keys])


def columns(path: Path, *names: str) -> dict[str, tuple]:
    with sqlite3.connect(path) as db:
        return {row[0]: row[1:] for row in db.execute(f"SELECT key, {', '.join(names)} FROM calls")}


def test_an_old_cache_is_migrated_in_place_with_its_answers_stamped_now(tmp_path):
    path = tmp_path / "call_cache.sqlite"
    with sqlite3.connect(path) as db:  # a cache as made before answers carried stamps and a model
        db.execute("PRAGMA journal_mode=WAL")
        db.execute(OLD_SCHEMA)
        db.executemany("INSERT INTO calls VALUES (?, ?, ?, ?, ?)", [(f"old{i}", f"answer {i}", 3, 4, 0.5) for i in range(3)])
    before = time.time()
    cache = CallCache(path)
    after = time.time()
    assert cache.get("old1") == ("answer 1", 3, 4, 0.5)
    assert cache.put("new", "fresh", 1, 2, 0.0, model="openai/judge") == "fresh"
    cache.close()
    rows = columns(path, "stored_at", "used_at", "model")
    assert all(before <= rows[f"old{i}"][0] <= after and rows[f"old{i}"][1] == rows[f"old{i}"][0] for i in range(3))
    assert [rows[f"old{i}"][2] for i in range(3)] == [None] * 3 and rows["new"][2] == "openai/judge"
    assert rows["new"][0] >= after
    again = CallCache(path)  # opening a migrated cache changes nothing
    assert again.stats().by_model == [("unknown", 3, 24), ("openai/judge", 1, 5)]
    again.close()
    assert columns(path, "stored_at")["old0"] == rows["old0"][:1]


def test_a_hit_marks_the_answer_used_at_most_once_an_interval(tmp_path):
    path = tmp_path / "c.sqlite"
    cache = CallCache(path)
    cache.put("stale", "a", 1, 1, 0.0, model="m")
    cache.put("recent", "b", 1, 1, 0.0, model="m")
    stamp(path, 2 * TOUCH_INTERVAL_S / DAY_S, ["stale"])
    stamp(path, 0.1 * TOUCH_INTERVAL_S / DAY_S, ["recent"])
    marked = columns(path, "used_at", "stored_at")
    hit = time.time()
    assert cache.get("stale")[0] == "a" and cache.get("recent")[0] == "b"
    now = columns(path, "used_at", "stored_at")
    assert now["stale"][0] >= hit and now["stale"][1] == marked["stale"][1]  # stored_at stays
    assert now["recent"] == marked["recent"]  # used within the interval: no write
    cache.close()


def check_stats_by_model_and_age(cache, stamp_keys) -> None:
    """An empty `cache` given answers of two models, last used (`stamp_keys(days, keys)`) at several
    ages: its stats count them by model and by age bucket."""
    ages = {"a": 0.1, "b": 3, "c": 3, "d": 10, "e": 45, "f": 400}
    for key in ages:
        cache.put(key, "x" * 10, 1, 1, 0.0, model="judge" if key in "abcd" else "policy")
    for key, days in ages.items():
        stamp_keys(days, [key])
    found = cache.stats()
    assert found.size.rows == 6 and found.size.bytes > 0
    assert found.by_model == [("judge", 4, 40), ("policy", 2, 20)]
    assert found.by_age == [("under 1 day", 1), ("1-7 days", 2), ("7-30 days", 1), ("30-90 days", 1), ("90 days or more", 1)]


def test_stats_count_answers_by_model_and_by_age_of_last_use(tmp_path):
    path = tmp_path / "c.sqlite"
    cache = CallCache(path)
    check_stats_by_model_and_age(cache, lambda days, keys: stamp(path, days, keys))
    cache.close()


def prune_beside_a_writer(open_cache, cutoff: float) -> tuple[CachePruned, list[str]]:
    """Prune (`open_cache()`) up to `cutoff` while another connection keeps storing and reading
    answers, until the pruning is over and 50 answers at least; the writer must meet no error.
    Returns what the pruning removed and the keys the writer stored."""
    stored: list[str] = []
    errors: list[BaseException] = []
    pruning_done = threading.Event()

    def write() -> None:
        writer = open_cache()  # its own connection, as another shard's process has
        try:
            i = 0
            while not pruning_done.is_set() or i < 50:
                key = f"new{i}"
                assert writer.put(key, f"answer {i}", 1, 1, 0.0, model="judge") == f"answer {i}"
                assert writer.get(key)[0] == f"answer {i}"
                stored.append(key)
                i += 1
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)
        finally:
            writer.close()

    thread = threading.Thread(target=write)
    thread.start()
    pruner = open_cache()
    try:
        pruned = pruner.prune(cutoff)
    finally:
        pruning_done.set()
        thread.join(timeout=120)
        pruner.close()
    assert not errors, errors
    return pruned, stored


def test_prune_while_another_connection_writes_loses_no_new_answer(tmp_path, monkeypatch):
    """Old answers go in many short chunks while another connection keeps storing and reading:
    every answer it stored is kept, and so is an old answer used lately."""
    monkeypatch.setattr(call_cache, "PRUNE_CHUNK", 200)
    path = tmp_path / "c.sqlite"
    seed = CallCache(path)
    for i in range(3000):
        seed.put(f"old{i}", "y" * 200, 1, 1, 0.0, model="judge")
    seed.close()
    stamp(path, 40)
    stamp(path, 10, ["old7"])  # used 10 days ago: within 30 days
    pruned, stored = prune_beside_a_writer(lambda: CallCache(path), time.time() - 30 * DAY_S)
    assert pruned.rows == 2999 and pruned.text_bytes == 2999 * 200
    assert set(columns(path, "model")) == {"old7", *stored}


def test_a_new_file_gives_its_freed_pages_back(tmp_path):
    path = tmp_path / "c.sqlite"
    cache = CallCache(path)
    for i in range(500):
        cache.put(f"k{i}", "z" * 2000, 1, 1, 0.0)
    stamp(path, 60)
    pruned = cache.prune(time.time() - 30 * DAY_S)
    cache.close()
    assert pruned.rows == 500 and pruned.space == "freed pages given back to the file system (incremental vacuum)"
    assert pruned.bytes_after < pruned.bytes_before / 10 and pruned.bytes_after == path.stat().st_size


def test_an_old_file_reuses_its_freed_pages(tmp_path):
    path = tmp_path / "c.sqlite"
    with sqlite3.connect(path) as db:  # made before incremental vacuum
        db.execute(OLD_SCHEMA)
        db.executemany("INSERT INTO calls VALUES (?, ?, 1, 1, 0.0)", [(f"k{i}", "z" * 500) for i in range(500)])
    cache = CallCache(path)
    stamp(path, 60)
    pruned = cache.prune(time.time() - 30 * DAY_S)
    cache.close()
    assert pruned.rows == 500
    assert pruned.space.endswith("are reused by new answers (`VACUUM` while no build runs shrinks it)")
    assert int(pruned.space.split()[0]) > 500 * 500


@pytest.mark.parametrize(("text", "seconds"), [("0s", 0), ("90m", 5400), ("12h", 43200), ("30d", 2592000)])
def test_durations(text, seconds):
    assert parse_duration(text).total_seconds() == seconds


def test_cache_commands_measure_and_prune(tmp_path):
    path = tmp_path / "call_cache.sqlite"
    cache = open_call_cache(path)
    for i in range(4):
        cache.put(f"k{i}", "answer", 1, 1, 0.0, model="openai/judge-model")
    cache.close()
    stamp(path, 45, ["k0", "k1"])
    runner = CliRunner()
    shown = runner.invoke(app, ["cache", "stats", str(path)], env={"COLUMNS": "200"})
    assert shown.exit_code == 0, shown.output
    assert f"{path}: 4 answers" in shown.output and "openai/judge-model" in shown.output
    assert "30-90 days      │ 2" in shown.output and "under 1 day     │ 2" in shown.output
    pruned = runner.invoke(app, ["cache", "prune", str(path), "--older-than", "30d"], env={"COLUMNS": "200"})
    assert pruned.exit_code == 0, pruned.output
    assert "removed 2 answers not used for 30d (12 B of answer text)" in pruned.output
    assert set(columns(path, "model")) == {"k2", "k3"}


@pytest.mark.parametrize("duration", ["30", "30x", "-1d", "1.5d", "d"])
def test_a_bad_duration_exits_2_naming_it(tmp_path, duration):
    path = tmp_path / "call_cache.sqlite"
    open_call_cache(path).close()
    for command in (["cache", "prune", str(path)], ["cache", "prune-outputs", str(tmp_path)]):
        result = CliRunner().invoke(app, [*command, "--older-than", duration], env={"COLUMNS": "200"})
        assert result.exit_code == 2, result.output
        assert f"duration {duration!r}: expected a whole number and a unit" in result.output


def test_a_missing_cache_exits_2_and_is_not_created(tmp_path):
    path = tmp_path / "nowhere.sqlite"
    result = CliRunner().invoke(app, ["cache", "stats", str(path)], env={"COLUMNS": "200"})
    assert result.exit_code == 2 and "call cache not found" in result.output
    assert not path.exists()
    refused = CliRunner().invoke(app, ["cache", "stats", "postgresql://lr:pw-5d1e9a@127.0.0.1/db"], env={"COLUMNS": "200"})
    assert refused.exit_code == 2 and "carries a password" in refused.output and "pw-5d1e9a" not in refused.output


def put_file(path: Path, size: int, days_ago: float) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\0" * size)
    then = time.time() - days_ago * DAY_S
    os.utime(path, (then, then))
    return path


def output_root(root: Path, newest_days_ago: float = 0) -> dict[str, Path]:
    """An output root after some nights: an old build, the newest one, result records, spools."""
    files = {
        "old store": put_file(root / "2026-10-01" / "shards" / "shard-0000" / "qdrant" / "documents" / "ab" / "doc" / "storage.sqlite", 4000, 60),
        "old spool": put_file(root / "2026-10-01" / "shards" / "shard-0001" / ".scores.x1.spool.jsonl", 300, 60),
        "old scores": put_file(root / "2026-10-01" / "shards" / "shard-0000" / "scores.parquet", 100, 60),
        "old dataset": put_file(root / "2026-10-01" / "pairs.parquet", 100, 60),
        "old record": put_file(root / ".prefect-results" / "score-v3-aaaa", 700, 60),
        "recent record": put_file(root / ".prefect-results" / "score-v3-bbbb", 700, 2),
        "new store": put_file(root / "2026-11-21" / "shards" / "shard-0000" / "qdrant" / "documents" / "cd" / "doc" / "storage.sqlite", 4000, 60),
        "new spool": put_file(root / "2026-11-21" / "shards" / "shard-0000" / ".scores.x2.spool.jsonl", 300, 60),
        "cache": put_file(root / "call_cache.sqlite", 100, 60),
    }
    shards = root / "2026-11-21" / "shards"
    os.utime(shards, (time.time() - newest_days_ago * DAY_S,) * 2)
    return files


def test_prune_outputs_removes_old_builds_leftovers_and_says_how_many_bytes(tmp_path):
    files = output_root(tmp_path)
    result = CliRunner().invoke(app, ["cache", "prune-outputs", str(tmp_path), "--older-than", "30d"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    gone = {"old store", "old spool", "old record"}
    assert {name for name, path in files.items() if not path.exists()} == gone
    assert not (tmp_path / "2026-10-01" / "shards" / "shard-0000" / "qdrant").exists()
    assert f"removed qdrant store {tmp_path / '2026-10-01' / 'shards' / 'shard-0000' / 'qdrant'} (4,000 B (0.0 MiB))" in result.output
    assert "prefect results: 1 removed, 700 B" in result.output and "spools: 1 removed, 300 B" in result.output
    assert "total: 3 removed, 5,000 B (0.0 MiB) freed" in result.output


def test_prune_outputs_never_touches_the_running_build(tmp_path):
    """Even at 0s: nothing under the newest build, nor written since its shards were laid out."""
    files = output_root(tmp_path, newest_days_ago=5)
    removed = prune_outputs(tmp_path, time.time())
    assert {r.path for r in removed} == {files["old spool"], files["old record"], files["old store"].parents[3]}
    assert files["recent record"].exists() and files["new store"].exists() and files["new spool"].exists()
    again = output_root(tmp_path / "again")
    removed = prune_outputs(tmp_path / "again", time.time(), keep=tmp_path / "again" / "2026-10-01")
    assert {r.path for r in removed} == {again["old record"], again["recent record"]}  # outside both builds
    assert all(path.exists() for name, path in again.items() if not name.endswith("record"))


@pytest.mark.usefixtures("prefect_harness")
def test_the_nightly_reports_the_cache_size_and_prunes_on_its_retention(judge_server, tmp_path, monkeypatch):
    from flows.preference_build import preference_build
    from longreward_testing.scenarios import write_inputs
    from tests.test_flow import helpfulness_by_length, params_for

    monkeypatch.setenv("LONGREWARD_POLICY_API_KEY", "k")
    judge_server.double.answers = {"helpfulness": helpfulness_by_length}
    root = tmp_path / "builds"
    files = output_root(root)
    os.utime(root / "2026-11-21" / "shards", (time.time() - 60 * DAY_S,) * 2)  # an old build, not this run's
    cache_path = root / "call_cache.sqlite"
    cache_path.unlink()
    old = CallCache(cache_path)
    old.put("forgotten", "an answer nobody asked for again", 1, 1, 0.0, model="openai/judge-double")
    old.close()
    stamp(cache_path, 40)
    prompts, candidates = write_inputs(tmp_path, n_prompts=2)
    params = params_for(judge_server, tmp_path, prompts, candidates, run_date="2026-12-01", retention_days=30)

    first = preference_build(params)
    calls = judge_server.double.count()
    size = first["call_cache"]
    assert size["rows"] == calls + 1 and size["bytes"] == json.loads(Path(first["manifest_path"]).read_text())["call_cache"]["bytes"]
    assert first["pruned"]["call cache answers"]["count"] == 1
    assert first["pruned"]["qdrant stores"] == {"count": 2, "bytes": 8000}
    assert first["pruned"]["spools"] == {"count": 2, "bytes": 600} and first["pruned"]["prefect results"]["count"] == 1
    assert not files["old store"].exists() and files["recent record"].exists() and files["old dataset"].exists()
    build_stores = list((root / "2026-12-01" / "shards").glob("*/qdrant"))
    assert build_stores  # this build's own stores stay
    with sqlite3.connect(cache_path) as db:
        models = dict(db.execute("SELECT model, COUNT(*) FROM calls GROUP BY model").fetchall())
    assert models == {"openai/judge-double": calls}

    second = preference_build(params)  # its stage records and judge answers survived the pruning
    assert judge_server.double.count() == calls and second["call_cache"]["rows"] == calls

"""No paid answer is lost when storage fails: the SQLite call cache on a small tmpfs that fills up
mid-run (a real full disk: SQLite's "database or disk is full"), with the loopback judge.

The measure is the answers paid twice: what a re-run, once there is room again, asks the judge
for that the first run had already been answered. At most the requests in flight when storage
failed (the judge's concurrency) may be repeated."""

from __future__ import annotations

import asyncio
import errno
import sqlite3
import subprocess
import threading
from pathlib import Path

import polars as pl
import pytest

from longreward_core.models.storage import StorageGuard, StorageUnavailable
from longreward_core.pipeline.score_files import score_files
from longreward_core.reward.scorer import ScoringConfig
from longreward_testing.scenarios import judge_config_for, write_inputs

SCORING = ScoringConfig(retrieval_chunk_tokens=32, completeness_chunk_tokens=256)
CONCURRENCY = 4
FILL_AT = 40  # the judge request at whose arrival the disk fills up


@pytest.fixture
def small_disk(tmp_path):
    """A 4 MiB tmpfs: a filesystem that really fills up (mounting needs root)."""
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(disk)], capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"a tmpfs cannot be mounted here: {mounted.stderr.strip() or mounted.returncode}")
    yield disk
    subprocess.run(["umount", "-l", str(disk)], check=False)


def fill(disk: Path) -> Path:
    """Write zeros to `disk` until no byte is left; returns the filler file."""
    filler = disk / "filler"
    with open(filler, "wb", buffering=0) as out:
        block = b"\0" * 65536
        try:
            while True:
                out.write(block)
        except OSError as exc:
            assert exc.errno == errno.ENOSPC
        for size in (4096, 512, 1):  # the last partial blocks too
            try:
                while True:
                    out.write(b"\0" * size)
            except OSError:
                pass
    return filler


def requests_of(double) -> list[tuple[str, float | None, str]]:
    return [(r.task, r.temperature, r.content) for r in double.requests]


def stored_answers(cache: Path) -> int:
    with sqlite3.connect(cache) as db:
        return db.execute("SELECT count(*) FROM calls").fetchone()[0]


def score(server, tmp_path: Path, out: str, cache: Path, storage_retry_s: float):
    prompts, candidates = write_inputs(tmp_path)
    judge = judge_config_for(server, concurrency=CONCURRENCY, transport_retries=1, storage_retry_s=storage_retry_s)
    return score_files(prompts, candidates, tmp_path / out, judge, SCORING, cache_path=cache)


def test_a_cache_whose_disk_fills_up_stops_the_run_and_the_rerun_repeats_at_most_the_requests_in_flight(
    judge_server, small_disk, tmp_path
):
    double = judge_server.double
    cache = small_disk / "call_cache.sqlite"
    filled = []
    double.fault_rule = lambda request, index: filled.append(fill(small_disk)) if index == FILL_AT else None

    with pytest.raises(StorageUnavailable) as stopped:
        score(judge_server, tmp_path, "first", cache, storage_retry_s=1.0)
    message = str(stopped.value)
    assert "\n" not in message
    assert f"the call cache {cache}" in message and "disk is full" in message
    assert f"reuses every answer stored in the call cache {cache}" in message
    assert "could not be reached" not in message
    first = requests_of(double)
    stored = stored_answers(cache)
    assert len(first) > FILL_AT and stored >= FILL_AT - CONCURRENCY
    # Nothing was sent once the first store failed: the answers not stored are those in flight.
    assert len(first) - stored <= CONCURRENCY + 1  # + the request whose arrival filled the disk

    filled[0].unlink()  # room again
    double.reset()
    double.fault_rule = None
    run = score(judge_server, tmp_path, "again", cache, storage_retry_s=1.0)
    assert run.summary.failed == 0 and run.summary.scored == 25
    again = requests_of(double)
    paid_twice = [r for r in again if r in set(first)]
    assert len(paid_twice) <= len(first) - stored <= CONCURRENCY + 1
    assert run.summary.judge.total.cache_hits >= stored - CONCURRENCY  # the re-run reused what was stored


def test_a_cache_disk_full_for_less_than_the_retry_window_loses_nothing(judge_server, small_disk, tmp_path):
    """The disk is full for about a second: no candidate fails, no request is sent twice, and the
    run's scores are those of a run that never met the outage."""
    double = judge_server.double
    cache = small_disk / "call_cache.sqlite"

    def outage(request, index):
        if index == FILL_AT:
            filler = fill(small_disk)
            threading.Timer(1.0, filler.unlink).start()

    double.fault_rule = outage
    run = score(judge_server, tmp_path, "outage", cache, storage_retry_s=30.0)
    assert run.summary.failed == 0 and run.summary.unreachable == 0 and run.summary.scored == 25
    sent = requests_of(double)
    assert len(set(sent)) == len(sent) and stored_answers(cache) == len(sent)

    double.reset()
    double.fault_rule = None
    clean = score(judge_server, tmp_path, "clean", tmp_path / "clean.sqlite", storage_retry_s=30.0)
    assert len(requests_of(double)) == len(sent)
    columns = ["candidate_id", "reward", "status"]
    assert pl.read_parquet(run.scores_path)[columns].equals(pl.read_parquet(clean.scores_path)[columns])


def test_an_output_folder_whose_disk_fills_up_ends_the_command_with_one_line(judge_server, small_disk, tmp_path, monkeypatch):
    """`longreward score --out` on a disk that fills up mid-run (the call cache is in the output
    folder): exit 1 with one line naming what failed, where, and what a re-run reuses; the re-run
    (with room again) completes, paying again at most the requests in flight."""
    from typer.testing import CliRunner

    from flows.cli import app
    from longreward_testing.scenarios import TEST_API_KEY

    monkeypatch.setenv("LONGREWARD_JUDGE_API_KEY", TEST_API_KEY)
    double = judge_server.double
    filled = []
    double.fault_rule = lambda request, index: filled.append(fill(small_disk)) if index == FILL_AT else None
    prompts, candidates = write_inputs(tmp_path)
    command = ["score", "--prompts", str(prompts), "--candidates", str(candidates), "--out", str(small_disk / "out"),
               "--judge-model", "openai/judge-double", "--judge-api-base", judge_server.api_base,
               "--judge-concurrency", str(CONCURRENCY), "--storage-retry", "1", "--retrieval-chunk-tokens", "32", "--completeness-chunk-tokens", "256"]
    monkeypatch.setenv("COLUMNS", "1000")  # the message on one terminal line, as a log reads it
    result = CliRunner().invoke(app, command)
    assert result.exit_code == 1, result.output
    line = result.output.strip().splitlines()[-1]
    assert line.startswith("error: storage failed: ") and str(small_disk / "out") in line, result.output
    assert "run the same command again" in line and "could not be reached" not in result.output
    assert "Traceback" not in result.output
    first = requests_of(double)

    filled[0].unlink()
    double.reset()
    double.fault_rule = None
    again = CliRunner().invoke(app, command)
    assert again.exit_code == 0, again.output
    paid_twice = [r for r in requests_of(double) if r in set(first)]
    assert len(paid_twice) <= CONCURRENCY + 1


def no_space() -> None:
    raise OSError(errno.ENOSPC, "No space left on device")


def test_the_gate_stays_closed_while_a_store_is_kept_back_and_opens_once_none_is():
    async def run() -> None:
        guard = StorageGuard(30.0, reuse="every answer stored")
        kept = asyncio.ensure_future(guard.use("the file f", no_space))
        await asyncio.sleep(0.05)
        gate = asyncio.ensure_future(guard.wait_open())
        await asyncio.sleep(0.3)
        assert not gate.done()  # no request goes while a store is kept back
        kept.cancel()  # its run was stopped: nothing is kept back any more
        await asyncio.wait_for(gate, 1.0)
        assert await guard.use("the file f", lambda: "stored") == "stored"

    asyncio.run(run())


def test_storage_down_for_the_whole_window_stops_every_store_and_request():
    async def run() -> None:
        guard = StorageGuard(0.3, reuse="every answer stored in the call cache c")
        kept = asyncio.ensure_future(guard.use("the file f", no_space))
        await asyncio.sleep(0.05)
        gate = asyncio.ensure_future(guard.wait_open())
        with pytest.raises(StorageUnavailable, match=r"the file f kept failing for 0.3 s \(OSError: .*No space left"):
            await kept
        with pytest.raises(StorageUnavailable, match="reuses every answer stored in the call cache c"):
            await gate
        with pytest.raises(StorageUnavailable):
            await guard.use("the file f", lambda: "stored")

    asyncio.run(run())

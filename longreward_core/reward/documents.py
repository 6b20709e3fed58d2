"""Document preparation: chunking, the chunk index, and the evidence a statement retrieves.

The build's index stage and the scorer prepare documents the same way (`prepare_document`), so the
scorer finds the chunks the stage indexed; neither needs the other.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from longreward_core.data.form import form_order
from longreward_core.models.accounting import RunAccounting
from longreward_core.models.call_cache import CallStore
from longreward_core.models.embeddings import EMBEDDED_EMBEDDING, make_embedder
from longreward_core.models.tokenizers import load_tokenizer
from longreward_core.reward.chunking import ChunkSpan, chunk_document
from longreward_core.reward.retrieval import ChunkIndex, content_hash


class DocumentConfig(BaseModel):
    """How documents are chunked, embedded and searched. Every field is a CLI option / flow parameter
    (`scoring.*`: `ScoringConfig` extends it)."""

    model_config = ConfigDict(json_schema_extra=form_order)  # the form shows required fields first

    retrieval_chunk_tokens: int = Field(128, ge=8, description="Tokens per retrieval chunk (faithfulness).")
    completeness_chunk_tokens: int = Field(4096, ge=64, description="Tokens per key-point extraction chunk.")
    top_k: int = Field(5, ge=1, description="Chunks retrieved per factual statement.")
    tokenizer: str | None = Field(None, description="Tokenizer name or path for chunking; None: the embedded model's.")
    embedding_model: str = Field(
        EMBEDDED_EMBEDDING, description="Embedding model: the embedded MiniLM, or a litellm embedding model string."
    )
    embedding_api_base: str | None = Field(None, description="Base URL for a litellm embedding model.")
    qdrant_url: str | None = Field(None, description="Qdrant server URL; None: local mode in the output folder.")


@dataclass(frozen=True)
class PreparedDocument:
    """A document's id and retrieval chunks; its completeness chunks are cut on first use, so
    indexing alone never pays for them."""

    context: str = field(repr=False)
    config: DocumentConfig = field(repr=False)
    doc_id: str
    chunking: str  # identifies tokenizer + chunk size, so indexes of other settings never mix
    retrieval_chunks: list[ChunkSpan]

    @cached_property
    def completeness_chunks(self) -> list[ChunkSpan]:
        return chunk_document(self.context, load_tokenizer(self.config.tokenizer), self.config.completeness_chunk_tokens)

    def index_into(self, index: ChunkIndex) -> None:
        """Store the retrieval chunks in `index` (idempotent: ids are content hashes)."""
        index.index_document(self.doc_id, self.chunking, self.retrieval_chunks)

    def evidence(self, chunk_indices: list[int]) -> str:
        """Chunks in document order; adjacent ones joined as they are, gaps marked."""
        parts: list[str] = []
        previous = None
        for i in chunk_indices:
            if previous is not None and i != previous + 1:
                parts.append("\n[...]\n")
            parts.append(self.retrieval_chunks[i].text)
            previous = i
        return "".join(parts)


def retrieval_chunking(config: DocumentConfig) -> str:
    """Names the tokenizer and chunk size, so indexes of other settings never mix."""
    return f"{config.tokenizer or 'embedded'}:{config.retrieval_chunk_tokens}"


def prepare_document(context: str, config: DocumentConfig) -> PreparedDocument:
    """A document's id (content hash) and its retrieval chunks (completeness chunks on demand)."""
    return PreparedDocument(
        context=context,
        config=config,
        doc_id=content_hash(context),
        chunking=retrieval_chunking(config),
        retrieval_chunks=chunk_document(context, load_tokenizer(config.tokenizer), config.retrieval_chunk_tokens),
    )


def open_chunk_index(
    config: DocumentConfig, path: str | Path | None, *, cache: CallStore | None = None,
    accounting: RunAccounting | None = None,
) -> ChunkIndex:
    """The chunk index `config` names: its Qdrant server, else local mode in the folder `path`
    (a litellm embedding model's requests cached in `cache` and counted in `accounting`)."""
    return ChunkIndex(
        make_embedder(config.embedding_model, config.embedding_api_base, cache=cache, accounting=accounting),
        path=None if config.qdrant_url else path,
        url=config.qdrant_url,
    )

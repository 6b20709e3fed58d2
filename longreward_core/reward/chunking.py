"""Token-based document chunking with exact character offsets.

Chunks are cut every `chunk_tokens` tokens of the configured tokenizer, but their boundaries are
character offsets into the original text taken from the tokenizer's offset mapping, never
detokenised text: `text[span.start:span.end] == span.text` always holds, and the chunks tile the
document (no gap, no overlap), so whitespace and characters split across byte-level tokens are
kept exactly.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # transformers is imported where a tokenizer is loaded, not at start-up
    from transformers import PreTrainedTokenizerBase


@dataclass(frozen=True)
class ChunkSpan:
    """One chunk of a document: `text == document[start:end]`."""

    index: int
    start: int
    end: int
    text: str
    n_tokens: int
    # Position in the document, as a percentage of its characters.
    start_pct: float
    end_pct: float

    @property
    def position_label(self) -> str:
        """E.g. '0%-25%': the chunk's place in the document, for completeness labels."""
        return f"{self.start_pct:.0f}%-{self.end_pct:.0f}%"


def chunk_document(text: str, tokenizer: PreTrainedTokenizerBase, chunk_tokens: int) -> list[ChunkSpan]:
    """Split `text` into consecutive spans of `chunk_tokens` tokens (the last may be shorter)."""
    if chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be >= 1, got {chunk_tokens}")
    if not text:
        return []
    offsets = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    token_starts = [o[0] for o in offsets]
    # A cut may only fall before a token that starts a new character: byte-level tokenizers split
    # one CJK character or emoji over several tokens that share a start offset.
    boundaries = [j for j in range(1, len(token_starts)) if token_starts[j] > token_starts[j - 1]]
    cuts = []  # token indices where chunks after the first begin
    first = 0
    while True:
        limit = first + chunk_tokens
        if limit >= len(token_starts):
            break
        i = bisect.bisect_right(boundaries, limit) - 1
        if i < 0 or boundaries[i] <= first:
            # A character longer than the chunk: the smallest cut past it.
            i = bisect.bisect_right(boundaries, first)
            if i >= len(boundaries):
                break
        first = boundaries[i]
        cuts.append(first)
    # The first chunk starts at 0 and the last ends at len(text), so leading and trailing
    # whitespace the tokenizer does not cover is kept: the chunks tile the text.
    bounds = [0] + [token_starts[j] for j in cuts] + [len(text)]
    length = len(text)
    spans = []
    for i, (start, end) in enumerate(zip(bounds, bounds[1:])):
        spans.append(
            ChunkSpan(
                index=i,
                start=start,
                end=end,
                text=text[start:end],
                n_tokens=_count_in(token_starts, start, end),
                start_pct=100.0 * start / length,
                end_pct=100.0 * end / length,
            )
        )
    return spans


def _count_in(sorted_starts: list[int], start: int, end: int) -> int:
    return bisect.bisect_left(sorted_starts, end) - bisect.bisect_left(sorted_starts, start)

"""Token chunking with exact character offsets, against the real (embedded SmolLM2) tokenizer."""

from __future__ import annotations

import math
from collections import Counter

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from longreward_core.models.tokenizers import load_tokenizer
from longreward_core.reward.chunking import ChunkSpan, chunk_document


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(None)


def token_starts(tokenizer, text: str) -> list[int]:
    return [s for s, _ in tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]]


def max_tokens_per_char(tokenizer, text: str) -> int:
    """Byte-level BPE splits some characters (CJK, emoji) into several tokens sharing one start."""
    starts = token_starts(tokenizer, text)
    return max(Counter(starts).values(), default=1)


# Text pieces: English words, Chinese characters, digits, punctuation, emoji, newlines, space runs.
PIECES = st.one_of(
    st.sampled_from(["the", "quick", "brown", "fox", "reward", "model", "Document", "don't", "long-context"]),
    st.text(alphabet="中文字符长文档奖励模型忠实性完整性图书馆藏书", min_size=1, max_size=6),
    st.text(alphabet="0123456789", min_size=1, max_size=5),
    st.sampled_from(list(".,;:!?()[]\"'-—…，。？！、")),
    st.sampled_from(["😀", "🎉", "👍🏽", "🇫🇷", "❤️", "👩‍💻"]),
    st.sampled_from(["\n", "\n\n", "\r\n", "\t"]),
    st.integers(min_value=1, max_value=6).map(lambda n: " " * n),
)
TEXTS = st.lists(PIECES, min_size=0, max_size=40).map("".join)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=TEXTS, size=st.integers(min_value=1, max_value=64))
def test_chunks_tile_the_text_exactly(tokenizer, text: str, size: int) -> None:
    chunks = chunk_document(text, tokenizer, size)
    if not text:
        assert chunks == []
        return
    starts = token_starts(tokenizer, text)

    assert chunks, "a non-empty text has at least one chunk"
    assert [c.index for c in chunks] == list(range(len(chunks)))
    assert chunks[0].start == 0
    assert chunks[-1].end == len(text)
    for prev, cur in zip(chunks, chunks[1:]):
        assert cur.start == prev.end  # no gap, no overlap
        assert cur.start in starts  # every cut is at a token's first character
    assert "".join(c.text for c in chunks) == text
    for c in chunks:
        assert text[c.start : c.end] == c.text
        assert c.end > c.start and c.text
        assert c.n_tokens >= 1
        assert 0.0 <= c.start_pct < c.end_pct <= 100.0
        assert c.start_pct == pytest.approx(100.0 * c.start / len(text))
        assert c.end_pct == pytest.approx(100.0 * c.end / len(text))
    assert chunks[0].start_pct == 0.0 and chunks[-1].end_pct == 100.0
    # Every token is counted in exactly one chunk.
    assert sum(c.n_tokens for c in chunks) == len(starts)
    # Cuts fall between characters; a chunk exceeds the size only when one character alone is
    # split into more tokens than the size allows.
    group = max_tokens_per_char(tokenizer, text)
    for c in chunks:
        assert c.n_tokens <= max(size, group)
    if group == 1:
        assert all(c.n_tokens <= size for c in chunks)
        assert all(c.n_tokens == size for c in chunks[:-1])
        assert len(chunks) == math.ceil(len(starts) / size)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    words=st.lists(st.sampled_from(["alpha", "beta", "gamma", "42", "x", "long", "reward", ",", "."]), min_size=1, max_size=60),
    sep=st.sampled_from([" ", "  ", "\n", " \n "]),
    size=st.integers(min_value=1, max_value=64),
)
def test_ascii_text_chunks_never_exceed_the_size(tokenizer, words: list[str], sep: str, size: int) -> None:
    text = sep.join(words)
    n = len(token_starts(tokenizer, text))
    chunks = chunk_document(text, tokenizer, size)
    assert [c.n_tokens for c in chunks] == [size] * (n // size) + ([n % size] if n % size else [])
    assert "".join(c.text for c in chunks) == text


ENGLISH = (
    "The Calder Ridge Pumping Station was commissioned in March 1962 to lift raw water from the "
    "Brannock River to the Hilltop Reservoir. In 2019 the council approved a budget of 2.4 million "
    "euros for its refurbishment; the final cost was 2.98 million euros.\n\n"
) * 3
CHINESE = "长文档的奖励模型需要关注忠实性与完整性。" * 4


@pytest.mark.parametrize("size", [1, 7, 16, 32, 100, 10_000])
def test_english_chunk_count_is_ceil_tokens_over_size(tokenizer, size: int) -> None:
    n = len(token_starts(tokenizer, ENGLISH))
    assert n > 100  # the text really spans several chunks for the smaller sizes
    chunks = chunk_document(ENGLISH, tokenizer, size)
    assert len(chunks) == math.ceil(n / size)
    assert [c.n_tokens for c in chunks[:-1]] == [size] * (len(chunks) - 1)
    assert chunks[-1].n_tokens == n - size * (len(chunks) - 1)
    assert "".join(c.text for c in chunks) == ENGLISH


@pytest.mark.parametrize("size", [8, 16, 32, 64])
def test_chinese_chunks_pack_whole_characters(tokenizer, size: int) -> None:
    assert len(CHINESE) == 80
    n = len(token_starts(tokenizer, CHINESE))
    assert n > len(CHINESE)  # many CJK characters take two or three byte-level tokens
    chunks = chunk_document(CHINESE, tokenizer, size)
    group = max_tokens_per_char(tokenizer, CHINESE)
    # Each chunk is filled to within one character of the size, never past it.
    assert all(size - group < c.n_tokens <= size for c in chunks[:-1])
    assert math.ceil(n / size) <= len(chunks) <= math.ceil(n / (size - group + 1))
    assert sum(c.n_tokens for c in chunks) == n
    assert "".join(c.text for c in chunks) == CHINESE
    for c in chunks:
        assert CHINESE[c.start : c.end] == c.text


def test_multi_token_character_is_never_split(tokenizer) -> None:
    text = "a😀b"
    assert max_tokens_per_char(tokenizer, text) > 1  # the emoji is several byte-level tokens
    chunks = chunk_document(text, tokenizer, 1)
    assert [c.text for c in chunks] == ["a", "😀", "b"]
    assert chunks[1].n_tokens == len(token_starts(tokenizer, text)) - 2


def test_leading_and_trailing_whitespace_is_kept(tokenizer) -> None:
    text = "   leading words and trailing spaces   \n\n"
    chunks = chunk_document(text, tokenizer, 2)
    assert chunks[0].text.startswith("   ")
    assert chunks[-1].text.endswith("   \n\n")
    assert "".join(c.text for c in chunks) == text


def test_position_labels_of_four_single_token_chunks(tokenizer) -> None:
    text = "1234"
    assert len(token_starts(tokenizer, text)) == 4  # digits are single tokens
    chunks = chunk_document(text, tokenizer, 1)
    assert [c.position_label for c in chunks] == ["0%-25%", "25%-50%", "50%-75%", "75%-100%"]


def test_position_labels_round_to_whole_percent(tokenizer) -> None:
    chunks = chunk_document("123", tokenizer, 1)
    assert [c.position_label for c in chunks] == ["0%-33%", "33%-67%", "67%-100%"]
    assert chunk_document("123", tokenizer, 3)[0].position_label == "0%-100%"


def test_position_label_format() -> None:
    span = ChunkSpan(index=1, start=10, end=20, text="x" * 10, n_tokens=3, start_pct=12.5, end_pct=37.49)
    assert span.position_label == "12%-37%"  # format '.0f' (banker's rounding of 12.5 is 12)


def test_empty_text_gives_no_chunks(tokenizer) -> None:
    assert chunk_document("", tokenizer, 16) == []


def test_whitespace_only_text_is_one_chunk(tokenizer) -> None:
    chunks = chunk_document("   \n ", tokenizer, 16)
    assert [(c.start, c.end, c.text) for c in chunks] == [(0, 5, "   \n ")]


@pytest.mark.parametrize("bad", [0, -1, -100])
def test_chunk_tokens_below_one_raises(tokenizer, bad: int) -> None:
    with pytest.raises(ValueError, match="chunk_tokens must be >= 1"):
        chunk_document("some text", tokenizer, bad)
    with pytest.raises(ValueError):
        chunk_document("", tokenizer, bad)  # checked before the empty-text shortcut


def test_load_tokenizer_is_cached(tokenizer) -> None:
    assert load_tokenizer(None) is tokenizer


# A cut never falls inside a character split over several tokens, and is counted from where the
# chunk really starts, so a chunk never exceeds chunk_tokens when a compliant chunking exists.


@pytest.mark.parametrize("size", [16, 32])
def test_chunks_respect_size_when_characters_fit(tokenizer, size: int) -> None:
    assert max_tokens_per_char(tokenizer, CHINESE) <= size  # a compliant chunking exists
    chunks = chunk_document(CHINESE, tokenizer, size)
    assert max(c.n_tokens for c in chunks) <= size


RACE = """
import threading
from concurrent.futures import ThreadPoolExecutor
from longreward_core.models.tokenizers import load_tokenizer
barrier = threading.Barrier(8)
def load(_):
    barrier.wait()
    return load_tokenizer(None)
with ThreadPoolExecutor(8) as pool:
    print(len({id(t) for t in pool.map(load, range(8))}))
"""


@pytest.mark.parametrize("attempt", range(3))
def test_shards_starting_together_load_the_tokenizer_once_without_an_import_race(attempt):
    """A fresh process (transformers not imported yet) whose threads all ask for the tokenizer at
    once, as a build's shard tasks do: every thread gets the one tokenizer, none an ImportError."""
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", RACE], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "1"

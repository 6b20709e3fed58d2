"""Sampling candidate responses from the policy model being improved.

The policy is any litellm model (an OpenAI-compatible server such as vLLM or `transformers serve`,
a hosted model) or the embedded SmolLM2. Requests go through the same client as the judge, so
they are cached (a re-run samples nothing again), retried and rate limited.

The policy's context window is taken from the configuration, else from the server (an
OpenAI-compatible `/models` listing's `max_model_len`, as vLLM reports it), else from litellm's
model information; sampling refuses to start when none knows it. A document that does not fit is
never cut silently: its prompt is skipped and reported, unless `allow_truncation` cuts it in the
middle (head + tail tokens), and the cut is reported.
"""

from __future__ import annotations

import asyncio
import json

from pydantic import BaseModel, ConfigDict, Field, SecretStr
from pydantic.json_schema import SkipJsonSchema

from longreward_core.data.form import form_order
from longreward_core.data.io import InputError
from longreward_core.data.pairs import user_message
from longreward_core.data.records import Candidate, Prompt, SampleReport
from longreward_core.models.client import EMBEDDED_MODEL, ApiBase, LLMClient, PolicyClientConfig, litellm_module
from longreward_core.models.errors import AuthenticationFailed, ConfigurationError, LLMCallFailed, RequestRejected
from longreward_core.models.secrets import POLICY_API_KEY_ENV
from longreward_core.models.smollm2 import SMOLLM2_CONTEXT_TOKENS
from longreward_core.models.tokenizers import load_tokenizer

SAMPLE_TRIES = 3  # requests per candidate until a non-empty answer


class PolicyConfig(BaseModel):
    """The policy model candidates are sampled from. Every field is a CLI option / flow parameter."""

    model_config = ConfigDict(json_schema_extra=form_order)  # the form shows required fields first

    model: str = Field(EMBEDDED_MODEL, description="litellm model string of the policy (default: the embedded SmolLM2).")
    api_base: ApiBase = Field(None, description="Base URL of an OpenAI-compatible server (vLLM, transformers serve).")
    api_key: SkipJsonSchema[SecretStr | None] = Field(None, exclude=True, description=f"Key; by default ${POLICY_API_KEY_ENV}.")
    candidates_per_prompt: int = Field(10, ge=1, description="Candidates sampled per prompt.")
    temperature: float = Field(0.8, ge=0, le=2, description="Sampling temperature.")
    top_p: float = Field(0.95, gt=0, le=1, description="Nucleus sampling threshold.")
    max_new_tokens: int = Field(512, ge=1, description="Longest response, in tokens.")
    max_context_tokens: int | None = Field(
        None, ge=256,
        description="Policy context window in tokens; empty: as the server reports it (max_model_len), else as "
        "litellm knows the model; required when neither does.",
    )
    allow_truncation: bool = Field(
        False, description="Cut documents longer than the context in the middle (head + tail) instead of skipping their prompt."
    )
    tokenizer: str | None = Field(None, description="Tokenizer for the context budget; None: the embedded model's.")
    sample_in_one_request: bool = Field(
        False,
        description="Ask for a prompt's candidates in one request (the `n` parameter of vLLM and OpenAI), so its document "
        "is sent and prefilled once; where the server refuses `n` or returns fewer choices, one request per candidate.",
    )
    concurrency: int = Field(8, ge=1, description="Requests in flight at once.")
    rpm: int | None = Field(None, ge=1, description="Requests per minute at most.")
    timeout_s: float = Field(300.0, gt=0, description="Hard limit on one request, seconds.")
    # The client's own fields, described there once.
    transport_retries: int = PolicyClientConfig.model_fields["transport_retries"]
    backoff_initial_s: float = PolicyClientConfig.model_fields["backoff_initial_s"]
    backoff_max_s: float = PolicyClientConfig.model_fields["backoff_max_s"]

    def client_config(self) -> PolicyClientConfig:
        return PolicyClientConfig(
            model=self.model, api_base=self.api_base, api_key=self.api_key, max_tokens=self.max_new_tokens,
            timeout_s=self.timeout_s, concurrency=self.concurrency, rpm=self.rpm,
            transport_retries=self.transport_retries, backoff_initial_s=self.backoff_initial_s,
            backoff_max_s=self.backoff_max_s,
        )


class ContextUnknown(InputError):
    """Nobody knows the policy's context window: the configuration must state it."""


async def policy_context(config: PolicyConfig) -> int:
    """The policy's context window in tokens: configured, reported by its server, or known to litellm."""
    if config.max_context_tokens is not None:
        return config.max_context_tokens
    if config.model.startswith("embedded/"):
        return SMOLLM2_CONTEXT_TOKENS
    if config.api_base:
        served = await _served_context(config)
        if served:
            return served
    try:
        known = litellm_module().get_model_info(config.model).get("max_input_tokens")
    except Exception:  # litellm raises for models it does not know
        known = None
    if known:
        return int(known)
    raise ContextUnknown(
        f"the context window of policy '{config.model}' is unknown: its server does not report max_model_len and "
        "litellm does not know the model; set policy.max_context_tokens (--policy-max-context-tokens), or serve it "
        "where GET /models reports max_model_len (vLLM does)"
    )


async def _served_context(config: PolicyConfig) -> int | None:
    """`max_model_len` of the served model from an OpenAI-compatible `GET /models` (None if absent;
    refused credentials stop sampling before it starts)."""
    served_name = config.model.split("/", 1)[-1]
    try:
        listed = await LLMClient(config.client_config(), None).served_models()
    except AuthenticationFailed:
        raise
    except LLMCallFailed:  # no listing (a server without /models, or unreachable): asked elsewhere
        return None
    for entry in listed:
        if isinstance(entry, dict) and entry.get("id") == served_name and entry.get("max_model_len"):
            return int(entry["max_model_len"])
    return None


def cut_document_middle(text: str, tokenizer, budget: int) -> tuple[str, int, int]:
    """Keep the first and last budget/2 tokens of `text`, cut at token boundaries.

    Returns (text, kept tokens, original tokens); the text is unchanged when it fits.
    """
    offsets = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    if len(offsets) <= budget:
        return text, len(offsets), len(offsets)
    head, tail = budget // 2, budget - budget // 2
    cut = text[: offsets[head - 1][1]] + "\n[...]\n" + text[offsets[len(offsets) - tail][0] :]
    return cut, head + tail, len(offsets)


async def sample_candidates(
    client: LLMClient, prompts: list[Prompt], config: PolicyConfig
) -> tuple[list[Candidate], list[SampleReport]]:
    """`candidates_per_prompt` responses per prompt, ids '<prompt id>-<k>', and a report per prompt.

    Raises ContextUnknown before any request when the policy's context window cannot be found.
    """
    tokenizer = load_tokenizer(config.tokenizer)
    context_tokens = await policy_context(config)
    # Room for the question, the chat template and the answer.
    budget = max(128, context_tokens - config.max_new_tokens - 256)

    async def one_prompt(prompt: Prompt) -> tuple[list[Candidate], SampleReport]:
        context, kept, total = await asyncio.to_thread(cut_document_middle, prompt.context, tokenizer, budget)
        if kept < total and not config.allow_truncation:
            return [], SampleReport(
                prompt_id=prompt.id, context_tokens=total, kept_tokens=0, sampled=0, failed=config.candidates_per_prompt,
                error=f"the document ({total} tokens) does not fit the policy's context ({context_tokens} tokens, "
                f"{budget} for the document): not sampled; allow cutting it in the middle with --policy-allow-truncation",
            )
        messages = [{"role": "user", "content": user_message(prompt.model_copy(update={"context": context}))}]

        async def one_sample(k: int) -> Candidate | LLMCallFailed | str:
            for attempt in range(k * SAMPLE_TRIES, (k + 1) * SAMPLE_TRIES):
                try:
                    text = await client.complete(
                        "sampling", messages, config.temperature, attempt, top_p=config.top_p,
                        accept=lambda answer: bool(answer.strip()),  # an empty sample is asked for again
                    )
                except ConfigurationError:
                    raise
                except LLMCallFailed as exc:
                    return exc
                if text.strip():
                    return Candidate(prompt_id=prompt.id, candidate_id=f"{prompt.id}-{k}", response=text.strip())
            return "empty response"

        n = config.candidates_per_prompt
        batch = await one_request(messages, n) if config.sample_in_one_request and n > 1 and not n_refused else None
        if batch is not None:  # empty choices are asked for again, one request each
            results = await asyncio.gather(*(
                asyncio.sleep(0, Candidate(prompt_id=prompt.id, candidate_id=f"{prompt.id}-{k}", response=text.strip()))
                if text.strip() else one_sample(k)
                for k, text in enumerate(batch)
            ))
        else:
            results = await asyncio.gather(*(one_sample(k) for k in range(n)))
        candidates = [r for r in results if isinstance(r, Candidate)]
        errors = sorted({str(r) for r in results if not isinstance(r, Candidate)})
        report = SampleReport(
            prompt_id=prompt.id, context_tokens=total, kept_tokens=kept, sampled=len(candidates),
            failed=len(results) - len(candidates), error="; ".join(errors) or None,
            unreachable=sum(1 for r in results if isinstance(r, LLMCallFailed) and r.transport),
        )
        return candidates, report

    n_refused = False  # set once the server refuses `n`: every later prompt goes one request per candidate

    async def one_request(messages: list[dict[str, str]], n: int) -> list[str] | None:
        """All n samples from one request; None when the server does not give them (then one each)."""
        nonlocal n_refused
        try:
            text = await client.complete(
                "sampling", messages, config.temperature, 0, top_p=config.top_p, n=n,
                accept=lambda answer: len(json.loads(answer)) == n,
            )
        except ConfigurationError:
            raise
        except LLMCallFailed as exc:
            n_refused = n_refused or isinstance(exc, RequestRejected)
            return None
        texts = json.loads(text)
        if len(texts) != n:  # a server that ignores `n` answers with one choice
            n_refused = True
            return None
        return texts

    per_prompt = await asyncio.gather(*(one_prompt(p) for p in prompts))
    return [c for cands, _ in per_prompt for c in cands], [r for _, r in per_prompt]

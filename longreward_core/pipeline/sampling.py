"""Sampling candidate responses from the policy model being improved.

The policy is any litellm model (an OpenAI-compatible server such as vLLM or `transformers serve`,
a hosted model) or the embedded SmolLM2. Requests go through the same client as the judge, so
they are cached (a re-run samples nothing again), retried and rate limited. Documents longer than
the policy's context are cut in the middle (head + tail tokens) and the cut is reported.
"""

from __future__ import annotations

import asyncio

from pydantic import BaseModel, Field, SecretStr

from longreward_core.data.pairs import user_message
from longreward_core.data.records import Candidate, Prompt, SampleReport
from longreward_core.models.client import (
    EMBEDDED_MODEL,
    POLICY_API_KEY_ENV,
    AuthenticationFailed,
    LLMCallFailed,
    LLMClient,
    PolicyClientConfig,
)
from longreward_core.models.tokenizers import load_tokenizer

SAMPLE_TRIES = 3  # requests per candidate until a non-empty answer


class PolicyConfig(BaseModel):
    """The policy model candidates are sampled from. Every field is a CLI option / flow parameter."""

    model: str = Field(EMBEDDED_MODEL, description="litellm model string of the policy (default: the embedded SmolLM2).")
    api_base: str | None = Field(None, description="Base URL of an OpenAI-compatible server (vLLM, transformers serve).")
    api_key: SecretStr | None = Field(None, exclude=True, description=f"Key; by default ${POLICY_API_KEY_ENV}.")
    candidates_per_prompt: int = Field(10, ge=1, description="Candidates sampled per prompt.")
    temperature: float = Field(0.8, ge=0, le=2, description="Sampling temperature.")
    top_p: float = Field(0.95, gt=0, le=1, description="Nucleus sampling threshold.")
    max_new_tokens: int = Field(512, ge=1, description="Longest response, in tokens.")
    max_context_tokens: int = Field(8192, ge=256, description="Policy context window; longer prompts are cut in the middle.")
    tokenizer: str | None = Field(None, description="Tokenizer for the context budget; None: the embedded model's.")
    concurrency: int = Field(8, ge=1, description="Requests in flight at once.")
    rpm: int | None = Field(None, ge=1, description="Requests per minute at most.")
    timeout_s: float = Field(300.0, gt=0, description="Hard limit on one request, seconds.")

    def client_config(self) -> PolicyClientConfig:
        return PolicyClientConfig(
            model=self.model, api_base=self.api_base, api_key=self.api_key, max_tokens=self.max_new_tokens,
            timeout_s=self.timeout_s, concurrency=self.concurrency, rpm=self.rpm,
        )


def truncate_middle(text: str, tokenizer, budget: int) -> tuple[str, int, int]:
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
    """`candidates_per_prompt` responses per prompt, ids '<prompt id>-<k>', and a report per prompt."""
    tokenizer = load_tokenizer(config.tokenizer)
    # Room for the question, the chat template and the answer.
    budget = max(128, config.max_context_tokens - config.max_new_tokens - 256)

    async def one_prompt(prompt: Prompt) -> tuple[list[Candidate], SampleReport]:
        context, kept, total = await asyncio.to_thread(truncate_middle, prompt.context, tokenizer, budget)
        messages = [{"role": "user", "content": user_message(prompt.model_copy(update={"context": context}))}]

        async def one_sample(k: int) -> Candidate | str:
            for attempt in range(k * SAMPLE_TRIES, (k + 1) * SAMPLE_TRIES):
                try:
                    text = await client.complete(
                        "sampling", messages, config.temperature, attempt, top_p=config.top_p,
                        accept=lambda answer: bool(answer.strip()),  # an empty sample is asked for again
                    )
                except AuthenticationFailed:
                    raise
                except LLMCallFailed as exc:
                    return str(exc)
                if text.strip():
                    return Candidate(prompt_id=prompt.id, candidate_id=f"{prompt.id}-{k}", response=text.strip())
            return "empty response"

        results = await asyncio.gather(*(one_sample(k) for k in range(config.candidates_per_prompt)))
        candidates = [r for r in results if isinstance(r, Candidate)]
        errors = sorted({r for r in results if isinstance(r, str)})
        report = SampleReport(
            prompt_id=prompt.id, context_tokens=total, kept_tokens=kept, sampled=len(candidates),
            failed=len(results) - len(candidates), error="; ".join(errors) or None,
        )
        return candidates, report

    per_prompt = await asyncio.gather(*(one_prompt(p) for p in prompts))
    return [c for cands, _ in per_prompt for c in cands], [r for _, r in per_prompt]

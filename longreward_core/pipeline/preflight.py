"""What a run can learn about its models before it pays for anything.

A build that fans out into shards would otherwise find a wrong configuration once per shard, after
indexing and sampling, and end with a failure that looks like one a retry could fix. These
checks send no paid request: litellm's model resolution (a model string it cannot route), the
free model listing of an OpenAI-compatible server (`GET /models`: refused credentials; and the
policy's context window), and the policy's context from the configuration or litellm's model
information. A hosted provider that refuses a key is found by the first paid request, which
stops the client at once (`models.client`).
"""

from __future__ import annotations

from longreward_core.models.client import LLMClient, LLMConfig, litellm_module
from longreward_core.models.errors import (
    AuthenticationFailed,
    ConfigurationError,
    LLMCallFailed,
    classify_failure,
)
from longreward_core.pipeline.sampling import PolicyConfig, policy_context


async def check_model(config: LLMConfig) -> None:
    """Raises ConfigurationError when `config` cannot work whatever the retries: litellm cannot
    tell which provider serves its model, or its server (`api_base`) refuses the credentials on
    its model listing. A server that cannot be reached now, or has no listing, is not refused
    here: the run's own requests retry an outage."""
    if config.is_embedded:
        return
    # The probe does not wait out an outage: the run's requests have their own retries.
    client = LLMClient(config.model_copy(update={"transport_retries": 0}), None)
    if client.route == "litellm":
        try:
            litellm_module().get_llm_provider(model=config.model, api_base=config.api_base)
        except Exception as exc:
            failure = classify_failure(exc, model=config.model, api_base=config.api_base, api_key=None, key_variables="")
            if isinstance(failure, ConfigurationError):
                raise failure from None
    if config.api_base:
        try:
            await client.served_models()
        except AuthenticationFailed:
            raise
        except LLMCallFailed:
            pass


async def check_models(judge: LLMConfig, policy: PolicyConfig | None = None) -> None:
    """The checks of `check_model` for the judge and, when candidates are sampled, the policy,
    whose context window must also be known (raises ContextUnknown with the fix otherwise)."""
    await check_model(judge)
    if policy is not None:
        await check_model(policy.client_config())
        await policy_context(policy)

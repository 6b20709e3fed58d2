"""Stage: the checks that no retry can pass, run once before any shard starts."""

from __future__ import annotations

from prefect import task
from prefect.cache_policies import NO_CACHE

from longreward_core.models.event_loop import run_async
from longreward_core.pipeline.preflight import check_models
from longreward_core.pipeline.sampling import PolicyConfig
from longreward_core.reward.judge import JudgeConfig
from tasks.caching import with_secret_key
from tasks.score import judge_limit


@task(name="preflight", task_run_name="preflight", cache_policy=NO_CACHE)
def check_configuration(
    judge: JudgeConfig,
    policy: PolicyConfig | None,
    judge_slots: str | None = None,
    judge_limit_strict: bool = False,
    judge_key_secret: str | None = None,
    policy_key_secret: str | None = None,
) -> None:
    """Fails, naming the fix, on what would fail every shard and every retry alike: a missing
    judge limit in strict mode (ServerSetupMissing), a model litellm cannot route or credentials
    its server refuses (ConfigurationError), the context window of the policy (`None` when
    candidates are given) unknown (ContextUnknown). Sends no paid request
    (`longreward_core.pipeline.preflight`). Never cached: the server and the keys may change."""
    if judge_slots and judge_limit_strict:
        judge_limit(judge_slots, strict=True)
    policy = with_secret_key(policy, policy_key_secret) if policy is not None else None
    run_async(check_models(with_secret_key(judge, judge_key_secret), policy))

"""The automations that operate the nightly on a self-hosted Prefect server; deploy.sh runs this.

- `longreward-crash-zombie-runs`: a flow run whose heartbeats stop (its worker or machine died)
  is set Crashed: Prefect's "Detect zombie flows" automation. After each heartbeat of a flow run,
  another event of that run (a heartbeat or a state change) is expected within
  $LONGREWARD_ZOMBIE_AFTER_S seconds (default 300). The workers send a heartbeat every
  $PREFECT_FLOWS_HEARTBEAT_FREQUENCY seconds (60 in docker-compose.yml; Prefect's own default,
  for clients that do not set it, is 180, hence a threshold above both).
- `longreward-retry-crashed-nightly`: a nightly build that crashed is scheduled again, as
  `prefect flow-run retry` does, up to $LONGREWARD_CRASH_RETRIES times (default 2; 0 removes the
  automation): a run that keeps crashing its worker stops there, Crashed. The retry resumes:
  every finished shard comes back from the cache and no answered judge call is asked again.

With $LONGREWARD_NOTIFY_WEBHOOK_URL (Slack's or Teams' incoming webhook, or any URL that takes
a JSON POST), someone is told, by a POST of {"text": message}:
- `longreward-notify-nightly-failed`: a nightly ended Failed or Crashed (failed shards, an
  exhausted budget, a lost worker). The message names the run, its state message (the failed
  shards and their count, or what ran out), the attempt, and the retry command.
- `longreward-notify-nightly-needs-review`: a nightly published a build in which more than
  $LONGREWARD_NOTIFY_FAILED_SHARE of the candidates (default 0.05) have no reward; the flow emits
  that event with the counts (flows/preference_build.py).
The URL is kept in the Webhook block `longreward-notify`, whose URL field is a secret (masked in
the UI and the API); it is never a flow parameter, and the message carries none of it.

Each automation is created, or updated in place when one of that name exists: running this
again changes the settings and never adds a second one.

    python infra/stack/automations.py      # with PREFECT_API_URL (and PREFECT_API_AUTH_STRING)
"""

from __future__ import annotations

import os
from datetime import timedelta

from uuid import UUID

from prefect.automations import Automation
from prefect.blocks.webhook import Webhook
from prefect.client.orchestration import get_client
from prefect.client.schemas.objects import StateType
from prefect.events.actions import CallWebhook, ChangeFlowRunState
from prefect.events.schemas.automations import AutomationCore, EventTrigger, Posture
from prefect.events.schemas.events import ResourceSpecification
from prefect.variables import Variable

from flows.preference_build import FAILED_SHARE_VARIABLE, NEEDS_REVIEW_EVENT

NIGHTLY_DEPLOYMENT = "nightly-preference-build"
ZOMBIE_AUTOMATION = "longreward-crash-zombie-runs"
RETRY_AUTOMATION = "longreward-retry-crashed-nightly"
DEFAULT_ZOMBIE_AFTER_S = 300
ZOMBIE_MESSAGE = "No heartbeat from the flow run: its worker or machine stopped while it ran."
NOTIFY_BLOCK = "longreward-notify"
NOTIFY_FAILED_AUTOMATION = "longreward-notify-nightly-failed"
NOTIFY_REVIEW_AUTOMATION = "longreward-notify-nightly-needs-review"
NIGHTLY_RUNS = ResourceSpecification({"prefect.resource.role": "deployment", "prefect.resource.name": NIGHTLY_DEPLOYMENT})

# The messages, rendered by the server (Jinja) from the triggering event and its flow run; each
# ends as the JSON body {"text": ...} that Slack's and Teams' incoming webhooks take.
FAILED_MESSAGE = """\
{%- set state = event.resource["prefect.state-name"] -%}
{%- set attempt = event.resource["prefect.run-count"] | int -%}
{%- set reason = event.resource["prefect.state-message"] -%}
{%- set text -%}
Nightly preference build {{ flow_run.name }} (flow run {{ flow_run.id }}) ended {{ state }} on attempt {{ attempt }}:
{{ reason }}
{% if state == "Crashed" and attempt <= __CRASH_RETRIES__ -%}
It is retried automatically (finished shards come back from the cache); you are told again if that fails.
{%- elif "budget reached" in reason -%}
Start it again with a larger scoring.max_judge_cost_usd / max_judge_tokens: every answer so far is cached.
{%- else -%}
Retry (finished shards come back from the cache): prefect flow-run retry {{ flow_run.id }}
{%- endif %}
{%- endset -%}
{"text": {{ text | tojson }}}"""

REVIEW_MESSAGE = """\
{%- set counts = event.payload -%}
{%- set text -%}
Nightly preference build {{ flow_run.name }} (flow run {{ flow_run.id }}) published {{ counts.build }} with \
{{ counts.failed }} of {{ counts.candidates }} candidates without a reward ({{ counts.failed_percent }}%, \
above {{ counts.threshold_percent }}%): {{ counts.rejected }} refused by the provider for good. \
{{ counts.pairs }} pairs; {{ counts.quarantined_rows }} input rows quarantined; no shard failed.
The reasons are in the error column of {{ counts.build }}/shards/*/scores.parquet. \
The run completed: a retry would change nothing, as its shards come back from the cache.
{%- endset -%}
{"text": {{ text | tojson }}}"""


def _setting(name: str, default: int, minimum: int) -> int:
    raw = os.environ.get(name, str(default))
    try:
        value = int(raw)
    except ValueError:
        value = minimum - 1
    if value < minimum:
        raise SystemExit(f"{name}={raw!r}: expected a whole number >= {minimum}")
    return value


def zombie_automation(after_s: int) -> Automation:
    """Crash a flow run `after_s` seconds after its last heartbeat when nothing else came."""
    return Automation(
        name=ZOMBIE_AUTOMATION,
        description=f"A flow run with no heartbeat nor state change for {after_s} s after a heartbeat is set Crashed.",
        trigger=EventTrigger(
            after={"prefect.flow-run.heartbeat"},
            expect={"prefect.flow-run.*"},
            match=ResourceSpecification({"prefect.resource.id": ["prefect.flow-run.*"]}),
            for_each={"prefect.resource.id"},
            posture=Posture.Proactive,
            threshold=1,
            within=timedelta(seconds=after_s),
        ),
        actions=[ChangeFlowRunState(state=StateType.CRASHED, message=ZOMBIE_MESSAGE)],
    )


def retry_automation(retries: int) -> Automation:
    """Schedule a crashed nightly again, up to `retries` times."""
    return Automation(
        name=RETRY_AUTOMATION,
        description=f"A crashed {NIGHTLY_DEPLOYMENT} run is scheduled again, up to {retries} times; "
        "finished shards come back from the cache.",
        trigger=EventTrigger(
            expect={"prefect.flow-run.Crashed"},
            # The state-change event carries the run's count of attempts so far: a run that
            # crashed on its (retries + 1)th attempt is left Crashed.
            match=ResourceSpecification({"prefect.resource.id": ["prefect.flow-run.*"],
                                         "prefect.run-count": [str(n) for n in range(1, retries + 1)]}),
            match_related=ResourceSpecification({"prefect.resource.role": "deployment",
                                                 "prefect.resource.name": NIGHTLY_DEPLOYMENT}),
            posture=Posture.Reactive,
            threshold=1,
        ),
        # What `prefect flow-run retry` does: back to Scheduled, forced out of the final state.
        actions=[ChangeFlowRunState(state=StateType.SCHEDULED, name="AwaitingRetry", force=True,
                                    message="Retried after a crash; finished shards come back from the cache.")],
    )


def notify_failed_automation(webhook: UUID, retries: int) -> Automation:
    """Call the webhook when a nightly ends Failed or Crashed."""
    return Automation(
        name=NOTIFY_FAILED_AUTOMATION,
        description=f"Tell the {NOTIFY_BLOCK} webhook that a {NIGHTLY_DEPLOYMENT} run ended Failed or Crashed.",
        trigger=EventTrigger(
            expect={"prefect.flow-run.Failed", "prefect.flow-run.Crashed"},
            match=ResourceSpecification({"prefect.resource.id": ["prefect.flow-run.*"]}),
            match_related=NIGHTLY_RUNS,
            posture=Posture.Reactive,
            threshold=1,
        ),
        actions=[CallWebhook(block_document_id=webhook, payload=FAILED_MESSAGE.replace("__CRASH_RETRIES__", str(retries)))],
    )


def notify_review_automation(webhook: UUID) -> Automation:
    """Call the webhook when a nightly published a build with too many candidates without a reward."""
    return Automation(
        name=NOTIFY_REVIEW_AUTOMATION,
        description=f"Tell the {NOTIFY_BLOCK} webhook that a {NIGHTLY_DEPLOYMENT} run published a build to review.",
        trigger=EventTrigger(
            expect={NEEDS_REVIEW_EVENT},
            match_related=NIGHTLY_RUNS,
            posture=Posture.Reactive,
            threshold=1,
        ),
        actions=[CallWebhook(block_document_id=webhook, payload=REVIEW_MESSAGE)],
    )


def upsert(automation: Automation) -> str:
    """Create `automation`, or update the one of the same name (and drop any duplicates)."""
    core = AutomationCore(**automation.model_dump(exclude={"id", "owner_resource"}))
    with get_client(sync_client=True) as client:
        existing = client.read_automations_by_name(automation.name)
        if not existing:
            return f"created {automation.name} ({client.create_automation(core)})"
        keep, *duplicates = existing
        client.update_automation(keep.id, core)
        for duplicate in duplicates:
            client.delete_automation(duplicate.id)
        return f"updated {automation.name} ({keep.id})"


def remove(name: str) -> str:
    with get_client(sync_client=True) as client:
        existing = client.read_automations_by_name(name)
        for automation in existing:
            client.delete_automation(automation.id)
    return f"removed {name}" if existing else f"no {name}"


def _failed_share() -> float:
    raw = os.environ.get("LONGREWARD_NOTIFY_FAILED_SHARE", "0.05")
    try:
        share = float(raw)
    except ValueError:
        share = -1.0
    if not 0 <= share < 1:
        raise SystemExit(f"LONGREWARD_NOTIFY_FAILED_SHARE={raw!r}: expected a fraction of the candidates, >= 0 and < 1")
    return share


def main() -> None:
    after_s = _setting("LONGREWARD_ZOMBIE_AFTER_S", DEFAULT_ZOMBIE_AFTER_S, 31)  # above the shortest heartbeat (30 s)
    retries = _setting("LONGREWARD_CRASH_RETRIES", 2, 0)
    url = os.environ.get("LONGREWARD_NOTIFY_WEBHOOK_URL")
    share = _failed_share()
    print(upsert(zombie_automation(after_s)))
    print(upsert(retry_automation(retries)) if retries else remove(RETRY_AUTOMATION))
    if not url:
        print(f"no LONGREWARD_NOTIFY_WEBHOOK_URL: notifications left as they are ({NOTIFY_BLOCK})")
        return
    webhook = Webhook(url=url, headers={"Content-Type": "application/json"}).save(NOTIFY_BLOCK, overwrite=True)
    Variable.set(FAILED_SHARE_VARIABLE, share, overwrite=True)
    print(upsert(notify_failed_automation(webhook, retries)))
    print(upsert(notify_review_automation(webhook)))


if __name__ == "__main__":
    main()

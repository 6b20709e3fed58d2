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

Each is created, or updated in place when one of that name exists: running this again changes
the settings and never adds a second one.

    python infra/stack/automations.py      # with PREFECT_API_URL (and PREFECT_API_AUTH_STRING)
"""

from __future__ import annotations

import os
from datetime import timedelta

from prefect.automations import Automation
from prefect.client.orchestration import get_client
from prefect.client.schemas.objects import StateType
from prefect.events.actions import ChangeFlowRunState
from prefect.events.schemas.automations import AutomationCore, EventTrigger, Posture
from prefect.events.schemas.events import ResourceSpecification

NIGHTLY_DEPLOYMENT = "nightly-preference-build"
ZOMBIE_AUTOMATION = "longreward-crash-zombie-runs"
RETRY_AUTOMATION = "longreward-retry-crashed-nightly"
DEFAULT_ZOMBIE_AFTER_S = 300
ZOMBIE_MESSAGE = "No heartbeat from the flow run: its worker or machine stopped while it ran."


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


def main() -> None:
    after_s = _setting("LONGREWARD_ZOMBIE_AFTER_S", DEFAULT_ZOMBIE_AFTER_S, 31)  # above the shortest heartbeat (30 s)
    retries = _setting("LONGREWARD_CRASH_RETRIES", 2, 0)
    print(upsert(zombie_automation(after_s)))
    print(upsert(retry_automation(retries)) if retries else remove(RETRY_AUTOMATION))


if __name__ == "__main__":
    main()

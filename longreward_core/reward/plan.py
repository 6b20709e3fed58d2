"""The plan of a prompt's judge requests: the table of the dimensions, and a run of it.

`DIMENSION_TABLE` is the one place that names the dimensions. Each row's plan (`reward.steps`)
says what the dimension asks and what waits for what:

    helpfulness    ask (question, response)
    logicality     ask (question, response)
    faithfulness   ask statements -> per distinct statement: evidence -> ask support   (shared step)
    completeness   key points (per completeness chunk: ask; once per prompt) -> ask   (shared step)

A judge call's attempts (a hotter retry after an unparsed answer) are the judge's rule
(`reward.judge.Judge.attempts`). `PlanRun` runs the table for one prompt's candidates as a state
machine that never sends anything: `start()` and `resolve()` return the needs that are ready, and an
executor answers them however it gets answers. The online scorer (`reward.scorer`) asks the judge
for each as soon as it is ready; the pruned schedule holds the support checks back and releases
them in the rounds that `reward.pruning` decides; a batch executor can collect every ready need of
many prompts, submit them together and resolve them from the answers.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from longreward_core.data.records import DIMENSIONS
from longreward_core.reward.dimensions import completeness, faithfulness, helpfulness, logicality
from longreward_core.reward.steps import Ask, Evidence, Need, Plan, PromptInputs, Step

Leaf = Ask | Evidence  # a need an executor answers itself (a step is run by the plan)


@dataclass(frozen=True)
class Dimension:
    """A row of the table: a dimension's plan per candidate, and the prompt-level steps it shares
    with every candidate, started with the prompt before any candidate's requests."""

    name: str
    plan: Callable[[PromptInputs, str], Plan[Any]]
    prompt_steps: tuple[Step, ...] = ()


DIMENSION_TABLE: tuple[Dimension, ...] = (
    Dimension("helpfulness", helpfulness.plan),
    Dimension("logicality", logicality.plan),
    Dimension("faithfulness", faithfulness.plan),
    Dimension("completeness", completeness.plan, prompt_steps=(completeness.KEY_POINTS,)),
)
assert tuple(d.name for d in DIMENSION_TABLE) == DIMENSIONS, "the table and the scores' columns name the same dimensions"


@dataclass(frozen=True)
class Outcome:
    """What a plan ended with: its value, or the exception it failed with."""

    value: Any = None
    error: Exception | None = None


@dataclass(eq=False)
class _Node:
    """A plan in progress: what it waits for since its last `yield`."""

    plan: Plan[Any]
    owner: tuple[str, str] | Step  # (candidate id, dimension), or the shared step it runs
    needs: list[Need] = field(default_factory=list)
    answers: list[Any] = field(default_factory=list)
    pending: int = 0
    generation: int = 0  # advances at every `yield`, so answers to an abandoned one are ignored
    done: bool = False


@dataclass(eq=False)
class _StepRun:
    started: bool = False
    outcome: Outcome | None = None
    waiters: list[tuple[_Node, int, int]] = field(default_factory=list)  # (node, generation, index)


class PlanRun:
    """The table run for one prompt's candidates. `held`: step plans started only when released
    (`release`), not when a candidate first waits for them."""

    def __init__(self, prompt: PromptInputs, responses: Mapping[str, str], *, held: frozenset[Callable[..., Plan[Any]]] = frozenset()):
        self.prompt = prompt
        self.responses = dict(responses)
        self._held = held
        self._steps: dict[Step, _StepRun] = {}
        self._leaves: dict[Leaf, tuple[_Node, int, int]] = {}
        self._nodes: dict[tuple[str, str], _Node] = {}
        self._outcomes: dict[str, dict[str, Outcome]] = {cid: {} for cid in self.responses}
        self._ready: list[Leaf] = []
        self._finished: list[str] = []

    def start(self) -> list[Leaf]:
        """Start the prompt's steps, then every candidate's dimensions (in the table's order); the
        needs ready now, in the order they were asked for."""
        for d in DIMENSION_TABLE:
            for step in d.prompt_steps:
                self._start_step(step)
        for cid, response in self.responses.items():
            for d in DIMENSION_TABLE:
                node = self._nodes[cid, d.name] = _Node(d.plan(self.prompt, response), (cid, d.name))
                self._advance(node, None)
        return self._take_ready()

    def resolve(self, leaf: Leaf, value: Any = None, error: Exception | None = None) -> list[Leaf]:
        """Answer `leaf` (with `value`, or its failure `error`); the needs that became ready."""
        self._deliver(self._leaves.pop(leaf), Outcome(value, error))
        return self._take_ready()

    def release(self, steps: list[Step]) -> list[Leaf]:
        """Start `steps` where not started yet (held ones included); the needs that became ready."""
        for step in dict.fromkeys(steps):
            self._start_step(step)
        return self._take_ready()

    def finished(self) -> list[str]:
        """Candidates whose every dimension ended since the last call."""
        done, self._finished = self._finished, []
        return done

    def outcomes(self, candidate_id: str) -> dict[str, Outcome]:
        """The candidate's dimensions that ended, by name."""
        return self._outcomes[candidate_id]

    def step_outcome(self, step: Step) -> Outcome | None:
        run = self._steps.get(step)
        return run.outcome if run is not None else None

    def held_steps(self, candidate_id: str, dimension: str) -> list[Step]:
        """The held steps the dimension waits for (empty unless it waits for nothing else)."""
        node = self._nodes[candidate_id, dimension]
        if node.done or not all(self._is_held(n) for n in node.needs):
            return []
        return list(node.needs)

    def settled(self) -> bool:
        """Every dimension of every candidate ended or waits only for held steps."""
        return all(node.done or self.held_steps(*key) for key, node in self._nodes.items())

    def _is_held(self, need: Need) -> bool:
        run = self._steps.get(need) if isinstance(need, Step) else None
        return run is not None and not run.started

    def _take_ready(self) -> list[Leaf]:
        ready, self._ready = self._ready, []
        return ready

    def _start_step(self, step: Step) -> None:
        run = self._steps.setdefault(step, _StepRun())
        if not run.started:
            run.started = True
            self._advance(_Node(step.plan(self.prompt, *step.args), step), None)

    def _advance(self, node: _Node, answers: list[Any] | None, error: Exception | None = None) -> None:
        """Resume `node`'s plan with the answers (or the failure) of its last `yield`, and wait for
        what it asks next."""
        while True:
            try:
                needs = node.plan.throw(error) if error is not None else node.plan.send(answers)
            except StopIteration as stop:
                return self._end(node, Outcome(stop.value))
            except Exception as exc:
                return self._end(node, Outcome(error=exc))
            error, answers = None, []
            if needs:
                break
        node.generation += 1
        node.needs, node.answers, node.pending = needs, [None] * len(needs), len(needs)
        starts, known = [], []
        for i, need in enumerate(needs):
            waiter = (node, node.generation, i)
            if not isinstance(need, Step):
                self._leaves[need] = waiter
                self._ready.append(need)
                continue
            run = self._steps.setdefault(need, _StepRun())
            if run.outcome is not None:
                known.append((waiter, run.outcome))
            else:
                run.waiters.append(waiter)
                if need.plan not in self._held:
                    starts.append(need)
        # Every need is registered before any is answered: a step may end as soon as it starts.
        for step in starts:
            self._start_step(step)
        for waiter, outcome in known:
            self._deliver(waiter, outcome)

    def _deliver(self, waiter: tuple[_Node, int, int], outcome: Outcome) -> None:
        node, generation, index = waiter
        if node.done or generation != node.generation:
            return
        if outcome.error is not None:  # the first failure ends the wait, as `asyncio.gather` does
            node.generation += 1
            self._advance(node, None, outcome.error)
            return
        node.answers[index] = outcome.value
        node.pending -= 1
        if not node.pending:
            self._advance(node, node.answers)

    def _end(self, node: _Node, outcome: Outcome) -> None:
        node.done, node.needs = True, []
        if isinstance(node.owner, Step):
            run = self._steps[node.owner]
            run.outcome = outcome
            waiters, run.waiters = run.waiters, []
            for waiter in waiters:
                self._deliver(waiter, outcome)
            return
        cid, dimension = node.owner
        self._outcomes[cid][dimension] = outcome
        if len(self._outcomes[cid]) == len(DIMENSION_TABLE):
            self._finished.append(cid)

"""The chain's data as its workflow walks it: where the next handoff goes (`Target`) and the line
of handoffs it goes along (`Path`: the chain itself, or one branch of a fan-out). Deterministic
values only: the workflow, its rules and its record are built from them."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any
from uuid import UUID

from temporalio import workflow

with workflow.unsafe.imports_passed_through():
    from handoff.models import (
        Addressed,
        AgentCapability,
        BranchOutcome,
        BranchPosition,
        HopInput,
        HopKind,
        HopRecord,
        HopStatus,
    )


@dataclass(frozen=True)
class Target:
    """Where the next handoff goes, as asked by the starter or by the previous agent."""

    to_agent: str
    capability: AgentCapability | None
    task: str
    from_agent: str
    visible_keys: tuple[str, ...] | None = None
    visible_previous: int | None = None
    kind: HopKind = HopKind.HANDOFF
    require_approval: bool = False
    """The sending agent asked for a person's approval of this hop."""
    branches: tuple[BranchOutcome, ...] = ()
    """For a join or a return: how each branch ended."""
    chosen_by: str = ""
    """How the sending agent's model chose this hop (`AgentDecision.summary`), for the Web UI."""

    @property
    def addressed(self) -> str:
        """What the handoff names, for messages: the agent, else the capability."""
        return self.to_agent or (self.capability.value if self.capability else "")

    @classmethod
    def of(cls, spec: Addressed, from_agent: str, kind: HopKind = HopKind.HANDOFF) -> Target:
        """The target a directive, a branch or a join names; `from_agent` is set by the workflow."""
        return cls(
            to_agent=spec.to_agent, capability=spec.to_capability, task=spec.task_description,
            from_agent=from_agent,
            visible_keys=tuple(spec.visible_context_keys) if spec.visible_context_keys is not None else None,
            visible_previous=spec.visible_previous_results, kind=kind, require_approval=spec.require_approval,
        )

    def returns_to(self, agent: str) -> bool:
        """Whether a hop to `agent` brings the chain back to the agent that delegated (or fanned
        out): not a loop, so the loop and visit rules leave it alone."""
        return self.kind is HopKind.RETURN and agent == self.to_agent

    def entry_fields(self, depth: int, agent: str, status: HopStatus, when: datetime, *,
                     handoff_id: UUID | None = None, fallback_for: str | None = None,
                     considered: list[str] | None = None) -> dict[str, Any]:
        """The fields of this target's hop entry: the one place a resolved target becomes a
        record. `considered`: the agents a capability hop (or a fallback) chose among."""
        return dict(
            hop=depth, handoff_id=handoff_id, from_agent=self.from_agent, to_agent=agent,
            capability=self.capability, task_description=self.task, status=status, started_at=when,
            fallback_for=fallback_for, kind=self.kind,
            candidates=list(considered or []) if (self.capability or fallback_for) else [],
        )

    def entry(self, depth: int, agent: str, status: HopStatus, when: datetime, *, error: str | None = None,
              handoff_id: UUID | None = None, fallback_for: str | None = None,
              considered: list[str] | None = None, **more: Any) -> HopRecord:
        """This target's hop entry. An entry that ends as it is made (a refused or unreachable
        hop: `status` not open) ends at `when`, in no time."""
        entry = HopRecord(**self.entry_fields(depth, agent, status, when, handoff_id=handoff_id,
                                              fallback_for=fallback_for, considered=considered),
                          error=error, **more)
        if not status.open:
            entry.completed_at, entry.duration_ms = when, 0.0
        return entry


@dataclass
class Path:
    """One line of handoffs: the chain itself, or one branch of a fan-out. It holds what the
    rules judge along it (visits, tasks asked, agents that failed) and what its next hop sees.
    A branch starts as a copy of the path it forks from and is merged back into it at the join."""

    hops: list[HopRecord]
    """Where this path's hop entries go: the record's hops, or its branch's."""
    context: dict[str, Any]
    results: list[dict[str, Any]]
    refs: list[UUID | None] = field(default_factory=list)
    """For each of `results` (when set), the hop whose activity result in history holds it, when
    later hops are given it by reference (None: carried inline)."""
    visits: Counter[str] = field(default_factory=Counter)
    asked: set[tuple[str, str]] = field(default_factory=set)
    failed: set[str] = field(default_factory=set)
    label: str = ""
    """"" for the chain; "b1.0" for branch 0 of the fan-out at hop 1 ("b1.0/b2.1" nested)."""
    position: BranchPosition | None = None

    def fork(self, hops: list[HopRecord], position: BranchPosition, context_data: dict[str, Any]) -> Path:
        label = f"b{position.hop}.{position.index}"
        return Path(hops=hops, context={**self.context, **context_data}, results=list(self.results),
                    refs=list(self.refs), visits=Counter(self.visits), asked=set(self.asked), failed=set(self.failed),
                    label=f"{self.label}/{label}" if self.label else label, position=position)

    def merge(self, branches: list[Path]) -> None:
        """What the branches forked from this path did joins it, in branch order: their
        results, their visits, the tasks they asked and the agents that failed in them."""
        forked, base = len(self.results), Counter(self.visits)
        for branch in branches:
            self.results.extend(branch.results[forked:])
            self.refs.extend(branch.ref_list()[forked:])
            self.visits.update(branch.visits - base)
            self.asked |= branch.asked
            self.failed |= branch.failed

    def add_result(self, result: dict[str, Any], ref: UUID | None = None) -> None:
        self.refs = self.ref_list()
        self.results.append(result)
        self.refs.append(ref)

    def ref_list(self) -> list[UUID | None]:
        """`refs`, one for each of `results`."""
        return self.refs + [None] * (len(self.results) - len(self.refs))

    def visit(self, target: Target, agent: str) -> None:
        """`agent` takes a hop of this path: a visit, and the task asked of it (a return to the
        agent that delegated is neither)."""
        if not target.returns_to(agent):
            self.visits[agent] += 1
            self.asked.add((agent, target.task))

    def open(self, hop_input: HopInput, target: Target, considered: list[str], entry: HopRecord | None) -> HopRecord:
        """The hop's entry in this path, running from the hop input's time (the entry it waited
        for approval in, when it did)."""
        context = hop_input.context
        fields = dict(
            target.entry_fields(hop_input.hop, context.to_agent, HopStatus.RUNNING, context.created_at,
                                handoff_id=context.handoff_id, fallback_for=hop_input.fallback_for,
                                considered=considered),
            withheld_context_keys=hop_input.withheld_context_keys,
            previous_results_shown=hop_input.previous_results_shown,
        )
        if entry is not None:
            for name, value in fields.items():
                setattr(entry, name, value)
            return entry
        record = HopRecord(**fields)
        self.hops.append(record)
        return record

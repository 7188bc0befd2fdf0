"""How the chain workflow is versioned: by its request's protocol number, read here and nowhere else.

A running chain replays on whatever chain worker picks it up next, so a change to what the
workflow does must leave the commands of chains already recorded as they were. Every such change
is keyed on `ChainRequest.protocol`: the client sets it to `CHAIN_PROTOCOL`, the change runs only
for requests of that protocol or later, and chains recorded before it replay as they ran. A new
change bumps `CHAIN_PROTOCOL` and adds a property below; `workflow.patched` is not used for new
changes (its marker costs a search-attribute write per chain, where the request's number is free).

Requests recorded before protocol numbers keyed every change carry protocol 1 or 2, and two of
their behaviours followed from the fields they carried (`policy.progress_after_s`,
`policy.max_total_hops`); their silent rounds were marked with the `silent-rounds` patch. Those
rules are kept below, for those protocols only. See docs/design.md, "Versioning and replay safety".
"""

from __future__ import annotations

from dataclasses import dataclass

from temporalio import workflow

with workflow.unsafe.imports_passed_through():
    from handoff.models import ChainRequest

SILENT_ROUNDS_PATCH = "silent-rounds"
"""The patch that marked silent rounds in chains of protocols 1 and 2."""


@dataclass(frozen=True)
class Behaviour:
    """What one chain does, as its request's protocol says."""

    protocol: int

    deferred_progress: bool
    """Progress search attributes follow every hop only after `progress_after_s` (else from the
    first hop, as chains recorded before the field did)."""
    unsuccessful_fails: bool
    """A chain that ends unsuccessfully fails its workflow (its record in the failure's details),
    so the Web UI lists it as Failed; before protocol 2 it completed whatever its status."""
    hop_budget: bool
    """`policy.max_total_hops` bounds the chain (requests recorded before it had no budget)."""
    budgets: bool
    """Hops' usage (tokens, model calls, cost) is recorded and added up, and `policy.budget`
    bounds the chain."""
    cost_floor: bool
    """No progress timer (progress follows the hops once `progress_after_s` has passed); one
    lookup of every capability's candidates serves the chain's capability hops while fresh; hop
    results over `INLINE_RESULT_BYTES` are carried once, named by later hops and the record."""

    @classmethod
    def of(cls, request: ChainRequest) -> Behaviour:
        protocol = request.protocol
        carried = request.policy.model_fields_set
        return cls(
            protocol=protocol,
            deferred_progress=protocol >= 3 or "progress_after_s" in carried,
            unsuccessful_fails=protocol >= 2,
            hop_budget=protocol >= 3 or "max_total_hops" in carried,
            cost_floor=protocol >= 4,
            budgets=protocol >= 5,
        )

    def silent_rounds(self) -> bool:
        """Whether a hop whose attempts all went silent may be scheduled again. Chains of
        protocol 3 and later always may; older ones recorded it with a patch marker, written (and
        read back on replay) only when a hop goes silent, so other chains' histories lack it."""
        return self.protocol >= 3 or workflow.patched(SILENT_ROUNDS_PATCH)

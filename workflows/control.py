"""What people tell a running chain: steering for its next hop (and a redirect of its next
handoff), and a stop once its running hops end. Both arrive as Updates whose validators refuse,
before anything reaches history, what the chain could not take."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from temporalio import workflow

with workflow.unsafe.imports_passed_through():
    from handoff.models import ChainPolicy, ChainRecord, Steering, SteeringMessage, StopRequest
    from handoff.models.control import MAX_STEERING_MESSAGES

    from handoff.workflows.paths import Target


class Control:
    """One chain's pending steering, its pending redirect, and whether it was asked to stop."""

    def __init__(self, record: ChainRecord, policy: ChainPolicy) -> None:
        self._record = record
        self._policy = policy
        self.pending: list[SteeringMessage] = []
        self.redirect: SteeringMessage | None = None
        self.stop: StopRequest | None = None

    def _still_running(self) -> None:
        if self._record.status.ended:
            raise ValueError(f"chain {self._record.chain_id} has ended ({self._record.status.value})")
        if self.stop is not None:
            raise ValueError(f"chain {self._record.chain_id} is stopping (asked by {self.stop.by})")

    def check_steering(self, steering: Steering) -> None:
        """ValueError saying why `steering` cannot be taken now."""
        problem = steering.problem()
        if problem:
            raise ValueError(problem)
        self._still_running()
        if len(self.pending) >= MAX_STEERING_MESSAGES:
            raise ValueError(f"{MAX_STEERING_MESSAGES} steering messages already wait for the next hop")
        if steering.redirect is not None:
            senders = self._senders()
            if not any(self._policy.permits(s, steering.redirect, steering.capability) for s in senders):
                raise ValueError(f"the handoff policy does not let {' or '.join(senders)} hand off to "
                                 f"{steering.redirect}")

    def _senders(self) -> list[str]:
        """The agents whose next handoff a redirect would change: those with a hop open, else the
        last one that ran."""
        hops = list(self._record.all_hops())
        open_hops = sorted({h.to_agent for h in hops if h.status.open and h.to_agent})
        return open_hops or ([hops[-1].to_agent] if hops and hops[-1].to_agent else ["starter"])

    def steer(self, steering: Steering) -> SteeringMessage:
        message = SteeringMessage(message=steering.message, by=steering.by, at=workflow.now(),
                                  redirect=steering.redirect)
        self.pending.append(message)
        if steering.redirect is not None:
            self.redirect = message
        return message

    def take(self) -> list[SteeringMessage]:
        """The messages for the hop that starts now (each is delivered once)."""
        taken, self.pending = self.pending, []
        return taken

    def redirected(self, target: Target) -> Target:
        """`target`, sent where a pending redirect says instead (once)."""
        if self.redirect is None:
            return target
        message, self.redirect = self.redirect, None
        steering = Steering(message=message.message, by=message.by, redirect=message.redirect)
        capability = steering.capability
        return replace(target, to_agent="" if capability else str(message.redirect), capability=capability,
                       chosen_by=f"redirected by {message.by}: {message.message[:80]}")

    def check_stop(self, request: StopRequest) -> None:
        problem = request.problem()
        if problem:
            raise ValueError(problem)
        self._still_running()

    def stopped(self) -> Any:
        """Why no new hop may start (None: it may)."""
        if self.stop is None:
            return None
        return f"stopped by {self.stop.by} after its running hops" + (f": {self.stop.reason}" if self.stop.reason else "")

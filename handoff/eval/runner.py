"""Running an evaluation: every case as a real chain, `repeat` times, on the current routing or on
chosen builds of one agent, and each run's record scored.

Each run (case, repeat, build) has a chain id derived from the evaluation's run id, so running the
same evaluation again finds the chains already recorded and scores them instead of starting them
again: an interrupted evaluation, run again, counts no case twice.

Builds are compared by switching the agent's current build (its Worker Deployment's current
version, as `handoff rollout` does) between blocks of runs, alternating which build goes first in
each block so that drift on the machine falls on both alike. Every hop to the agent goes to the
build of the block meanwhile, other chains' hops included; the original current build is set back
at the end, also when the evaluation fails or is cancelled.
"""

from __future__ import annotations

import asyncio
import hashlib
import re
from collections.abc import Awaitable, Callable, Sequence
from contextlib import suppress
from dataclasses import dataclass
from uuid import UUID, uuid5

import structlog
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from temporalio.api.enums.v1 import RoutingConfigUpdateState
from temporalio.api.workflowservice.v1 import DescribeWorkerDeploymentRequest
from temporalio.client import Client

from handoff.client import cancel_chain, context_limit, get_chain, start_request, wait_chain
from handoff.client.versioning import deployment_name, patiently, routing_of, set_current_build_id
from handoff.errors import ChainNotFound, InvalidRequest
from handoff.eval.cases import NamedCase
from handoff.eval.scoring import Capabilities, RunScore, score_run, unscored
from handoff.models import ChainRecord, ChainStatus, check_agent_id
from handoff.registry import registered_agents

log = structlog.get_logger("handoff.eval")

CHAIN_ID_NAMESPACE = UUID("5d0f6a3e-7c61-4d51-9a55-2b6f1e0c8a47")
"""The namespace of the name-based (version 5) UUIDs of an evaluation's chains."""
RUN_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
ROUTED_TIMEOUT_S = 30.0
"""How long a switch of builds may take to reach the agent's task queues."""
ROUTED_POLL_S = 0.5
RUN_TIMEOUT_S = 600.0


def default_run_id(cases_text: bytes, *, agent: str | None, builds: Sequence[str], repeat: int) -> str:
    """The run id of an evaluation: a hash of its case file, its builds and its repeats, so the
    same command run again is the same evaluation (and new cases, builds or repeats a new one)."""
    digest = hashlib.sha256(cases_text)
    digest.update(f"\x00{agent or ''}\x00{','.join(builds)}\x00{repeat}".encode())
    return digest.hexdigest()[:16]


def chain_id_of(run_id: str, case: str, repeat: int, build: str | None) -> UUID:
    """The chain id of one run of an evaluation: the same for the same run, whenever it is asked."""
    return uuid5(CHAIN_ID_NAMESPACE, f"{run_id}\x00{case}\x00{repeat}\x00{build or ''}")


class EvalSettings(BaseModel):
    """How an evaluation runs. `builds`: none (the agent's routing as it is), one, or two to
    compare (the first is A, the second B); they need `agent`."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    run_id: str
    repeat: int = Field(default=1, ge=1, le=100)
    concurrency: int = Field(default=4, ge=1, le=64)
    agent: str | None = None
    builds: tuple[str, ...] = Field(default=(), max_length=2)
    block_size: int = Field(default=20, ge=1, le=10_000)
    """Runs per block: each block runs on every build in turn, so a comparison switches builds
    about 2 x runs / block_size times (each switch takes a second or two)."""
    run_timeout_s: float = Field(default=RUN_TIMEOUT_S, gt=0, le=86_400)
    """How long a run's chain may take; one still running then is left running and not scored
    (the evaluation run again waits for it)."""

    @field_validator("run_id")
    @classmethod
    def _run_id(cls, value: str) -> str:
        if not RUN_ID_RE.match(value):
            raise ValueError("a run id is 1 to 64 of A-Z a-z 0-9 . _ -, starting with a letter or digit")
        return value

    @field_validator("agent")
    @classmethod
    def _agent(cls, value: str | None) -> str | None:
        return None if value is None else check_agent_id(value)

    @field_validator("builds")
    @classmethod
    def _builds(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        if any(not b.strip() or len(b) > 255 for b in value):
            raise ValueError("a build id is 1 to 255 characters")
        if len(set(value)) != len(value):
            raise ValueError("the two builds compared are the same")
        return value

    @model_validator(mode="after")
    def _builds_of_an_agent(self) -> EvalSettings:
        if self.builds and self.agent is None:
            raise ValueError("builds need the agent they are builds of")
        return self


@dataclass(frozen=True)
class Run:
    """One run of an evaluation: a case, its repeat, the build it runs on, its chain."""

    case: NamedCase
    repeat: int
    build: str | None
    chain_id: UUID


OnRun = Callable[[RunScore], None]


class Evaluation:
    """One evaluation's runs against a server (`run` runs them all and returns their scores)."""

    def __init__(self, client: Client, cases: Sequence[NamedCase], settings: EvalSettings,
                 on_run: OnRun | None = None) -> None:
        self.client = client
        self.cases = list(cases)
        self.settings = settings
        self.on_run = on_run
        self.capabilities: Capabilities = {}
        self.original_build: str | None = None
        self._limit = context_limit(client)
        self._started: set[UUID] = set()
        """Chains this evaluation started and has not seen end."""

    @property
    def total(self) -> int:
        return len(self.cases) * self.settings.repeat * max(1, len(self.settings.builds))

    def blocks(self) -> list[list[list[Run]]]:
        """The runs in blocks; each block a list of runs per build, in the order they run."""
        settings = self.settings
        pairs = [(case, repeat) for repeat in range(settings.repeat) for case in self.cases]
        builds: Sequence[str | None] = settings.builds or (None,)
        blocks = []
        for index, start in enumerate(range(0, len(pairs), settings.block_size)):
            chunk = pairs[start:start + settings.block_size]
            order = builds if index % 2 == 0 else list(reversed(builds))
            blocks.append([[Run(case, repeat, build, chain_id_of(settings.run_id, case.name, repeat, build))
                            for case, repeat in chunk] for build in order])
        return blocks

    async def run(self) -> list[RunScore]:
        """Every run's score, in the order of `blocks()`."""
        self.capabilities = await self._capabilities()
        if self.settings.builds:
            await self._check_builds()
        scores: list[RunScore] = []
        try:
            for block in self.blocks():
                for runs in block:
                    scores += await self._run_block(runs)
        except BaseException:
            if self.settings.builds:  # their next hops would run on whatever build is current then
                await _to_the_end(self._cancel_started())
            raise
        finally:
            if self.settings.builds:
                await _to_the_end(self._restore())
        return scores

    async def _capabilities(self) -> Capabilities:
        try:
            return {card.agent_id: list(card.capabilities) for card in await registered_agents(self.client)}
        except Exception as err:  # the registry is not essential: hops addressed by id still score
            log.warning("eval_registry_unreadable", error=str(err))
            return {}

    async def _check_builds(self) -> None:
        agent = self.settings.agent
        assert agent is not None
        routing = await routing_of(self.client, agent)
        if routing is None:
            raise InvalidRequest(f"cannot evaluate builds of {agent}: it has no versioned workers "
                                 "(run them with `handoff worker --versioned`)")
        missing = [b for b in self.settings.builds if b not in routing.versions]
        if missing:
            raise InvalidRequest(f"cannot evaluate {agent} {', '.join(missing)}: no worker of that version has "
                                 f"polled (versions seen: {', '.join(routing.versions) or 'none'})")
        self.original_build = routing.current

    async def _run_block(self, runs: list[Run]) -> list[RunScore]:
        """The runs of one build in one block: those already recorded are scored as they are; the
        others run, on the block's build."""
        build = runs[0].build
        recorded: list[ChainRecord | None] = [None] * len(runs)
        if build is not None:  # switch builds only for runs that are not recorded yet
            recorded = list(await asyncio.gather(*(self._recorded(run) for run in runs)))
            if any(record is None for record in recorded):
                await self._switch(build)
        semaphore = asyncio.Semaphore(self.settings.concurrency)

        async def one(run: Run, record: ChainRecord | None) -> RunScore:
            if record is not None:
                score = self._scored(run, record, reused=True)
            else:
                async with semaphore:
                    score = await self._score(run)
            if self.on_run is not None:
                self.on_run(score)
            return score

        try:
            async with asyncio.TaskGroup() as group:
                tasks = [group.create_task(one(run, record)) for run, record in zip(runs, recorded)]
        except BaseExceptionGroup as failed:  # the first error, as it is (the others are alike)
            raise failed.exceptions[0] from None
        return [task.result() for task in tasks]

    async def _recorded(self, run: Run) -> ChainRecord | None:
        """The run's chain as an earlier run of this evaluation recorded it, if it ended and
        counts; None when it must run (missing, running, cancelled, or on another build)."""
        try:
            record = await get_chain(self.client, run.chain_id)
        except ChainNotFound:
            return None
        return record if record.status.ended and not self._rerun(run, record) else None

    def _rerun(self, run: Run, record: ChainRecord) -> bool:
        """Whether an ended chain of this run must run again: an interrupted evaluation cancelled
        it, or hops of the agent ran on another build than the run's."""
        return record.status is ChainStatus.CANCELLED or self._other_build(run, record) is not None

    def _other_build(self, run: Run, record: ChainRecord) -> str | None:
        if run.build is None:
            return None
        return next((h.build_id for h in record.all_hops()
                     if h.to_agent == self.settings.agent and h.build_id not in (None, run.build)), None)

    async def _score(self, run: Run) -> RunScore:
        try:
            record, reused = await asyncio.wait_for(self._chain(run), self.settings.run_timeout_s)
        except InvalidRequest as err:  # the case's chain cannot start on this deployment
            return unscored(run.case.name, str(err), repeat=run.repeat, build=run.build, chain_id=run.chain_id)
        except TimeoutError:
            self._started.discard(run.chain_id)
            return unscored(run.case.name, f"still running after {self.settings.run_timeout_s:g}s",
                            repeat=run.repeat, build=run.build, chain_id=run.chain_id)
        return self._scored(run, record, reused=reused)

    def _scored(self, run: Run, record: ChainRecord, *, reused: bool) -> RunScore:
        other = self._other_build(run, record)
        if other is not None:
            return unscored(run.case.name, f"hops of {self.settings.agent} ran on build {other}, not {run.build}",
                            repeat=run.repeat, build=run.build, chain_id=run.chain_id)
        return score_run(run.case.case, record, name=run.case.name, repeat=run.repeat, build=run.build,
                         capabilities=self.capabilities, reused=reused)

    async def _chain(self, run: Run) -> tuple[ChainRecord, bool]:
        """The run's ended chain, and whether an earlier run of the evaluation had recorded it.
        The chain starts unless one of its id exists: an ended one counts as it is (unless it
        must run again), a running one is waited for."""
        request = run.case.case.request(run.chain_id, max_context_bytes=self._limit)
        try:
            await start_request(self.client, request)
        except InvalidRequest as refused:
            try:
                record = await get_chain(self.client, run.chain_id)
            except ChainNotFound:
                raise refused from None
            if record.status.ended and not self._rerun(run, record):
                return record, True
            if record.status.ended:
                await start_request(self.client, request, reuse_id=True)
            else:
                return await wait_chain(self.client, run.chain_id), True
        self._started.add(run.chain_id)
        record = await wait_chain(self.client, run.chain_id)
        self._started.discard(run.chain_id)
        return record, False

    async def _switch(self, build: str) -> None:
        """Make `build` the agent's current build, and wait until its task queues route to it."""
        agent = self.settings.agent
        assert agent is not None
        if await routed_to(self.client, agent, build):
            return
        await set_current_build_id(self.client, agent, build)
        deadline = asyncio.get_running_loop().time() + ROUTED_TIMEOUT_S
        while not await routed_to(self.client, agent, build):
            if asyncio.get_running_loop().time() > deadline:
                raise InvalidRequest(f"{agent}'s hops did not go to build {build} within {ROUTED_TIMEOUT_S:g}s")
            await asyncio.sleep(ROUTED_POLL_S)
        log.info("eval_build_current", agent_id=agent, build_id=build)

    async def _cancel_started(self) -> None:
        for chain_id in list(self._started):
            with suppress(Exception):
                await cancel_chain(self.client, chain_id)

    async def _restore(self) -> None:
        agent, original = self.settings.agent, self.original_build
        if agent is None or original is None:
            return
        try:
            routing = await routing_of(self.client, agent)
            if routing is not None and routing.current != original:
                await set_current_build_id(self.client, agent, original)
                log.info("eval_build_restored", agent_id=agent, build_id=original)
        except Exception as err:
            log.error("eval_build_not_restored", agent_id=agent, build_id=original, error=str(err))
            raise


async def _to_the_end(work: Awaitable[None]) -> None:
    """Await `work` to its end even if the caller is cancelled meanwhile (again: Ctrl-C twice);
    the cancellation is raised once it is done."""
    task = asyncio.ensure_future(work)
    cancelled = False
    while not task.done():
        try:
            await asyncio.shield(task)
        except asyncio.CancelledError:
            cancelled = True
    task.result()
    if cancelled:
        raise asyncio.CancelledError


async def routed_to(client: Client, agent: str, build: str) -> bool:
    """Whether hops to `agent` go to `build`: its deployment's current build, with the change
    reached every task queue of the deployment."""
    response = await patiently(lambda: client.workflow_service.describe_worker_deployment(
        DescribeWorkerDeploymentRequest(namespace=client.namespace, deployment_name=deployment_name(agent))))
    info = response.worker_deployment_info
    settled = info.routing_config_update_state != RoutingConfigUpdateState.ROUTING_CONFIG_UPDATE_STATE_IN_PROGRESS
    return info.routing_config.current_deployment_version.build_id == build and settled



async def run_eval(client: Client, cases: Sequence[NamedCase], settings: EvalSettings,
                   on_run: OnRun | None = None) -> list[RunScore]:
    """Run every case of `cases` as `settings` say and score each run (`Evaluation`)."""
    return await Evaluation(client, cases, settings, on_run).run()

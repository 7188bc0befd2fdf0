"""A2A push notifications: a caller registers a webhook for a task (in its message's
configuration, or with CreateTaskPushNotificationConfig), and every change of the chain (a hop
started, a hop completed, waiting for approval, how it ended) is POSTed to it as a
`StreamResponse`, with the config's token in `X-A2A-Notification-Token` (and its `authentication`
as `Authorization`).

- **Off the chain's path.** The server follows a chain with a webhook itself (`watched_records`, as a
  request following its task does, through the same `ChainProgress`), whoever listens or not,
  until the chain ends or its webhooks are deleted. Each webhook has its own delivery task and a
  bounded queue: a notification is queued and the following goes on; the delivery task POSTs
  them in order, each retried with backoff for at most `PushPolicy.retry_s`. A webhook that is
  down delays nobody but itself; past its queue's bound, notifications to it are dropped (and
  logged).
- **SSRF.** A webhook URL must be https, on a host the operator allows (`HANDOFF_A2A_PUSH_HOSTS`),
  and every address its host resolves to must be public: never loopback, link-local, private,
  shared or reserved, unless configured (`HANDOFF_A2A_PUSH_HTTP`, `HANDOFF_A2A_PUSH_PRIVATE`). It is
  checked when the config is created (else InvalidParams) and again, resolved anew, before every
  POST; redirects are not followed.
- **Owned like tasks.** A config belongs to the caller that created it, on a task it may see;
  get, list and delete show a caller its own configs only. Configs live in this process's memory.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
import time
from collections import OrderedDict
from contextlib import aclosing
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import httpx
import structlog
from a2a.server.context import ServerCallContext
from a2a.server.tasks import InMemoryPushNotificationConfigStore
from a2a.types import (
    StreamResponse,
    TaskArtifactUpdateEvent,
    TaskPushNotificationConfig,
    TaskStatusUpdateEvent,
)
from a2a.utils.errors import InvalidParamsError
from google.protobuf import json_format
from temporalio.client import Client

from handoff.client.watch import TASK_COMING_WAIT_S, watched_records
from handoff.errors import unless_missing
from handoff.settings import Settings, switched_on, token_list
from handoff.a2a.tasks import ChainProgress, caller_of

log = structlog.get_logger("handoff.a2a.push")

TOKEN_HEADER = "X-A2A-Notification-Token"
"""The header that carries a config's token back to its webhook (as a2a-sdk's sender names it)."""
POLL_S = 0.25
"""How often a chain with a webhook is read while it runs."""
MAX_CONFIGS_PER_TASK = 10
"""Webhooks one caller may register for one task."""
MAX_FOLLOWED = 1000
"""Chains with webhooks this process follows at once; past it a new config is refused."""
MAX_KEPT_TASKS = 1000
"""Tasks whose configs are kept; past it, those of the longest-kept task no chain is followed for
go (the configs of chains that ended long ago)."""
CHAIN_APPEAR_S = 10.0
"""How long a config set with the message that starts its chain waits for the chain to exist."""


@dataclass(frozen=True)
class PushPolicy:
    """Where push notifications may go, and how hard they are tried. Off (no hosts): the cards
    do not declare push notifications and their methods answer PushNotificationNotSupported."""

    hosts: tuple[str, ...] = ()
    """Hosts a webhook may be on (a name or an address, as its URL spells it); `*`: any host."""
    allow_http: bool = False
    """Also plain http URLs (else https only)."""
    allow_private: bool = False
    """Also hosts that resolve to loopback, link-local, private or reserved addresses."""
    retry_s: float = 30.0
    """How long one notification is retried (with backoff) before it is given up."""
    timeout_s: float = 5.0
    """One POST's timeout."""
    queue_size: int = 64
    """Notifications waiting for one webhook; past it, new ones are dropped."""

    @property
    def enabled(self) -> bool:
        return bool(self.hosts)

    @classmethod
    def from_settings(cls, env: Settings) -> PushPolicy:
        return cls(hosts=tuple(h.lower() for h in token_list(env.a2a_push_hosts)),
                   allow_http=switched_on(env.a2a_push_http or "off"),
                   allow_private=switched_on(env.a2a_push_private or "off"))


def _address_refusal(address: str, allow_private: bool) -> str | None:
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped  # judged as the IPv4 address it carries
    if ip.is_multicast or ip.is_unspecified:
        return f"{ip} is not a host's address"
    if not ip.is_global and not allow_private:
        return f"{ip} is a loopback, link-local, private or reserved address"
    return None


async def webhook_refusal(url: str, policy: PushPolicy) -> str | None:
    """Why push notifications may not go to `url` under `policy`, or None. Resolves the URL's host
    and checks every address it resolves to."""
    try:
        parts = urlsplit(url)
        port = parts.port or {"https": 443, "http": 80}.get(parts.scheme, 0)
    except ValueError:
        return "the webhook URL does not parse"
    if parts.scheme != "https" and not (policy.allow_http and parts.scheme == "http"):
        return "a webhook URL must be https" + ("" if not policy.allow_http else " or http")
    host = (parts.hostname or "").lower()
    if not host or parts.username or parts.password:
        return "a webhook URL needs a host, and no credentials in it"
    if "*" not in policy.hosts and host not in policy.hosts:
        return f"webhooks on {host} are not allowed (the server's allowed hosts: HANDOFF_A2A_PUSH_HOSTS)"
    try:
        infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except OSError:
        return f"{host} does not resolve"
    for info in infos:
        refusal = _address_refusal(str(info[4][0]), policy.allow_private)
        if refusal:
            return f"{host}: {refusal}"
    return None


class OwnedPushConfigs(InMemoryPushNotificationConfigStore):
    """The SDK's in-memory config store, each config owned by the caller that set it (as tasks
    are, `caller_of`), each URL checked against the policy, and each task with a config followed
    (`PushNotifier.follow`)."""

    def __init__(self, policy: PushPolicy, notifier: PushNotifier) -> None:
        super().__init__(owner_resolver=lambda context: caller_of(context).name)
        self._policy, self._notifier = policy, notifier
        self._kept: OrderedDict[str, None] = OrderedDict()

    async def set_info(self, task_id: str, notification_config: TaskPushNotificationConfig,
                       context: ServerCallContext) -> TaskPushNotificationConfig:
        refusal = await webhook_refusal(notification_config.url, self._policy)
        if refusal:
            raise InvalidParamsError(message=f"push notification URL refused: {refusal}")
        mine = await self.get_info(task_id, context)
        if len(mine) >= MAX_CONFIGS_PER_TASK and all(c.id != (notification_config.id or task_id) for c in mine):
            raise InvalidParamsError(message=f"at most {MAX_CONFIGS_PER_TASK} push configs per task")
        if not self._notifier.follow(task_id):
            raise InvalidParamsError(message=f"this server follows {MAX_FOLLOWED} chains with webhooks already")
        stored = await super().set_info(task_id, notification_config, context)
        self._kept[task_id] = None
        self._kept.move_to_end(task_id)
        self._forget_beyond(MAX_KEPT_TASKS)
        return stored

    def _forget_beyond(self, limit: int) -> None:
        for task_id in list(self._kept):
            if len(self._kept) <= limit:
                return
            if not self._notifier.following(task_id):
                del self._kept[task_id]
                with self.lock:
                    for owned in self._push_notification_infos.values():
                        owned.pop(task_id, None)


@dataclass
class _Lane:
    """One webhook's queue of notifications, and the task that delivers them in order."""

    queue: asyncio.Queue
    task: asyncio.Task | None = field(default=None)


class PushNotifier:
    """Follows the chains that have webhooks and delivers their changes (see the module's
    docstring); `aclose()` stops it all."""

    def __init__(self, client: Client, policy: PushPolicy) -> None:
        self._client, self._policy = client, policy
        self.configs = OwnedPushConfigs(policy, self)
        self._followed: dict[str, asyncio.Task] = {}
        self._lanes: dict[tuple[str, str, str], _Lane] = {}
        self._http = httpx.AsyncClient(timeout=policy.timeout_s, follow_redirects=False)

    def following(self, task_id: str) -> bool:
        return task_id in self._followed

    def follow(self, task_id: str) -> bool:
        """Follow chain `task_id` for its webhooks (unless it is followed already); False: too
        many are."""
        if task_id in self._followed:
            return True
        if len(self._followed) >= MAX_FOLLOWED:
            return False
        task = asyncio.create_task(self._follow(task_id))
        self._followed[task_id] = task
        task.add_done_callback(lambda _: self._followed.pop(task_id, None))
        return True

    async def _follow(self, task_id: str) -> None:
        handle = self._client.get_workflow_handle(task_id)
        deadline = time.monotonic() + CHAIN_APPEAR_S
        while await unless_missing(handle.describe()) is None:  # set with the message that starts it
            if time.monotonic() > deadline:
                return
            await asyncio.sleep(POLL_S)
        progress = ChainProgress()
        async with aclosing(watched_records(self._client, task_id, settle_s=TASK_COMING_WAIT_S)) as records:
            async for record in records:
                configs = await self.configs.get_info_for_dispatch(task_id)
                if not configs:
                    return  # its webhooks were deleted
                artifacts, status = progress.changes(record)
                context_id = str(record.chain_id)
                events: list[StreamResponse] = [
                    StreamResponse(artifact_update=TaskArtifactUpdateEvent(task_id=task_id, context_id=context_id,
                                                                           artifact=a)) for a in artifacts]
                if status is not None:
                    events.append(StreamResponse(status_update=TaskStatusUpdateEvent(
                        task_id=task_id, context_id=context_id, status=status)))
                for event in events:
                    for config in configs:
                        self._enqueue(config, event)
                if record.status.ended:
                    return

    def _enqueue(self, config: TaskPushNotificationConfig, event: StreamResponse) -> None:
        key = (config.task_id, config.id, config.url)
        lane = self._lanes.get(key)
        if lane is None:
            lane = self._lanes[key] = _Lane(asyncio.Queue(self._policy.queue_size))
            lane.task = asyncio.create_task(self._deliver(key, lane, config))
        try:
            lane.queue.put_nowait(json_format.MessageToDict(event))
        except asyncio.QueueFull:
            log.warning("push_dropped", task_id=config.task_id, config_id=config.id,
                        queued=self._policy.queue_size)

    async def _deliver(self, key: tuple[str, str, str], lane: _Lane, config: TaskPushNotificationConfig) -> None:
        """POST the lane's notifications in order until none has come for a while."""
        try:
            while True:
                try:
                    body = await asyncio.wait_for(lane.queue.get(), timeout=max(self._policy.retry_s, 30.0))
                except TimeoutError:
                    return
                await self._post(config, body)
        finally:
            self._lanes.pop(key, None)

    async def _post(self, config: TaskPushNotificationConfig, body: dict[str, Any]) -> bool:
        headers = {TOKEN_HEADER: config.token} if config.token else {}
        if config.HasField("authentication") and config.authentication.credentials:
            headers["Authorization"] = f"{config.authentication.scheme or 'Bearer'} {config.authentication.credentials}"
        deadline, delay = time.monotonic() + self._policy.retry_s, 0.25
        while True:
            refusal = await webhook_refusal(config.url, self._policy)  # resolved anew: no rebinding
            if refusal:
                log.warning("push_refused", task_id=config.task_id, config_id=config.id, reason=refusal)
                return False
            try:
                answer = await self._http.post(config.url, json=body, headers=headers)
                if answer.is_success:
                    return True
                if answer.status_code < 500 and answer.status_code not in (408, 429):
                    log.warning("push_rejected", task_id=config.task_id, config_id=config.id,
                                status=answer.status_code)
                    return False
            except httpx.HTTPError:
                pass
            if time.monotonic() + delay > deadline:
                log.warning("push_given_up", task_id=config.task_id, config_id=config.id, after_s=self._policy.retry_s)
                return False
            await asyncio.sleep(delay)
            delay = min(delay * 2, 5.0)

    async def aclose(self) -> None:
        tasks = [*self._followed.values(), *(lane.task for lane in self._lanes.values() if lane.task)]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await self._http.aclose()


"""The starter host's program in the multi-host tests (tests/test_hosts.py): it talks to the
server over the test bed only. `python -m tests.bedstarter SPEC_JSON`:

- waits until the agents in `live` are live (when given);
- starts `chains` chains at `to_agent` with `context_data` and `policy`, says `started` and
  then one line per chain id (its lines start with `bed: `);
- waits for each until `deadline_s` after the start, then says one JSON object: for each chain
  its status (`stuck` if it had not ended, `lost` if the server knows no such chain) and its
  hops (the tree's, flattened) with attempts, and the record read back from history.

With `read` (a list of chain ids) instead of `chains`, it only reads those records back.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time

from handoff.client import connect, get_chain, start_chain, wait_chain
from handoff.errors import ChainNotFound
from handoff.testing import wait_live

MARK = "bed: "


def say(*lines: str) -> None:
    """Lines for the test, apart from what the SDK's core logs on stdout."""
    for line in lines:
        print(f"{MARK}{line}", flush=True)


def summary(record) -> dict:
    return {"status": record.status.value,
            "hops": [{"hop": str(h.handoff_id), "agent": h.to_agent, "status": h.status.value,
                      "attempts": h.attempts} for h in record.all_hops()],
            "record": record.model_dump(mode="json")}


async def read(client, chain_id: str) -> dict:
    try:
        return summary(await get_chain(client, chain_id))
    except ChainNotFound:
        return {"status": "lost", "hops": []}


async def ended(client, chain_id: str, deadline: float) -> dict:
    try:
        await asyncio.wait_for(wait_chain(client, chain_id), max(1.0, deadline - time.monotonic()))
    except TimeoutError:
        return {**await read(client, chain_id), "status": "stuck"}
    except ChainNotFound:
        return {"status": "lost", "hops": []}
    return await read(client, chain_id)


async def main(spec: dict) -> None:
    client = await connect(address=spec["address"])
    if spec.get("read"):
        say(json.dumps({c: await read(client, c) for c in spec["read"]}))
        return
    if spec.get("live"):
        await wait_live(client, set(spec["live"]), timeout_s=60)
    ids = [str(await start_chain(client, to_agent=spec["to_agent"], task_description=f"bed chain {i}",
                                 context_data=spec["context_data"], policy=spec.get("policy"),
                                 search_attributes=False))
           for i in range(spec["chains"])]
    say("started", *ids)
    deadline = time.monotonic() + spec["deadline_s"]
    results = await asyncio.gather(*(ended(client, c, deadline) for c in ids))
    say(json.dumps(dict(zip(ids, results))))


if __name__ == "__main__":
    asyncio.run(main(json.loads(sys.argv[1])))

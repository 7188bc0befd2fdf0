"""What the tests share besides fixtures: paths, fake agents, and running the CLI."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path

from handoff import Agent, AgentCapability, HandoffContext, HandoffResult
from handoff.testing import running, start_dev_env, wait_live

__all__ = ["HANDOFF", "ROOT", "DEMO_SOURCE", "assert_usage_error", "cli", "make_agent", "running",
           "start_dev_env", "wait_live"]

ROOT = Path(__file__).resolve().parent.parent
HANDOFF = str(Path(sys.executable).parent / "handoff")
"""The `handoff` console script of this environment."""
DEMO_SOURCE = ROOT / "examples" / "samples" / "inventory_service.py"


def make_agent(
    agent_id: str,
    handler: Callable[[HandoffContext], Awaitable[HandoffResult]],
    capabilities: Sequence[AgentCapability] = (AgentCapability.TESTING,),
    max_concurrent: int = 5,
) -> Agent:
    """A fake agent: a real `Agent` whose handler the test writes."""
    return Agent(id=agent_id, name=agent_id.title(), capabilities=list(capabilities),
                 handler=handler, max_concurrent=max_concurrent)


async def cli(env: dict[str, str], *args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    """Run `handoff ARGS` off the event loop, so in-process agent workers keep polling."""
    proc = await asyncio.to_thread(
        subprocess.run, [HANDOFF, *args], env=env, capture_output=True, text=True, timeout=timeout,
    )
    assert proc.returncode >= 0, f"handoff {' '.join(args)} died: {proc.stderr[-500:]}"
    return proc


def assert_usage_error(proc: subprocess.CompletedProcess[str], fragment: str) -> None:
    """Bad input: exit 2, one line on stderr that starts with `error:` and says `fragment`."""
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("error:"), lines[0]
    assert fragment in lines[0], lines[0]

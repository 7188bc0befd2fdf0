"""The `handoff` command line: chain commands (`chains`), the fleet's (`workers`), the servers'
(`servers`) and evaluations (`eval`), on one Typer app (`common`). The console script is
`handoff.cli:main`."""

from __future__ import annotations

import os
import sys

import typer

from handoff.cli import chains, eval, follow, mcp, workers, servers  # noqa: F401  (each module adds its commands to `app`)
from handoff.cli.common import EXIT_USAGE, app, say

__all__ = ["app", "main"]


def main() -> None:
    """Console-script entry. Usage errors are one line and exit 2, like every other bad input.

    The process ends with `os._exit`: the Temporal client's native threads can crash a normal
    interpreter shutdown (sdk-python#300), after the command's output is complete.
    """
    try:
        code = app(standalone_mode=False)
    except typer.Exit as exit_:
        code = exit_.exit_code
    except typer.Abort:
        code = 130
    except Exception as err:  # typer's parser errors (missing option, bad value, no such command)
        if not hasattr(err, "format_message"):
            raise
        say(f"error: {err.format_message()}")
        code = getattr(err, "exit_code", EXIT_USAGE)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code if isinstance(code, int) else 0)

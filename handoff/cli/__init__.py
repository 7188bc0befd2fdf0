"""The `handoff` command line (the console script is `handoff.cli:main`)."""

from handoff.cli.commands import app, main

__all__ = ["app", "main"]

"""Layer 11, the command line: one parser, every sub-command registered the same way (swavkit/cli/main.py)."""

from swavkit.cli.main import main

__all__ = ["main"]

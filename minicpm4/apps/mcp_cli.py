"""`minicpm4 mcp`: tool use through MCP servers (being built; registered so the subcommand list is stable)."""

from __future__ import annotations


def register(sub) -> None:
    return None

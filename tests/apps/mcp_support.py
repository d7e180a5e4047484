"""Shared by the MCP tests: where the third-party servers are, and a scripted model."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from minicpm4.apps.chat_backend import AssistantTurn, turn_from_text

SERVERS_BIN = Path(__file__).resolve().parents[2] / "build" / "mcp-servers" / "bin"


def server_command(name: str) -> str:
    """The command of a PyPI MCP server (`make mcp-servers` installs them into build/mcp-servers/bin), or skip."""
    pytest.importorskip("mcp", reason="the mcp SDK (pip install 'minicpm4[apps]')")
    local = SERVERS_BIN / name
    if local.is_file():
        return str(local)
    found = shutil.which(name)
    if found is None:
        pytest.skip(f"{name} is not installed (make mcp-servers installs it into {SERVERS_BIN})")
    return found


class ScriptedBackend:
    """A stub model: replies are given in advance, in order; every conversation it saw is kept."""

    def __init__(self, replies: list[str]) -> None:
        self.replies = list(replies)
        self.seen: list[tuple[list[dict], list[dict] | None]] = []

    def complete(self, messages, tools=None, sampling=None, prefix="") -> AssistantTurn:
        self.seen.append((list(messages), tools))
        if not self.replies:
            raise AssertionError("the scripted model was asked more often than scripted")
        return turn_from_text(prefix + self.replies.pop(0), tools)

    def complete_batch(self, conversations, tools=None, sampling=None, prefix=""):
        return [self.complete(m, tools, sampling, prefix) for m in conversations]

"""The MCP side of `minicpm4 mcp`: start MCP servers over stdio, list their tools, run tool calls.

Uses the official `mcp` SDK (2.x client API: `mcp.client.stdio.stdio_client` + `ClientSession`). Each server is
a command line (`"mcp-server-time --local-timezone Etc/UTC"`), started as a subprocess as Claude Desktop or
mcp-cli do; the servers' tools are offered to the model as OpenAI function specs (name, description,
inputSchema as `parameters`). A server's stderr goes to a log file, not the terminal (servers log every
request); when a server fails to start, the error quotes that log.

Tool results are the text parts of the MCP result joined by newlines (images/resources are named, not
inlined: a small model reads text). A result flagged `isError` is still returned to the model, marked as an
error, so it can correct itself — the same loop a human-facing host runs.
"""

from __future__ import annotations

import shlex
import shutil
import tempfile
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, AsyncIterator

from minicpm4.errors import UserError


@dataclass
class ServerSpec:
    command: str
    args: list[str] = field(default_factory=list)

    @classmethod
    def parse(cls, line: str) -> ServerSpec:
        """A shell-style command line -> ServerSpec; the executable must exist (checked here, before any spawn)."""
        try:
            words = shlex.split(line)
        except ValueError as e:
            raise UserError(f"--server {line!r}: {e}") from e
        if not words:
            raise UserError("--server: empty command")
        if shutil.which(words[0]) is None:
            raise UserError(f"--server {line!r}: {words[0]!r} is not an executable on PATH nor a file")
        return cls(words[0], words[1:])

    def __str__(self) -> str:
        return shlex.join([self.command, *self.args])


@dataclass
class ToolResult:
    text: str
    is_error: bool = False


def openai_tool(tool: Any) -> dict:
    """An MCP Tool (name, description, inputSchema) -> an OpenAI function tool spec."""
    schema = getattr(tool, "input_schema", None) or getattr(tool, "inputSchema", None) or {"type": "object"}
    fn = {"name": tool.name, "parameters": dict(schema)}
    if tool.description:
        fn["description"] = tool.description
    return {"type": "function", "function": fn}


def result_text(result: Any) -> str:
    parts = []
    for item in result.content or []:
        if getattr(item, "type", None) == "text":
            parts.append(item.text)
        else:
            parts.append(f"[{getattr(item, 'type', 'content')} omitted]")
    return "\n".join(parts)


def first_leaf(group: BaseExceptionGroup) -> BaseException:
    """The first real exception of a (nested) exception group, cancellations skipped when there is another."""
    leaves: list[BaseException] = []

    def walk(e: BaseException) -> None:
        if isinstance(e, BaseExceptionGroup):
            for inner in e.exceptions:
                walk(inner)
        else:
            leaves.append(e)
    walk(group)
    real = [e for e in leaves if not isinstance(e, (KeyboardInterrupt, SystemExit)) and "Cancel" not in type(e).__name__]
    return (real or leaves or [group])[0]


class Toolbox:
    """The connected servers' tools. Use `async with Toolbox.connect(specs) as box:`; box.tools are the OpenAI
    specs to offer, `await box.call(name, arguments)` runs one through the server that owns it."""

    def __init__(self) -> None:
        self.tools: list[dict] = []
        self.owner: dict[str, str] = {}  # tool name -> server command line
        self._sessions: dict[str, Any] = {}

    @classmethod
    @asynccontextmanager
    async def connect(cls, specs: list[ServerSpec], log_dir: str | Path | None = None) -> AsyncIterator[Toolbox]:
        from mcp import ClientSession
        from mcp.client.stdio import StdioServerParameters, stdio_client

        box = cls()
        log_root = Path(log_dir) if log_dir else Path(tempfile.mkdtemp(prefix="minicpm4-mcp-"))
        try:
            async with AsyncExitStack() as stack:
                for i, spec in enumerate(specs):
                    await box._start(stack, spec, log_root / f"server-{i}.log", ClientSession, StdioServerParameters,
                                     stdio_client)
                yield box
        except BaseExceptionGroup as group:  # the SDK's task groups wrap whatever was raised inside them
            raise first_leaf(group) from None

    async def _start(self, stack: AsyncExitStack, spec: ServerSpec, log_path: Path, session_cls, params_cls,
                     stdio_client) -> None:
        log = stack.enter_context(open(log_path, "w", encoding="utf-8"))
        try:
            read, write = await stack.enter_async_context(
                stdio_client(params_cls(command=spec.command, args=spec.args), errlog=log))
            session = await stack.enter_async_context(session_cls(read, write))
            await session.initialize()
            listed = await session.list_tools()
        except Exception as e:  # noqa: BLE001 - any failure to start/handshake is the user's server
            log.flush()
            tail = log_path.read_text(encoding="utf-8", errors="replace")[-800:].strip()
            raise UserError(f"MCP server {str(spec)!r} did not start: {type(e).__name__}: {e}"
                            + (f"\n  its stderr ({log_path}):\n  {tail}" if tail else "")) from e
        for tool in listed.tools:
            if tool.name in self.owner:
                raise UserError(f"tool {tool.name!r} is offered by two servers: {self.owner[tool.name]!r} "
                                f"and {str(spec)!r}")
            self.owner[tool.name] = str(spec)
            self.tools.append(openai_tool(tool))
            self._sessions[tool.name] = session

    def names(self) -> list[str]:
        return [t["function"]["name"] for t in self.tools]

    async def call(self, name: str, arguments: dict[str, Any]) -> ToolResult:
        session = self._sessions.get(name)
        if session is None:
            return ToolResult(f"unknown tool {name!r}; available: {', '.join(self.names())}", True)
        try:
            result = await session.call_tool(name, arguments)
        except Exception as e:  # noqa: BLE001 - a failing call is reported to the model, not raised
            return ToolResult(f"tool {name!r} failed: {type(e).__name__}: {e}", True)
        return ToolResult(result_text(result), bool(result.is_error))

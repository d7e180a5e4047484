"""The bundled tool model end to end: `minicpm4 mcp` really calls the time and calculator servers (greedy, fp32),
and the same model behind `minicpm4 serve` answers the official openai client with tool_calls, which an
EndpointBackend turns into a full MCP conversation (MCP server <-> host <-> HTTP <-> engine)."""

from __future__ import annotations

import json
import re
from zoneinfo import ZoneInfo, available_timezones

import anyio
import pytest

from minicpm4.apps.mcp_cli import TOOL_MODEL_DIR
from minicpm4.apps.mcp_eval import arithmetic_value
from tests.apps.mcp_support import server_command

CALL_LINE = re.compile(r"^  -> (\w+)\((.*)\)$", re.M)


@pytest.fixture(scope="module")
def servers() -> list[str]:
    return [server_command("mcp-server-time"), server_command("mcp-server-calculator")]


def run_cli(servers, query, capsys) -> str:
    from minicpm4 import cli

    argv = ["mcp", "--dtype", "float32", "-q", query]
    for s in servers:
        argv += ["--server", s]
    assert cli.main(argv) == 0, capsys.readouterr().err
    return capsys.readouterr().out


def test_the_tool_model_ships():
    assert (TOOL_MODEL_DIR / "model.safetensors").is_file() and (TOOL_MODEL_DIR / "eval.json").is_file()


def test_the_bundled_model_calls_the_time_tool(servers, capsys):
    out = run_cli(servers, "What time is it in Tokyo?", capsys)
    name, args = CALL_LINE.search(out).groups()
    assert name == "get_current_time"
    zone = re.fullmatch(r"timezone='([^']+)'", args).group(1)
    assert zone in available_timezones() and ZoneInfo(zone)  # a valid argument: the server accepted it
    assert "<- {" in out and "ERROR" not in out and "assistant: " in out


def test_the_bundled_model_calls_the_calculator(servers, capsys):
    out = run_cli(servers, "How much is 128 times 46?", capsys)
    name, args = CALL_LINE.search(out).groups()
    assert name == "calculate"
    expression = re.fullmatch(r"expression='([^']+)'", args).group(1)
    assert arithmetic_value(expression) is not None and "ERROR" not in out


def test_openai_client_and_endpoint_backend_against_the_served_tool_model(servers):
    openai = pytest.importorskip("openai")
    pytest.importorskip("uvicorn")
    from minicpm4.api import from_pretrained
    from minicpm4.apps.agent import run_agent
    from minicpm4.apps.chat_backend import EndpointBackend, Sampling
    from minicpm4.apps.mcp_host import ServerSpec, Toolbox
    from minicpm4.engine import LLM, AsyncLLM
    from minicpm4.server import create_app
    from tests.server.conftest import serve

    pipe = from_pretrained(TOOL_MODEL_DIR, dtype="float32")
    live = serve(create_app(AsyncLLM(LLM(model=pipe.model, tokenizer=pipe.tokenizer, kv_cache_tokens=8192),
                                     threads=1), "minicpm4-tools", shutdown_engine=True))
    try:
        async def main():
            async with Toolbox.connect([ServerSpec.parse(s) for s in servers]) as box:
                client = openai.OpenAI(base_url=live.base_url, api_key="x", max_retries=0, timeout=120)
                reply = client.chat.completions.create(
                    model="minicpm4-tools", messages=[{"role": "user", "content": "What time is it in Paris?"}],
                    tools=box.tools, max_tokens=96, temperature=0)
                backend = EndpointBackend(live.base_url)
                result = await run_agent(backend, box, [{"role": "user", "content": "What is 345 plus 678?"}],
                                         max_steps=3, sampling=Sampling(max_tokens=96))
                return reply, result
        reply, result = anyio.run(main)
    finally:
        live.stop()
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls"
    call = choice.message.tool_calls[0].function
    assert call.name == "get_current_time" and json.loads(call.arguments)["timezone"] in available_timezones()
    assert result.steps[0].calls[0].name == "calculate" and not result.steps[0].results[0].is_error
    assert result.stopped == "answer" and result.answer

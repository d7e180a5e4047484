"""Where the apps get their model replies: a model in this process, or any OpenAI-compatible endpoint.

Both speak OpenAI chat messages (dicts) plus optional `tools` and return an AssistantTurn with MiniCPM4's
tool calls already parsed (minicpm4/apps/tool_calls.py), so the MCP host, the survey writer and the
evaluations run unchanged on the bundled model, on `minicpm4 serve`, or on another vendor's server.

LocalBackend renders exactly as the server does (render_conversation + the tokenizer's chat template) and
batches: `complete_batch` sends every conversation to the engine at once (continuous batching), which is what
makes evaluation over hundreds of items fast. EndpointBackend uses only the standard library (urllib), with a
thread pool for concurrent requests; the server parses the calls, so it needs no MiniCPM4-specific knowledge.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Protocol, Sequence

from minicpm4.apps.tool_calls import CALL_START, ToolCall, openai_tool_calls, parse_reply, render_conversation
from minicpm4.errors import UserError


@dataclass
class Sampling:
    max_tokens: int = 512
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None


@dataclass
class AssistantTurn:
    content: str | None  # the text outside any call/thought markers
    calls: list[ToolCall] = field(default_factory=list)
    thought: str | None = None
    text: str = ""  # the raw reply as generated (the rendered form for an endpoint's parsed reply)
    finish_reason: str = "stop"

    def message(self, call_ids: Sequence[str] | None = None) -> dict:
        """This turn as an OpenAI assistant message for the conversation history."""
        msg: dict[str, Any] = {"role": "assistant", "content": self.content}
        if self.calls:
            ids = list(call_ids) if call_ids is not None else [f"call_{i}" for i in range(len(self.calls))]
            msg["tool_calls"] = openai_tool_calls(self.calls, ids)
        return msg


class ChatBackend(Protocol):
    def complete(self, messages: list[dict], tools: list[dict] | None = None,
                 sampling: Sampling | None = None, prefix: str = "") -> AssistantTurn: ...

    def complete_batch(self, conversations: Sequence[list[dict]], tools: list[dict] | None = None,
                       sampling: Sampling | None = None, prefix: str = "") -> list[AssistantTurn]: ...


def turn_from_text(text: str, tools: list[dict] | None, finish_reason: str = "stop") -> AssistantTurn:
    parsed = parse_reply(text, tools)
    return AssistantTurn(parsed.content or None, parsed.calls, parsed.thought, text, finish_reason)


class LocalBackend:
    """A Pipeline (minicpm4.api) in this process. prefix: text the reply is forced to start with (e.g. the call
    marker, as the server does for tool_choice "required"); it is part of the parsed reply."""

    def __init__(self, pipeline) -> None:
        self.pipeline = pipeline

    def prompt_ids(self, messages: list[dict], tools: list[dict] | None = None, prefix: str = "") -> list[int]:
        tok = self.pipeline.tokenizer
        ids = tok.encode_chat(render_conversation(messages, tools), add_generation_prompt=True)
        return ids + tok.encode(prefix, add_bos=False) if prefix else ids

    def complete(self, messages: list[dict], tools: list[dict] | None = None,
                 sampling: Sampling | None = None, prefix: str = "") -> AssistantTurn:
        return self.complete_batch([messages], tools, sampling, prefix)[0]

    def complete_batch(self, conversations: Sequence[list[dict]], tools: list[dict] | None = None,
                       sampling: Sampling | None = None, prefix: str = "") -> list[AssistantTurn]:
        s = sampling or Sampling()
        params = self.pipeline.sampling_params(max_new_tokens=s.max_tokens, temperature=s.temperature,
                                               top_p=s.top_p, seed=s.seed)
        prompts = [self.prompt_ids(m, tools, prefix) for m in conversations]
        texts = ["" for _ in prompts]
        reasons = ["length" for _ in prompts]
        for row, text, reason in self.pipeline.stream_batch(prompts, params):
            texts[row] += text
            if reason is not None:
                reasons[row] = reason
        return [turn_from_text(prefix + t, tools, r) for t, r in zip(texts, reasons)]


class EndpointBackend:
    """An OpenAI-compatible server at base_url (e.g. http://127.0.0.1:8000/v1). model: the model name to send;
    None asks the server (/models, first entry). concurrency: parallel requests in complete_batch."""

    def __init__(self, base_url: str, model: str | None = None, api_key: str | None = None,
                 timeout: float = 600.0, concurrency: int = 8) -> None:
        self.base_url = base_url.rstrip("/")
        self.api_key = api_key
        self.timeout = timeout
        self.concurrency = concurrency
        self.model = model or self._first_model()

    def _request(self, path: str, body: dict | None = None) -> dict:
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(self.base_url + path, data=data, headers=headers,
                                     method="POST" if body is not None else "GET")
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                return json.loads(resp.read())
        except urllib.error.HTTPError as e:
            detail = e.read().decode(errors="replace")[:500]
            raise UserError(f"{self.base_url}{path}: HTTP {e.code}: {detail}") from e
        except (urllib.error.URLError, OSError) as e:
            raise UserError(f"{self.base_url}{path}: cannot reach the endpoint ({e})") from e

    def _first_model(self) -> str:
        models = self._request("/models").get("data") or []
        if not models:
            raise UserError(f"{self.base_url}/models lists no model; pass one by name")
        return models[0]["id"]

    def complete(self, messages: list[dict], tools: list[dict] | None = None,
                 sampling: Sampling | None = None, prefix: str = "") -> AssistantTurn:
        s = sampling or Sampling()
        body: dict[str, Any] = {"model": self.model, "messages": messages, "max_tokens": s.max_tokens,
                                "temperature": s.temperature, "top_p": s.top_p}
        if s.seed is not None:
            body["seed"] = s.seed
        if tools:
            body["tools"] = tools
            if prefix.startswith(CALL_START):  # a forced call is the endpoint's tool_choice
                name = prefix[len(CALL_START):].rstrip("(")
                body["tool_choice"] = {"type": "function", "function": {"name": name}} if name else "required"
        choice = self._request("/chat/completions", body)["choices"][0]
        msg = choice.get("message") or {}
        calls = [ToolCall(c["function"]["name"], json.loads(c["function"].get("arguments") or "{}"))
                 for c in msg.get("tool_calls") or []]
        content = msg.get("content")
        text = (content or "") + (CALL_START + "…" if calls else "")
        return AssistantTurn(content, calls, None, text, choice.get("finish_reason") or "stop")

    def complete_batch(self, conversations: Sequence[list[dict]], tools: list[dict] | None = None,
                       sampling: Sampling | None = None, prefix: str = "") -> list[AssistantTurn]:
        with ThreadPoolExecutor(max_workers=max(1, self.concurrency)) as pool:
            return list(pool.map(lambda m: self.complete(m, tools, sampling, prefix), conversations))

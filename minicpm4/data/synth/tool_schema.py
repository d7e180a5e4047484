"""Tool-call verification for the tool-use track (MINICPM4.md §8.3, track 5): the report drops samples "whose gold
tool is missing from the tool set or whose arguments break the schema".

Tools are OpenAI-style: [{"type": "function", "function": {"name", "description", "parameters": <JSON Schema>}}].
A call is {"name": str, "arguments": dict or JSON string} (OpenAI's {"function": {...}} wrapper is accepted too).
Arguments are checked with jsonschema's Draft 2020-12 validator. A malformed tool set is the data's fault, not the
model's: check_tool_set and the verifiers raise UserError for it instead of returning a Verdict.
"""

from __future__ import annotations

import json
from functools import lru_cache
from typing import Sequence

from minicpm4.data.synth.verdict import Verdict, quote
from minicpm4.errors import MissingDependency, UserError

_NO_PARAMETERS = {"type": "object", "properties": {}}  # OpenAI lets a tool omit "parameters": it takes none


def _jsonschema():
    try:
        import jsonschema
    except ImportError:
        raise MissingDependency("tool-call verification", "jsonschema", "data") from None
    return jsonschema


def _tool_name(tool: object, index: int) -> str:
    function = tool.get("function") if isinstance(tool, dict) else None
    name = function.get("name") if isinstance(function, dict) else None
    return f"tool {name!r}" if isinstance(name, str) and name else f"tool {index}"


def check_tool_set(tools: Sequence[dict]) -> None:
    """Raise UserError, naming the tool and field, unless every tool is well-formed, names are unique and each
    parameters is a valid Draft 2020-12 JSON Schema for an object."""
    _validators(_canonical(tools))


def _canonical(tools: Sequence[dict]) -> str:
    """The tool set as one hashable string, so validators are built once per distinct tool set."""
    if isinstance(tools, (str, bytes)) or not isinstance(tools, Sequence):
        raise UserError(f"tool set must be a list of tools, got {type(tools).__name__}")
    try:
        return json.dumps(list(tools), sort_keys=True)
    except (TypeError, ValueError) as e:
        raise UserError(f"tool set is not JSON-serialisable ({e})") from None


@lru_cache(maxsize=256)
def _validators(canonical_tools: str) -> dict:
    """name -> Draft 2020-12 validator of that tool's arguments."""
    js = _jsonschema()
    validators = {}
    for i, tool in enumerate(json.loads(canonical_tools)):
        where = _tool_name(tool, i)
        if not isinstance(tool, dict):
            raise UserError(f"{where}: a tool must be an object, got {type(tool).__name__}")
        if tool.get("type") != "function":
            raise UserError(f"{where}: 'type' must be 'function', got {tool.get('type')!r}")
        function = tool.get("function")
        if not isinstance(function, dict):
            raise UserError(f"{where}: 'function' must be an object")
        name = function.get("name")
        if not isinstance(name, str) or not name.strip():
            raise UserError(f"{where}: 'function.name' must be a non-empty string")
        if name in validators:
            raise UserError(f"{where}: the name appears twice in the tool set")
        if not isinstance(function.get("description", ""), str):
            raise UserError(f"{where}: 'function.description' must be a string")
        parameters = function.get("parameters", _NO_PARAMETERS)
        if not isinstance(parameters, dict):
            raise UserError(f"{where}: 'function.parameters' must be a JSON Schema object")
        if parameters.get("type", "object") != "object":
            raise UserError(f"{where}: 'function.parameters' must describe an object (type 'object'), "
                            f"got type {parameters.get('type')!r}")
        try:
            js.Draft202012Validator.check_schema(parameters)
        except js.SchemaError as e:
            raise UserError(f"{where}: 'function.parameters' is not a valid JSON Schema: {e.message}") from None
        validators[name] = js.Draft202012Validator(parameters)
    return validators


def _parse_arguments(arguments: object) -> dict | str:
    """The arguments as a dict, or the reason they are not one."""
    if arguments is None:
        return {}
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments) if arguments.strip() else {}
        except json.JSONDecodeError as e:
            return f"arguments are not valid JSON ({e.msg} at column {e.colno})"
    if not isinstance(arguments, dict):
        return f"arguments are a JSON {type(arguments).__name__}, not an object"
    return arguments


def _unwrap(call: object) -> object:
    """OpenAI's {"type": "function", "function": {"name", "arguments"}} -> the inner {"name", "arguments"}."""
    if isinstance(call, dict) and "name" not in call and isinstance(call.get("function"), dict):
        return call["function"]
    return call


def _verify(call: object, validators: dict) -> Verdict:
    call = _unwrap(call)
    if not isinstance(call, dict):
        return Verdict.failed(f"a call must be an object, got {type(call).__name__}")
    name = call.get("name")
    if not isinstance(name, str) or not name:
        return Verdict.failed("call without a tool name")
    if name not in validators:
        return Verdict.failed(f"unknown tool {quote(name)!r}")
    arguments = _parse_arguments(call.get("arguments"))
    if isinstance(arguments, str):
        return Verdict.failed(arguments)
    error = _jsonschema().exceptions.best_match(validators[name].iter_errors(arguments))
    if error is not None:
        return Verdict.failed(f"schema: {error.message}")
    return Verdict.passed()


def verify_tool_call(call: dict, tools: Sequence[dict]) -> Verdict:
    """Passes when the call names a tool of the set and its arguments are a JSON object that the tool's
    parameters schema accepts; reasons: "unknown tool 'foo'", "schema: 'expression' is a required property"."""
    return _verify(call, _validators(_canonical(tools)))


def verify_tool_calls(calls: Sequence[dict], tools: Sequence[dict], *,
                      gold_names: Sequence[str] | None = None) -> Verdict:
    """Passes when there is at least one call and every call is valid; with gold_names (the tools the sample is
    about), each gold tool must also be in the tool set and be called."""
    validators = _validators(_canonical(tools))
    for gold in gold_names or ():
        if gold not in validators:
            return Verdict.failed(f"gold tool {quote(gold)!r} missing from the tool set")
    if not calls:
        return Verdict.failed("no tool call")
    for i, call in enumerate(calls):
        verdict = _verify(call, validators)
        if not verdict.ok:
            return verdict if len(calls) == 1 else Verdict.failed(f"call {i}: {verdict.reason}")
    called = {c.get("name") for c in map(_unwrap, calls) if isinstance(c, dict)}
    for gold in gold_names or ():
        if gold not in called:
            return Verdict.failed(f"gold tool {quote(gold)!r} not called")
    return Verdict.passed()

"""The synthesis output record, its JSON Schema, and the append-only JSONL file that makes a run resumable.

One record per line:

    {"id": "reasoning:math-train-00001:solve", "track": "reasoning",
     "messages": [{"role": "user", "content": ...}, {"role": "assistant", "content": ...}],
     "kept": true, "reason": "", "meta": {"seed": "math-train-00001", "variant": "solve", ...}}

`id` is track + seed item + variant, so a restarted run knows which records exist already, kept or rejected.
A kept record's `messages` are plain chat-template messages (string contents; the tool track's tools prompt is
rendered into its system message and the calls into the assistant text, and the OpenAI `tools` list rides along
in "tools"), so `minicpm4.train.sft_data.read_jsonl` loads the kept records as they are. A rejected record
keeps whatever conversation got as far as the verifier (prompt + raw reply), so a reader can see why.

Writing appends and flushes one line per record: a kill loses at most the records still in flight, and at worst
leaves a truncated last line, which `load_records` cuts off (the record is regenerated); a broken line anywhere
else is an error naming the line, never silently skipped.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from minicpm4.errors import UserError

TRACKS = ("knowledge", "reasoning", "instruction", "longctx", "tool")
ROLES = ("system", "user", "assistant", "tool")

RECORD_SCHEMA: dict[str, Any] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "title": "minicpm4 synthesis record",
    "type": "object",
    "required": ["id", "track", "messages", "kept", "reason", "meta"],
    "additionalProperties": False,
    "properties": {
        "id": {"type": "string", "minLength": 1},
        "track": {"enum": list(TRACKS)},
        "messages": {"type": "array", "minItems": 1, "items": {
            "type": "object", "required": ["role", "content"], "additionalProperties": False,
            "properties": {"role": {"enum": list(ROLES)}, "content": {"type": "string"}}}},
        "tools": {"type": "array", "items": {"type": "object", "required": ["type", "function"]}},
        "kept": {"type": "boolean"},
        "reason": {"type": "string"},
        "meta": {"type": "object", "required": ["seed", "variant"],
                 "properties": {"seed": {"type": "string", "minLength": 1},
                                "variant": {"type": "string", "minLength": 1}}},
    },
    # a kept record has no reason and ends with the assistant turn SFT trains on; a rejected one says why
    "if": {"properties": {"kept": {"const": True}}},
    "then": {"properties": {"reason": {"const": ""},
                            "messages": {"contains": {"properties": {"role": {"const": "assistant"}}}}}},
    "else": {"properties": {"reason": {"minLength": 1}}},
}


def record_id(track: str, seed: str, variant: str) -> str:
    return f"{track}:{seed}:{variant}"


@dataclass
class Record:
    id: str
    track: str
    messages: list[dict]
    kept: bool
    reason: str
    meta: dict = field(default_factory=dict)
    tools: list[dict] | None = None

    def to_dict(self) -> dict:
        d: dict[str, Any] = {"id": self.id, "track": self.track, "messages": self.messages}
        if self.tools is not None:
            d["tools"] = self.tools
        d.update(kept=self.kept, reason=self.reason, meta=self.meta)
        return d

    def reject(self, reason: str) -> None:
        self.kept, self.reason = False, reason


_validator = None


def validate_record(record: dict) -> None:
    """Raise ValueError naming the record's id and the first field RECORD_SCHEMA rejects."""
    global _validator
    if _validator is None:
        import jsonschema

        jsonschema.Draft202012Validator.check_schema(RECORD_SCHEMA)
        _validator = jsonschema.Draft202012Validator(RECORD_SCHEMA)
    import jsonschema

    error = jsonschema.exceptions.best_match(_validator.iter_errors(record))
    if error is not None:
        where = "/".join(str(p) for p in error.absolute_path) or "(record)"
        rid = record.get("id") if isinstance(record, dict) else None
        raise ValueError(f"synthesis record {rid!r}: {where}: {error.message}")


def dedup_text(record: dict) -> str:
    """The text near-duplicate removal compares: the conversation without the system prompt; for long-context
    records the query and answer only (thousands of shared context tokens would make every record a match)."""
    if record["track"] == "longctx":
        return f"{record['meta'].get('query', '')}\n{record['messages'][-1]['content']}"
    return "\n".join(m["content"] for m in record["messages"] if m["role"] != "system")


def load_records(path: str | Path, *, repair: bool = True) -> list[dict]:
    """Every record of a synthesis JSONL file ([] when it does not exist). A last line that is not valid JSON
    (a run killed mid-write) is dropped and, with repair, cut from the file so appending continues cleanly;
    a bad line before it raises UserError naming the line."""
    path = Path(path)
    if not path.exists():
        return []
    data = path.read_bytes()
    records: list[dict] = []
    offset = 0
    truncated = False
    lines = data.split(b"\n")
    for lineno, raw in enumerate(lines, 1):
        start, offset = offset, offset + len(raw) + 1
        if not raw.strip():
            continue
        try:
            record = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError):
            if any(rest.strip() for rest in lines[lineno:]):
                raise UserError(f"{path}:{lineno}: not valid JSON; only a truncated last line is repaired") from None
            truncated = True
            if repair:
                with open(path, "r+b") as f:
                    f.truncate(start)
            break
        if not isinstance(record, dict) or not isinstance(record.get("id"), str):
            raise UserError(f"{path}:{lineno}: expected a synthesis record with a string 'id'")
        records.append(record)
    if repair and not truncated and data.strip() and not data.endswith(b"\n"):
        with open(path, "ab") as f:  # a complete last line without its newline: end it before appending more
            f.write(b"\n")
    return records


class RecordWriter:
    """Appends validated records to a JSONL file, one flushed line each."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._f = open(self.path, "a", encoding="utf-8")

    def write(self, record: Record | dict) -> dict:
        d = record.to_dict() if isinstance(record, Record) else record
        validate_record(d)
        self._f.write(json.dumps(d, ensure_ascii=False) + "\n")
        self._f.flush()
        return d

    def close(self) -> None:
        self._f.close()

    def __enter__(self) -> "RecordWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def write_records_atomic(path: str | Path, records: Iterable[dict]) -> int:
    """Replace path with exactly these records (validated), atomically; the count written."""
    from minicpm4.io import atomic_path

    n = 0
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        for r in records:
            validate_record(r)
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
            n += 1
        f.flush()
        os.fsync(f.fileno())
    return n


def export_kept(out: str | Path, kept_path: str | Path) -> int:
    """Write the kept records of `out` to kept_path (the SFT set: `minicpm4 train sft` reads it as is)."""
    return write_records_atomic(kept_path, (r for r in load_records(out, repair=False) if r.get("kept")))

"""The one answer every synthesis verifier gives: did the sample pass, and if not, why (one short line)."""

from __future__ import annotations

from dataclasses import dataclass

MAX_QUOTE_CHARS = 60  # model text quoted in a reason is cut here, so a reason stays one readable line


@dataclass(frozen=True)
class Verdict:
    ok: bool
    reason: str = ""  # "" when ok; else short and specific: "wrong answer: got 12, expected 77"

    @classmethod
    def passed(cls) -> "Verdict":
        return cls(ok=True)

    @classmethod
    def failed(cls, reason: str) -> "Verdict":
        if not reason:
            raise ValueError("Verdict.failed needs a reason")
        return cls(ok=False, reason=reason)


def quote(text: str, limit: int = MAX_QUOTE_CHARS) -> str:
    """`text` on one line and at most `limit` characters, for quoting model output inside a reason."""
    flat = " ".join(text.split())
    return flat if len(flat) <= limit else flat[: limit - 3] + "..."

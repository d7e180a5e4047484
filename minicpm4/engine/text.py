"""Per-request text: incremental detokenization plus stop strings (the engine's output side)."""

from __future__ import annotations

from minicpm4.stop_strings import StopStringFilter
from minicpm4.tokenizer import StreamDecoder, Tokenizer


class TextState:
    def __init__(self, tokenizer: Tokenizer, stop: list[str]) -> None:
        self.decoder = StreamDecoder(tokenizer, skip_special_tokens=True)
        self.filter = StopStringFilter(stop)
        self.text = ""  # what may be shown so far (held-back possible stop-string prefixes excluded)

    def push(self, token: int) -> bool:
        """Add one generated token; True when a stop string has appeared (the request should stop)."""
        self.text += self.filter.push(self.decoder.push(token))
        return self.filter.stopped

    def finish(self) -> None:
        self.text += self.filter.push(self.decoder.flush()) + self.filter.flush()

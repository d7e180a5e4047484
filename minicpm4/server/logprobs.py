"""Token strings and the two OpenAI logprobs formats built from the engine's TokenLogprob records.

A token's string is its text as it appears inside a longer text (decoded after an anchor token, so a
SentencePiece "▁a" is " a", not the "a" that decoding it alone gives). A token that is only part of a
UTF-8 character (a byte-level or "<0xNN>" piece) has no text of its own: it is shown as OpenAI shows
such tokens, "bytes:\\xe6", with its raw bytes in `bytes`.
"""

from __future__ import annotations

import functools
import re

from minicpm4.engine import TokenLogprob
from minicpm4.server.protocol import ChatTokenLogprob, CompletionLogprobs, TopLogprob
from minicpm4.tokenizer import StreamDecoder, Tokenizer

_BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")


@functools.lru_cache(maxsize=1)
def _byte_level_decoder() -> dict[str, int]:
    """GPT-2's bytes_to_unicode, inverted: the printable stand-in character of each byte -> the byte."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


class TokenTexts:
    """Per-token strings and bytes of one tokenizer, cached (a vocabulary is at most ~100K entries)."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer
        anchor = tokenizer.encode("a", add_bos=False)
        self._anchor = anchor[-1:] if anchor else []
        self._anchor_text = tokenizer.decode(self._anchor)
        self._cache: dict[int, tuple[str, list[int]]] = {}

    def __call__(self, token_id: int) -> tuple[str, list[int]]:
        """(string, UTF-8 bytes) of one token."""
        hit = self._cache.get(token_id)
        if hit is None:
            hit = self._cache[token_id] = self._compute(token_id)
        return hit

    def text(self, token_id: int) -> str:
        return self(token_id)[0]

    def _compute(self, token_id: int) -> tuple[str, list[int]]:
        text = self.tokenizer.decode(self._anchor + [token_id])[len(self._anchor_text):]
        if "\ufffd" not in text:
            return text, list(text.encode("utf-8"))
        piece = self.tokenizer.id_to_token(token_id) or ""
        match = _BYTE_PIECE.fullmatch(piece)
        table = _byte_level_decoder()
        if match:
            raw = [int(match.group(1), 16)]
        elif piece and all(c in table for c in piece):
            raw = [table[c] for c in piece]
        else:
            return text, list(text.encode("utf-8"))
        return "bytes:" + "".join(f"\\x{b:02x}" for b in raw), raw


def chat_logprobs(records: list[TokenLogprob], texts: TokenTexts, top_n: int) -> list[ChatTokenLogprob]:
    out = []
    for r in records:
        token, raw = texts(r.token_id)
        top = [TopLogprob(token=texts(t)[0], logprob=lp, bytes=texts(t)[1]) for t, lp in r.top[:top_n]]
        out.append(ChatTokenLogprob(token=token, logprob=r.logprob, bytes=raw, top_logprobs=top))
    return out


class OffsetTracker:
    """Character offset of each token in the decoded text, streamed: the text emitted before the token.
    Tokens of one multi-byte character share the character's offset."""

    def __init__(self, tokenizer: Tokenizer, start: int = 0) -> None:
        self._decoder = StreamDecoder(tokenizer, skip_special_tokens=True)
        self.position = start

    def push(self, token_id: int) -> int:
        before = self.position
        self.position += len(self._decoder.push(token_id))
        return before


def completion_logprobs(records: list[TokenLogprob | None], token_ids: list[int], texts: TokenTexts,
                        offsets: OffsetTracker, top_n: int) -> CompletionLogprobs:
    """The legacy format for `token_ids` (None record: the first prompt token, which has no logprob).
    top_logprobs holds the top_n tokens and, as OpenAI does, the chosen one when it is not among them."""
    out = CompletionLogprobs()
    for token_id, r in zip(token_ids, records):
        out.tokens.append(texts.text(token_id))
        out.text_offset.append(offsets.push(token_id))
        if r is None:
            out.token_logprobs.append(None)
            out.top_logprobs.append(None)
            continue
        out.token_logprobs.append(r.logprob)
        top: dict[str, float] = {}
        for t, lp in r.top[:top_n]:
            top.setdefault(texts.text(t), lp)  # two ids with one string: keep the likelier
        top.setdefault(texts.text(r.token_id), r.logprob)
        out.top_logprobs.append(top)
    return out

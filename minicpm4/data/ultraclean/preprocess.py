"""UltraClean's fastText preprocessing (MINICPM4.md §8.1): redundant blank lines and extra whitespace removed,
diacritics stripped, lowercased, `\\n \\t \\r` kept as structural tokens, then tokenised with the model's own
tokenizer (the report used DeepSeek-V2's; any tokenizer works: its ids are fastText's "words").

The output is one line of space-separated words: token ids as `t<id>` and the structural tokens `<n>`, `<t>`,
`<r>` between the tokenised runs (fastText reads one example per line, so a raw newline cannot stay).
"""

from __future__ import annotations

import re
import unicodedata

_BLANKS = re.compile(r"\n\s*\n+")
_SPACES = re.compile(r"[ \f\v\u00a0\u2000-\u200b\u3000]+")
_STRUCTURAL = {"\n": "<n>", "\t": "<t>", "\r": "<r>"}
_SPLIT = re.compile(r"([\n\t\r])")


def normalise(text: str) -> str:
    """Blank-line runs -> one blank line, space runs -> one space, diacritics stripped, lowercased."""
    text = text.replace("\r\n", "\n")
    text = _BLANKS.sub("\n\n", text)
    text = "\n".join(_SPACES.sub(" ", line).strip(" ") for line in text.split("\n")).strip()
    decomposed = unicodedata.normalize("NFKD", text)
    text = "".join(c for c in decomposed if not unicodedata.combining(c))
    return text.lower()


def fasttext_words(text: str, tokenizer) -> str:
    words: list[str] = []
    for part in _SPLIT.split(normalise(text)):
        if part in _STRUCTURAL:
            words.append(_STRUCTURAL[part])
        elif part:
            words += [f"t{i}" for i in tokenizer.encode(part, add_bos=False, allow_special=False)]
    return " ".join(words)

"""Rule-verifiable instruction-following constraints (MINICPM4.md §8.3, track 3; IFEval-like): each one is a
sentence appended to an instruction (`describe()`) and a rule that checks a reply (`check(text) -> Verdict`).

The track layers several constraints on one instruction (`sample_constraints`, never two that contradict), samples
several replies and keeps the instruction when enough replies satisfy every constraint (`verify_samples`).
Records store constraints as {"kind": ..., params} (`constraint_to_dict` / `constraint_from_dict`).

Phrases and keywords are compared case-insensitively (as IFEval does), so `all_lowercase` combines with
`starts_with("My answer is")`: "my answer is ..." satisfies both.
"""

from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass, fields
from typing import ClassVar, Sequence, Union

from minicpm4.data.synth.verdict import Verdict, quote
from minicpm4.errors import UserError

_WORD = re.compile(r"\w+(?:['’-]\w+)*")
_BULLET = re.compile(r"^[ \t]*[-*][ \t]+\S", re.MULTILINE)  # "- item" / "* item"; "---" and "**bold**" are not
_PARAGRAPH_BREAK = re.compile(r"\n[ \t]*\n")
_TITLE = re.compile(r"<<[^<>\n]*\S[^<>\n]*>>")
_JSON_FENCE = re.compile(r"^```[ \t]*(?:json)?[ \t]*\n(.*?)\n?[ \t]*```$", re.DOTALL | re.IGNORECASE)
_COMMAS = (",", "，")  # the full-width comma counts too: a reply told "no commas" should not dodge with it
_QUOTES = "\"'“”‘’"  # a reply may wrap itself in quotes; starts_with / ends_with look inside them


def count_words(text: str) -> int:
    """Words as runs of letters/digits, with inner apostrophes and hyphens kept ("don't", "well-known" = 1)."""
    return len(_WORD.findall(text))


def contains_word(text: str, word: str) -> bool:
    """Whether `word` (or phrase) occurs in `text` as whole words, ignoring case ("cat" is not in "concat")."""
    return re.search(rf"(?<!\w){re.escape(word)}(?!\w)", text, re.IGNORECASE) is not None


def _quoted_list(words: Sequence[str], conjunction: str) -> str:
    quoted = [f"'{w}'" for w in words]
    return quoted[0] if len(quoted) == 1 else f"{', '.join(quoted[:-1])} {conjunction} {quoted[-1]}"


class _Rule:
    """What every constraint shares: its label in reasons, its verdict, and checks of its own parameters."""

    kind: ClassVar[str]

    def label(self) -> str:
        """`word_count_at_most(50)`, `include_keywords('a', 'b')`: the kind and parameters, as in reasons."""
        args = []
        for f in fields(self):
            value = getattr(self, f.name)
            args.append(", ".join(map(repr, value)) if isinstance(value, tuple) else repr(value))
        return f"{self.kind}({', '.join(args)})"

    def _verdict(self, ok: bool, detail: str) -> Verdict:
        return Verdict.passed() if ok else Verdict.failed(f"constraint {self.label()}: {detail}")

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if f.type == "int" and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise UserError(f"constraint {self.kind}: {f.name} must be a positive integer, got {value!r}")
            if f.type == "str" and (not isinstance(value, str) or not value.strip()):
                raise UserError(f"constraint {self.kind}: {f.name} must be a non-empty string, got {value!r}")
            if f.type == "tuple[str, ...]" and (not isinstance(value, tuple) or not value or not all(
                    isinstance(w, str) and w.strip() for w in value)):
                raise UserError(f"constraint {self.kind}: {f.name} must be a non-empty list of non-empty strings, "
                                f"got {value!r}")


@dataclass(frozen=True)
class WordCountAtMost(_Rule):
    n: int
    kind: ClassVar[str] = "word_count_at_most"

    def describe(self) -> str:
        return f"Answer in at most {self.n} words."

    def check(self, text: str) -> Verdict:
        words = count_words(text)
        return self._verdict(words <= self.n, f"{words} words")


@dataclass(frozen=True)
class WordCountAtLeast(_Rule):
    n: int
    kind: ClassVar[str] = "word_count_at_least"

    def describe(self) -> str:
        return f"Answer in at least {self.n} words."

    def check(self, text: str) -> Verdict:
        words = count_words(text)
        return self._verdict(words >= self.n, f"{words} words")


@dataclass(frozen=True)
class IncludeKeywords(_Rule):
    words: tuple[str, ...]
    kind: ClassVar[str] = "include_keywords"

    def describe(self) -> str:
        return f"Include the keywords {_quoted_list(self.words, 'and')} in your answer."

    def check(self, text: str) -> Verdict:
        missing = [w for w in self.words if not contains_word(text, w)]
        return self._verdict(not missing, f"missing {_quoted_list(missing, 'and')}" if missing else "")


@dataclass(frozen=True)
class ExcludeWords(_Rule):
    words: tuple[str, ...]
    kind: ClassVar[str] = "exclude_words"

    def describe(self) -> str:
        return f"Do not use the words {_quoted_list(self.words, 'or')} anywhere in your answer."

    def check(self, text: str) -> Verdict:
        used = [w for w in self.words if contains_word(text, w)]
        return self._verdict(not used, f"uses {_quoted_list(used, 'and')}" if used else "")


@dataclass(frozen=True)
class BulletPointsExactly(_Rule):
    n: int
    kind: ClassVar[str] = "bullet_points_exactly"

    def describe(self) -> str:
        return f"Your answer must contain exactly {self.n} bullet points, each a markdown line starting with '- '."

    def check(self, text: str) -> Verdict:
        bullets = len(_BULLET.findall(text))
        return self._verdict(bullets == self.n, f"{bullets} bullet points")


@dataclass(frozen=True)
class ParagraphsExactly(_Rule):
    n: int
    kind: ClassVar[str] = "paragraphs_exactly"

    def describe(self) -> str:
        return f"Write exactly {self.n} paragraphs, separated from each other by a blank line."

    def check(self, text: str) -> Verdict:
        paragraphs = sum(1 for p in _PARAGRAPH_BREAK.split(text.strip()) if p.strip())
        return self._verdict(paragraphs == self.n, f"{paragraphs} paragraphs")


@dataclass(frozen=True)
class AllLowercase(_Rule):
    kind: ClassVar[str] = "all_lowercase"

    def describe(self) -> str:
        return "Your entire answer must be in lowercase letters; no capital letters are allowed."

    def check(self, text: str) -> Verdict:
        upper = next((w for w in text.split() if w != w.lower()), None)
        return self._verdict(upper is None, f"uppercase in {quote(upper or '')!r}")


@dataclass(frozen=True)
class EndsWith(_Rule):
    phrase: str
    kind: ClassVar[str] = "ends_with"

    def describe(self) -> str:
        return f"Finish your answer with the exact phrase '{self.phrase}'. No other words should follow it."

    def check(self, text: str) -> Verdict:
        body = text.strip().strip(_QUOTES).rstrip()
        return self._verdict(body.lower().endswith(self.phrase.strip().lower()),
                             f"ends with {quote(body[-len(self.phrase):])!r}")


@dataclass(frozen=True)
class StartsWith(_Rule):
    phrase: str
    kind: ClassVar[str] = "starts_with"

    def describe(self) -> str:
        return f"Start your answer with the exact phrase '{self.phrase}'."

    def check(self, text: str) -> Verdict:
        body = text.strip().strip(_QUOTES).lstrip()
        return self._verdict(body.lower().startswith(self.phrase.strip().lower()),
                             f"starts with {quote(body[:len(self.phrase)])!r}")


@dataclass(frozen=True)
class JsonObject(_Rule):
    kind: ClassVar[str] = "json_object"

    def describe(self) -> str:
        return "Your entire answer must be a single JSON object; you may wrap it in a ```json code block."

    def check(self, text: str) -> Verdict:
        body = text.strip()
        fenced = _JSON_FENCE.match(body)
        try:
            value = json.loads(fenced.group(1) if fenced else body)
        except json.JSONDecodeError as e:
            return self._verdict(False, f"not valid JSON ({e.msg} at line {e.lineno} column {e.colno})")
        return self._verdict(isinstance(value, dict), f"JSON {type(value).__name__}, not an object")


@dataclass(frozen=True)
class TitleInDoubleAngles(_Rule):
    kind: ClassVar[str] = "title_in_double_angles"

    def describe(self) -> str:
        return "Give your answer a title wrapped in double angular brackets, such as <<poem of joy>>."

    def check(self, text: str) -> Verdict:
        return self._verdict(_TITLE.search(text) is not None, "no <<title>>")


@dataclass(frozen=True)
class NoCommas(_Rule):
    kind: ClassVar[str] = "no_commas"

    def describe(self) -> str:
        return "Do not use any commas in your answer."

    def check(self, text: str) -> Verdict:
        commas = sum(text.count(c) for c in _COMMAS)
        return self._verdict(commas == 0, f"{commas} comma{'s' if commas != 1 else ''}")


Constraint = Union[WordCountAtMost, WordCountAtLeast, IncludeKeywords, ExcludeWords, BulletPointsExactly,
                   ParagraphsExactly, AllLowercase, EndsWith, StartsWith, JsonObject, TitleInDoubleAngles, NoCommas]
KINDS: dict[str, type] = {cls.kind: cls for cls in Constraint.__args__}


# ---- records ----------------------------------------------------------------------------------------------------

def constraint_to_dict(c: Constraint) -> dict:
    """{"kind": "word_count_at_most", "n": 50}; word lists as JSON lists."""
    params = {f.name: list(v) if isinstance(v := getattr(c, f.name), tuple) else v for f in fields(c)}
    return {"kind": c.kind, **params}


def constraint_from_dict(d: dict) -> Constraint:
    """The inverse of constraint_to_dict; a UserError names the kind and the field that is wrong."""
    if not isinstance(d, dict) or d.get("kind") not in KINDS:
        kind = d.get("kind") if isinstance(d, dict) else d
        raise UserError(f"unknown constraint kind {kind!r} (known: {', '.join(KINDS)})")
    cls = KINDS[d["kind"]]
    names = {f.name for f in fields(cls)}
    if unknown := sorted(set(d) - names - {"kind"}):
        raise UserError(f"constraint {d['kind']}: unknown field {unknown[0]!r} (fields: {sorted(names) or 'none'})")
    if missing := sorted(names - set(d)):
        raise UserError(f"constraint {d['kind']}: missing field {missing[0]!r}")
    return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items() if k != "kind"})


# ---- checking ---------------------------------------------------------------------------------------------------

def verify_constraints(text: str, constraints: Sequence[Constraint]) -> Verdict:
    """Passes when `text` satisfies every constraint; the reason names the first that fails."""
    for c in constraints:
        verdict = c.check(text)
        if not verdict.ok:
            return verdict
    return Verdict.passed()


def verify_samples(samples: Sequence[str], constraints: Sequence[Constraint], *,
                   min_pass: int = 1) -> tuple[Verdict, list[int]]:
    """Check several sampled replies to one instruction (the report verifies constraints "over several sampled
    outputs"): the verdict passes when at least min_pass samples satisfy all constraints; also the indices of
    those samples (the ones worth keeping)."""
    if min_pass < 1:
        raise ValueError(f"verify_samples: min_pass must be >= 1, got {min_pass}")
    verdicts = [verify_constraints(s, constraints) for s in samples]
    passing = [i for i, v in enumerate(verdicts) if v.ok]
    if len(passing) >= min_pass:
        return Verdict.passed(), passing
    if not samples:
        return Verdict.failed("no samples"), passing
    first = next(i for i, v in enumerate(verdicts) if not v.ok)
    return Verdict.failed(f"{len(passing)}/{len(samples)} samples pass, need {min_pass} "
                          f"(sample {first}: {verdicts[first].reason})"), passing


# ---- sampling compatible sets -----------------------------------------------------------------------------------

WORDS_AT_MOST = (50, 80, 120, 200, 300)
WORDS_AT_LEAST = (30, 60, 100, 150)  # every pair with at_most is possible; the crossing ones are filtered
BULLETS = (2, 3, 4, 5)
PARAGRAPHS = (2, 3, 4)
EXCLUDE_POOL = ("very", "really", "basically", "actually", "literally", "just", "thing", "stuff", "nice", "good")
START_PHRASES = ("My answer is", "Here is what I found", "To put it simply")
END_PHRASES = ("Is there anything else I can help with?", "Let me know if you have any other questions.",
               "That is all.")
MAX_KEYWORDS = 3
_KEYWORD = re.compile(r"^\w+(?:[ '’-]\w+)*$")  # a word or short phrase, no punctuation that a rule would trip on
# What a JSON-only reply cannot also be: a structured/bulleted text, framed by phrases, or (with 2+ keys) comma-free.
_NOT_WITH_JSON = {"bullet_points_exactly", "paragraphs_exactly", "title_in_double_angles", "starts_with",
                  "ends_with", "no_commas"}


def _texts_in(c: Constraint) -> tuple[str, ...]:
    """The text a reply must contain to satisfy c (keywords, phrases)."""
    if isinstance(c, IncludeKeywords):
        return c.words
    if isinstance(c, (StartsWith, EndsWith)):
        return (c.phrase,)
    return ()


def contradict(a: Constraint, b: Constraint) -> bool:
    """Whether no reply can satisfy both (or the pair makes no sense together: two of one kind)."""
    if a.kind == b.kind:
        return True
    pair = {a.kind, b.kind}
    if pair == {"word_count_at_most", "word_count_at_least"}:
        most, least = (a, b) if isinstance(a, WordCountAtMost) else (b, a)
        return least.n >= most.n
    if "json_object" in pair:
        return bool(pair & _NOT_WITH_JSON)
    for x, y in ((a, b), (b, a)):
        if isinstance(x, ExcludeWords) and any(contains_word(t, w) for t in _texts_in(y) for w in x.words):
            return True
        if isinstance(x, NoCommas) and any(c in t for t in _texts_in(y) for c in _COMMAS):
            return True
        if isinstance(x, WordCountAtMost) and sum(count_words(t) for t in _texts_in(y)) > x.n:
            return True
    return False


def _keyword_pool(keywords: Sequence[str]) -> list[str]:
    pool, seen = [], set()
    for k in keywords:
        k = " ".join(str(k).split())
        if _KEYWORD.match(k) and len(k) >= 3 and k.casefold() not in seen:
            seen.add(k.casefold())
            pool.append(k)
    return pool


def _sample_one(kind: str, rng: random.Random, keyword_pool: list[str]) -> Constraint:
    if kind == "word_count_at_most":
        return WordCountAtMost(rng.choice(WORDS_AT_MOST))
    if kind == "word_count_at_least":
        return WordCountAtLeast(rng.choice(WORDS_AT_LEAST))
    if kind == "include_keywords":
        return IncludeKeywords(tuple(rng.sample(keyword_pool, rng.randint(1, min(MAX_KEYWORDS, len(keyword_pool))))))
    if kind == "exclude_words":
        return ExcludeWords(tuple(rng.sample(EXCLUDE_POOL, rng.randint(1, 3))))
    if kind == "bullet_points_exactly":
        return BulletPointsExactly(rng.choice(BULLETS))
    if kind == "paragraphs_exactly":
        return ParagraphsExactly(rng.choice(PARAGRAPHS))
    if kind == "ends_with":
        return EndsWith(rng.choice(END_PHRASES))
    if kind == "starts_with":
        return StartsWith(rng.choice(START_PHRASES))
    return KINDS[kind]()


def sample_constraints(rng: random.Random, k: int, *, keywords: Sequence[str] = ()) -> list[Constraint]:
    """k constraints of distinct kinds, no two contradicting (`contradict`), drawn with rng (the same rng state
    gives the same set). `keywords` (words or short phrases from the source text) are the include_keywords
    candidates; without usable ones that kind is not drawn, since demanding arbitrary words makes unnatural
    instructions."""
    if k < 0:
        raise ValueError(f"sample_constraints: k must be >= 0, got {k}")
    if k == 0:
        return []
    pool = _keyword_pool(keywords)
    kinds = [kind for kind in KINDS if pool or kind != "include_keywords"]
    if k > len(kinds) - 1:  # json_object excludes six kinds, so all of them never combine
        raise UserError(f"cannot layer {k} compatible constraints: at most {len(kinds) - 1} kinds combine")
    for _ in range(100):  # a greedy pass fails only when an early draw (json_object, tight bounds) blocks k
        order = rng.sample(kinds, len(kinds))
        chosen: list[Constraint] = []
        for kind in order:
            c = _sample_one(kind, rng, pool)
            if not any(contradict(c, other) for other in chosen):
                chosen.append(c)
                if len(chosen) == k:
                    return chosen
    raise UserError(f"could not draw {k} compatible constraints in 100 tries; ask for fewer")

"""What every synthesis track is made of: jobs that ask the model and verify what it says.

A track turns its shipped seeds into Jobs, one per seed item. A job knows up front the variants it produces (so
the ids of its records, so a resumed run can skip it), and its steps are a generator: it yields a list of
Requests (the conversations it needs answered now, asked together), receives the list of AssistantTurns in the
same order, and finally returns one Record per variant, kept or rejected with the verifier's reason:

    def steps():
        turns = yield [Request(messages)]          # one model call
        a, b = yield [Request(m1), Request(m2)]    # two at once
        return [record_a, record_b]

The runner (runner.py) drives many jobs at a time and batches their requests, so tracks never deal with
concurrency, HTTP or files.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass, field
from typing import Callable, Generator, Protocol, Sequence, TypeVar

from minicpm4.apps.chat_backend import AssistantTurn
from minicpm4.data.synth.records import Record, record_id
from minicpm4.data.synth.verdict import Verdict

T = TypeVar("T")


@dataclass(frozen=True)
class Request:
    messages: list[dict]
    tools: list[dict] | None = None
    temperature: float | None = None  # None: the run's --temperature
    sample_index: int = 0  # with --seed, sample i is drawn with seed + i, so n samples are not n copies


JobSteps = Generator[list[Request], list[AssistantTurn], list[Record]]


@dataclass
class Job:
    track: str
    seed: str  # the seed item's id
    variants: tuple[str, ...]
    steps: Callable[["Job"], JobSteps]  # called with the job itself, e.g. functools.partial(track._steps, item=...)

    def start(self) -> JobSteps:
        return self.steps(self)

    @property
    def record_ids(self) -> list[str]:
        return [record_id(self.track, self.seed, v) for v in self.variants]

    def record(self, variant: str, messages: list[dict], verdict: Verdict, tools: list[dict] | None = None,
               **meta) -> Record:
        assert variant in self.variants, f"{self.track} job {self.seed}: variant {variant!r} was not announced"
        return Record(record_id(self.track, self.seed, variant), self.track, messages, verdict.ok, verdict.reason,
                      {"seed": self.seed, "variant": variant, **meta}, tools)


@dataclass
class TrackContext:
    """What the run gives every track: the data seed, how to measure a prompt, and the sampling knobs."""

    data_seed: int = 0
    samples: int = 4  # instruction track: outputs sampled per instruction
    sample_temperature: float | None = None  # None: the run's --temperature
    length: Callable[[str], int] = field(default=lambda text: (len(text) + 3) // 4)
    length_unit: str = "chars/4 estimate"

    def rng(self, track: str, seed: str) -> random.Random:
        """A generator private to one seed item: its draws do not depend on run order, limit or resume."""
        return random.Random(f"{self.data_seed}:{track}:{seed}")


class Track(Protocol):
    name: str

    def jobs(self, limit: int | None) -> list[Job]: ...

    def info(self) -> dict: ...  # facts for the stats file (e.g. the length unit)


def pick(items: Sequence[T], limit: int | None, seed: int, track: str) -> list[T]:
    """The first `limit` seed items (all with None) of a shuffle fixed by the data seed."""
    order = list(items)
    random.Random(f"{seed}:{track}:order").shuffle(order)
    return order if limit is None else order[:limit]


# ---- checks every track shares -----------------------------------------------------------------------------------

REFUSAL = re.compile(r"\b(i'?m sorry|i am sorry|i cannot|i can'?t help|as an ai|i'?m unable|i am unable|"
                     r"i won'?t be able)\b", re.IGNORECASE)
STOPWORDS = frozenset("a an and are as at be by for from in is it of on or that the this to with what which who "
                      "how why when where does do its into your you".split())
_WORD = re.compile(r"[a-z0-9]+")


def words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


def content_words(text: str) -> set[str]:
    return {w for w in words(text) if w not in STOPWORDS and (len(w) >= 3 or w.isdigit())}


def check_reply(text: str, prompt: str, *, min_chars: int = 1, max_chars: int = 100_000,
                what: str = "reply") -> Verdict:
    """Non-empty, not a refusal, not an echo of the prompt, within [min_chars, max_chars]."""
    body = (text or "").strip()
    if not body:
        return Verdict.failed(f"empty {what}")
    if REFUSAL.search(body):
        return Verdict.failed(f"refusal in the {what}")
    flat, flat_prompt = " ".join(words(body)), " ".join(words(prompt))
    if flat and flat in flat_prompt:
        return Verdict.failed(f"{what} echoes the prompt")
    if len(body) < min_chars:
        return Verdict.failed(f"{what} too short: {len(body)} < {min_chars} characters")
    if len(body) > max_chars:
        return Verdict.failed(f"{what} too long: {len(body)} > {max_chars} characters")
    return Verdict.passed()


def reply_text(turn: AssistantTurn) -> str:
    """What the model said, as text: its content, else the raw reply."""
    return (turn.content if turn.content is not None else turn.text or "").strip()


def user(content: str) -> dict:
    return {"role": "user", "content": content}


def assistant(content: str) -> dict:
    return {"role": "assistant", "content": content}

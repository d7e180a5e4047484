"""A real instruction set for SFT, synthesised from the corpus sources, with a held-out split by KEY.

Output (`minicpm4 data build-sft --out build/data/sft`): train.jsonl and heldout.jsonl, one object per
line, {"messages": [{"role": "user", ...}, {"role": "assistant", ...}], "task": ..., "key": ...}, plus
stats.json. Tasks (several phrasings each, picked by a hash of the key, so the model must generalise
over wording):

| task            | key               | question -> answer                                     | source   |
|-----------------|-------------------|--------------------------------------------------------|----------|
| definition      | word              | "What does 'bank' mean?" -> up to 3 WordNet senses     | wordnet  |
| synonym         | word              | "Another word for 'bank'?" -> the synset's other words | wordnet  |
| usage           | word              | "Use 'bank' in a sentence." -> WordNet's example       | wordnet  |
| verse           | "John 11:35"      | "What does John 11:35 say?" -> the KJV text            | bible    |
| verse_reference | "John 11:35"      | "Where is 'Jesus wept.'?" -> "John 11:35"              | bible    |
| computing       | term              | "In computing, what is X?" -> first FOLDOC/Jargon paragraph | foldoc, jargon |
| devil           | word              | "How does Bierce define X?" -> The Devil's Dictionary  | devil    |

Held-out split (what the acceptance test needs: better answers on words the SFT never showed):
- A key is held out when a hash of its namespace ("word:bank", "verse:John 11:35") falls below
  `heldout_fraction`; ALL tasks on that key are then held out, so "bank" is asked about in heldout.jsonl
  only, never in a train question.
- No train ANSWER contains a held-out fact either: train rows whose answer uses a gloss or verse text of
  any held-out row are dropped ("automobile" shares its gloss with a held-out "car").
- With `corpus_dir`, a held-out row is kept only if the document that holds its answer is in the corpus
  TRAIN split. Held-out definitions are therefore in the pretraining data, on purpose: the dictionary IS
  the corpus, and SFT teaches the model to retrieve, in chat form, what it read in pretraining. The
  evaluation measures that retrieval on questions it was never tuned on, not memorisation of new facts.
"""

from __future__ import annotations

import hashlib
import json
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

from minicpm4.io import write_text_atomic
from minicpm4.data.corpus import iter_corpus
from minicpm4.data.sources import SourcePaths, Verse, WordEntry, bible_verses, dictd_entries, wordnet_entries

SFT_SPLITS = ("train", "heldout")
MAX_ANSWER_CHARS = 600  # ~150-250 tokens at 3-4 bytes per token: a row stays well inside 512 tokens

TEMPLATES: dict[str, tuple[str, ...]] = {
    "definition": (
        'What does "{k}" mean?', "What is the meaning of the word {k}?", "Define {k}.",
        'Give me a definition of "{k}".', "{k}: what does that word mean?", "Can you explain what {k} means?",
        'I came across the word "{k}". What does it mean?', "Meaning of {k}?",
        'Explain the word "{k}" in plain English.', "What is the dictionary definition of {k}?"),
    "synonym": (
        "What is another word for {k}?", 'Give me a synonym of "{k}".', "Which words mean the same as {k}?",
        "Suggest a synonym for {k}.", 'What word could I use instead of "{k}"?'),
    "usage": (
        'Use the word "{k}" in a sentence.', "Give me an example sentence with {k}.",
        'How is "{k}" used? Show an example.', "Write a sentence containing the word {k}."),
    "verse": (
        "What does {k} say?", "Quote {k} from the King James Bible.", "Recite {k} (KJV).",
        "What is the text of {k}?", "Give me the verse {k}.", "How does {k} read in the King James Version?"),
    "verse_reference": (
        'Where in the Bible is this verse: "{q}"', 'Which book, chapter and verse says: "{q}"',
        'Give the reference of this King James verse: "{q}"', 'What is the reference of "{q}"?'),
    "computing": (
        "In computing, what is {k}?", 'What does "{k}" mean in computing?', 'Explain the computing term "{k}".',
        "What is {k}? Answer as a computer dictionary would.", 'Hacker and computer jargon: what is "{k}"?'),
    "devil": (
        'How does Ambrose Bierce\'s Devil\'s Dictionary define "{k}"?',
        "What is The Devil's Dictionary definition of {k}?", "Give me Bierce's cynical definition of {k}.",
        'In The Devil\'s Dictionary, what is "{k}"?'),
}
TASKS = tuple(TEMPLATES)


@dataclass(frozen=True)
class Example:
    task: str
    key: str  # the word (as WordNet spells it) or the verse reference
    question: str
    answer: str
    doc: tuple[str, str]  # (source, title) of the corpus document that holds the answer
    facts: frozenset[str]  # answer pieces that must not reach train from a held-out key

    @property
    def namespace(self) -> str:
        return f"verse:{self.key}" if self.task.startswith("verse") else f"word:{self.key.lower()}"

    def row(self) -> dict:
        messages = [{"role": "user", "content": self.question}, {"role": "assistant", "content": self.answer}]
        return {"messages": messages, "task": self.task, "key": self.key}


def _unit(text: str) -> float:
    """A stable number in [0, 1) for `text` (Python's hash() is salted per process)."""
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "big") / 2**64


def _ask(task: str, key: str, **fields: str) -> str:
    templates = TEMPLATES[task]
    return templates[int(_unit(f"template:{task}:{key}") * len(templates))].format(k=key, **fields)


def _shorten(text: str, limit: int = MAX_ANSWER_CHARS) -> str | None:
    """`text` cut at the last sentence end within `limit` characters; None when there is none."""
    if len(text) <= limit:
        return text
    cut = max(text.rfind(". ", 0, limit), text.rfind("? ", 0, limit), text.rfind("! ", 0, limit))
    return text[: cut + 1] if cut > limit // 4 else None


# ---- examples per source --------------------------------------------------------------------------------

_WORD = re.compile(r"[a-z][a-z'-]*(?: [a-z][a-z'-]*)*")


def word_examples(entries: Sequence[WordEntry]) -> Iterator[Example]:
    """definition / synonym / usage rows for common (not proper) WordNet words of 3+ letters."""
    for entry in entries:
        senses = [s for s in entry.senses if not s.proper and len(s.definition) >= 10]
        word = entry.lemma
        if not senses or not _WORD.fullmatch(word) or len(word) < 3:
            continue
        doc = ("wordnet", word)
        shown = senses[:3]
        if len(shown) == 1:
            answer = f"{word} ({shown[0].pos}): {shown[0].definition}."
        else:
            numbered = (f"{i}. ({s.pos}) {s.definition}." for i, s in enumerate(shown, 1))
            answer = f"{word} can mean:\n" + "\n".join(numbered)
        yield Example("definition", word, _ask("definition", word), answer, doc,
                      frozenset(s.definition for s in shown))
        with_synonyms = next((s for s in senses if s.synonyms), None)
        if with_synonyms is not None:
            s = with_synonyms
            answer = f'In the sense "{s.definition}" ({s.pos}), {word} can be replaced by: {", ".join(s.synonyms[:6])}.'
            yield Example("synonym", word, _ask("synonym", word), answer, doc, frozenset([s.definition]))
        # WordNet examples belong to the synset and may use a synonym instead; keep one that uses the word
        # (at a word start, so inflections count: "banked" for "bank", but not "art" inside "start").
        starts = re.compile(rf"\b{re.escape(word)}")
        used = next(((s, e) for s in senses for e in s.examples if starts.search(e.lower())), None)
        if used is not None:
            s, example = used
            article = "an" if s.pos[0] in "aeiou" else "a"
            answer = f'"{example}" (here {word} is {article} {s.pos} meaning: {s.definition}.)'
            yield Example("usage", word, _ask("usage", word), answer, doc, frozenset([s.definition, example]))


def verse_examples(verses: Sequence[Verse]) -> Iterator[Example]:
    """verse rows for every verse; verse_reference rows only for verses whose text is unique and long
    enough (40+ characters) to point at one place."""
    seen: dict[str, int] = {}
    for v in verses:
        seen[v.text] = seen.get(v.text, 0) + 1
    for v in verses:
        doc, facts = ("bible", f"{v.book} {v.chapter}"), frozenset([v.text])
        yield Example("verse", v.ref, _ask("verse", v.ref), v.text, doc, facts)
        if seen[v.text] == 1 and len(v.text) >= 40 and len(v.text) <= MAX_ANSWER_CHARS:
            yield Example("verse_reference", v.ref, _ask("verse_reference", v.ref, q=v.text), v.ref, doc, facts)


def _first_paragraph(text: str) -> str | None:
    """The first paragraph of a dictd entry that reads as prose (after the headword and label lines)."""
    paragraphs = [p.replace("\n", " ").strip() for p in text.split("\n\n")[1:]]  # [0] = headword lines
    for p in paragraphs:
        p = re.sub(r"^<[^<>]{1,60}>\s*", "", p)  # FOLDOC's "<language, humour>" domain tag
        if len(p) >= 40 and sum(c.isalpha() for c in p) > len(p) / 2:
            return _shorten(p)
    return None


def dictionary_examples(entries: Sequence[tuple[str, str, str]]) -> Iterator[Example]:
    """computing rows from (source, headword, text) of FOLDOC/Jargon, devil rows from The Devil's Dictionary."""
    for source, headword, text in entries:
        term = text.split("\n", 1)[0].strip() or headword  # spelled as the entry spells it ("JOVIAL")
        if source == "devil":
            term = headword  # Bierce capitalises every headword ("OPTIMISM, n."); ask in lower case
            body = _shorten(re.sub(r"\s*\n\s*", " ", text).strip())
            task = "devil"
        else:
            body = _first_paragraph(text)
            body = body and f"{term}: {body}"
            task = "computing"
        if body and len(term) >= 2:
            yield Example(task, term, _ask(task, term), body, (source, headword), frozenset([body]))


# ---- the builder ----------------------------------------------------------------------------------------

@dataclass
class SFTConfig:
    out_dir: Path
    heldout_fraction: float = 0.05
    max_train_per_task: int = 20_000
    max_heldout_per_task: int = 1_000
    corpus_dir: Path | None = None  # keep held-out rows whose answer document is in corpus/train.jsonl
    tokenizer_dir: Path | None = None  # measure chat lengths and drop rows over max_tokens
    max_tokens: int = 512
    tasks: tuple[str, ...] = TASKS
    paths: SourcePaths = field(default_factory=SourcePaths)

    def __post_init__(self) -> None:
        if not 0.0 < self.heldout_fraction < 1.0:
            raise ValueError(f"heldout_fraction must be in (0, 1), got {self.heldout_fraction}")
        unknown = [t for t in self.tasks if t not in TASKS]
        if unknown:
            raise ValueError(f"tasks: unknown {', '.join(unknown)} (choose from {', '.join(TASKS)})")
        for name in ("max_train_per_task", "max_heldout_per_task", "max_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")


def all_examples(tasks: Sequence[str], paths: SourcePaths) -> list[Example]:
    examples: list[Example] = []
    if {"definition", "synonym", "usage"} & set(tasks):
        examples += word_examples(list(wordnet_entries(paths)))
    if {"verse", "verse_reference"} & set(tasks):
        examples += verse_examples(list(bible_verses(paths)))
    wanted = [("foldoc", "computing"), ("jargon", "computing"), ("devil", "devil")]
    entries = [(src, h, t) for src, task in wanted if task in tasks for h, t in dictd_entries(src, paths)]
    examples += dictionary_examples(entries)
    # One row per (task, key): FOLDOC and the Jargon File both define "bogus"; the first source wins.
    unique: dict[tuple[str, str], Example] = {}
    for e in examples:
        if e.task in tasks:
            unique.setdefault((e.task, e.namespace), e)
    return list(unique.values())


def split_examples(examples: Sequence[Example], config: SFTConfig,
                   corpus_train: set[tuple[str, str]] | None = None) -> tuple[dict[str, list[Example]], dict]:
    """Assign each example to train or heldout by its key, drop leaks and cap per task (see module doc)."""
    heldout_keys = {e.namespace for e in examples if _unit(e.namespace) < config.heldout_fraction}
    heldout_facts = frozenset().union(*(e.facts for e in examples if e.namespace in heldout_keys))
    counts = {t: {"candidates": 0, "heldout_not_in_corpus": 0, "train_fact_leak": 0, "capped": 0}
              for t in config.tasks}
    chosen: dict[str, dict[str, list[Example]]] = {sp: {t: [] for t in config.tasks} for sp in SFT_SPLITS}
    for e in sorted(examples, key=lambda e: _unit(f"order:{e.task}:{e.key}")):  # deterministic sample order
        c = counts[e.task]
        c["candidates"] += 1
        if e.namespace in heldout_keys:
            if corpus_train is not None and e.doc not in corpus_train:
                c["heldout_not_in_corpus"] += 1
                continue
            split, cap = "heldout", config.max_heldout_per_task
        else:
            if e.facts & heldout_facts:
                c["train_fact_leak"] += 1
                continue
            split, cap = "train", config.max_train_per_task
        if len(chosen[split][e.task]) >= cap:
            c["capped"] += 1
            continue
        chosen[split][e.task].append(e)
    train_keys = {e.namespace for rows in chosen["train"].values() for e in rows}
    held_keys = {e.namespace for rows in chosen["heldout"].values() for e in rows}
    assert not train_keys & held_keys, f"held-out keys leaked into train: {sorted(train_keys & held_keys)[:5]}"
    out = {sp: sorted((e for rows in chosen[sp].values() for e in rows), key=lambda e: _unit(f"row:{e.task}:{e.key}"))
           for sp in SFT_SPLITS}
    return out, counts


def _token_lengths(rows: list[Example], tokenizer_dir: Path) -> list[int]:
    from minicpm4.tokenizer import Tokenizer

    tok = Tokenizer.from_pretrained(tokenizer_dir)
    return [len(tok.encode_chat(e.row()["messages"], add_generation_prompt=False)) for e in rows]


def build_sft(config: SFTConfig) -> dict:
    """Write config.out_dir/{train,heldout}.jsonl and stats.json; return the stats."""
    start = time.perf_counter()
    corpus_train = None
    if config.corpus_dir is not None:
        corpus_train = {(d.source, d.title) for d in iter_corpus(config.corpus_dir, "train")}
    splits, counts = split_examples(all_examples(config.tasks, config.paths), config, corpus_train)
    lengths: dict[str, dict] = {}
    if config.tokenizer_dir is not None:
        for sp in SFT_SPLITS:
            n = _token_lengths(splits[sp], config.tokenizer_dir)
            kept = [e for e, k in zip(splits[sp], n) if k <= config.max_tokens]
            over, splits[sp] = len(splits[sp]) - len(kept), kept
            n = sorted(k for k in n if k <= config.max_tokens)
            lengths[sp] = {"over_max_tokens_dropped": over, "max": n[-1] if n else 0,
                           "mean": round(sum(n) / max(len(n), 1), 1), "p99": n[int(0.99 * (len(n) - 1))] if n else 0}
    out = Path(config.out_dir)
    for sp in SFT_SPLITS:
        text = "".join(json.dumps(e.row(), ensure_ascii=False) + "\n" for e in splits[sp])
        write_text_atomic(out / f"{sp}.jsonl", text)
    stats = {
        "heldout_fraction": config.heldout_fraction,
        "max_train_per_task": config.max_train_per_task,
        "max_heldout_per_task": config.max_heldout_per_task,
        "heldout_requires_corpus_train_doc": corpus_train is not None,
        "rows": {sp: {t: sum(e.task == t for e in splits[sp]) for t in config.tasks} for sp in SFT_SPLITS},
        "dropped": counts,
        "chat_tokens": lengths or None,
        "seconds": round(time.perf_counter() - start, 1),
    }
    write_text_atomic(out / "stats.json", json.dumps(stats, indent=2) + "\n")
    return stats

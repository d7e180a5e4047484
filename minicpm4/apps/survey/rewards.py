"""Rule-based survey rewards of MINICPM4.md §9.1's table, each in [0, 1].

The report names the rules, not their thresholds; ours are:
- structure rationality: the fraction of these checks that pass: a title; an abstract; an introduction;
  at least two sections; every section has a heading of its own (not the "Section i" fallback); no two
  sections share a heading; no section has exactly one subsection (split in two or none); a conclusion.
  The section checks fail when there is no section: an empty survey scores 0.
- section length: per part (abstract, introduction, each section with its subsections, conclusion) 1 inside
  its word range, words/low below it, high/words above it; the mean over parts (0 with nothing written).
- language (English only): the share of sentences of 4+ words that read as English: at least 90% of their
  letters are ASCII and at least one word is a common English function word. 0 with no such sentence.
- citation hallucination: the share of the ids the model cited over the run that were among the papers
  retrieved by then (the loop removed the others and counted them); 0 when nothing was cited (a survey
  without citations earns no citation reward).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from minicpm4.apps.survey.state import Survey

WORD_RANGES = {"abstract": (50, 300), "introduction": (100, 1000), "section": (150, 2000), "conclusion": (50, 600)}
_FUNCTION_WORDS = frozenset(
    "the a an of and or to in on for with by from as is are was were be been this that these those it its "
    "which who we our they their not but can may than such into".split())
_WORD = re.compile(r"[^\W\d_]+", re.U)
_SENTENCE = re.compile(r"(?<=[.!?])\s+")


@dataclass
class RuleScores:
    structure: float
    section_length: float
    language: float
    citation: float
    cited: int  # distinct papers cited in the final text
    hallucinated: int  # cited ids removed during the run
    failed_checks: list[str] = field(default_factory=list)
    words: int = 0

    @property
    def mean(self) -> float:
        return (self.structure + self.section_length + self.language + self.citation) / 4


def structure_score(s: Survey) -> tuple[float, list[str]]:
    headings = [sec.heading for sec in s.sections]
    checks = {
        "a title": bool(s.title),
        "an abstract": bool(s.abstract),
        "an introduction": bool(s.introduction),
        "at least two sections": len(s.sections) >= 2,
        "every section has its own heading": bool(s.sections) and all(
            h != f"Section {i}" for i, h in enumerate(headings, 1)),
        "distinct section headings": bool(headings) and len({h.lower() for h in headings}) == len(headings),
        "no section with a single subsection": bool(s.sections) and all(
            len(sec.subsections) != 1 for sec in s.sections),
        "a conclusion": bool(s.conclusion),
    }
    failed = [name for name, ok in checks.items() if not ok]
    return 1 - len(failed) / len(checks), failed


def words(text: str) -> int:
    return len(_WORD.findall(text))


def _range_score(n: int, low: int, high: int) -> float:
    if n < low:
        return n / low
    return 1.0 if n <= high else high / n


def length_score(s: Survey) -> float:
    parts = []
    for kind in ("abstract", "introduction", "conclusion"):
        if getattr(s, kind):
            parts.append((kind, getattr(s, kind)))
    for sec in s.sections:
        parts.append(("section", "\n".join([sec.body] + [u.body for u in sec.subsections])))
    if not parts:
        return 0.0
    return sum(_range_score(words(t), *WORD_RANGES[k]) for k, t in parts) / len(parts)


def is_english(sentence: str) -> bool:
    letters = [c for c in sentence if c.isalpha()]
    if not letters:
        return True
    ascii_share = sum(c.isascii() for c in letters) / len(letters)
    return ascii_share >= 0.9 and any(w.lower() in _FUNCTION_WORDS for w in _WORD.findall(sentence))


def language_score(s: Survey) -> float:
    sentences = [x for _, t in s.texts() for x in _SENTENCE.split(t) if words(x) >= 4]
    if not sentences:
        return 0.0
    return sum(is_english(x) for x in sentences) / len(sentences)


def rule_scores(s: Survey) -> RuleScores:
    structure, failed = structure_score(s)
    kept, dropped = s.kept_citations, len(s.dropped_citations)
    citation = kept / (kept + dropped) if kept + dropped else 0.0
    return RuleScores(structure, length_score(s), language_score(s), citation, len(s.cited()), dropped, failed,
                      sum(words(t) for _, t in s.texts()))

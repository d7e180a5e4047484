"""The survey being written: its positions, their contents, the retrieved papers and the citation bookkeeping.

Positions (MINICPM4.md §9.1): "title", "abstract", "introduction", "section-i", "section-i/subsection-j",
"conclusion". A section or subsection takes its heading from the first line of its content when that line is
a Markdown heading ("## Heading"); sections are numbered from 1 without gaps (section-3 needs section-2).

Citations are `\\cite{id1,id2}`. An id that is not among the papers retrieved so far is a hallucination: it is
dropped from the text when the update is applied and counted, so every citation in the finished survey
resolves to a retrieved paper.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from minicpm4.apps.survey.kb import Paper

SINGLE_POSITIONS = ("title", "abstract", "introduction", "conclusion")
_SECTION = re.compile(r"^section-(\d+)(?:/subsection-(\d+))?$")
CITE = re.compile(r"\\cite[tp]?\{([^}]*)\}")
_SPACED_CITE = re.compile(r"([ \t]?)\\cite[tp]?\{([^}]*)\}")
_HEADING = re.compile(r"^\s*#{1,6}\s*(.+?)\s*#*\s*$")


@dataclass
class Part:
    """A section or subsection."""
    heading: str
    body: str


@dataclass
class Section(Part):
    subsections: list[Part] = field(default_factory=list)


def split_heading(content: str, fallback: str) -> Part:
    lines = content.strip().split("\n", 1)
    m = _HEADING.match(lines[0]) if lines[0] else None
    if m:
        return Part(m.group(1), lines[1].strip() if len(lines) > 1 else "")
    return Part(fallback, content.strip())


def citation_ids(text: str) -> list[str]:
    """Every cited id, in order, with repeats."""
    return [i.strip() for group in CITE.findall(text) for i in group.split(",") if i.strip()]


@dataclass
class CitationCheck:
    text: str
    kept: list[str]
    dropped: list[str]


def resolve_citations(text: str, known: set[str] | dict) -> CitationCheck:
    """Drop cited ids not in `known`; a \\cite left empty disappears with the space before it."""
    kept: list[str] = []
    dropped: list[str] = []

    def one(m: re.Match) -> str:
        ids = [i.strip() for i in m.group(2).split(",") if i.strip()]
        good = [i for i in ids if i in known]
        kept.extend(good)
        dropped.extend(i for i in ids if i not in known)
        return m.group(1) + "\\cite{" + ",".join(good) + "}" if good else ""

    return CitationCheck(_SPACED_CITE.sub(one, text), kept, dropped)


@dataclass
class Survey:
    topic: str
    title: str = ""
    abstract: str = ""
    introduction: str = ""
    sections: list[Section] = field(default_factory=list)
    conclusion: str = ""
    retrieved: dict[str, Paper] = field(default_factory=dict)  # id -> paper, in retrieval order
    dropped_citations: list[str] = field(default_factory=list)  # hallucinated ids, over the whole run
    kept_citations: int = 0  # cited ids that resolved, over the whole run (rewritten text included)
    updates: int = 0

    def add_papers(self, papers: list[Paper]) -> list[Paper]:
        """Record retrieved papers; returns those not seen before."""
        new = [p for p in papers if p.id not in self.retrieved]
        for p in new:
            self.retrieved[p.id] = p
        return new

    def apply(self, position: str, content: str) -> str | None:
        """Write `content` at `position`; returns a problem message instead when the position is invalid."""
        position = position.strip().lower().replace(" ", "")
        check = resolve_citations(content, self.retrieved)
        text = check.text
        if position in SINGLE_POSITIONS:
            setattr(self, position, text.strip() if position != "title" else text.strip().lstrip("# ").strip())
        else:
            m = _SECTION.match(position)
            if m is None:
                return (f"unknown position {position!r}: use title, abstract, introduction, section-i, "
                        "section-i/subsection-j or conclusion")
            i, j = int(m.group(1)), m.group(2) and int(m.group(2))
            if not 1 <= i <= len(self.sections) + 1:
                return f"{position}: write section-{len(self.sections) + 1} first (sections are numbered 1, 2, ...)"
            if j is None:
                part = split_heading(text, f"Section {i}")
                if i == len(self.sections) + 1:
                    self.sections.append(Section(part.heading, part.body))
                else:
                    self.sections[i - 1].heading, self.sections[i - 1].body = part.heading, part.body
            else:
                if i == len(self.sections) + 1:
                    return f"{position}: write section-{i} before its subsections"
                subs = self.sections[i - 1].subsections
                if not 1 <= j <= len(subs) + 1:
                    return f"{position}: write section-{i}/subsection-{len(subs) + 1} first"
                part = split_heading(text, f"Subsection {i}.{j}")
                if j == len(subs) + 1:
                    subs.append(part)
                else:
                    subs[j - 1] = part
        self.dropped_citations += check.dropped
        self.kept_citations += len(check.kept)
        self.updates += 1
        return None

    def texts(self) -> list[tuple[str, str]]:
        """(position, text) of everything written, in reading order."""
        out = [(p, getattr(self, p)) for p in ("title", "abstract", "introduction") if getattr(self, p)]
        for i, s in enumerate(self.sections, 1):
            out.append((f"section-{i}", s.body))
            out += [(f"section-{i}/subsection-{j}", sub.body) for j, sub in enumerate(s.subsections, 1)]
        if self.conclusion:
            out.append(("conclusion", self.conclusion))
        return out

    def cited(self) -> list[str]:
        """Cited ids in order of first citation."""
        seen: dict[str, None] = {}
        for _, text in self.texts():
            for i in citation_ids(text):
                seen.setdefault(i, None)
        return list(seen)

    def outline(self, body_chars: int = 160) -> str:
        """The draft as the model sees it each step: every position with the start of its text."""
        def short(text: str) -> str:
            text = " ".join(text.split())
            return text if len(text) <= body_chars else text[:body_chars] + "…"

        lines = [f"title: {self.title or '(empty)'}",
                 f"abstract: {short(self.abstract) or '(empty)'}",
                 f"introduction: {short(self.introduction) or '(empty)'}"]
        for i, s in enumerate(self.sections, 1):
            lines.append(f"section-{i} [{s.heading}]: {short(s.body) or '(empty)'}")
            lines += [f"section-{i}/subsection-{j} [{sub.heading}]: {short(sub.body) or '(empty)'}"
                      for j, sub in enumerate(s.subsections, 1)]
        lines.append(f"conclusion: {short(self.conclusion) or '(empty)'}")
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return {"topic": self.topic, "title": self.title, "abstract": self.abstract,
                "introduction": self.introduction, "conclusion": self.conclusion,
                "sections": [{"heading": s.heading, "body": s.body,
                              "subsections": [{"heading": u.heading, "body": u.body} for u in s.subsections]}
                             for s in self.sections],
                "retrieved": [vars(p) for p in self.retrieved.values()],
                "dropped_citations": self.dropped_citations, "kept_citations": self.kept_citations,
                "updates": self.updates}

    @classmethod
    def from_dict(cls, d: dict) -> "Survey":
        return cls(topic=d["topic"], title=d["title"], abstract=d["abstract"], introduction=d["introduction"],
                   conclusion=d["conclusion"],
                   sections=[Section(s["heading"], s["body"], [Part(u["heading"], u["body"]) for u in s["subsections"]])
                             for s in d["sections"]],
                   retrieved={p["id"]: Paper(**p) for p in d["retrieved"]},
                   dropped_citations=list(d["dropped_citations"]), kept_citations=d["kept_citations"],
                   updates=d["updates"])

"""Track 1, knowledge (MINICPM4.md §8.3): practice QA per knowledge point, with instruction evolution (the
question rewritten in another style) and answer-diversity evolution (a second, different answer).

Knowledge points are the entries of a knowledge base ({"id", "title", "abstract"}; default: the shipped
survey KB of computing terms, minicpm4/assets/survey-kb/kb.jsonl). Per point, three records:

  qa             the model writes "Question: ... / Answer: ..." from the point
  style-<style>  that question rewritten as multiple-choice | fill-in-the-blank | short-answer |
                 explain-to-a-child (one style per point, drawn per point), then answered
  answer2        the original question answered again, differently from the first answer

Verification: the reply parses; the question is about the point (shares a content word with its title; else
every variant, all derived from it, is rejected);
answers are within length bounds and are neither refusals nor echoes; an evolved question has its style's
marks (options A-D, a blank); a second answer differs from the first (near copies also fall to dedup).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import partial
from pathlib import Path

from minicpm4.data.synth.track import (Job, JobSteps, Request, TrackContext, assistant, check_reply, content_words,
                                       pick, reply_text, user, words)
from minicpm4.data.synth.verdict import Verdict, quote

KB_PATH = Path(__file__).resolve().parents[2] / "assets" / "survey-kb" / "kb.jsonl"
STYLES = {
    "multiple-choice": "a multiple-choice question with four options labelled A), B), C) and D)",
    "fill-in-the-blank": "a fill-in-the-blank sentence, with the missing term written as ____",
    "short-answer": "a short-answer question that can be answered in one or two sentences",
    "explain-to-a-child": "a question a curious ten-year-old child would ask",
}
_QA = re.compile(r"question\s*[:：]\s*(?P<q>.+?)\s*\n\s*(?:\*\*)?answer\s*[:：]\s*(?P<a>.+)", re.IGNORECASE | re.DOTALL)
_OPTIONS = re.compile(r"(?:^|\s|\()([A-Da-d])[).:]\s")
_BLANK = re.compile(r"_{3,}|\bblank\b", re.IGNORECASE)


@dataclass
class KnowledgeConfig:
    kb_path: Path = KB_PATH
    min_answer_chars: int = 10
    max_answer_chars: int = 3000
    max_abstract_chars: int = 1500  # the point as shown to the model; KB abstracts are ~300-1000 characters


def parse_qa(text: str) -> tuple[str, str] | None:
    m = _QA.search(text or "")
    if not m:
        return None
    q, a = m.group("q").strip(" *"), m.group("a").strip(" *")
    return (q, a) if q and a else None


def relates_to(text: str, title: str) -> bool:
    """Whether text is about the point: it shares a content word with the title (or, for a title without one,
    such as "C", contains the title as a word)."""
    keys = content_words(title)
    if not keys:
        return title.lower() in words(text)
    return bool(keys & content_words(text))


def check_style(question: str, style: str) -> Verdict:
    if style == "multiple-choice" and len({m.upper() for m in _OPTIONS.findall(question)}) < 2:
        return Verdict.failed("multiple-choice question without labelled options")
    if style == "fill-in-the-blank" and not _BLANK.search(question):
        return Verdict.failed("fill-in-the-blank question without a blank")
    return Verdict.passed()


class KnowledgeTrack:
    name = "knowledge"

    def __init__(self, ctx: TrackContext, config: KnowledgeConfig | None = None) -> None:
        from minicpm4.apps.survey.kb import load_kb

        self.ctx, self.config = ctx, config or KnowledgeConfig()
        self.points = load_kb(self.config.kb_path)

    def info(self) -> dict:
        return {"kb": str(self.config.kb_path), "points": len(self.points), "styles": list(STYLES)}

    def jobs(self, limit: int | None) -> list[Job]:
        out = []
        for p in pick(self.points, limit, self.ctx.data_seed, self.name):
            style = self.ctx.rng(self.name, p.id).choice(sorted(STYLES))
            out.append(Job(self.name, p.id, ("qa", f"style-{style}", "answer2"),
                           partial(self._steps, point=p, style=style)))
        return out

    def _check_answer(self, answer: str, question: str) -> Verdict:
        c = self.config
        return check_reply(answer, question, min_chars=c.min_answer_chars, max_chars=c.max_answer_chars,
                           what="answer")

    def _steps(self, job: Job, point, style: str) -> JobSteps:
        abstract = point.abstract[: self.config.max_abstract_chars]
        prompt = (f"Knowledge point: {point.title}\n{abstract}\n\nWrite one practice question that tests this "
                  "knowledge point, and its answer. Reply in exactly this format:\n"
                  "Question: <the question>\nAnswer: <the answer>")
        [turn] = yield [Request([user(prompt)])]
        raw = reply_text(turn)
        parsed = parse_qa(raw)
        if parsed is None:
            why = Verdict.failed(f"reply not in the Question/Answer format: {quote(raw)!r}" if raw else "empty reply")
            return [job.record(v, [user(prompt), assistant(raw)], why, title=point.title) for v in job.variants]
        question, answer = parsed
        meta = {"title": point.title}
        if not relates_to(question, point.title) and not relates_to(answer, point.title):
            # every variant derives from this question: none of them is about the point either
            why = Verdict.failed(f"question not about {quote(point.title)!r}")
            return [job.record(v, [user(question), assistant(answer)], why, **meta) for v in job.variants]
        verdict = self._check_answer(answer, question)
        borderline = {} if relates_to(question, point.title) or not verdict.ok else {
            "borderline": "the title is named in the answer only"}
        qa = job.record("qa", [user(question), assistant(answer)], verdict, **meta, **borderline)

        rewrite = (f"Rewrite this question as {STYLES[style]}. Keep it about {point.title}. Reply with the "
                   f"rewritten question only.\n\nQuestion: {question}")
        again = [user(f"{question}\n\nAnswer this question in a different way from this earlier answer, "
                      f"with other words and another angle:\n{answer}")]
        evolved_turn, second_turn = yield [Request([user(rewrite)]), Request(again)]

        second = reply_text(second_turn)
        v2 = self._check_answer(second, question)
        if v2.ok and " ".join(words(second)) == " ".join(words(answer)):
            v2 = Verdict.failed("second answer repeats the first")
        answer2 = job.record("answer2", [user(question), assistant(second)], v2, **meta,
                             evolution="answer-diversity")

        evolved = re.sub(r"^(?:rewritten\s+)?question\s*[:：]\s*", "", reply_text(evolved_turn), flags=re.I).strip()
        v3 = check_reply(evolved, rewrite, what="rewritten question")
        if v3.ok:
            v3 = check_style(evolved, style)
        if v3.ok and not relates_to(evolved, point.title):
            v3 = Verdict.failed(f"rewritten question not about {quote(point.title)!r}")
        variant = f"style-{style}"
        if not v3.ok:
            return [qa, answer2, job.record(variant, [user(rewrite), assistant(evolved)], v3, **meta, style=style)]
        [evolved_answer_turn] = yield [Request([user(evolved)])]
        evolved_answer = reply_text(evolved_answer_turn)
        v4 = self._check_answer(evolved_answer, evolved)
        styled = job.record(variant, [user(evolved), assistant(evolved_answer)], v4, **meta, style=style,
                            evolution="instruction", original_question=question)
        return [qa, answer2, styled]

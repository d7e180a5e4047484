"""LLM-judge scores of a survey (MINICPM4.md §9.1: relevance, coverage, depth, novelty, 1-5 as in SurveyEval),
asked of any chat backend — an OpenAI-compatible endpoint (`--judge-base-url`) or a local model.

One request per criterion, greedy, the survey's Markdown cut to `max_chars`; the first integer 1-5 of the reply
is the score. A reply without one is kept as None and reported, not guessed.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from minicpm4.apps.chat_backend import ChatBackend, Sampling

CRITERIA = {
    "relevance": "How well does the survey stay focused on the topic?",
    "coverage": "How broadly does it cover the main aspects and work on the topic?",
    "depth": "How deep and specific is its analysis, beyond listing work?",
    "novelty": "Does it bring new perspectives, connections or future directions?",
}
_SCORE = re.compile(r"\b([1-5])\b")


@dataclass
class JudgeScore:
    criterion: str
    score: int | None
    reply: str


def judge_prompt(topic: str, survey_markdown: str, criterion: str, max_chars: int) -> list[dict]:
    text = survey_markdown if len(survey_markdown) <= max_chars else survey_markdown[:max_chars] + "\n[…cut]"
    return [{"role": "system", "content": "You are an expert reviewer of scientific literature surveys."},
            {"role": "user", "content": f"Topic: {topic}\n\nSurvey:\n{text}\n\n{criterion.capitalize()}: "
                                        f"{CRITERIA[criterion]}\nRate it from 1 (poor) to 5 (excellent). "
                                        "Answer with the number only."}]


def parse_score(reply: str) -> int | None:
    m = _SCORE.search(reply)
    return int(m.group(1)) if m else None


def judge(backend: ChatBackend, topic: str, survey_markdown: str, max_chars: int = 12000,
          max_tokens: int = 16) -> list[JudgeScore]:
    prompts = [judge_prompt(topic, survey_markdown, c, max_chars) for c in CRITERIA]
    turns = backend.complete_batch(prompts, None, Sampling(max_tokens=max_tokens, temperature=0.0))
    return [JudgeScore(c, parse_score(t.text), t.text) for c, t in zip(CRITERIA, turns)]

"""The plan-retrieve-write loop of MiniCPM4-Survey (MINICPM4.md §9.1) over any chat model.

Each step the model gets a fresh prompt (a context manager, as in the report, rather than an ever-growing
chat): the topic, the draft so far as an outline, the papers of the latest search in full and the earlier
ones by title, and what was wrong with its previous step. It answers with one protocol step (protocol.py):
an update of one position, then a search or finalize. The loop applies the update (dropping and counting
cited ids that were never retrieved), runs the search on the knowledge base, and stops when the model
finalizes, at the step limit, or after too many consecutive failed steps (no usable update or action).

The first retrieval is on the topic itself, before the first step, so the model can cite from step one.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Callable

from minicpm4.apps.chat_backend import ChatBackend, Sampling
from minicpm4.apps.survey.kb import Index, Paper, search
from minicpm4.apps.survey.protocol import Finalize, Search, Update, parse_step, render_step
from minicpm4.apps.survey.state import Survey

# MINICPM4.md §9.1: the demo's sampling.
DEFAULT_SAMPLING = Sampling(max_tokens=2748, temperature=0.7, top_p=0.8)

SYSTEM_PROMPT = """You write a literature survey on the user's topic, step by step, citing papers from a knowledge base.
Plan the outline first (title, then sections), then write each part with citations, searching for papers as you go.

Each step, write exactly:
<think>your reasoning</think><answer>{"update": "<position>", "content": "<text>"}</answer>
<think>what to look up next</think><tool_call>{"name": "search_engine", "arguments": {"query": ["<keywords>", "<keywords>"]}}</tool_call>
or, when the survey is complete, instead of the search:
<tool_call>{"name": "finalize"}</tool_call>

Positions: "title", "abstract", "introduction", "section-1", "section-1/subsection-1", ..., "conclusion".
A section's content starts with its heading line, e.g. "## Methods". Rewriting a position replaces it.
Cite papers as \\cite{id} or \\cite{id1,id2} using only ids of retrieved papers; other ids are removed.

Example step:
""" + render_step(Update("section-1", "## Background\nEarly work \\cite{some-id} studied ..."),
                  Search(["keyword one", "keyword two"]), "I start the first section.")


@dataclass
class LoopConfig:
    max_steps: int = 24
    max_failures: int = 3  # consecutive failed steps before giving up
    papers_per_query: int = 5
    abstract_chars: int = 400  # of each newly retrieved paper, in the prompt
    listed_papers: int = 40  # earlier retrievals listed by id and title
    sampling: Sampling = field(default_factory=lambda: Sampling(**asdict(DEFAULT_SAMPLING)))


@dataclass
class StepRecord:
    step: int
    reply: str
    update: str | None  # the position written
    action: str | None  # "search" | "finalize"
    queries: list[str]
    new_papers: list[str]
    problems: list[str]
    dropped_citations: list[str]
    seconds: float


@dataclass
class SurveyRun:
    survey: Survey
    steps: list[StepRecord]
    stopped: str  # "finalized" | "step_limit" | "failures"
    initial_papers: list[str]
    seconds: float


def _paper_lines(papers: list[Paper], chars: int) -> list[str]:
    def cut(text: str) -> str:
        return text if len(text) <= chars else text[:chars].rsplit(" ", 1)[0] + " …"

    return [f"[{p.id}] {p.title}: {cut(p.abstract)}" for p in papers]


def step_prompt(survey: Survey, latest: list[Paper], feedback: list[str], cfg: LoopConfig) -> list[dict]:
    earlier = [p for p in survey.retrieved.values() if p not in latest][-cfg.listed_papers:]
    parts = [f"Topic: {survey.topic}", "", "Draft so far:", survey.outline(), ""]
    if latest:
        parts += ["Papers from the latest search (cite by the id in brackets):",
                  *_paper_lines(latest, cfg.abstract_chars), ""]
    else:
        parts += ["The latest search found no new papers.", ""]
    if earlier:
        parts += ["Papers retrieved earlier:", *[f"[{p.id}] {p.title}" for p in earlier], ""]
    if feedback:
        parts += ["Problems with your previous step:", *[f"- {f}" for f in feedback], ""]
    parts.append("Write the next step.")
    return [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": "\n".join(parts)}]


def write_survey(backend: ChatBackend, index: Index, topic: str, cfg: LoopConfig | None = None,
                 on_step: Callable[[StepRecord], None] | None = None) -> SurveyRun:
    cfg = cfg or LoopConfig()
    if not topic.strip():
        raise ValueError("topic: must not be empty")
    start = time.perf_counter()
    survey = Survey(topic.strip())
    latest = survey.add_papers(search(index, [topic], cfg.papers_per_query))
    initial = [p.id for p in latest]
    feedback: list[str] = []
    steps: list[StepRecord] = []
    failures, stopped = 0, "step_limit"
    for n in range(1, cfg.max_steps + 1):
        t0 = time.perf_counter()
        reply = backend.complete(step_prompt(survey, latest, feedback, cfg), None, cfg.sampling).text
        step = parse_step(reply)
        problems = list(step.problems)
        dropped_before = len(survey.dropped_citations)
        written = None
        if step.update is not None:
            problem = survey.apply(step.update.position, step.update.content)
            if problem:
                problems.append(problem)
            else:
                written = step.update.position
        dropped = survey.dropped_citations[dropped_before:]
        if dropped:
            problems.append("not retrieved, removed: " + ", ".join(dict.fromkeys(dropped)))
        queries: list[str] = []
        action = None
        if isinstance(step.action, Search):
            queries, action = step.action.queries, "search"
            latest = survey.add_papers(search(index, queries, cfg.papers_per_query))
        elif isinstance(step.action, Finalize):
            action = "finalize"
        if written is None and action is None:
            failures += 1
        else:
            failures = 0
        record = StepRecord(n, reply, written, action, queries, [p.id for p in latest] if action == "search" else [],
                            problems, dropped, time.perf_counter() - t0)
        steps.append(record)
        if on_step:
            on_step(record)
        feedback = problems
        if action == "finalize":
            stopped = "finalized"
            break
        if failures >= cfg.max_failures:
            stopped = "failures"
            break
    return SurveyRun(survey, steps, stopped, initial, time.perf_counter() - start)


def run_to_dict(run: SurveyRun) -> dict:
    return {"survey": run.survey.to_dict(), "steps": [asdict(s) for s in run.steps], "stopped": run.stopped,
            "initial_papers": run.initial_papers, "seconds": run.seconds}


def run_from_dict(d: dict) -> SurveyRun:
    return SurveyRun(Survey.from_dict(d["survey"]), [StepRecord(**s) for s in d["steps"]], d["stopped"],
                     d["initial_papers"], d["seconds"])

"""Track 3, instruction following (MINICPM4.md §8.3): progressive constraint layering over persona x topic
instructions, several sampled outputs checked by rules, the passing ones kept.

Seed instruction: a topic from the knowledge base (a KB entry's title, its abstract as background) x a persona
x a task template, drawn per entry (Persona Hub's persona x domain diversity, in miniature). Constraints are
drawn once per entry (`sample_constraints`, keywords from the title) and layered: variant c1 carries the first
constraint, c2 the first two, ... ck all k, so one instruction grows harder step by step.

Per variant the model is sampled `--samples` times at temperature > 0; `verify_samples` keeps the instruction
when at least one sample satisfies every constraint (and is not empty or a refusal), and the first passing
sample becomes the record. Fewer than half passing marks the record borderline for the human review.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from pathlib import Path

from minicpm4.data.synth.constraints import constraint_to_dict, sample_constraints, verify_samples
from minicpm4.data.synth.track import (Job, JobSteps, Request, TrackContext, assistant, check_reply, content_words,
                                       pick, reply_text, user)
from minicpm4.data.synth.tracks_knowledge import KB_PATH
from minicpm4.data.synth.verdict import Verdict

PERSONAS = (
    "a first-year computer science student", "a retired schoolteacher who is new to computers",
    "a busy startup founder", "a high-school physics teacher", "a technical writer preparing documentation",
    "a network administrator at a hospital", "a journalist covering the history of technology",
    "a ten-year-old who loves video games", "a librarian helping visitors", "a security auditor",
    "a product manager without an engineering background", "a hobbyist who builds retro computers",
)
TASKS = (
    "Explain what {topic} is to {persona}.",
    "Write a short note for {persona} about {topic}.",
    "{persona_cap} asks why {topic} matters. Answer them.",
    "Describe {topic} in a way that would help {persona}.",
    "Write a brief introduction to {topic} for {persona}.",
)


@dataclass
class InstructionConfig:
    kb_path: Path = KB_PATH
    max_constraints: int = 3  # variants c1 .. ck
    background_chars: int = 600


def instruction_for(title: str, abstract: str, persona: str, task: str, background_chars: int) -> str:
    text = task.format(topic=title, persona=persona, persona_cap=persona[:1].upper() + persona[1:])
    return f"{text}\nBackground: {abstract[:background_chars]}"


class InstructionTrack:
    name = "instruction"

    def __init__(self, ctx: TrackContext, config: InstructionConfig | None = None) -> None:
        from minicpm4.apps.survey.kb import load_kb

        self.ctx, self.config = ctx, config or InstructionConfig()
        if self.config.max_constraints < 1:
            raise ValueError("--max-constraints: must be >= 1")
        if ctx.samples < 1:
            raise ValueError("--samples: must be >= 1")
        self.entries = load_kb(self.config.kb_path)

    def info(self) -> dict:
        return {"kb": str(self.config.kb_path), "samples": self.ctx.samples,
                "max_constraints": self.config.max_constraints, "personas": len(PERSONAS), "tasks": len(TASKS)}

    def jobs(self, limit: int | None) -> list[Job]:
        variants = tuple(f"c{j}" for j in range(1, self.config.max_constraints + 1))
        return [Job(self.name, e.id, variants, partial(self._steps, entry=e))
                for e in pick(self.entries, limit, self.ctx.data_seed, self.name)]

    def _steps(self, job: Job, entry) -> JobSteps:
        rng = self.ctx.rng(self.name, entry.id)
        persona, task = rng.choice(PERSONAS), rng.choice(TASKS)
        base = instruction_for(entry.title, entry.abstract, persona, task, self.config.background_chars)
        keywords = sorted(content_words(entry.title)) or [entry.title]
        layered = sample_constraints(rng, self.config.max_constraints, keywords=keywords)
        n = self.ctx.samples
        prompts = []
        for j in range(1, len(job.variants) + 1):
            prompts.append(base + "\n" + " ".join(c.describe() for c in layered[:j]))
        requests = [Request([user(p)], temperature=self.ctx.sample_temperature, sample_index=i)
                    for p in prompts for i in range(n)]
        turns = yield requests
        records = []
        for j, (variant, prompt) in enumerate(zip(job.variants, prompts)):
            samples = [reply_text(t) for t in turns[j * n:(j + 1) * n]]
            # an empty, refusing or echoing sample never counts, whatever the constraints say
            usable = [i for i, s in enumerate(samples) if check_reply(s, prompt).ok]
            if usable:
                verdict, among = verify_samples([samples[i] for i in usable], layered[:j + 1])
                passing = [usable[k] for k in among]
            else:
                verdict, passing = Verdict.failed(f"no usable sample ({check_reply(samples[0], prompt).reason})"), []
            meta = {"constraints": [constraint_to_dict(c) for c in layered[:j + 1]], "persona": persona,
                    "topic": entry.title, "samples": n, "passing": passing}
            if verdict.ok and len(passing) * 2 < n:
                meta["borderline"] = f"only {len(passing)}/{n} samples passed"
            chosen = samples[passing[0]] if passing else samples[0]
            records.append(job.record(variant, [user(prompt), assistant(chosen)], verdict, **meta))
        return records

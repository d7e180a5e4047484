"""Survey writer on the shipped knowledge base: rule rewards and seconds per survey, bundled model vs a
model-free extractive baseline, over a few topics.

    .venv/bin/python benchmarks/survey_scores.py [--topics 5] [--max-steps 24] [--dtype float32]

Systems: "bundled" = the bundled default model (3M parameters) in `minicpm4 survey` with the report's demo
sampling (temperature 0.7, top_p 0.8, max_tokens 2748), seed 0; "extractive" = a scripted policy that follows the
step protocol without a model (title from the topic, then one section per search from the retrieved abstracts with
their citations, then introduction, abstract and conclusion, then finalize) — what the rule rewards give for a
protocol-following, copy-only writer, the yardstick for the model's numbers. Both run the same loop, knowledge
base (bm25s) and scoring (minicpm4/apps/survey/rewards.py). Writes benchmarks/results/survey_scores.json.
"""

from __future__ import annotations

import argparse
import re
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import RESULTS_DIR, command_line, fmt, machine_info, median, publish  # noqa: E402

from minicpm4.apps.chat_backend import AssistantTurn  # noqa: E402
from minicpm4.apps.survey.cli import SHIPPED_KB  # noqa: E402
from minicpm4.apps.survey.kb import Bm25Index, load_kb  # noqa: E402
from minicpm4.apps.survey.loop import LoopConfig, write_survey  # noqa: E402
from minicpm4.apps.survey.protocol import Finalize, Search, Update, render_step  # noqa: E402
from minicpm4.apps.survey.rewards import rule_scores  # noqa: E402

TOPICS = ["cache memory", "garbage collection", "computer networks", "programming languages", "hacker culture"]
_LATEST = re.compile(r"^\[([^\]]+)\] ([^:]+): (.*)$")
_OUTLINE = re.compile(r"^(title|abstract|introduction|conclusion|section-\d+)(?: \[[^\]]*\])?: (.*)$")


class ExtractiveWriter:
    """Reads the step prompt (the outline and the latest papers) and answers with a well-formed step."""

    def __init__(self, sections: int = 3) -> None:
        self.sections = sections

    def complete_batch(self, conversations, tools=None, sampling=None, prefix=""):
        return [self.complete(m, tools, sampling, prefix) for m in conversations]

    def complete(self, messages, tools=None, sampling=None, prefix="") -> AssistantTurn:
        prompt = messages[-1]["content"]
        topic = prompt.split("\n", 1)[0].removeprefix("Topic: ")
        filled = {m.group(1) for line in prompt.splitlines() if (m := _OUTLINE.match(line))
                  and m.group(2) != "(empty)"}
        latest = [m.groups() for line in prompt.splitlines() if (m := _LATEST.match(line))]
        cite = " ".join(f"{abstract.split('. ')[0].rstrip('.')} \\cite{{{pid}}}." for pid, _, abstract in latest[:4])
        n_sections = sum(1 for f in filled if f.startswith("section-"))
        if "title" not in filled:
            step = (Update("title", f"A survey of {topic}"), None)  # the loop already searched the topic
        elif n_sections < self.sections and latest:
            heading = latest[0][1]
            step = (Update(f"section-{n_sections + 1}", f"## {heading}\n{cite}"), Search([f"{topic} {heading}"]))
        elif "introduction" not in filled:
            step = (Update("introduction", f"This survey covers {topic}. {cite}"), Search([topic + " overview"]))
        elif "abstract" not in filled:
            step = (Update("abstract", f"We review work on {topic}. {cite}"), Search([topic + " history"]))
        else:
            step = (Update("conclusion", f"We surveyed {topic}. {cite}"), Finalize())
        text = render_step(*step)
        return AssistantTurn(text, [], None, text)


def run_system(name, backend, index, topics, cfg) -> list[dict]:
    rows = []
    for topic in topics:
        t0 = time.perf_counter()
        run = write_survey(backend, index, topic, cfg)
        s = rule_scores(run.survey)
        rows.append({"system": name, "topic": topic, "stopped": run.stopped, "steps": len(run.steps),
                     "seconds": time.perf_counter() - t0, "structure": s.structure,
                     "section_length": s.section_length, "language": s.language, "citation": s.citation,
                     "mean": s.mean, "words": s.words, "cited": s.cited, "hallucinated": s.hallucinated,
                     "failed_steps": sum(1 for r in run.steps if r.update is None and r.action is None)})
        print(f"{name:10s} {topic:24s} {run.stopped:10s} steps {len(run.steps):2d}  mean {s.mean:.2f}  "
              f"{rows[-1]['seconds']:.1f}s", flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--topics", type=int, default=len(TOPICS))
    ap.add_argument("--max-steps", type=int, default=24)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--out", default=str(RESULTS_DIR / "survey_scores.json"))
    args = ap.parse_args()

    from minicpm4.api import default_pipeline
    from minicpm4.apps.chat_backend import LocalBackend
    from minicpm4.apps.survey.loop import DEFAULT_SAMPLING, Sampling

    topics = TOPICS[: args.topics]
    index = Bm25Index(load_kb(SHIPPED_KB))
    model_cfg = LoopConfig(max_steps=args.max_steps, sampling=Sampling(
        DEFAULT_SAMPLING.max_tokens, DEFAULT_SAMPLING.temperature, DEFAULT_SAMPLING.top_p, seed=0))
    rows = run_system("extractive", ExtractiveWriter(), index, topics, LoopConfig(max_steps=args.max_steps))
    rows += run_system("bundled", LocalBackend(default_pipeline(args.dtype)), index, topics, model_cfg)

    keys = ("structure", "section_length", "language", "citation", "mean")
    summary = {}
    lines = [f"{'system':10s} " + " ".join(f"{k:>14s}" for k in keys) + f" {'s/survey':>9s} {'stopped':>22s}"]
    for system in ("bundled", "extractive"):
        mine = [r for r in rows if r["system"] == system]
        summary[system] = {k: sum(r[k] for r in mine) / len(mine) for k in keys}
        summary[system]["median_seconds"] = median(r["seconds"] for r in mine)
        stops = {s: sum(r["stopped"] == s for r in mine) for s in ("finalized", "step_limit", "failures")}
        summary[system]["stopped"] = stops
        lines.append(f"{system:10s} " + " ".join(f"{summary[system][k]:14.2f}" for k in keys)
                     + f" {fmt(summary[system]['median_seconds'], 1):>9s} "
                     + f"{' '.join(f'{k}={v}' for k, v in stops.items() if v):>22s}")
    publish({"command": command_line(), "machine": machine_info(), "dtype": args.dtype, "topics": topics,
             "knowledge_base": str(SHIPPED_KB.relative_to(SHIPPED_KB.parents[3])), "summary": summary,
             "rows": rows, "table": "\n".join(lines)}, args.out)


if __name__ == "__main__":
    main()

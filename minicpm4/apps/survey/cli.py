"""`minicpm4 survey`: write a literature survey with the plan-retrieve-write loop (MINICPM4.md §9.1).

    minicpm4 survey "cache memory" -o out/cache                   # bundled model + shipped knowledge base
    minicpm4 survey "TOPIC" --kb papers.jsonl --base-url http://127.0.0.1:8000/v1 -o OUT
    minicpm4 survey "TOPIC" --kb papers.jsonl --index faiss --embed-base-url URL --embed-model NAME -o OUT
    minicpm4 survey eval OUT [OUT ...] [--judge-base-url URL] [--out scores.json]
    minicpm4 survey build-kb --out kb.jsonl                        # rebuild the shipped knowledge base

OUT receives survey.md, survey.tex + refs.bib, survey.html and trajectory.json (every step, for `survey eval`).
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict
from pathlib import Path

from minicpm4.errors import UserError

SHIPPED_KB = Path(__file__).resolve().parents[2] / "assets" / "survey-kb" / "kb.jsonl"


def register(sub: argparse._SubParsersAction) -> None:
    # A positional TOPIC and the eval/build-kb subcommands cannot share one argparse level, so the command
    # line after "survey" comes whole (raw_argv, see cli.main) and the parser its first word names reads it.
    p = sub.add_parser("survey", add_help=False, help="write a survey (plan-retrieve-write) | survey eval | "
                       "survey build-kb", description=__doc__.split("\n\n")[0])
    p.set_defaults(func=cmd_survey, raw_argv=True)


def write_parser() -> argparse.ArgumentParser:
    from minicpm4.apps.backend_cli import add_backend_options
    from minicpm4.apps.survey.loop import DEFAULT_SAMPLING, LoopConfig

    p = argparse.ArgumentParser(prog="minicpm4 survey", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("topic", help="what the survey is about")
    p.add_argument("-o", "--out", required=True, metavar="DIR", help="output folder")
    p.add_argument("--kb", default=str(SHIPPED_KB), metavar="FILE",
                   help="knowledge base: JSONL of {id, title, abstract} (default: the shipped FOLDOC/Jargon one)")
    p.add_argument("--index", choices=["bm25", "faiss"], default="bm25",
                   help="bm25: bm25s, offline; faiss: cosine over embeddings from --embed-base-url")
    p.add_argument("--embed-base-url", default=None, help="OpenAI-compatible /embeddings endpoint (for --index faiss)")
    p.add_argument("--embed-model", default=None, help="embedding model name to request")
    cfg = LoopConfig()
    p.add_argument("--max-steps", type=int, default=cfg.max_steps)
    p.add_argument("--max-failures", type=int, default=cfg.max_failures,
                   help="consecutive steps without a usable update or action before giving up")
    p.add_argument("--papers-per-query", type=int, default=cfg.papers_per_query)
    add_backend_options(p, DEFAULT_SAMPLING.temperature, DEFAULT_SAMPLING.top_p, DEFAULT_SAMPLING.max_tokens)
    p.add_argument("--quiet", action="store_true", help="do not print each step")
    return p


def eval_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="minicpm4 survey eval",
                                description="rule rewards (structure, section length, English, citation "
                                "hallucination) of written surveys, and LLM-judge scores when a judge is named")
    p.add_argument("runs", nargs="+", metavar="OUT", help="folders written by `minicpm4 survey`")
    p.add_argument("--judge-base-url", default=None, help="an OpenAI-compatible endpoint to judge with")
    p.add_argument("--judge-model", default=None, help="model name to request (default: the endpoint's first)")
    p.add_argument("--judge-api-key", default=None)
    p.add_argument("--out", default=None, metavar="FILE", help="write all scores as JSON")
    return p


def build_kb_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="minicpm4 survey build-kb",
                                description="the shipped knowledge base from Debian's dict-foldoc and dict-jargon")
    p.add_argument("--out", default=str(SHIPPED_KB), metavar="FILE")
    p.add_argument("--dictd-dir", default="/usr/share/dictd")
    p.add_argument("--abstract-chars", type=int, default=500)
    return p


def cmd_survey(args: argparse.Namespace) -> None:
    argv = list(args.argv)
    if argv and argv[0] == "eval":
        return cmd_eval(eval_parser().parse_args(argv[1:]))
    if argv and argv[0] == "build-kb":
        return cmd_build_kb(build_kb_parser().parse_args(argv[1:]))
    return cmd_write(write_parser().parse_args(argv), args)


def make_index(a: argparse.Namespace):
    from minicpm4.apps.survey.kb import Bm25Index, EndpointEmbedder, FaissIndex, load_kb

    papers = load_kb(a.kb)
    if a.index == "bm25":
        return Bm25Index(papers)
    if not a.embed_base_url or not a.embed_model:
        raise UserError("--index faiss needs --embed-base-url and --embed-model (an OpenAI-compatible /embeddings)")
    return FaissIndex(papers, EndpointEmbedder(a.embed_base_url, a.embed_model, a.api_key))


def _show(record) -> None:
    what = f"update {record.update}" if record.update else "no update"
    if record.action == "search":
        what += f"; search {record.queries} -> {len(record.new_papers)} new papers"
    elif record.action == "finalize":
        what += "; finalize"
    print(f"step {record.step}: {what} ({record.seconds:.1f}s)", file=sys.stderr)
    for problem in record.problems:
        print(f"  problem: {problem}", file=sys.stderr)


def cmd_write(a: argparse.Namespace, outer: argparse.Namespace) -> None:
    from minicpm4.apps.backend_cli import make_backend, sampling_from_args
    from minicpm4.apps.survey.loop import LoopConfig, run_to_dict, write_survey
    from minicpm4.apps.survey.render import write_outputs
    from minicpm4.apps.survey.rewards import rule_scores

    for name in ("max_steps", "max_failures", "papers_per_query"):
        if getattr(a, name) < 1:
            raise UserError(f"--{name.replace('_', '-')}: must be >= 1")
    cfg = LoopConfig(max_steps=a.max_steps, max_failures=a.max_failures, papers_per_query=a.papers_per_query,
                     sampling=sampling_from_args(a))
    index = make_index(a)
    backend = make_backend(a)
    try:
        run = write_survey(backend, index, a.topic, cfg, on_step=None if a.quiet else _show)
    except ValueError as e:
        raise UserError(str(e)) from e
    paths = write_outputs(run_to_dict(run), run.survey, a.out)
    s = rule_scores(run.survey)
    print(f"stopped: {run.stopped} after {len(run.steps)} steps, {run.seconds:.1f}s; {s.words} words, "
          f"{s.cited} papers cited, {s.hallucinated} hallucinated citations removed")
    print(f"rule scores: structure {s.structure:.2f}, section length {s.section_length:.2f}, "
          f"language {s.language:.2f}, citation {s.citation:.2f}")
    print("wrote " + ", ".join(str(p) for p in paths))


def load_run(folder: str | Path):
    from minicpm4.apps.survey.loop import run_from_dict

    path = Path(folder) / "trajectory.json"
    if not path.is_file():
        raise UserError(f"{folder}: no trajectory.json (not a folder written by `minicpm4 survey`)")
    try:
        return run_from_dict(json.loads(path.read_text(encoding="utf-8")))
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise UserError(f"{path}: not a survey trajectory ({e})") from e


def cmd_eval(a: argparse.Namespace) -> None:
    from minicpm4.apps.survey.render import to_markdown
    from minicpm4.apps.survey.rewards import rule_scores

    judge_backend = None
    if a.judge_base_url:
        from minicpm4.apps.chat_backend import EndpointBackend

        judge_backend = EndpointBackend(a.judge_base_url, a.judge_model, a.judge_api_key)
    results = []
    for folder in a.runs:
        run = load_run(folder)
        s = rule_scores(run.survey)
        row = {"run": str(folder), "topic": run.survey.topic, "stopped": run.stopped, "steps": len(run.steps),
               "seconds": run.seconds, **asdict(s), "mean": s.mean}
        line = (f"{folder}: structure {s.structure:.2f}  length {s.section_length:.2f}  language {s.language:.2f}  "
                f"citation {s.citation:.2f}  mean {s.mean:.2f}  ({s.words} words, {s.cited} cited)")
        if judge_backend is not None:
            from minicpm4.apps.survey.judge import judge

            scores = judge(judge_backend, run.survey.topic, to_markdown(run.survey))
            row["judge"] = {j.criterion: j.score for j in scores}
            row["judge_replies"] = {j.criterion: j.reply for j in scores}
            line += "  judge " + " ".join(f"{j.criterion} {j.score if j.score is not None else '?'}" for j in scores)
        print(line)
        results.append(row)
    if a.out:
        from minicpm4.io import write_text_atomic

        write_text_atomic(a.out, json.dumps(results, indent=1, ensure_ascii=False))


def cmd_build_kb(a: argparse.Namespace) -> None:
    from minicpm4.apps.survey.kb_build import build_kb
    from minicpm4.data.sources import SourcePaths

    if not Path(a.dictd_dir, "foldoc.index").is_file():
        raise UserError(f"--dictd-dir {a.dictd_dir}: no foldoc.index (install Debian's dict-foldoc and dict-jargon)")
    n = build_kb(a.out, SourcePaths(dictd_dir=Path(a.dictd_dir)), abstract_chars=a.abstract_chars)
    print(f"wrote {n} papers to {a.out}")

"""The survey loop end to end: a scripted model (control flow, citations, limits, outputs, `survey eval`) and
the bundled default model with the shipped knowledge base (runs to completion; every citation resolves)."""

from __future__ import annotations

import json

import pytest

from minicpm4.apps.survey.cli import SHIPPED_KB, load_run
from minicpm4.apps.survey.kb import Bm25Index, Paper, load_kb
from minicpm4.apps.survey.loop import LoopConfig, run_to_dict, write_survey
from minicpm4.apps.survey.protocol import Finalize, Search, Update, render_step
from minicpm4.apps.survey.render import OUTPUT_FILES, write_outputs
from minicpm4.apps.survey.state import citation_ids
from minicpm4.cli import main
from tests.apps.mcp_support import ScriptedBackend

PAPERS = [Paper("cache", "Cache memory", "A small fast memory holding copies of main memory locations."),
          Paper("write-back", "Write-back cache", "A cache that writes modified lines to memory on eviction."),
          Paper("tlb", "Translation lookaside buffer", "A cache of page table entries for virtual memory."),
          Paper("paging", "Paging", "Virtual memory divided into fixed-size pages mapped to frames."),
          Paper("lisp", "Lisp", "A functional programming language.")]


def _script() -> list[str]:
    return [
        render_step(Update("title", "Caches: a survey"), Search(["write-back eviction"])),
        render_step(Update("section-1", "## Hardware caches\nCaches \\cite{cache,write-back} and \\cite{made-up}."),
                    Search(["page table entries virtual memory"])),
        render_step(Update("section-3", "## Gap\nskipped a number")),  # invalid position, no action: a failure
        "I will now write the conclusion.",  # no protocol at all: a second failure in a row
        render_step(Update("section-1/subsection-1", "## TLBs\nTranslation is cached \\cite{tlb}."),
                    Search(["paging"])),
        render_step(Update("conclusion", "Caches everywhere \\cite{paging}."), Finalize()),
    ]


def test_scripted_run_finalizes_and_every_citation_resolves(tmp_path):
    backend = ScriptedBackend(_script())
    run = write_survey(backend, Bm25Index(PAPERS), "cache memory", LoopConfig(max_steps=10, papers_per_query=2))
    assert run.stopped == "finalized" and len(run.steps) == 6 and backend.replies == []
    s = run.survey
    assert "cache" in run.initial_papers  # retrieval on the topic before the first step
    assert s.title == "Caches: a survey" and s.sections[0].heading == "Hardware caches"
    assert s.sections[0].subsections[0].heading == "TLBs" and s.conclusion == "Caches everywhere \\cite{paging}."
    assert s.dropped_citations == ["made-up"] and run.steps[1].dropped_citations == ["made-up"]
    assert all(i in s.retrieved for _, text in s.texts() for i in citation_ids(text))
    assert [r.action for r in run.steps] == ["search", "search", None, None, "search", "finalize"]
    assert "write section-2 first" in run.steps[2].problems[0]
    # The model is told what went wrong with its previous step, and sees the latest papers in full.
    step2_prompt = backend.seen[2][0][1]["content"]
    assert "not retrieved, removed: made-up" in step2_prompt
    assert "[tlb] Translation lookaside buffer: A cache of page table entries" in step2_prompt
    assert "section-1 [Hardware caches]" in step2_prompt

    paths = write_outputs(run_to_dict(run), s, tmp_path / "out")
    assert [p.name for p in paths] == list(OUTPUT_FILES)
    again = load_run(tmp_path / "out")
    assert again.survey == s and again.steps == run.steps and again.stopped == "finalized"
    bib = (tmp_path / "out" / "refs.bib").read_text()
    assert sorted(line.split("{")[1].rstrip(",") for line in bib.splitlines() if line.startswith("@misc")) == \
        sorted(s.cited())


def test_consecutive_failures_and_the_step_limit_stop_the_loop():
    run = write_survey(ScriptedBackend(["nonsense"] * 3), Bm25Index(PAPERS), "caches", LoopConfig(max_failures=3))
    assert run.stopped == "failures" and len(run.steps) == 3
    searches = [render_step(None, Search([f"memory {i}"])) for i in range(2)]
    run = write_survey(ScriptedBackend(searches), Bm25Index(PAPERS), "caches", LoopConfig(max_steps=2))
    assert run.stopped == "step_limit" and len(run.steps) == 2
    with pytest.raises(ValueError, match="topic"):
        write_survey(ScriptedBackend([]), Bm25Index(PAPERS), "  ")


def test_survey_eval_reads_written_runs(tmp_path, capsys):
    run = write_survey(ScriptedBackend(_script()), Bm25Index(PAPERS), "cache memory",
                       LoopConfig(papers_per_query=2))
    write_outputs(run_to_dict(run), run.survey, tmp_path / "a")
    assert main(["survey", "eval", str(tmp_path / "a"), "--out", str(tmp_path / "scores.json")]) == 0
    row = json.loads((tmp_path / "scores.json").read_text())[0]
    assert row["stopped"] == "finalized" and row["hallucinated"] == 1 and row["cited"] == 4
    assert row["citation"] == pytest.approx(4 / 5)
    assert 0 < row["structure"] < 1 and "an abstract" in row["failed_checks"]
    assert "structure" in capsys.readouterr().out
    assert main(["survey", "eval", str(tmp_path)]) == 2  # not a run folder: one clear error
    assert "no trajectory.json" in capsys.readouterr().err


def test_shipped_knowledge_base_loads_and_answers():
    papers = load_kb(SHIPPED_KB)
    assert len(papers) >= 1000 and {p.id.split("-")[0] for p in papers} == {"foldoc", "jargon"}
    hits = Bm25Index(papers).search_one("cache memory", 3)
    assert any("cache" in papers[i].title.lower() for i in hits)


def test_bundled_model_runs_the_command_to_completion(tmp_path, capsys):
    out = tmp_path / "survey"
    code = main(["survey", "cache memory", "-o", str(out), "--max-steps", "3", "--max-tokens", "48",
                 "--dtype", "float32", "--seed", "0", "--quiet"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "stopped:" in printed and "rule scores:" in printed
    run = load_run(out)
    assert run.stopped in ("finalized", "step_limit", "failures") and 1 <= len(run.steps) <= 3
    assert all(i in run.survey.retrieved for _, text in run.survey.texts() for i in citation_ids(text))
    assert all((out / name).is_file() for name in OUTPUT_FILES)
    assert main(["survey", "x", "-o", str(out), "--kb", str(tmp_path / "none.jsonl")]) == 2
    assert "--kb" in capsys.readouterr().err

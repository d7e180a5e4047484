"""Survey writer parts: the step protocol, the draft and its citation bookkeeping, the knowledge base and its
indexes, the renderings, the rule rewards and the judge's score parsing (golden cases)."""

from __future__ import annotations

import http.server
import json
import threading

import numpy as np
import pytest

from minicpm4.apps.survey.judge import CRITERIA, judge, parse_score
from minicpm4.apps.survey.kb import EndpointEmbedder, FaissIndex, Paper, load_kb, search
from minicpm4.apps.survey.kb_build import build_kb, entry_paper
from minicpm4.apps.survey.protocol import Finalize, Search, Update, parse_step, render_step
from minicpm4.apps.survey.render import latex_escape, to_bibtex, to_html, to_latex, to_markdown
from minicpm4.apps.survey.rewards import is_english, length_score, rule_scores, structure_score
from minicpm4.apps.survey.state import Survey, resolve_citations
from minicpm4.data.sources import SourcePaths
from minicpm4.errors import UserError
from tests.apps.mcp_support import ScriptedBackend
from tests.test_data import write_dictd

# ---- protocol ------------------------------------------------------------------------------------------


def test_parse_the_report_format():
    text = ('<think>plan</think><answer>{"update": "section-1/subsection-2", "content": "## A\\nText \\\\cite{x}"}'
            '</answer>\n<think>next</think><tool_call>{"name": "search_engine", "arguments": {"query": ["a b", "c"]}}'
            "</tool_call>")
    step = parse_step(text)
    assert step.thoughts == ["plan", "next"]
    assert step.update == Update("section-1/subsection-2", "## A\nText \\cite{x}")
    assert step.action == Search(["a b", "c"]) and step.problems == [] and not step.failed


@pytest.mark.parametrize("text, problem", [
    ("just prose", "no <answer>"),
    ('<answer>{"update": "title", "content": "x"</answer>', "not valid JSON"),
    ('<answer>["title"]</answer>', "expected a JSON object"),
    ('<answer>{"content": "x"}</answer>', '"update" must name a position'),
    ('<tool_call>{"name": "web_search", "arguments": {}}</tool_call>', "unknown tool 'web_search'"),
    ('<tool_call>{"name": "search_engine", "arguments": {"query": 3}}</tool_call>', "search_engine needs"),
    ('<tool_call>{"name": "search_engine", "arguments": {"query": ["  "]}}</tool_call>', "no non-empty query"),
])
def test_broken_steps_fail_with_a_reason(text, problem):
    step = parse_step(text)
    assert step.failed
    assert any(problem in p for p in step.problems), step.problems


def test_one_query_string_and_finalize_and_extra_blocks():
    step = parse_step('<tool_call>{"name": "search_engine", "arguments": {"query": "caches"}}</tool_call>')
    assert step.action == Search(["caches"])
    step = parse_step('<answer>{"update": "conclusion", "content": "End."}</answer><tool_call>{"name": "finalize"}'
                      '</tool_call><tool_call>{"name": "finalize"}</tool_call>')
    assert step.update == Update("conclusion", "End.") and step.action == Finalize()
    assert step.problems == ["2 <tool_call> blocks: only the first is used"]


def test_render_step_round_trips():
    for update, action in [(Update("title", 'Quotes " and \\cite{a}'), Search(["q1", "q2"])),
                           (Update("abstract", "x"), Finalize()), (None, Search(["only"]))]:
        step = parse_step(render_step(update, action, "why"))
        assert step.update == update and step.action == action and not step.problems


# ---- draft state -----------------------------------------------------------------------------------------

def _survey_with(*ids: str) -> Survey:
    s = Survey("topic")
    s.add_papers([Paper(i, f"Title {i}", f"Abstract of {i}.") for i in ids])
    return s


def test_hallucinated_citations_are_dropped_and_counted():
    check = resolve_citations("A \\cite{a,zz} and B \\cite{yy}. C \\citep{b}.", {"a", "b"})
    assert check.text == "A \\cite{a} and B. C \\cite{b}."
    assert check.kept == ["a", "b"] and check.dropped == ["zz", "yy"]
    s = _survey_with("a")
    assert s.apply("introduction", "Known \\cite{a}, invented \\cite{nope}.") is None
    assert s.introduction == "Known \\cite{a}, invented." and s.dropped_citations == ["nope"]
    assert s.kept_citations == 1 and s.cited() == ["a"]


def test_positions_are_checked():
    s = _survey_with()
    assert "write section-1 first" in s.apply("section-2", "x")
    assert "before its subsections" in s.apply("section-1/subsection-1", "x")
    assert "unknown position" in s.apply("chapter-1", "x")
    assert s.apply("Section-1", "## Methods\nBody.") is None
    assert "write section-1/subsection-1 first" in s.apply("section-1/subsection-2", "x")
    assert s.apply("section-1/subsection-1", "No heading here.") is None
    assert s.apply("section-1", "## Methods, revised\nNew body.") is None
    sec = s.sections[0]
    assert (sec.heading, sec.body) == ("Methods, revised", "New body.")
    assert (sec.subsections[0].heading, sec.subsections[0].body) == ("Subsection 1.1", "No heading here.")
    assert s.updates == 3
    assert Survey.from_dict(json.loads(json.dumps(s.to_dict()))) == s


# ---- knowledge base ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("content, message", [
    ("", "holds no papers"),
    ('{"id": "a", "title": "t", "abstract": "x"}\nnot json\n', ":2: not JSON"),
    ('["a"]\n', ":1: expected an object"),
    ('{"id": "a", "title": "t"}\n', ":1: field 'abstract' must be a non-empty string"),
    ('{"id": "a b", "title": "t", "abstract": "x"}\n', "not a usable citation key"),
    ('{"id": "a", "title": "t", "abstract": "x"}\n\n{"id": "a", "title": "u", "abstract": "y"}\n',
     ":3: id 'a' repeats line 1"),
])
def test_bad_knowledge_bases_give_one_clear_error(tmp_path, content, message):
    path = tmp_path / "kb.jsonl"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(UserError, match=message):
        load_kb(path)
    with pytest.raises(UserError, match="no such file"):
        load_kb(tmp_path / "missing.jsonl")


class HashEmbedder:
    """A deterministic local embedder: a hashed bag of lowercased words (no network, no model)."""

    def embed(self, texts):
        out = np.zeros((len(texts), 64), dtype=np.float32)
        for row, text in enumerate(texts):
            for word in text.lower().replace(".", " ").split():
                out[row, sum(map(ord, word)) % 64] += 1
        return out


PAPERS = [Paper("cache", "Cache memory", "A small fast memory holding copies of main memory."),
          Paper("tlb", "Translation lookaside buffer", "A cache of page table entries for virtual memory."),
          Paper("lisp", "Lisp", "A functional programming language with garbage collection."),
          Paper("gc", "Garbage collection", "Automatic reclamation of unused heap memory.")]


def test_bm25_and_faiss_find_the_matching_paper_and_interleave_queries():
    from minicpm4.apps.survey.kb import Bm25Index

    for index in (Bm25Index(PAPERS), FaissIndex(PAPERS, HashEmbedder())):
        assert index.search_one("lookaside buffer", 1) == [1]
        got = [p.id for p in search(index, ["page table entries", "functional programming language"], k=2)]
        assert got[:2] == ["tlb", "lisp"] and len(got) == len(set(got))
    assert Bm25Index(PAPERS).search_one("the of and", 3) == []  # only stopwords: nothing, not an error


def test_endpoint_embedder_speaks_the_openai_embeddings_format():
    seen = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            seen.append((self.path, body["model"], len(body["input"])))
            data = [{"index": i, "embedding": [float(len(t)), 1.0]} for i, t in enumerate(body["input"])][::-1]
            raw = json.dumps({"data": data}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(raw)))
            self.end_headers()
            self.wfile.write(raw)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        emb = EndpointEmbedder(f"http://127.0.0.1:{server.server_port}/v1", "embed-small", batch=2)
        got = emb.embed(["a", "bbb", "cc"])
        assert got.tolist() == [[1.0, 1.0], [3.0, 1.0], [2.0, 1.0]]  # reordered by "index"
        assert seen == [("/v1/embeddings", "embed-small", 2), ("/v1/embeddings", "embed-small", 1)]
    finally:
        server.shutdown()
    with pytest.raises(UserError, match="no embeddings"):
        EndpointEmbedder(f"http://127.0.0.1:{server.server_port}/v1", "m", timeout=2).embed(["x"])


def test_build_kb_from_dictd_fixtures(tmp_path):
    long_body = "A cache is a small fast memory. " * 12
    write_dictd(tmp_path, "foldoc", [(["cache"], f"cache\n\n<storage> {long_body}\n\n(1997-03-05)\n"),
                                     (["tiny"], "tiny\n\n<jargon> Too short.\n")])
    write_dictd(tmp_path, "jargon", [(["bogus"], f"bogus\nadj.\n\n1. {long_body}\n")])
    out = tmp_path / "kb.jsonl"
    assert build_kb(out, SourcePaths(dictd_dir=tmp_path), abstract_chars=120) == 2
    papers = load_kb(out)
    assert [p.id for p in papers] == ["foldoc-cache", "jargon-bogus"]
    assert papers[0].abstract.startswith("A cache is a small fast memory.") and len(papers[0].abstract) <= 120
    assert "<storage>" not in papers[0].abstract and papers[0].abstract.endswith(".")
    assert entry_paper("x", "x\n\n<a, b> Body text. (2001-01-01)", 500) == ("x", "Body text.")


# ---- rendering -------------------------------------------------------------------------------------------

def _full_survey() -> Survey:
    s = _survey_with("a", "b_2")
    words = " ".join(["the cache holds data"] * 40)
    for pos, text in [("title", "Caches & Co"), ("abstract", f"We survey caches \\cite{{b_2}}. {words}"),
                      ("introduction", f"Caches matter \\cite{{a}}. {words}"),
                      ("section-1", f"## Hardware\n50% of <b>time</b> \\cite{{a,b_2}}. {words}"),
                      ("section-2", f"## Software\nMemo tables. {words}"),
                      ("conclusion", f"Caches are everywhere. {words}")]:
        assert s.apply(pos, text) is None
    return s


def test_markdown_numbers_citations_in_first_use_order():
    md = to_markdown(_full_survey())
    assert md.startswith("# Caches & Co\n")
    assert "**Abstract.** We survey caches [1]." in md and "Caches matter [2]." in md
    assert "## 1 Introduction" in md and "## 2 Hardware" in md and "## 4 Conclusion" in md
    assert "50% of <b>time</b> [2, 1]." in md
    assert md.rstrip().endswith("1. [b_2] Title b_2\n2. [a] Title a")


def test_latex_escapes_text_but_keeps_cites_and_bibtex_lists_cited_papers():
    tex = to_latex(_full_survey())
    assert "\\title{Caches \\& Co}" in tex and "50\\% of <b>time</b> \\cite{a,b_2}." in tex
    assert "\\section{Hardware}" in tex and "\\bibliography{refs}" in tex
    assert latex_escape("a_b {c} \\d ~") == "a\\_b \\{c\\} \\textbackslash{}d \\textasciitilde{}"
    bib = to_bibtex(_full_survey())
    assert bib.count("@misc{") == 2 and "@misc{b_2," in bib and "title = {Title b\\_2}" in bib


def test_html_escapes_and_links_citations():
    page = to_html(_full_survey())
    assert "50% of &lt;b&gt;time&lt;/b&gt; [<a href=\"#ref-a\">2</a>" in page
    assert '<li id="ref-b_2"><b>Title b_2</b>' in page and "<b>time</b>" not in page


# ---- rewards -----------------------------------------------------------------------------------------------

def test_rule_scores_of_a_complete_survey_and_an_empty_one():
    s = _full_survey()
    scores = rule_scores(s)
    assert scores.structure == 1.0 and scores.failed_checks == []
    assert scores.language == 1.0 and scores.citation == 1.0 and scores.cited == 2
    empty = rule_scores(Survey("t"))
    assert (empty.structure, empty.section_length, empty.language, empty.citation) == (0, 0, 0, 0)


def test_structure_length_language_citation_golden_values():
    s = _survey_with("a")
    s.apply("title", "T")
    s.apply("section-1", "## Only\n" + "word " * 75)
    s.apply("section-1/subsection-1", "## Lonely\nx")
    score, failed = structure_score(s)
    assert failed == ["an abstract", "an introduction", "at least two sections",
                      "no section with a single subsection", "a conclusion"]
    assert score == 3 / 8
    assert length_score(s) == pytest.approx(76 / 150)  # 75 + 1 words against the low end 150
    assert is_english("The cache is a small memory.") and not is_english("缓存是一种小而快的存储器，用于加速。")
    s.apply("introduction", "Uses \\cite{a} and \\cite{a} but not \\cite{ghost}.")
    assert rule_scores(s).citation == pytest.approx(2 / 3)


# ---- judge ---------------------------------------------------------------------------------------------

def test_judge_asks_each_criterion_and_parses_scores():
    backend = ScriptedBackend(["4", "Score: 3/5", "five", "2"])
    scores = judge(backend, "caches", "# Caches\ntext")
    assert [j.criterion for j in scores] == list(CRITERIA)
    assert [j.score for j in scores] == [4, 3, None, 2]
    assert "Relevance" in backend.seen[0][0][1]["content"]
    assert parse_score("I'd say 7, no 5") == 5

"""A written survey as Markdown, LaTeX + BibTeX, and standalone HTML.

Citations are numbered in order of first citation. Markdown and HTML show them as [1, 2] with a reference
list; LaTeX keeps \\cite{id} against refs.bib. Only cited papers are listed (all resolve: state.py drops the
rest). Text is escaped for each format except the \\cite commands themselves.
"""

from __future__ import annotations

import html
import json
import re
from pathlib import Path

from minicpm4.apps.survey.kb import Paper
from minicpm4.apps.survey.state import CITE, Survey
from minicpm4.io import write_text_atomic


def _numbers(survey: Survey) -> dict[str, int]:
    return {pid: n for n, pid in enumerate(survey.cited(), 1)}


def _blocks(survey: Survey) -> list[tuple[int, str, str, str]]:
    """(heading level 1|2, its number "2" / "2.1", heading, body) after the abstract, in reading order."""
    parts: list[tuple[int, str, str]] = []
    if survey.introduction:
        parts.append((1, "Introduction", survey.introduction))
    for s in survey.sections:
        parts.append((1, s.heading, s.body))
        parts += [(2, sub.heading, sub.body) for sub in s.subsections]
    if survey.conclusion:
        parts.append((1, "Conclusion", survey.conclusion))
    out, section, sub = [], 0, 0
    for level, heading, body in parts:
        section, sub = (section + 1, 0) if level == 1 else (section, sub + 1)
        out.append((level, str(section) if level == 1 else f"{section}.{sub}", heading, body))
    return out


def _sub_cites(text: str, escape, cite) -> str:
    """Escape the text between \\cite commands; replace each command by cite(ids)."""
    out, pos = [], 0
    for m in CITE.finditer(text):
        out.append(escape(text[pos:m.start()]))
        out.append(cite([i.strip() for i in m.group(1).split(",") if i.strip()]))
        pos = m.end()
    out.append(escape(text[pos:]))
    return "".join(out)


def _title(survey: Survey) -> str:
    return survey.title or survey.topic


def to_markdown(survey: Survey) -> str:
    nums = _numbers(survey)

    def text(t: str) -> str:
        return _sub_cites(t, lambda s: s, lambda ids: "[" + ", ".join(str(nums[i]) for i in ids) + "]")

    lines = [f"# {_title(survey)}", ""]
    if survey.abstract:
        lines += [f"**Abstract.** {text(survey.abstract)}", ""]
    for level, number, heading, body in _blocks(survey):
        lines.append(f"{'#' * (level + 1)} {number} {heading}")
        lines += ["", text(body), ""] if body else [""]
    if nums:
        lines += ["## References", ""]
        lines += [f"{n}. [{pid}] {survey.retrieved[pid].title}" for pid, n in nums.items()]
    return "\n".join(lines).rstrip() + "\n"


_LATEX_SPECIAL = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
                  "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}"}
_LATEX_RE = re.compile("|".join(re.escape(c) for c in _LATEX_SPECIAL))


def latex_escape(text: str) -> str:
    return _LATEX_RE.sub(lambda m: _LATEX_SPECIAL[m.group(0)], text)


def to_latex(survey: Survey, bib_name: str = "refs") -> str:
    def text(t: str) -> str:
        return _sub_cites(t, latex_escape, lambda ids: "\\cite{" + ",".join(ids) + "}")

    lines = [r"\documentclass{article}", r"\usepackage[utf8]{inputenc}", r"\usepackage{hyperref}",
             f"\\title{{{latex_escape(_title(survey))}}}", r"\date{}", r"\begin{document}", r"\maketitle"]
    if survey.abstract:
        lines += [r"\begin{abstract}", text(survey.abstract), r"\end{abstract}"]
    for level, _, heading, body in _blocks(survey):
        lines.append(("\\section{" if level == 1 else "\\subsection{") + latex_escape(heading) + "}")
        if body:
            lines.append(text(body))
    if survey.cited():
        lines += [r"\bibliographystyle{plain}", f"\\bibliography{{{bib_name}}}"]
    lines.append(r"\end{document}")
    return "\n\n".join(lines) + "\n"


def _bib_value(text: str) -> str:
    # Braces inside a braced BibTeX value must balance; dropping them is simpler than counting.
    return latex_escape(text.replace("{", "(").replace("}", ")"))


def to_bibtex(survey: Survey) -> str:
    entries = []
    for pid in survey.cited():
        p: Paper = survey.retrieved[pid]
        entries.append(f"@misc{{{pid},\n  title = {{{_bib_value(p.title)}}},\n"
                       f"  abstract = {{{_bib_value(p.abstract)}}},\n  note = {{knowledge-base entry {pid}}}\n}}")
    return "\n\n".join(entries) + ("\n" if entries else "")


def to_html(survey: Survey) -> str:
    nums = _numbers(survey)

    def text(t: str) -> str:
        def cite(ids: list[str]) -> str:
            return "[" + ", ".join(f'<a href="#ref-{html.escape(i)}">{nums[i]}</a>' for i in ids) + "]"

        paragraphs = [p for p in re.split(r"\n\s*\n", t.strip()) if p.strip()]
        return "\n".join("<p>" + _sub_cites(p, html.escape, cite) + "</p>" for p in paragraphs)

    title = html.escape(_title(survey))
    body = [f"<h1>{title}</h1>"]
    if survey.abstract:
        body += ['<section class="abstract"><h2>Abstract</h2>', text(survey.abstract), "</section>"]
    for level, number, heading, content in _blocks(survey):
        body.append(f"<h{level + 1}>{number} {html.escape(heading)}</h{level + 1}>")
        body.append(text(content))
    if nums:
        body.append("<h2>References</h2><ol>")
        body += [f'<li id="ref-{html.escape(pid)}"><b>{html.escape(survey.retrieved[pid].title)}</b> '
                 f"[{html.escape(pid)}]. {html.escape(survey.retrieved[pid].abstract)}</li>" for pid in nums]
        body.append("</ol>")
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>{title}</title><style>body{{max-width:46em;margin:2em auto;font-family:serif;"
            "line-height:1.5;padding:0 1em}li{margin-bottom:.5em}</style></head><body>\n"
            + "\n".join(body) + "\n</body></html>\n")


OUTPUT_FILES = ("survey.md", "survey.tex", "refs.bib", "survey.html", "trajectory.json")


def write_outputs(run_dict: dict, survey: Survey, out_dir: str | Path) -> list[Path]:
    """Every rendering plus the trajectory (what `survey eval` reads), each written atomically."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    texts = {"survey.md": to_markdown(survey), "survey.tex": to_latex(survey), "refs.bib": to_bibtex(survey),
             "survey.html": to_html(survey), "trajectory.json": json.dumps(run_dict, indent=1, ensure_ascii=False)}
    for name in OUTPUT_FILES:
        write_text_atomic(out / name, texts[name])
    return [out / n for n in OUTPUT_FILES]

"""Text extraction for the raw document pool (pool.py): each reader turns one file found on a Debian system into
plain-text units, and `split_long` / `group_entries` cut those units into documents of bounded length.

Readers are pure functions of the file's bytes, so the pool is reproducible on any machine with the same files.
Man pages are rendered by `troff_to_text` (a small man/mdoc macro stripper: groff need not be installed) and HTML
by `html_to_text` (stdlib html.parser).
"""

from __future__ import annotations

import gzip
import re
from html.parser import HTMLParser
from pathlib import Path

# ---------------------------------------------------------------- bytes -> str


def read_text(path: Path, max_bytes: int) -> str | None:
    """The (gunzipped) file as text, at most max_bytes of it; None for binary files (a NUL in the first 8 KB)."""
    opener = gzip.open if path.name.endswith(".gz") else open
    with opener(path, "rb") as f:
        raw = f.read(max_bytes)
    if b"\0" in raw[:8192]:
        return None
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:  # old Debian files are often Latin-1; a cut mid-character lands here too
        return raw.decode("utf-8", errors="ignore") if _mostly_utf8(raw) else raw.decode("latin-1")


def _mostly_utf8(raw: bytes) -> bool:
    return len(raw.decode("utf-8", errors="ignore")) >= 0.95 * len(raw.decode("utf-8", errors="replace"))


_BLANK_RUNS = re.compile(r"\n{3,}")


def tidy(text: str) -> str:
    """Trailing spaces off every line, CRLF -> LF, at most one blank line in a row, no leading/trailing blanks."""
    text = "\n".join(line.rstrip() for line in text.replace("\r\n", "\n").split("\n"))
    return _BLANK_RUNS.sub("\n\n", text).strip("\n")


# ---------------------------------------------------------------- units -> documents


def split_long(text: str, max_chars: int) -> list[str]:
    """Greedy packing of paragraphs (then lines, then hard cuts) into parts of at most max_chars each."""
    parts: list[str] = []
    current = ""
    for piece in _pieces(text, max_chars):
        joined = f"{current}\n\n{piece}" if current else piece
        if len(joined) <= max_chars:
            current = joined
        else:
            parts.append(current)
            current = piece
    if current:
        parts.append(current)
    return parts


def _pieces(text: str, max_chars: int) -> list[str]:
    out: list[str] = []
    for para in text.split("\n\n"):
        if len(para) <= max_chars:
            out.append(para)
            continue
        line_block = ""
        for line in para.split("\n"):
            while len(line) > max_chars:  # a minified line: cut it
                out.append(line[:max_chars])
                line = line[max_chars:]
            if line_block and len(line_block) + 1 + len(line) > max_chars:
                out.append(line_block)
                line_block = line
            else:
                line_block = f"{line_block}\n{line}" if line_block else line
        if line_block:
            out.append(line_block)
    return [p for p in out if p.strip()]


def group_entries(entries: list[str], min_chars: int, max_chars: int) -> list[str]:
    """One document per changelog entry; entries shorter than min_chars are grouped with the ones after them (a
    group never grows past max_chars), and an entry longer than max_chars is split."""
    docs: list[str] = []
    group = ""
    for entry in entries:
        for piece in split_long(entry, max_chars):
            if group and len(group) + 2 + len(piece) > max_chars:
                docs.append(group)
                group = ""
            group = f"{group}\n\n{piece}" if group else piece
            if len(group) >= min_chars:
                docs.append(group)
                group = ""
    if group:
        docs.append(group)  # shorter than min_chars: pool.py drops it
    return docs


# ---------------------------------------------------------------- changelogs

# Debian policy §4.4: "package (version) distribution(s); urgency=..." opens every entry.
_DEBIAN_HEADER = re.compile(r"^\S+ \([^)]*\) [^;]*;.*urgency=", re.IGNORECASE)


def changelog_entries(text: str, debian: bool) -> list[str]:
    """Entries of a Debian changelog (split at policy headers) or of an upstream one (split at each unindented line
    that follows a blank line: GNU ChangeLog dates, "Version x.y" headings, ...)."""
    entries: list[list[str]] = []
    previous_blank = True
    for line in tidy(text).split("\n"):
        starts = _DEBIAN_HEADER.match(line) if debian else (previous_blank and line[:1] not in ("", " ", "\t"))
        if starts or not entries:
            entries.append([])
        entries[-1].append(line)
        previous_blank = not line.strip()
    return [e for e in (tidy("\n".join(lines)) for lines in entries) if e]


# ---------------------------------------------------------------- man pages (troff)

# Named glyphs man pages use, \(xx or \[xx] (groff_char(7)); unknown names render as nothing.
_GLYPHS = {
    "em": "\u2014", "en": "\u2013", "hy": "-", "mi": "-", "bu": "\u2022", "aq": "'", "dq": '"', "lq": "\u201c",
    "rq": "\u201d", "oq": "\u2018", "cq": "\u2019", "co": "\u00a9", "rg": "\u00ae", "tm": "\u2122", "mu": "\u00d7",
    "de": "\u00b0", "ga": "`", "ha": "^", "ti": "~", "rs": "\\", "sl": "/", "ba": "|", "pl": "+", "eq": "=",
    ">=": "\u2265", "<=": "\u2264", "->": "\u2192", "<-": "\u2190", "Fo": "\u00ab", "Fc": "\u00bb", "ss": "\u00df",
    "R": "\u00ae", "Tm": "\u2122", "Aq": "'", "lh": "\u261c", "rh": "\u261e", "dg": "\u2020", "sc": "\u00a7",
}
_ESCAPE = re.compile(
    r"""\\(?:
      (?P<comment>["#].*)                              # \" comment to end of line
    | f(?:\[[^\]]*\]|\(..|.)                           # font change
    | s[+-]?(?:\d+|\(\d\d|\[[^\]]*\])                  # size change
    | [nk*](?:\[(?P<reg>[^\]]*)\]|\((?P<reg2>..)|(?P<reg1>.))  # number register / string / mark
    | (?P<glyph>\((?P<g2>..)|\[(?P<gl>[^\]]*)\])      # named glyph
    | [hvwlLoXZbDNxR]'[^']*'                          # motions, widths, drawing: dropped
    | (?P<char>.)                                     # one-character escapes
    )""", re.VERBOSE)
_ONE_CHAR = {"-": "-", "e": "\\", "\\": "\\", " ": " ", "~": " ", "0": " ", "t": "\t", ".": ".", "'": "'",
             "`": "`", "_": "_", "|": "", "^": "", "&": "", "%": "", "c": "", "/": "", ",": "", ":": "", ")": "",
             "p": "", "{": "", "}": "", "z": "", "d": "", "u": "", "r": "", "a": "", "!": "", "?": "", "E": ""}


def _escape(m: re.Match) -> str:
    if m.group("comment") is not None:
        return ""
    if m.group("glyph"):
        name = m.group("g2") or m.group("gl") or ""
        if name.startswith("u") and re.fullmatch(r"u[0-9A-Fa-f]{4,6}", name):
            return chr(int(name[1:], 16))
        return _GLYPHS.get(name, "")
    reg = m.group("reg") or m.group("reg2") or m.group("reg1")
    if reg is not None:
        return _GLYPHS.get(reg, "") if m.group(0)[1] == "*" else ""
    char = m.group("char")
    return _ONE_CHAR.get(char, char) if char is not None else ""


def troff_inline(text: str) -> str:
    """Resolve the escapes of one troff line: fonts and sizes dropped, glyphs and \\- rendered."""
    return _ESCAPE.sub(_escape, text)


def _macro_args(rest: str) -> list[str]:
    """Split macro arguments troff's way: spaces separate, double quotes group, "" inside quotes is a quote."""
    args, i = [], 0
    while i < len(rest):
        if rest[i] in " \t":
            i += 1
        elif rest[i] == '"':
            j, buf = i + 1, []
            while j < len(rest):
                if rest[j] == '"' and rest[j + 1:j + 2] == '"':
                    buf.append('"')
                    j += 2
                elif rest[j] == '"':
                    break
                else:
                    buf.append(rest[j])
                    j += 1
            args.append("".join(buf))
            i = j + 1
        else:
            j = i
            while j < len(rest) and rest[j] not in " \t":
                j += 2 if rest[j] == "\\" else 1
            args.append(rest[i:j])
            i = j
    return args


_FONT_SPACED = {"B", "I", "SM", "SB"}
_FONT_ALTERNATING = {"BR", "RB", "IR", "RI", "BI", "IB"}
_PARAGRAPH = {"PP", "LP", "P", "sp", "HP", "RS", "RE", "Pp", "Lp", "ne", "TS", "TE", "EE", "fi", "Ed", "Bl", "El"}
_NOFILL_ON, _NOFILL_OFF = {"nf", "EX", "Bd", "TS"}, {"fi", "EE", "Ed", "TE"}
_BLOCK_SKIP = {"de", "de1", "ig", "am", "ds1"}  # ... up to a line "..": macro definitions and ignored blocks
_MDOC_DROP = {"Dd", "Os", "Ns", "No", "Pa", "Ar", "Cm", "Ic", "Li", "Em", "Sy", "Va", "Ev", "Dv", "Er", "Fa", "Ft",
              "Fn", "Op", "Oo", "Oc", "Xo", "Xc", "Ql", "Dq", "Sq", "Pq", "Qq", "Ad", "An", "Lk", "Mt", "Tn"}
_REQUEST = re.compile(r"^[.'][ \t]*([A-Za-z][A-Za-z0-9]*|\\\"|\\#|\.)?(.*)$")


class _ManWriter:
    """Collects blocks of rendered text: filled paragraphs (lines joined by spaces) or no-fill lines."""

    def __init__(self) -> None:
        self.blocks: list[str] = []
        self.lines: list[str] = []  # the current block's finished lines
        self.words: list[str] = []  # the current (filled) line
        self.attach = False  # the next block continues the previous one (a .TP tag and its body)

    def text(self, line: str, nofill: bool) -> None:
        if nofill:
            self.break_line()
            self.lines.append(line.rstrip())
        elif line.strip():
            self.words.append(line.strip())

    def break_line(self) -> None:
        if self.words:
            self.lines.append(" ".join(self.words))
            self.words = []

    def paragraph(self, attach_next: bool = False) -> None:
        self.break_line()
        if self.lines:
            block = "\n".join(self.lines)
            if self.attach and self.blocks:
                self.blocks[-1] += "\n" + block
            else:
                self.blocks.append(block)
            self.attach = False
            self.lines = []
        self.attach = self.attach or attach_next


def troff_to_text(source: str) -> str:
    """Plain text of a man page in man(7) or mdoc(7) macros: headings, paragraphs, tagged lists, no-fill blocks.
    Not a typesetter: conditionals, traps and custom macros are dropped, the words between them kept."""
    out = _ManWriter()
    nofill = False
    skip_until_dots = False
    table_format = False  # inside .TS before the format line that ends with "."
    pending = ""  # "tag": the next text line is a .TP tag; "heading": it is a section heading
    name = ""
    for raw in source.replace("\r\n", "\n").split("\n"):
        if skip_until_dots:
            skip_until_dots = raw.strip() not in ("..", ".")
            continue
        if table_format:
            table_format = not raw.rstrip().endswith(".")
            continue
        m = _REQUEST.match(raw)
        if not m:  # a text line
            line = troff_inline(raw)
            if nofill:
                line = line.replace("T{", "").replace("T}", "").replace("\t", "  ")
                if line.strip() in ("_", "="):
                    continue
            if pending == "heading" and line.strip():
                out.blocks.append(line.strip())
            else:
                out.text(line, nofill)
            if pending and line.strip():
                if pending == "tag":
                    out.paragraph(attach_next=True)
                pending = ""
            continue
        macro, rest = m.group(1) or "", m.group(2)
        if macro in ("\\\"", "\\#", ".") or not macro:
            continue
        args = [troff_inline(a) for a in _macro_args(rest)]
        if macro in _BLOCK_SKIP:
            skip_until_dots = True
        elif macro == "TH" or macro == "Dt":
            out.blocks.append(f"{args[0]}({args[1]})" if len(args) >= 2 else " ".join(args))
        elif macro in ("SH", "SS", "Sh", "Ss"):
            out.paragraph()
            if args:
                out.blocks.append(" ".join(args))
            else:
                pending = "heading"  # the heading is on the next line
        elif macro in ("TP", "TQ"):
            out.paragraph()
            pending = "tag"
        elif macro == "IP" or macro == "It":
            out.paragraph()
            tag = _mdoc_join(_mdoc_words(args)) if macro == "It" else " ".join(args[:1])
            if tag:
                out.text(tag, False)
                out.paragraph(attach_next=True)
        elif macro in _PARAGRAPH:
            out.paragraph()
        elif macro == "br":
            out.break_line()
        elif macro in _FONT_SPACED or macro in _FONT_ALTERNATING:
            if args:
                out.text((" " if macro in _FONT_SPACED else "").join(args), nofill)
                if pending == "tag":
                    pending = ""
                    out.paragraph(attach_next=True)
        elif macro == "Ux":
            out.text("UNIX" + "".join(a for a in args if a != "Ns"), nofill)
        elif macro == "Nm":
            name = name or (args[0] if args else "")
            out.text(" ".join(args) if args else name, nofill)
        elif macro == "Xr" and args:
            out.text(f"{args[0]}({args[1]})" + "".join(args[2:]) if len(args) > 1 else args[0], nofill)
        elif macro in ("Nd",):
            out.text("- " + " ".join(args), nofill)
        elif macro in _MDOC_DROP or macro in ("Fl",):
            words = _mdoc_words([macro, *args])
            if words and macro not in ("Dd", "Os"):  # the page's date and OS footer
                out.text(_mdoc_join(words), nofill)
        elif macro in ("UR", "UE", "MT", "ME", "so", "mso"):
            pass
        if macro in _NOFILL_ON:
            out.paragraph()
            nofill = True
            table_format = macro == "TS"
        elif macro in _NOFILL_OFF:
            nofill = False
    out.paragraph()
    return tidy("\n\n".join(b for b in out.blocks if b.strip()))


def _mdoc_words(args: list[str]) -> list[str]:
    """mdoc lines call macros inline (".It Fl v Ar file"): flags get their dash, other macro names vanish."""
    words, flag = [], False
    for a in args:
        if a == "Fl":
            flag = True
        elif a in _MDOC_DROP:
            flag = False
        else:
            words.append(f"-{a}" if flag else ("UNIX" if a == "Ux" else a))
            flag = False
    if flag:
        words.append("-")
    return words


def _mdoc_join(words: list[str]) -> str:
    """mdoc passes punctuation as separate arguments (".Ar file ,"): attach it to the word before."""
    text = ""
    for w in words:
        text += w if text and (re.fullmatch(r"[.,:;)\]!?]+", w) or text.endswith(("(", "["))) else f" {w}"
    return text.strip()


def is_man_alias(source: str) -> bool:
    """A page whose only content is `.so man1/other.1`: a redirect, not a document."""
    lines = [line for line in source.splitlines() if line.strip() and not line.startswith(('.\\"', "'\\\""))]
    return len(lines) <= 2 and any(line.startswith(".so ") for line in lines)


# ---------------------------------------------------------------- HTML

_BLOCK_TAGS = {"p", "div", "br", "li", "ul", "ol", "dl", "dt", "dd", "tr", "table", "pre", "h1", "h2", "h3", "h4",
               "h5", "h6", "blockquote", "hr", "section", "article", "header", "footer", "title", "body", "form"}
_SKIP_TAGS = {"script", "style", "head", "noscript", "svg"}


class _TextExtractor(HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.pieces: list[str] = []
        self.skip = 0  # depth inside <script>/<style>/<head> (the <title> is read anyway)
        self.pre = 0

    def handle_starttag(self, tag, attrs):
        if tag in _SKIP_TAGS:
            self.skip += 1
        if tag == "title":
            self.skip -= 1  # head is skipped, its title is not
        if tag == "pre":
            self.pre += 1
        if tag in _BLOCK_TAGS:
            self.pieces.append("\n\n" if tag in ("p", "pre", "table", "title") or tag[0] == "h" else "\n")

    def handle_endtag(self, tag):
        if tag in _SKIP_TAGS:
            self.skip = max(0, self.skip - 1)
        if tag == "title":
            self.skip += 1
        if tag == "pre":
            self.pre = max(0, self.pre - 1)
        if tag in _BLOCK_TAGS and (tag in ("p", "pre", "title", "table", "ul", "ol", "dl") or tag[0] == "h"):
            self.pieces.append("\n\n")  # a paragraph ends with a blank line; list items and rows just with one

    def handle_data(self, data):
        if self.skip > 0:
            return
        if not self.pre:  # collapse layout whitespace; a line starts at its first word
            data = re.sub(r"\s+", " ", data)
            if not self.pieces or self.pieces[-1].endswith("\n"):
                data = data.lstrip()
        if data:
            self.pieces.append(data)


def html_to_text(source: str) -> str:
    parser = _TextExtractor()
    parser.feed(source)
    parser.close()
    return tidy("".join(parser.pieces))


# ---------------------------------------------------------------- shell scripts

_SHELL_SHEBANG = re.compile(rb"^#!\s*(?:/usr)?/bin/(?:env\s+)?(?:ba|da|k|z)?sh\b")


def is_shell_script(path: Path) -> bool:
    with open(path, "rb") as f:
        return bool(_SHELL_SHEBANG.match(f.read(64)))

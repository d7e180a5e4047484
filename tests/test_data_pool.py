"""The raw document pool (minicpm4/data/pool.py): readers on a small Debian-like tree built here (gzipped
changelog, copyright, gzipped man page -> golden text, HTML, Python and shell sources, licences, NEWS), package
names from doc folders and dpkg file lists, determinism, caps, bad roots, and the CLI."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest

from minicpm4.cli import main
from minicpm4.data.pool import KINDS, PoolConfig, build_pool
from minicpm4.data.pool_readers import changelog_entries, group_entries, html_to_text, split_long, troff_to_text
from minicpm4.errors import UserError

CHANGELOG = """hello (2.12-2) unstable; urgency=medium

  * Fix the build with the newest gcc.
  * Bump Standards-Version.

 -- Jane Doe <jane@example.org>  Mon, 01 Jan 2024 10:00:00 +0000

hello (2.12-1) unstable; urgency=low

  * New upstream release.

 -- Jane Doe <jane@example.org>  Sun, 01 Oct 2023 10:00:00 +0000

hello (2.10-3) unstable; urgency=medium

  * Translate the greeting.

 -- Jane Doe <jane@example.org>  Sat, 01 Jul 2023 10:00:00 +0000
"""

MAN = r'''.\" Manual page for hello
.TH HELLO 1 "January 2024" "hello 2.12" "User Commands"
.SH NAME
hello \- friendly greeting program
.SH SYNOPSIS
.B hello
[\fI\,OPTION\/\fR]...
.SH DESCRIPTION
Print a friendly,
customizable greeting \(em see \fBprintf\fP(3).
.TP
\fB\-g\fR, \fB\-\-greeting\fR=\fI\,TEXT\/\fR
use TEXT as the greeting message
.TP
.B \-t
use traditional \*(lqhello, world\*(rq greeting
.PP
Example:
.nf
  hello \-g "Hi"
  Hi
.fi
.SS "Exit status"
Zero on success.
.de XX
this macro body is not text
..
.SH "SEE ALSO"
.BR printf (1),
.IR locale (7)
'''

MAN_TEXT = """HELLO(1)

NAME

hello - friendly greeting program

SYNOPSIS

hello [OPTION]...

DESCRIPTION

Print a friendly, customizable greeting \u2014 see printf(3).

-g, --greeting=TEXT
use TEXT as the greeting message

-t
use traditional \u201chello, world\u201d greeting

Example:

  hello -g "Hi"
  Hi

Exit status

Zero on success.

SEE ALSO

printf(1), locale(7)"""

HTML = """<html><head><title>Hello manual</title><style>p {color: red}</style></head>
<body><h1>Hello</h1><p>Hello prints   a
greeting.</p><script>var x = 1;</script><ul><li>one</li><li>two &amp; three</li></ul>
<pre>  indented
    code</pre></body></html>"""

HTML_TEXT = "Hello manual\n\nHello\n\nHello prints a greeting.\n\none\ntwo & three\n\n  indented\n    code"

PYTHON = '"""Greet the world."""\n\n\ndef greet(name: str) -> str:\n    return f"Hello, {name}!"\n'
LICENCE = "\n\n".join(f"{i}. Paragraph {i} of a long licence text, with terms and conditions." for i in range(40))


def _write(path: Path, text: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    data = text.encode() if isinstance(text, str) else text
    path.write_bytes(gzip.compress(data, mtime=0) if path.name.endswith(".gz") else data)
    return path


@pytest.fixture
def tree(tmp_path) -> Path:
    root = tmp_path / "root"
    doc = root / "usr/share/doc/hello"
    _write(doc / "changelog.Debian.gz", CHANGELOG)
    _write(doc / "copyright", "Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/\n"
           "Upstream-Name: hello\n\nFiles: *\nCopyright: 2024 Jane Doe\nLicense: GPL-3+\n")
    _write(doc / "manual.html", HTML)
    _write(doc / "NEWS.gz", "* Noteworthy changes in release 2.12\n\nThe greeting is now translated.\n")
    _write(doc / "README", "Hello prints a greeting. Run `hello --help` for the options.\n")
    _write(doc / "notes.bin", "not a kind the pool reads")
    _write(root / "usr/share/man/man1/hello.1.gz", MAN)
    _write(root / "usr/share/man/man1/hi.1.gz", ".so man1/hello.1\n")  # an alias page: not a document
    _write(root / "usr/share/common-licenses/GPL-3", LICENCE)
    (root / "usr/share/common-licenses/GPL").symlink_to("GPL-3")  # symlinks repeat files: skipped
    _write(root / "usr/lib/python3.11/greet.py", PYTHON)
    _write(root / "usr/bin/greet", "#!/bin/sh\n# greet the user by name\necho \"Hello, $USER\"\n")
    _write(root / "usr/bin/hello", b"\x7fELF\0\0\0binary")
    _write(root / "var/lib/dpkg/info/hello.list", "/.\n/usr/share/man/man1/hello.1.gz\n/bin/greet\n")
    _write(root / "var/lib/dpkg/info/base-files.list", "/usr/share/common-licenses/GPL-3\n")
    _write(root / "var/lib/dpkg/info/libpython3.11-stdlib:amd64.list", "/usr/lib/python3.11/greet.py\n")
    return root


def _pool(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "pool.jsonl").read_text().splitlines()]


def test_troff_and_html_render_to_golden_text():
    assert troff_to_text(MAN) == MAN_TEXT
    assert html_to_text(HTML) == HTML_TEXT


def test_changelog_entries_and_grouping():
    entries = changelog_entries(CHANGELOG, debian=True)
    assert len(entries) == 3 and all(e.startswith("hello (") and "-- Jane Doe" in e for e in entries)
    upstream = changelog_entries("2.0\n- big change\n\n1.0\n- first\n  more\n", debian=False)
    assert upstream == ["2.0\n- big change", "1.0\n- first\n  more"]
    assert group_entries(["a" * 5, "b" * 5, "c" * 20], min_chars=8, max_chars=100) == ["a" * 5 + "\n\n" + "b" * 5,
                                                                                        "c" * 20]
    parts = split_long(LICENCE, 300)
    assert len(parts) > 5 and all(len(p) <= 300 for p in parts) and "\n\n".join(parts) == LICENCE


def test_pool_reads_every_kind_with_ids_packages_and_golden_man_text(tree, tmp_path):
    manifest = build_pool(PoolConfig(out_dir=tmp_path / "out", roots=(tree,), min_chars=20, max_chars=4000),
                          log=lambda _: None)
    docs = _pool(tmp_path / "out")
    by_id = {d["id"]: d for d in docs}
    assert [by_id[f"changelog:usr/share/doc/hello/changelog.Debian.gz:{i}"]["text"].split()[1] for i in range(3)] \
        == ["(2.12-2)", "(2.12-1)", "(2.10-3)"]
    assert by_id["man:usr/share/man/man1/hello.1.gz:0"]["text"] == MAN_TEXT
    assert by_id["html:usr/share/doc/hello/manual.html:0"]["text"] == HTML_TEXT
    # every text is tidied: trailing spaces and blank-line runs squeezed (PEP 8's two blank lines become one)
    assert by_id["source:usr/lib/python3.11/greet.py:0"]["text"] == PYTHON.replace("\n\n\n", "\n\n").rstrip("\n")
    assert "source:usr/bin/greet:0" in by_id and not any("usr/bin/hello" in i for i in by_id)  # ELF skipped
    assert not any("hi.1.gz" in i or "common-licenses/GPL:" in i or "notes.bin" in i for i in by_id)
    assert {d["kind"] for d in docs} == set(KINDS)
    packages = {d["id"].split(":")[1]: d["package"] for d in docs}
    assert packages["usr/share/doc/hello/copyright"] == "hello"
    assert packages["usr/share/man/man1/hello.1.gz"] == "hello"  # from var/lib/dpkg/info/hello.list
    assert packages["usr/bin/greet"] == "hello"  # merged /usr: dpkg lists /bin/greet
    assert packages["usr/share/common-licenses/GPL-3"] == "base-files"
    assert packages["usr/lib/python3.11/greet.py"] == "libpython3.11-stdlib"  # the :amd64 suffix dropped
    assert all(d["path"] == str(tree / d["id"].split(":")[1]) for d in docs)
    assert manifest["counts"]["changelog"] == 3 and manifest["documents"] == len(docs)
    assert manifest["chars"]["man"] == len(MAN_TEXT)
    assert json.loads((tmp_path / "out" / "manifest.json").read_text())["sha256"] == manifest["sha256"]


def test_pool_is_deterministic(tree, tmp_path):
    cfg = dict(roots=(tree,), min_chars=20, max_chars=300, max_per_kind=3, seed=7)
    a = build_pool(PoolConfig(out_dir=tmp_path / "a", **cfg), log=lambda _: None)
    b = build_pool(PoolConfig(out_dir=tmp_path / "b", **cfg), log=lambda _: None)
    assert a["sha256"] == b["sha256"]
    assert (tmp_path / "a" / "pool.jsonl").read_bytes() == (tmp_path / "b" / "pool.jsonl").read_bytes()
    import hashlib

    assert hashlib.sha256((tmp_path / "a" / "pool.jsonl").read_bytes()).hexdigest() == a["sha256"]


def test_caps_and_splitting_are_respected(tree, tmp_path):
    build_pool(PoolConfig(out_dir=tmp_path / "o", roots=(tree,), min_chars=20, max_chars=300, max_per_kind=2,
                          caps={"changelog": 1, "man": 0}, max_parts_per_file=3), log=lambda _: None)
    docs = _pool(tmp_path / "o")
    count = {k: sum(d["kind"] == k for d in docs) for k in KINDS}
    assert count["changelog"] == 1 and count["man"] == 0 and max(count.values()) <= 2
    assert count["licence"] == 2  # the long licence is split; max_per_kind stops it at 2 of its parts
    assert all(len(d["text"]) <= 300 for d in docs) and all(len(d["text"]) >= 20 for d in docs)
    build_pool(PoolConfig(out_dir=tmp_path / "p", roots=(tree,), min_chars=20, max_chars=300, max_parts_per_file=3),
               log=lambda _: None)
    assert sum(d["kind"] == "licence" for d in _pool(tmp_path / "p")) == 3  # max_parts_per_file


def test_bad_roots_and_caps_are_user_errors(tree, tmp_path):
    with pytest.raises(UserError, match="no such folder"):
        build_pool(PoolConfig(out_dir=tmp_path / "o", roots=(tmp_path / "missing",)))
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="holds none of usr/share/doc"):
        build_pool(PoolConfig(out_dir=tmp_path / "o", roots=(tmp_path / "empty",)))
    with pytest.raises(UserError, match="--cap manual: unknown kind"):
        build_pool(PoolConfig(out_dir=tmp_path / "o", roots=(tree,), caps={"manual": 3}))
    assert not (tmp_path / "o").exists()


def test_cli_writes_pool_and_manifest(tree, tmp_path, capsys):
    out = tmp_path / "cli"
    assert main(["data", "pool", "--out", str(out), "--root", str(tree), "--min-chars", "20",
                 "--max-per-kind", "5", "--cap", "source=1"]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["counts"]["source"] == 1 and manifest["config"]["roots"] == [str(tree)]
    assert "documents" in capsys.readouterr().out
    assert main(["data", "pool", "--out", str(out), "--root", str(tmp_path / "nope")]) == 2
    assert f"--root {tmp_path / 'nope'}: no such folder" in capsys.readouterr().err


def test_help(capsys):
    with pytest.raises(SystemExit) as e:
        main(["data", "pool", "--help"])
    assert e.value.code == 0 and "usage: minicpm4 data pool" in capsys.readouterr().out

"""Readers for the Debian text packages the corpus is built from, one per package.

Each reader yields structured entries (a dictionary headword and its text, a WordNet lemma and its senses,
a Bible verse) that the SFT builder reuses, and `SOURCES` turns them into plain documents
(source, title, text) for pretraining. Markup that belongs to one format (GCIDE's pronunciation keys and
accent codes, dictd's hard-wrapped lines, WordNet's pointer fields) is removed here; generic cleaning
(Unicode form, control characters, blank lines) is corpus.py's job. Paths default to where Debian
installs the files; tests point `SourcePaths` at small fixtures.
"""

from __future__ import annotations

import gzip
import re
import shutil
import subprocess
import unicodedata
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator


@dataclass(frozen=True)
class Document:
    source: str  # a key of SOURCES
    title: str  # headword, lemma, "Genesis 1", "cookie #12": also the key of the train/val split
    text: str


@dataclass(frozen=True)
class SourcePaths:
    dictd_dir: Path = Path("/usr/share/dictd")
    wordnet_dir: Path = Path("/usr/share/wordnet")
    fortunes_dir: Path = Path("/usr/share/games/fortunes")
    # A dump in the format of `bible -f Gen1:1-Rev22:21` ("Ge1:1 In the beginning ..."); None runs the
    # `bible` program of package bible-kjv, the only reader of bible-kjv-text's compressed bible.data.
    bible_text: Path | None = None


# ---- dictd databases (dict-gcide, dict-foldoc, dict-jargon, dict-vera, dict-devil) -------------------

_B64 = {c: i for i, c in enumerate("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/")}


def _b64_number(digits: str) -> int:
    """dictd .index offsets/lengths are big-endian base-64 numbers ("Gb9L"), not base64-encoded bytes."""
    value = 0
    for c in digits:
        value = value * 64 + _B64[c]
    return value


def read_dictd(dict_path: Path, index_path: Path) -> Iterator[tuple[str, str]]:
    """(headword, raw entry text) once per entry, in index order.

    The .index lists an entry under every headword and variant ("Lifeless", "Lifelessness"), so several
    lines share one byte span: the first names it. Meta entries ("00-database-info") are skipped.
    """
    data = gzip.open(dict_path).read()  # .dict.dz is dictzip = gzip with a random-access table
    seen: set[tuple[int, int]] = set()
    with open(index_path, encoding="utf-8", errors="replace") as index:
        for lineno, line in enumerate(index, 1):
            fields = line.rstrip("\n").split("\t")
            if len(fields) < 3:
                raise ValueError(f"{index_path}:{lineno}: expected 'headword<TAB>offset<TAB>length'")
            headword, span = fields[0], (_b64_number(fields[1]), _b64_number(fields[2]))
            if headword.startswith(("00-database", "00database")) or span in seen:
                continue
            seen.add(span)
            raw = data[span[0] : span[0] + span[1]]
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError:  # a handful of GCIDE entries carry cp1252 bytes (0x92 = ’)
                text = raw.decode("cp1252", errors="replace")
            yield headword, text


_MARKER = re.compile(r"\s*(?:\d{1,2}\.\s|\([a-z0-9]{1,3}\)\s|Syn:|Note:|Usage:|See also|--|[-*]\s)")


def unfill(text: str, width: int) -> str:
    """Undo hard wrapping: join a line to the previous one when its first word would not have fitted on
    that line at the fill column `width` (so a filler broke there); short lines (verse, lists) stay."""
    out: list[str] = []
    prev = ""
    for line in text.split("\n"):
        words = line.split(maxsplit=1)
        broke_here = len(prev.rstrip()) + 1 + len(words[0]) > width if words else False
        if out and prev.strip() and broke_here and not _MARKER.match(line):
            out[-1] += " " + line.strip()
        else:
            out.append(line)
        prev = line
    return "\n".join(out)


def _unbrace(text: str) -> str:
    """dictd marks cross-references and italics as {word}; GCIDE also writes syllables and stress inside
    them ({Life"less*ly}), which we drop so the word reads as spelled."""
    def plain(m: re.Match) -> str:
        inner = m.group(1)
        return re.sub(r'["*`]', "", inner) if re.fullmatch(r"[A-Za-z\"*`' -]+", inner) else inner
    return re.sub(r"\{([^{}]*)\}", plain, text)


# GCIDE's ASCII accent codes: "[e^]" or "[^e]" circumflex, "['e]" acute, "[=a]" macron, ... -> Unicode.
_COMBINING = {"^": "\u0302", "'": "\u0301", "`": "\u0300", '"': "\u0308", "~": "\u0303", "=": "\u0304",
              "-": "\u0306", ".": "\u0307", ",": "\u0327"}
_NAMED = {"ae": "æ", "AE": "Æ", "oe": "œ", "OE": "Œ", "=ae": "ǣ", "eth": "ð", "thorn": "þ", "imac": "ī",
          "aum": "ä", "ng": "ŋ", "root": "√", "deg": "°", "sect": "§", "yogh": "ȝ", "th": "θ", "=oo": "o͞o",
          "oo^": "o͝o",
          "alpha": "α", "beta": "β", "gamma": "γ", "Delta": "Δ", "delta": "δ", "theta": "θ", "iota": "ι",
          "kappa": "κ", "Lambda": "Λ", "lambda": "λ", "pi": "π", "phi": "φ", "rho": "ρ", "tau": "τ",
          "pounds": "£", "times": "×", "flat": "♭", "sharp": "♯"}


def _accent(m: re.Match) -> str:
    code = m.group(1)
    if code in _NAMED:
        return _NAMED[code]
    if len(code) == 2 and code[0] in _COMBINING and code[1].isalpha():
        return unicodedata.normalize("NFC", code[1] + _COMBINING[code[0]])
    if len(code) == 2 and code[1] == "^" and code[0].isalpha():  # "[i^]"; a trailing "." is "[R.]" = Rare
        return unicodedata.normalize("NFC", code[0] + _COMBINING["^"])
    return m.group(0)  # an editorial label such as [Obs.] or [Slang]: keep


# Provenance tags ("[1913 Webster]", "[WordNet 1.5 +PJC]") say which edition a line came from, not what it
# means; the rest of such a line is a stray headword of a merged entry ("[1913 Webster] Leucocythaemia").
_GCIDE_SOURCE_TAG = re.compile(r"\[(?=[^\]\n]*(?:Webster|WordNet|PJC|Century Dict))[^\]\n]*\][^\n]*")
# The syllabified headword "\Life"less\" plus a following pronunciation "(sp[^u]rt)" (those hold accent
# codes, stress marks or "?"); a plain label such as "(Bot.)" stays.
_GCIDE_PRONUNCIATION = re.compile(r"[ \t]*\\[^\\\n]*\\(?:[ \t]*\([^()\n]*[\[\"'`?][^()\n]*\))?")
# Fill columns measured on the Debian files (99.9th percentile line length). FOLDOC entries were filled at
# 60 to 66 columns; at 66 most of its wrapped lines would stay broken, at 60 a line that was meant to stay
# short is joined only if it is 55+ characters long, which FOLDOC's lists and code rarely are.
_DICTD_WIDTH = {"gcide": 64, "foldoc": 60, "jargon": 79, "vera": 72, "devil": 70}


def clean_dictd(name: str, text: str) -> str:
    """Plain text of one dictd entry. Unwrap first: the fill column is measured on the raw lines."""
    text = unfill(text, _DICTD_WIDTH[name])
    if name == "gcide":
        text = _GCIDE_SOURCE_TAG.sub("", text)
        text = _GCIDE_PRONUNCIATION.sub("", text)
        text = re.sub(r"\[([^\]\n]{1,6})\]", _accent, text)
    text = _unbrace(text)
    # Indentation and right-aligned citations ("spurt.          --T. Hughes.") carry no meaning once unwrapped.
    return "\n".join(re.sub(r"[ \t]{2,}", " ", line).strip() for line in text.split("\n")).strip()


def dictd_entries(name: str, paths: SourcePaths) -> Iterator[tuple[str, str]]:
    """(headword, cleaned entry text) of dictd database `name` (gcide, foldoc, jargon, vera, devil)."""
    base = paths.dictd_dir / name
    for headword, raw in read_dictd(Path(f"{base}.dict.dz"), Path(f"{base}.index")):
        yield headword, clean_dictd(name, raw)


# ---- WordNet 3.0 (wordnet-base) -----------------------------------------------------------------------

_POS_NAME = {"n": "noun", "v": "verb", "a": "adjective", "s": "adjective", "r": "adverb"}
_POS_FILE = {"n": "noun", "v": "verb", "a": "adj", "s": "adj", "r": "adv"}
_POS_FILES = ("noun", "verb", "adj", "adv")  # data.* / index.* suffixes, in the order senses are listed


@dataclass(frozen=True)
class Sense:
    pos: str  # noun | verb | adjective | adverb
    definition: str  # the gloss without its examples
    examples: tuple[str, ...]  # quoted usage examples from the gloss
    synonyms: tuple[str, ...]  # the synset's other lemmas
    hypernyms: tuple[str, ...]  # first lemma of each "@"/"@i" target: "a kind of" / "an instance of"
    proper: bool  # the lemma is capitalised in this synset: a name ("Einstein"), not a word


@dataclass(frozen=True)
class WordEntry:
    lemma: str  # spelled as in its first sense ("dog", "New York")
    senses: tuple[Sense, ...]  # in WordNet's sense order (most frequent first), nouns, verbs, adj., adv.


def _word(form: str) -> str:
    return re.sub(r"\((?:a|p|ip)\)$", "", form).replace("_", " ")  # adjective position markers: "on_tap(p)"


def _read_synsets(path: Path) -> dict[str, tuple[str, list[str], list[tuple[str, str, str]], str]]:
    """offset -> (ss_type, words, pointers (symbol, offset, pos), gloss) of one data.* file (wndb(5))."""
    out = {}
    with open(path, encoding="utf-8", errors="replace") as f:
        for lineno, line in enumerate(f, 1):
            if line.startswith("  "):  # the licence header
                continue
            head, _, gloss = line.partition(" | ")
            fields = head.split()
            try:
                n_words = int(fields[3], 16)
                words = [_word(w) for w in fields[4 : 4 + 2 * n_words : 2]]
                at = 4 + 2 * n_words
                n_ptrs = int(fields[at])
                ptrs = [tuple(fields[at + 1 + 4 * i : at + 5 + 4 * i]) for i in range(n_ptrs)]
            except (IndexError, ValueError) as e:
                raise ValueError(f"{path}:{lineno}: not a WordNet data line: {e}") from e
            out[fields[0]] = (fields[2], words, ptrs, gloss.strip())
    return out


def _split_gloss(gloss: str) -> tuple[str, tuple[str, ...]]:
    """'sloping land; "they pulled the canoe up on the bank"' -> definition, examples. The definition loses
    its final period ("etc.") so that writers can always add one."""
    quote = gloss.find('"')
    definition = (gloss if quote < 0 else gloss[:quote]).strip().rstrip(";. ")
    examples = () if quote < 0 else tuple(e.strip() for e in re.findall(r'"([^"]+)"', gloss[quote:]))
    return definition, examples


def wordnet_entries(paths: SourcePaths) -> Iterator[WordEntry]:
    """Every lemma of WordNet with its senses, sorted by lemma (index.* give the sense order)."""
    folder = paths.wordnet_dir
    synsets = {pos: _read_synsets(folder / f"data.{pos}") for pos in _POS_FILES}
    by_lemma: dict[str, list[Sense]] = {}
    spelled: dict[str, str] = {}
    for pos in _POS_FILES:
        with open(folder / f"index.{pos}", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("  "):
                    continue
                fields = line.split()
                lemma, synset_cnt = fields[0], int(fields[2])
                key = lemma.replace("_", " ")
                for offset in fields[len(fields) - synset_cnt :]:  # the offsets end the line
                    if offset not in synsets[pos]:
                        raise ValueError(f"{folder / f'index.{pos}'}: {lemma} names synset {offset}, "
                                         f"which data.{pos} does not have")
                    ss_type, words, ptrs, gloss = synsets[pos][offset]
                    form = next((w for w in words if w.lower() == key), key)
                    spelled.setdefault(key, form)
                    definition, examples = _split_gloss(gloss)
                    hypernyms = tuple(synsets[_POS_FILE[p]][o][1][0] for s, o, p, _ in ptrs if s in ("@", "@i"))
                    by_lemma.setdefault(key, []).append(Sense(
                        pos=_POS_NAME[ss_type], definition=definition, examples=examples,
                        synonyms=tuple(w for w in words if w.lower() != key), hypernyms=hypernyms,
                        proper=form != form.lower()))
    for key in sorted(by_lemma):
        yield WordEntry(spelled[key], tuple(by_lemma[key]))


def wordnet_text(entry: WordEntry) -> str:
    """The dictionary-style document of one lemma: one "lemma (pos)" heading per part of speech, numbered senses."""
    lines, pos = [], None
    for sense in entry.senses:
        if sense.pos != pos:
            pos, number = sense.pos, 0
            lines.append(f"{entry.lemma} ({pos})")
        number += 1
        parts = [f"{number}. {sense.definition}."]
        if sense.synonyms:
            parts.append(f"Synonyms: {', '.join(sense.synonyms)}.")
        if sense.hypernyms:
            parts.append(f"Type of: {', '.join(sense.hypernyms)}.")
        if sense.examples:
            parts.append("Example: " + "; ".join(f'"{e}"' for e in sense.examples))
        lines.append(" ".join(parts))
    return "\n".join(lines)


# ---- King James Bible (bible-kjv-text, read through bible-kjv) ----------------------------------------

# `bible -f` abbreviations, in canonical order -> the names the KJV uses.
BOOKS = dict(zip(
    "Ge Exo Lev Num Deu Josh Jdgs Ruth 1Sm 2Sm 1Ki 2Ki 1Chr 2Chr Ezra Neh Est Job Psa Prv Eccl SSol Isa Jer "
    "Lam Eze Dan Hos Joel Amos Obad Jonah Mic Nahum Hab Zep Hag Zec Mal Mat Mark Luke John Acts Rom 1Cor 2Cor "
    "Gal Eph Phi Col 1Th 2Th 1Tim 2Tim Titus Phmn Heb Jas 1Pet 2Pet 1Jn 2Jn 3Jn Jude Rev".split(),
    ["Genesis", "Exodus", "Leviticus", "Numbers", "Deuteronomy", "Joshua", "Judges", "Ruth", "1 Samuel",
     "2 Samuel", "1 Kings", "2 Kings", "1 Chronicles", "2 Chronicles", "Ezra", "Nehemiah", "Esther", "Job",
     "Psalms", "Proverbs", "Ecclesiastes", "Song of Solomon", "Isaiah", "Jeremiah", "Lamentations", "Ezekiel",
     "Daniel", "Hosea", "Joel", "Amos", "Obadiah", "Jonah", "Micah", "Nahum", "Habakkuk", "Zephaniah", "Haggai",
     "Zechariah", "Malachi", "Matthew", "Mark", "Luke", "John", "Acts", "Romans", "1 Corinthians",
     "2 Corinthians", "Galatians", "Ephesians", "Philippians", "Colossians", "1 Thessalonians",
     "2 Thessalonians", "1 Timothy", "2 Timothy", "Titus", "Philemon", "Hebrews", "James", "1 Peter", "2 Peter",
     "1 John", "2 John", "3 John", "Jude", "Revelation"], strict=True))
_VERSE = re.compile(r"([1-3]?[A-Za-z]+)(\d+):(\d+) (.*)")


@dataclass(frozen=True)
class Verse:
    book: str
    chapter: int
    verse: int
    text: str

    @property
    def ref(self) -> str:
        return f"{self.book} {self.chapter}:{self.verse}"


def read_bible(lines: Iterable[str]) -> Iterator[Verse]:
    """Verses from `bible -f` output, one "Ge1:1 In the beginning ..." per line."""
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        m = _VERSE.fullmatch(line.strip())
        if m is None or m.group(1) not in BOOKS:
            raise ValueError(f"bible text line {lineno}: expected 'Ge1:1 text', got {line.strip()[:60]!r}")
        yield Verse(BOOKS[m.group(1)], int(m.group(2)), int(m.group(3)), m.group(4).strip())


def bible_verses(paths: SourcePaths) -> Iterator[Verse]:
    if paths.bible_text is not None:
        with open(paths.bible_text, encoding="utf-8") as f:
            yield from read_bible(f)
        return
    # -f: one verse per line with its reference; the range spans the whole book (66 books, 31,102 verses).
    command = ["bible", "-f", "Gen1:1-Rev22:21"]
    try:
        result = subprocess.run(command, capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError) as e:
        detail = getattr(e, "stderr", None) or e
        raise ValueError(f"`{' '.join(command)}` failed ({detail}); install package bible-kjv or pass a dump "
                         f"of its output as bible_text") from e
    yield from read_bible(result.stdout.splitlines())


def bible_documents(paths: SourcePaths) -> Iterator[Document]:
    """One document per chapter; every verse keeps its full reference so "John 3:16" is learnable."""
    chapter: list[Verse] = []
    for verse in [*bible_verses(paths), None]:
        if chapter and (verse is None or (verse.book, verse.chapter) != (chapter[0].book, chapter[0].chapter)):
            title = f"{chapter[0].book} {chapter[0].chapter}"
            yield Document("bible", title, "\n".join(f"{v.ref} {v.text}" for v in chapter))
            chapter = []
        if verse is not None:
            chapter.append(verse)


# ---- fortunes (fortunes, fortune-mod) -----------------------------------------------------------------

def fortune_documents(paths: SourcePaths) -> Iterator[Document]:
    """One document per fortune: files are fortunes separated by lines holding only "%"."""
    for path in sorted(paths.fortunes_dir.iterdir()):
        # .dat are strfile indexes, .u8 symlinks; ascii-art holds pictures, not text
        if path.is_symlink() or not path.is_file() or path.suffix in (".dat", ".u8") or path.name == "ascii-art":
            continue
        text = path.read_text(encoding="utf-8", errors="replace")
        for i, fortune in enumerate(re.split(r"(?m)^%\n", text)):
            if fortune.strip():
                yield Document("fortunes", f"{path.name} #{i}", fortune.rstrip())


# ---- the registry -------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Source:
    name: str
    packages: tuple[str, ...]  # Debian packages that provide it
    licence: str  # from /usr/share/doc/<package>/copyright
    documents: Callable[[SourcePaths], Iterator[Document]]
    needs: Callable[[SourcePaths], list[Path]]  # files that must exist

    def missing(self, paths: SourcePaths) -> list[str]:
        gone = [str(p) for p in self.needs(paths) if not p.exists()]
        if self.name == "bible" and paths.bible_text is None and shutil.which("bible") is None:
            gone.append("the `bible` program")
        return gone


def _dictd_source(name: str, package: str, licence: str) -> Source:
    def documents(paths: SourcePaths) -> Iterator[Document]:
        for headword, text in dictd_entries(name, paths):
            yield Document(name, headword, text)

    def needs(paths: SourcePaths) -> list[Path]:
        return [paths.dictd_dir / f"{name}.dict.dz", paths.dictd_dir / f"{name}.index"]

    return Source(name, (package,), licence, documents, needs)


SOURCES: dict[str, Source] = {s.name: s for s in (
    Source("wordnet", ("wordnet-base",), "WordNet 3.0 licence (permissive, BSD-like; Princeton University)",
           lambda p: (Document("wordnet", e.lemma, wordnet_text(e)) for e in wordnet_entries(p)),
           lambda p: [p.wordnet_dir / f"{kind}.{pos}" for kind in ("data", "index") for pos in _POS_FILES]),
    _dictd_source("gcide", "dict-gcide", "GPL-2.0-or-later (GNU Collaborative International Dictionary of "
                  "English; 1913 Webster's is public domain)"),
    Source("bible", ("bible-kjv-text", "bible-kjv"), "public domain (King James Version, 1611); "
           "reader program GPL-2.0-or-later", bible_documents,
           lambda p: [p.bible_text] if p.bible_text is not None else [Path("/usr/lib/bible.data")]),
    _dictd_source("foldoc", "dict-foldoc", "GFDL-1.1-or-later (Free On-line Dictionary of Computing, Denis Howe)"),
    _dictd_source("jargon", "dict-jargon", "public domain (The Jargon File 4.4.7)"),
    _dictd_source("vera", "dict-vera", "GFDL-1.1-or-later, no invariant sections (V.E.R.A. acronyms)"),
    _dictd_source("devil", "dict-devil", "public domain (Ambrose Bierce, The Devil's Dictionary, 1911)"),
    Source("fortunes", ("fortunes", "fortune-mod"), "BSD-3-Clause (fortune-mod; quotations of mixed origin)",
           fortune_documents, lambda p: [p.fortunes_dir]),
)}

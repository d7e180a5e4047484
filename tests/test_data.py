"""Data pipeline tests on small fixture files written here (no Debian packages needed): the dictd, WordNet,
Bible and fortune readers, corpus cleaning/dedup/split, tokenizer training, token shards and SFT synthesis."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import numpy as np
import pytest

from minicpm4.cli import main
from minicpm4.data.corpus import CorpusConfig, build_corpus, clean_text, iter_corpus, split_of
from minicpm4.data.sft_synth import TASKS, SFTConfig, build_sft
from minicpm4.data.shards import TokenShards, write_shards
from minicpm4.data.sources import (SourcePaths, bible_documents, clean_dictd, read_bible, read_dictd, unfill,
                                   wordnet_entries, wordnet_text)
from minicpm4.data.tokenizer_train import SPECIAL_TOKENS, train_tokenizer
from minicpm4.tokenizer import Tokenizer

B64 = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
WORDS = [a + b + c for a in "bcdfg" for b in "aeiou" for c in "lmnrst"]  # 150 made-up words: "bal", "bam", ...


def b64(n: int) -> str:
    digits = ""
    while True:
        digits = B64[n % 64] + digits
        n //= 64
        if n == 0:
            return digits


def write_dictd(folder: Path, name: str, entries: list[tuple[list[str], str]]) -> None:
    """A dictd database: entries are (headwords, text); every headword gets an index line on the same span."""
    data, index = b"", []
    for headwords, text in entries:
        raw = text.encode()
        index += [f"{h}\t{b64(len(data))}\t{b64(len(raw))}" for h in headwords]
        data += raw
    index.insert(0, f"00-database-info\t{b64(0)}\t{b64(5)}")  # meta entry: must be skipped
    with gzip.open(folder / f"{name}.dict.dz", "wb") as f:
        f.write(data)
    (folder / f"{name}.index").write_text("\n".join(index) + "\n", encoding="utf-8")


GCIDE_LIFELESS = (
    'Lifeless \\Life"less\\, a.\n'
    "   Destitute of life, or deprived of life; not containing, or\n"
    "   inhabited by, living beings or vegetation; dead. -- {Life\"less*ly},\n"
    "   adv.\n"
    "   [1913 Webster] Lifelessness\n\n"
    "         The long, steady sweep of the so-called paddle tried\n"
    "         him.                                        --T. Hughes.\n")


def make_sources(root: Path) -> SourcePaths:
    dictd, wordnet, fortunes = root / "dictd", root / "wordnet", root / "fortunes"
    for d in (dictd, wordnet, fortunes):
        d.mkdir(parents=True)
    write_dictd(dictd, "gcide", [
        (["Lifeless", "Lifelessness"], GCIDE_LIFELESS),
        (["Cafe"], "Cafe \\Ca*f['e]\\ (k[.a]*f[=a]\"), n. [F.]\n   A coffee house; a restaurant. [R.]\n"),
    ] + [([w.capitalize()], f"{w.capitalize()}, n.\n   The gcide sense of {w}, a thing of kind {i}.\n")
         for i, w in enumerate(WORDS)])
    write_dictd(dictd, "foldoc", [(["jovial"], "JOVIAL\n\n   <language> (Jule's Own Version of IAL) A version of "
                                   "{IAL} produced by\n   Jules Schwartz in 1959-1960.\n\n   (1996-07-19)\n")])
    write_dictd(dictd, "jargon", [(["bogus"], "bogus\n adj.\n\n    1. Non-functional. Your patches are bogus and "
                                   "nothing will make them work today.\n")])
    write_dictd(dictd, "vera", [(["lov"], "LOV\n       List Of Values (DB, Oracle, Java)\n")])
    write_dictd(dictd, "devil", [(["liar"], "LIAR, n.  A lawyer with a roving commission.\n")])
    header = "  1 This software and database is being provided to you, the LICENSEE\n"
    nouns = [f"{i:08d} 03 n 01 {w} 0 001 @ 99999999 n 0000 | the {w} meaning number {i}; \"a {w} in a sentence\"  "
             for i, w in enumerate(WORDS)]
    nouns.append("99999999 03 n 02 thing 0 entity 0 000 | a separate and self-contained entity  ")
    nouns.append("88888888 18 n 01 Einstein 0 001 @i 99999999 n 0000 | physicist born in Germany  ")
    (wordnet / "data.noun").write_text(header + "\n".join(nouns) + "\n")
    (wordnet / "data.verb").write_text(header + "77777777 30 v 01 bal 0 000 01 + 02 00 | to bal around  \n")
    (wordnet / "data.adj").write_text(header)
    (wordnet / "data.adv").write_text(header)
    index = [f"{w} n 1 1 @ 1 0 {i:08d}  " for i, w in enumerate(WORDS)]
    index += ["einstein n 1 1 @ 1 0 88888888  ", "entity n 1 0 1 0 99999999  ", "thing n 1 0 1 0 99999999  "]
    (wordnet / "index.noun").write_text(header + "\n".join(sorted(index)) + "\n")
    (wordnet / "index.verb").write_text(header + "bal v 1 0 1 0 77777777  \n")
    (wordnet / "index.adj").write_text(header)
    (wordnet / "index.adv").write_text(header)
    (fortunes / "cookie").write_text(
        "Whereof one cannot speak, thereof one must be silent.\n\t\t-- Wittgenstein\n%\n"
        "A fortune that appears twice, word for word.\n%\n"
        "A fortune that appears twice, word for word.\n%\n"
        "a FORTUNE that appears   twice -- word for word!\n%\n"  # near duplicate: case, spacing, punctuation
        "  ||  ()  ##  ++  ||  ()  ##  ++  ||  ()  ##  ++\n%\n"  # ASCII art: low letter ratio
        "Too short.\n%\n")
    (fortunes / "cookie.dat").write_bytes(b"\x00\x01binary strfile index")
    (fortunes / "cookie.u8").symlink_to("cookie")
    verses = [f"Ge{c}:{v} And in chapter {c} verse {v} the fixture says a thing that is unique."
              for c in (1, 2, 3) for v in range(1, 21)]
    verses += ["John11:35 Jesus wept.", "John11:36 Then said the Jews, Behold how he loved him!"]
    (root / "bible.txt").write_text("\n".join(verses) + "\n")
    return SourcePaths(dictd_dir=dictd, wordnet_dir=wordnet, fortunes_dir=fortunes, bible_text=root / "bible.txt")


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> dict[str, Path]:
    """Fixture sources -> corpus -> tokenizer -> shards, once for the module."""
    root = tmp_path_factory.mktemp("data")
    paths = make_sources(root / "src")
    build_corpus(CorpusConfig(out_dir=root / "corpus", paths=paths, val_fraction=0.2), show_progress=False)
    train_tokenizer(root / "corpus", root / "tokenizer", vocab_size=400, show_progress=False)
    write_shards(root / "corpus", root / "tokenizer", root / "shards", batch_size=7, show_progress=False)
    return {"root": root, "paths": paths, "corpus": root / "corpus", "tokenizer": root / "tokenizer",
            "shards": root / "shards"}


# ---- readers --------------------------------------------------------------------------------------------

def test_dictd_reader_one_entry_per_span_and_skips_meta(tmp_path):
    write_dictd(tmp_path, "devil", [(["liar", "liars"], "LIAR, n. x\n"), (["lov"], "LOV\n")])
    got = list(read_dictd(tmp_path / "devil.dict.dz", tmp_path / "devil.index"))
    assert got == [("liar", "LIAR, n. x\n"), ("lov", "LOV\n")]


def test_gcide_cleaning():
    text = clean_dictd("gcide", GCIDE_LIFELESS)
    assert text.split("\n")[0] == "Lifeless, a."  # syllabified headword removed
    assert "Destitute of life, or deprived of life; not containing, or inhabited by, living beings" in text  # unwrapped
    assert "Lifelessly, adv." in text  # braces and syllable marks gone
    assert "Webster" not in text and "Lifelessness" not in text  # provenance tag and its stray headword
    assert "tried him. --T. Hughes." in text  # citation unwrapped, right alignment collapsed
    cafe = clean_dictd("gcide", "Cafe \\Ca*f['e]\\ (k[.a]*f[=a]\"), n. [F.]\n   A caf['e]; a restaurant. [R.]\n")
    assert cafe == "Cafe, n. [F.]\nA café; a restaurant. [R.]"  # accent code decoded, the "Rare" label kept


def test_unfill_keeps_short_lines():
    poem = "Roses are red,\nviolets are blue.\n"
    assert unfill(poem, 30) == poem
    wrapped = "a b c d e f g h i j k l m\nn o p\n1. a list item"
    assert unfill(wrapped, 26) == "a b c d e f g h i j k l m n o p\n1. a list item"


def test_wordnet_entries_and_text(tmp_path):
    paths = make_sources(tmp_path)
    entries = {e.lemma: e for e in wordnet_entries(paths)}
    assert "Einstein" in entries and entries["Einstein"].senses[0].proper
    bal = entries["bal"]
    assert [s.pos for s in bal.senses] == ["noun", "verb"]
    assert bal.senses[0].definition == "the bal meaning number 0"
    assert bal.senses[0].examples == ("a bal in a sentence",)
    assert bal.senses[0].hypernyms == ("thing",)
    assert entries["thing"].senses[0].synonyms == ("entity",)
    assert wordnet_text(bal).split("\n") == [
        "bal (noun)", '1. the bal meaning number 0. Type of: thing. Example: "a bal in a sentence"',
        "bal (verb)", "1. to bal around."]


def test_bible_reader():
    verses = list(read_bible(["Ge1:1 In the beginning.", "", "1Cor13:4 Charity suffereth long."]))
    assert [v.ref for v in verses] == ["Genesis 1:1", "1 Corinthians 13:4"]
    with pytest.raises(ValueError, match="line 1"):
        list(read_bible(["Xyz1:1 nope"]))


def test_bible_documents_are_chapters(tmp_path):
    docs = list(bible_documents(make_sources(tmp_path)))
    assert [d.title for d in docs] == ["Genesis 1", "Genesis 2", "Genesis 3", "John 11"]
    assert docs[-1].text == "John 11:35 Jesus wept.\nJohn 11:36 Then said the Jews, Behold how he loved him!"


# ---- corpus ---------------------------------------------------------------------------------------------

def test_clean_text():
    assert clean_text("a\r\nb \x07\n\n\n\nc\u200b  ") == "a\nb\n\nc"


def test_corpus_dedup_filters_and_split(built):
    stats = json.loads((built["corpus"] / "stats.json").read_text())
    fortunes = stats["sources"]["fortunes"]
    assert (fortunes["exact_duplicates"], fortunes["near_duplicates"]) == (1, 1)
    assert fortunes["low_letter_ratio"] == 1 and fortunes["too_short"] == 1
    assert stats["sources"]["gcide"]["read"] == 2 + len(WORDS)  # one document per span, meta entry skipped
    assert stats["sources"]["bible"]["licence"].startswith("public domain")
    for split in ("train", "val"):
        docs = list(iter_corpus(built["corpus"], split))
        assert len(docs) == stats["total"]["documents"][split] > 0
        assert all(split_of(d.source, d.title, 0.2) == split for d in docs)
    texts = [d.text for sp in ("train", "val") for d in iter_corpus(built["corpus"], sp)]
    assert len(texts) == len(set(texts))


def test_corpus_is_reproducible(built, tmp_path):
    build_corpus(CorpusConfig(out_dir=tmp_path, paths=built["paths"], val_fraction=0.2), show_progress=False)
    for split in ("train.jsonl", "val.jsonl"):
        assert (tmp_path / split).read_bytes() == (built["corpus"] / split).read_bytes()


def test_missing_source_names_the_package(tmp_path):
    config = CorpusConfig(out_dir=tmp_path / "c", sources=("gcide",), paths=SourcePaths(dictd_dir=tmp_path))
    with pytest.raises(ValueError, match="apt-get install -y --no-install-recommends dict-gcide"):
        build_corpus(config, show_progress=False)
    assert main(["data", "build-corpus", "--out", str(tmp_path / "c"), "--sources", "gcide", "--dictd-dir",
                 str(tmp_path)]) == 2


# ---- tokenizer ------------------------------------------------------------------------------------------

TEXTS = ["Destitute of life; dead.", "  two spaces\nand a newline\t tab", "café naïve 😀 你好", "", "<|im_start|>"]


def test_tokenizer_loads_with_fixed_special_ids(built):
    tok = Tokenizer.from_pretrained(built["tokenizer"])
    assert tok.vocab_size == 400
    for i, token in enumerate(SPECIAL_TOKENS):
        assert tok.token_to_id(token) == i
        assert tok.encode(token, add_bos=False) == [i]  # one id each
    assert (tok.bos_token_id, tok.eos_token_id, tok.eos_token) == (1, 3, "<|im_end|>")
    assert tok.add_bos and tok.encode("x")[0] == 1
    for text in TEXTS[:-1]:
        assert tok.decode(tok.encode(text, add_bos=False)) == text
    assert tok.encode("<|im_start|>", add_bos=False, allow_special=False) != [4]


def test_tokenizer_chat(built):
    tok = Tokenizer.from_pretrained(built["tokenizer"])
    messages = [{"role": "user", "content": "What does bal mean?"}, {"role": "assistant", "content": "A thing."}]
    text = tok.apply_chat_template(messages, add_generation_prompt=False)
    assert text == "<|im_start|>user\nWhat does bal mean?<|im_end|>\n<|im_start|>assistant\nA thing.<|im_end|>\n"
    ids = tok.encode_chat(messages, add_generation_prompt=False)
    assert ids[:2] == [1, 4] and ids.count(3) == 2  # BOS, <|im_start|>; two <|im_end|>
    assert tok.decode(ids[1:]) == text


def test_tokenizer_matches_transformers(built):
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoTokenizer.from_pretrained(str(built["tokenizer"]))
    ours = Tokenizer.from_pretrained(built["tokenizer"])
    for text in TEXTS:
        assert hf(text)["input_ids"] == ours.encode(text)
    messages = [{"role": "user", "content": "hi"}]
    assert hf.apply_chat_template(messages, add_generation_prompt=True, tokenize=False) == ours.apply_chat_template(messages)


def test_tokenizer_rejects_tiny_vocab(built, tmp_path):
    with pytest.raises(ValueError, match="vocab_size"):
        train_tokenizer(built["corpus"], tmp_path, vocab_size=100, show_progress=False)


# ---- shards ---------------------------------------------------------------------------------------------

def test_shards_layout(built):
    shards = TokenShards.open(built["shards"])
    meta, tok = shards.meta, Tokenizer.from_pretrained(built["tokenizer"])
    assert (meta["dtype"], meta["vocab_size"], meta["bos_token_id"], meta["eos_token_id"]) == ("uint16", 400, 1, 2)
    for split in ("train", "val"):
        tokens = getattr(shards, split)
        assert isinstance(tokens, np.memmap) and tokens.dtype == np.uint16
        assert len(tokens) == meta["num_tokens"][split]
        assert int((tokens == 1).sum()) == int((tokens == 2).sum()) == meta["num_documents"][split]
        assert tokens[0] == 1 and tokens[-1] == 2
        docs = list(iter_corpus(built["corpus"], split))
        first = tokens[1 : int(np.argmax(tokens == 2))]
        assert tok.decode(first) == docs[0].text
    assert sum(s["tokens"]["train"] for s in meta["sources"].values()) == meta["num_tokens"]["train"]


def test_shards_detect_a_truncated_file(built, tmp_path):
    for name in ("train.bin", "val.bin", "meta.json"):
        (tmp_path / name).write_bytes((built["shards"] / name).read_bytes())
    with open(tmp_path / "train.bin", "r+b") as f:
        f.truncate(10)
    with pytest.raises(ValueError, match="num_tokens"):
        TokenShards.open(tmp_path)


# ---- SFT ------------------------------------------------------------------------------------------------

def test_sft_heldout_by_key(built, tmp_path):
    config = SFTConfig(out_dir=tmp_path, heldout_fraction=0.3, corpus_dir=built["corpus"],
                       tokenizer_dir=built["tokenizer"], paths=built["paths"])
    stats = build_sft(config)
    rows = {sp: [json.loads(line) for line in (tmp_path / f"{sp}.jsonl").read_text().splitlines()]
            for sp in ("train", "heldout")}
    assert rows["train"] and rows["heldout"]
    for row in rows["train"] + rows["heldout"]:
        assert set(row) == {"messages", "task", "key"} and row["task"] in TASKS
        assert [m["role"] for m in row["messages"]] == ["user", "assistant"]
        assert all(isinstance(m["content"], str) and m["content"] for m in row["messages"])
    keys = {sp: {(r["task"].startswith("verse"), r["key"].lower()) for r in rows[sp]} for sp in rows}
    assert not keys["train"] & keys["heldout"]  # no held-out word or verse is asked about in train
    train_answers = "\n".join(r["messages"][1]["content"] for r in rows["train"])
    corpus_train = {(d.source, d.title) for d in iter_corpus(built["corpus"], "train")}
    for r in rows["heldout"]:
        if r["task"] == "definition":
            assert (("wordnet", r["key"])) in corpus_train  # its answer was in pretraining
            gloss = r["messages"][1]["content"].split(": ", 1)[1]
            assert gloss not in train_answers
    assert {r["task"] for r in rows["train"]} >= {"definition", "synonym", "usage", "verse", "verse_reference"}
    assert not any(r["key"] == "Einstein" for r in rows["train"] + rows["heldout"])  # names are not words
    assert stats["chat_tokens"]["train"]["max"] <= 512
    again = tmp_path / "again"
    build_sft(SFTConfig(out_dir=again, heldout_fraction=0.3, corpus_dir=built["corpus"], paths=built["paths"]))
    assert (again / "train.jsonl").read_bytes() == (tmp_path / "train.jsonl").read_bytes()


def test_sft_config_errors(tmp_path):
    with pytest.raises(ValueError, match="heldout_fraction"):
        SFTConfig(out_dir=tmp_path, heldout_fraction=0.0)
    with pytest.raises(ValueError, match="tasks"):
        SFTConfig(out_dir=tmp_path, tasks=("poetry",))


def test_progress_without_tqdm(monkeypatch, capsys):
    import sys

    from minicpm4.data import progress

    monkeypatch.setitem(sys.modules, "tqdm.auto", None)  # makes `from tqdm.auto import tqdm` raise ImportError
    assert list(progress(range(3), desc="x")) == [0, 1, 2]
    with progress(total=5, desc="bar", unit="doc") as bar:
        bar.update(5)
    assert "bar: 5/5 doc" in capsys.readouterr().err


# ---- command line ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("argv", [["data"], ["data", "build-corpus"], ["data", "shards"], ["data", "build-sft"],
                                  ["tokenizer"], ["tokenizer", "train"]])
def test_cli_help(argv, capsys):
    with pytest.raises(SystemExit) as e:
        main([*argv, "--help"])
    assert e.value.code == 0 and "usage: minicpm4" in capsys.readouterr().out


def test_cli_end_to_end(built, tmp_path, capsys):
    p = built["paths"]
    src = ["--dictd-dir", str(p.dictd_dir), "--wordnet-dir", str(p.wordnet_dir), "--fortunes-dir",
           str(p.fortunes_dir), "--bible-text", str(p.bible_text)]
    assert main(["data", "build-corpus", "--out", str(tmp_path / "c"), "--quiet", *src]) == 0
    assert main(["tokenizer", "train", "--corpus", str(tmp_path / "c"), "--out", str(tmp_path / "t"),
                 "--vocab-size", "300", "--quiet"]) == 0
    assert main(["data", "shards", "--corpus", str(tmp_path / "c"), "--tokenizer", str(tmp_path / "t"), "--out",
                 str(tmp_path / "s"), "--quiet"]) == 0
    assert main(["data", "build-sft", "--out", str(tmp_path / "sft"), "--corpus", str(tmp_path / "c"), *src]) == 0
    out = capsys.readouterr().out
    assert "total:" in out and "vocab 300" in out and "train tokens" not in out and "heldout:" in out
    assert TokenShards.open(tmp_path / "s").meta["vocab_size"] == 300

"""FR-Spec frequency index: counts equal a slow Counter over Tokenizer.encode, the index equals a slow sorted()
reference (top N, EOS forced, ties by id), both file formats round-trip, and `minicpm4 frspec-index` runs."""

import json
import random
from collections import Counter

import pytest
import torch

from minicpm4.cli import main
from minicpm4.data.frspec import (FRSpecIndexConfig, build_index, count_token_ids, frequency_index, iter_texts,
                                  load_frspec_index, resolve_model_dir, save_cpmcu_index, write_frspec_files)
from minicpm4.tokenizer import Tokenizer

TEXTS = ["the cat sat on the mat", "", "hello world, hello again", "the end <|im_end|>", "café naïve 123",
         "  leading spaces", "the the the"]


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.from_pretrained(resolve_model_dir(None))


def slow_counts(texts, tok, **kw):
    c = Counter()
    for t in texts:
        c.update(tok.encode(t, **kw))
    return c


def slow_index(counts, n, eos):
    """The spec in plain Python: rank by (-count, id); the n - |eos| best non-EOS ids plus EOS, in rank order."""
    ranking = sorted(range(len(counts)), key=lambda i: (-counts[i], i))
    kept = set([i for i in ranking if i not in eos][: n - len(set(eos))]) | set(eos)
    return [i for i in ranking if i in kept]


class EncodeOnly:
    """A tokenizer with only encode(): counts must not depend on the batched fast path."""

    def __init__(self, tok):
        self.tok, self.bos_token_id = tok, tok.bos_token_id

    def encode(self, text, add_bos=None, allow_special=True):
        return self.tok.encode(text, add_bos=add_bos, allow_special=allow_special)


@pytest.mark.parametrize("add_bos,allow_special", [(False, True), (True, True), (False, False)])
def test_counts_equal_a_counter_over_encode(tok, add_bos, allow_special):
    want = slow_counts(TEXTS, tok, add_bos=add_bos, allow_special=allow_special)
    for tokenizer in (tok, EncodeOnly(tok)):
        got = count_token_ids(iter(TEXTS), tokenizer, tok.vocab_size, add_bos=add_bos, allow_special=allow_special,
                              batch_size=3)  # several batches, the last one short
        assert got.dtype == torch.int64 and got.shape == (tok.vocab_size,)
        assert {i: int(c) for i, c in enumerate(got) if c} == dict(want)
    assert count_token_ids(iter(["<|im_end|>"]), tok, tok.vocab_size)[tok.eos_token_id] == 1


def test_counts_reject_ids_outside_the_vocab(tok):
    with pytest.raises(ValueError, match="vocab_size"):
        count_token_ids(TEXTS, tok, vocab_size=4)


def test_index_is_the_top_n_with_eos_forced():
    counts = torch.tensor([5, 9, 0, 7, 7, 1, 3, 9, 2, 4])
    # EOS (id 2) is the rarest: the 3 most frequent other ids, ties by the smaller id, then EOS last.
    assert frequency_index(counts, 4, [2]).tolist() == [1, 7, 3, 2]
    assert frequency_index(counts, 5, [2]).tolist() == [1, 7, 3, 4, 2]
    # A frequent EOS keeps its rank and takes no extra place.
    assert frequency_index(counts, 3, [7]).tolist() == [1, 7, 3]
    assert frequency_index(counts, 2, [2, 8]).tolist() == [8, 2]  # n = number of EOS ids: just them
    assert frequency_index(counts, 3, []).dtype == torch.int32


def test_index_equals_the_slow_reference_on_random_counts():
    rng = random.Random(0)
    for _ in range(200):
        v = rng.randint(1, 40)
        counts = [rng.choice([0, 0, 1, 2, 3, rng.randint(0, 50)]) for _ in range(v)]  # many ties
        eos = rng.sample(range(v), rng.randint(0, min(3, v)))
        n = rng.randint(max(1, len(eos)), v)
        got = frequency_index(torch.tensor(counts), n, eos).tolist()
        assert got == slow_index(counts, n, eos), (counts, eos, n)
        assert len(got) == n and set(eos) <= set(got)


def test_ties_are_broken_by_the_smaller_id():
    counts = torch.full((100,), 7)
    assert frequency_index(counts, 10, [99]).tolist() == list(range(9)) + [99]
    assert frequency_index(counts.flip(0), 5).tolist() == [0, 1, 2, 3, 4]


@pytest.mark.parametrize("n,eos", [(0, []), (11, []), (1, [2, 3]), (-1, [])])
def test_bad_n_names_the_field(n, eos):
    with pytest.raises(ValueError, match="^n: "):
        frequency_index(torch.arange(10), n, eos)


def test_bad_config_names_the_field(tmp_path):
    with pytest.raises(ValueError, match="sizes"):
        FRSpecIndexConfig(sources=(tmp_path,), out_dir=tmp_path, sizes=(0,))
    with pytest.raises(ValueError, match="sources"):
        FRSpecIndexConfig(sources=(), out_dir=tmp_path)
    with pytest.raises(ValueError, match="eos_ids"):
        frequency_index(torch.arange(10), 5, [10])


def test_both_formats_round_trip(tmp_path):
    counts = torch.tensor([3, 0, 8, 8, 1, 5, 2, 0])
    indexes = [build_index(counts, n, [1]) for n in (3, 5)]
    assert indexes[0].ids.tolist() == [2, 3, 1] and indexes[0].coverage == pytest.approx(16 / 27)
    write_frspec_files(tmp_path, indexes, vocab_size=8, eos_ids=[1])
    # CPM.cu's file: a plain list of ints, which its loader turns into int32 with torch.tensor.
    raw = torch.load(tmp_path / "freq_5.pt", weights_only=True)
    assert raw == [2, 3, 5, 0, 1] and torch.tensor(raw, dtype=torch.int32).tolist() == raw
    for ix in indexes:
        for source in (tmp_path / f"freq_{ix.n}.pt", tmp_path / "frspec.json"):
            got = load_frspec_index(source, n=ix.n)
            assert got.dtype == torch.int64 and got.tolist() == ix.ids.tolist()
    record = json.loads((tmp_path / "frspec.json").read_text())
    assert record["vocab_size"] == 8 and record["indexes"][1]["counts"] == [8, 8, 5, 3, 0]
    with pytest.raises(ValueError, match="^n: "):
        load_frspec_index(tmp_path / "frspec.json", n=4)
    single = save_cpmcu_index(torch.tensor([4, 2, 9]), tmp_path / "one" / "freq_3.pt")
    assert load_frspec_index(single).tolist() == [4, 2, 9]
    torch.save([1, 1], tmp_path / "bad.pt")
    with pytest.raises(ValueError, match="repeat"):
        load_frspec_index(tmp_path / "bad.pt")


def test_loading_a_directory(tmp_path):
    counts = torch.arange(20).flip(0)
    write_frspec_files(tmp_path / "both", [build_index(counts, n) for n in (4, 8)])
    assert load_frspec_index(tmp_path / "both").tolist() == list(range(8))  # the largest
    assert load_frspec_index(tmp_path / "both", n=4).tolist() == [0, 1, 2, 3]
    with pytest.raises(ValueError, match="^n: "):
        load_frspec_index(tmp_path / "both", n=6)
    (tmp_path / "json").mkdir()
    (tmp_path / "both" / "frspec.json").rename(tmp_path / "json" / "frspec.json")
    assert load_frspec_index(tmp_path / "json", n=4).tolist() == [0, 1, 2, 3]
    assert load_frspec_index(tmp_path / "json").numel() == 8
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError):
        load_frspec_index(tmp_path / "empty")


def test_text_sources_and_the_line_cap(tmp_path):
    (tmp_path / "a.txt").write_text("one\ntwo\r\n\nfour\n", encoding="utf-8")
    (tmp_path / "b.jsonl").write_text('{"text": "five"}\n\n{"text": "six", "id": 1}\n', encoding="utf-8")
    (tmp_path / "corpus").mkdir()
    (tmp_path / "corpus" / "train.jsonl").write_text('{"source": "x", "title": "t", "text": "seven"}\n')
    sources = [tmp_path / "a.txt", tmp_path / "b.jsonl", tmp_path / "corpus"]
    assert list(iter_texts(sources)) == ["one", "two", "", "four", "five", "six", "seven"]
    assert list(iter_texts(sources, max_lines=5)) == ["one", "two", "", "four", "five"]
    (tmp_path / "c.jsonl").write_text('{"txt": "x"}\n')
    with pytest.raises(ValueError, match="c.jsonl:1"):
        list(iter_texts([tmp_path / "c.jsonl"]))


def test_cli_writes_the_index(tmp_path, tok, capsys):
    lines = ["the cat sat on the mat", "a dog and a cat", "", "the end"] * 5
    (tmp_path / "text.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    out = tmp_path / "out"
    argv = ["frspec-index", "--corpus", str(tmp_path / "text.txt"), "--sizes", "8,16,1000000", "--out", str(out),
            "--max-lines", "12", "--quiet"]
    assert main(argv) == 0
    printed = capsys.readouterr()
    assert "N =      8" in printed.out and "covers" in printed.out and "using 8192" in printed.err
    assert sorted(p.name for p in out.iterdir()) == ["freq_16.pt", "freq_8.pt", "freq_8192.pt", "frspec.json"]
    counts = count_token_ids(lines[:12], tok, 8192)
    eos = [2, 3]  # the default model's config.json eos_token_id (its tokenizer's eos is 3)
    for n in (8, 16, 8192):
        assert load_frspec_index(out, n=n).tolist() == frequency_index(counts, n, eos).tolist()
    record = json.loads((out / "frspec.json").read_text())
    assert record["num_texts"] == 12 and record["eos_ids"] == eos and record["num_tokens"] == int(counts.sum())


def test_cli_help_and_errors(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["frspec-index", "--help"])
    assert e.value.code == 0 and "usage: minicpm4 frspec-index" in capsys.readouterr().out
    assert main(["frspec-index", "--corpus", str(tmp_path / "missing.txt"), "--out", str(tmp_path)]) == 2
    (tmp_path / "t.txt").write_text("hi\n")
    assert main(["frspec-index", "--corpus", str(tmp_path / "t.txt"), "--sizes", "8,x", "--out", str(tmp_path)]) == 2
    assert main(["frspec-index", "--corpus", str(tmp_path / "t.txt"), "--sizes", "1", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "--corpus" in err and "--sizes" in err and "n: " in err
    assert not list(tmp_path.glob("freq_*"))  # a failed run writes nothing

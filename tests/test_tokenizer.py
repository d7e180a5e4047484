"""Tokenizer tests: the real MiniCPM4-0.5B tokenizer against transformers 5 as the oracle, plus a tiny tokenizer.json."""

from __future__ import annotations

import json
import random
import shutil
import warnings
from pathlib import Path

import pytest

from minicpm4.tokenizer import CHATML_TEMPLATE, StreamDecoder, Tokenizer

REF = Path(__file__).resolve().parents[2] / "shared/reference/minicpm4-0.5b"
needs_ref = pytest.mark.skipif(
    not (REF / "tokenizer.model").is_file(), reason=f"MiniCPM4-0.5B tokenizer files not found at {REF}"
)

TEXTS = [
    "Hello world",
    "MiniCPM4 runs on a laptop CPU.",
    "你好，世界！今天天气怎么样？",
    "emoji 😀🌏👩‍👩‍👧‍👦 done",
    "混合 mixed 文本 with 数字 12345 and 标点...",
    "  leading spaces",
    "trailing spaces   ",
    "line one\nline two\n\n\tindented\n",
    "\n",
    " ",
    "",
    "rare characters via byte fallback: 鱻 𠀀",
    "<|im_start|>user\nhi<|im_end|>\n",  # special-token text becomes single ids
    "x<|im_end|> y</s><s><unk><|fim_prefix|>a<|fim_middle|>b<|fim_suffix|>",
]
MESSAGES = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "What is MiniCPM4?"},
    {"role": "assistant", "content": "An efficient on-device LLM."},
    {"role": "user", "content": "用中文介绍一下 🌏"},
]
# Expected ChatML text for MESSAGES (MINICPM4.md §2.5), written out so the test stands without transformers.
CHATML = (
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "<|im_start|>user\nWhat is MiniCPM4?<|im_end|>\n"
    "<|im_start|>assistant\nAn efficient on-device LLM.<|im_end|>\n"
    "<|im_start|>user\n用中文介绍一下 🌏<|im_end|>\n"
    "<|im_start|>assistant\n"
)


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    if not (REF / "tokenizer.model").is_file():
        pytest.skip(f"MiniCPM4-0.5B tokenizer files not found at {REF}")
    return Tokenizer.from_pretrained(REF)


@pytest.fixture(scope="module")
def hf():
    """transformers' AutoTokenizer on the same folder: the parity oracle."""
    if not (REF / "tokenizer.model").is_file():
        pytest.skip(f"MiniCPM4-0.5B tokenizer files not found at {REF}")
    transformers = pytest.importorskip("transformers")
    transformers.logging.set_verbosity_error()
    with warnings.catch_warnings():  # it also parses config.json and warns about its rope_scaling key
        warnings.simplefilter("ignore")
        # trust_remote_code=False: config.json's auto_map would otherwise prompt for remote code on a tty.
        return transformers.AutoTokenizer.from_pretrained(str(REF), trust_remote_code=False)


def _input_ids(result) -> list[int]:
    """transformers 5 apply_chat_template(tokenize=True) returns a BatchEncoding; 4.x returned a list."""
    return list(result["input_ids"]) if not isinstance(result, list) else result


# -- MiniCPM4 vocabulary ----------------------------------------------------------------------------------


@needs_ref
def test_special_tokens_and_vocab(tok: Tokenizer) -> None:
    assert tok.vocab_size == 73448
    expected = {
        "<unk>": 0, "<s>": 1, "</s>": 2, "<|im_end|>": 73440, "<|im_start|>": 73441, "<|tool_call|>": 73442,
        "<|execute_start|>": 73443, "<|execute_end|>": 73444, "<|fim_prefix|>": 73445, "<|fim_middle|>": 73446,
        "<|fim_suffix|>": 73447,
    }  # fmt: skip
    assert tok.special_token_ids == expected
    assert (tok.bos_token_id, tok.eos_token_id, tok.add_bos) == (1, 73440, True)
    for text, idx in expected.items():
        assert tok.encode(text, add_bos=False) == [idx]
    assert tok.chat_template == json.loads((REF / "tokenizer_config.json").read_text())["chat_template"]


@needs_ref
def test_golden_ids_legacy_prefix(tok: Tokenizer) -> None:
    # legacy=true: the chunk after each special token gets its own "▁" (59320), so "\n" after <|im_end|>
    # is two tokens; "..." is NOT the atomic user-defined piece 75 (transformers' BPE conversion ignores it).
    assert tok.encode("<|im_start|>user\nhi<|im_end|>\n") == [1, 73441, 3060, 5, 6920, 73440, 59320, 5]
    assert tok.encode("Hello world") == [1, 21045, 2809]
    assert tok.encode("  two") == [1, 1345, 15438]  # "▁▁" "two": no extra prefix before an existing space
    assert tok.encode("a...", add_bos=False) == [1348, 72, 72, 72]
    assert tok.encode("", add_bos=True) == [1] and tok.encode("", add_bos=False) == []


@needs_ref
@pytest.mark.parametrize("text", TEXTS)
def test_encode_decode_match_transformers(tok: Tokenizer, hf, text: str) -> None:
    ids = tok.encode(text)
    assert ids == hf(text)["input_ids"]
    assert ids[0] == 1 and tok.encode(text, add_bos=False) == ids[1:]
    for skip in (False, True):
        assert tok.decode(ids, skip_special_tokens=skip) == hf.decode(ids, skip_special_tokens=skip)
    plain = tok.encode(text, allow_special=False)
    assert plain == hf(text, split_special_tokens=True)["input_ids"]
    assert not set(plain[1:]) & set(tok.special_token_ids.values())


@needs_ref
@pytest.mark.parametrize("text", [t for t in TEXTS if "<" not in t])
def test_round_trip(tok: Tokenizer, text: str) -> None:
    back = tok.decode(tok.encode(text), skip_special_tokens=True)
    # The decoder strips the one "▁" it prepends, so a single leading space is lost, as in transformers.
    assert back == (text[1:] if text.startswith(" ") else text)
    if text:  # with "<s>" first, nothing is stripped: the prepended "▁" shows as a space after BOS
        assert tok.decode(tok.encode(text)) == "<s>" + ("" if text.startswith(" ") else " ") + text


@needs_ref
def test_many_strings_match_transformers(tok: Tokenizer, hf) -> None:
    """Random strings built from vocabulary pieces, CJK, emoji, whitespace and special tokens."""
    rng = random.Random(0)
    alphabet = [" ", "  ", "\n", "\t", "...", "你", "好", "😀", "é", "<|im_end|>", "<|im_start|>", "<s>", "a", "Z"]
    for _ in range(300):
        parts = [tok.id_to_token(rng.randrange(3, 73440)) or "" for _ in range(rng.randint(0, 6))]
        parts += [rng.choice(alphabet) for _ in range(rng.randint(0, 6))]
        rng.shuffle(parts)
        text = "".join(parts).replace("▁", rng.choice([" ", "▁"]))
        ids = tok.encode(text)
        assert ids == hf(text)["input_ids"], repr(text)
        assert tok.decode(ids) == hf.decode(ids), repr(text)


# -- chat -------------------------------------------------------------------------------------------------


@needs_ref
def test_chat_template_matches_transformers(tok: Tokenizer, hf) -> None:
    rendered = tok.apply_chat_template(MESSAGES, add_generation_prompt=True)
    assert rendered == CHATML
    assert rendered == hf.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)
    no_prompt = tok.apply_chat_template(MESSAGES, add_generation_prompt=False)
    assert no_prompt == CHATML.removesuffix("<|im_start|>assistant\n")
    assert no_prompt == hf.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=False)


@needs_ref
def test_encode_chat_starts_with_bos(tok: Tokenizer, hf) -> None:
    ids = tok.encode_chat(MESSAGES)
    assert ids[:2] == [1, 73441] and ids[-3:] == [73441, 16434, 5]  # ... <|im_start|> "▁assistant" "\n"
    assert ids == hf(CHATML)["input_ids"]
    # transformers 5 apply_chat_template(tokenize=True) tokenizes with add_special_tokens=False and so omits
    # BOS for this template, which emits none: exactly the parity trap of MINICPM4.md §2.5. The ids the model
    # expects are the rendered string tokenized normally (compared above); apart from BOS they agree.
    hf_ids = _input_ids(hf.apply_chat_template(MESSAGES, tokenize=True, add_generation_prompt=True))
    assert hf_ids[0] == 73441 and ids == [1] + hf_ids


@needs_ref
@pytest.mark.parametrize(
    ("messages", "match"),
    [
        ("hi", r"messages must be a list"),
        ([{"role": "user", "content": "hi"}, "hello"], r"messages\[1\] must be a dict"),
        ([{"content": "hi"}], r"messages\[0\] has no 'role'"),
        ([{"role": "user"}], r"messages\[0\] has no 'content'"),
        ([{"role": "user", "content": "a"}, {"role": "user", "content": 3}], r"messages\[1\]\['content'\] must be a str"),
        ([{"role": None, "content": "a"}], r"messages\[0\]\['role'\] must be a str"),
    ],
)
def test_invalid_messages(tok: Tokenizer, messages, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        tok.apply_chat_template(messages)
    with pytest.raises(ValueError, match=match):
        tok.encode_chat(messages)


@needs_ref
def test_legacy_false(tmp_path: Path) -> None:
    """legacy=false: only the start of the text gets the "▁" prefix, not the chunks after special tokens."""
    shutil.copy(REF / "tokenizer.model", tmp_path / "tokenizer.model")
    config = json.loads((REF / "tokenizer_config.json").read_text())
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({**config, "legacy": False}))
    ours = Tokenizer.from_pretrained(tmp_path)
    # Golden ids from transformers 5.24 AutoTokenizer on this folder (kept literal: a second oracle load costs 2 s).
    assert ours.encode("<|im_start|>user\nhi<|im_end|>\n") == [1, 73441, 1836, 5, 6920, 73440, 5]  # "user", no "▁"
    assert ours.encode(" x<s>y") == [1, 1949, 1, 59339]
    assert ours.encode("Hello world") == [1, 21045, 2809]


# -- streaming --------------------------------------------------------------------------------------------


def _stream(tok: Tokenizer, ids: list[int], skip: bool = False) -> list[str]:
    decoder = StreamDecoder(tok, skip_special_tokens=skip)
    return [decoder.push(i) for i in ids] + [decoder.flush()]


@needs_ref
def test_stream_chinese_emoji(tok: Tokenizer) -> None:
    text = "你好，世界！🌏 MiniCPM4 很快 😀👍\n第二行 ok"
    ids = tok.encode(text)
    chunks = _stream(tok, ids)
    assert all("\ufffd" not in c for c in chunks)
    assert "".join(chunks) == tok.decode(ids) == "<s> " + text
    assert sum(bool(c) for c in chunks) > 10  # it streams, not one lump at flush


@needs_ref
def test_stream_byte_fallback(tok: Tokenizer) -> None:
    text = "鱻 𠀀鱻x"  # not in the vocabulary: 3- and 4-byte runs of "<0xNN>" pieces
    ids = tok.encode(text, add_bos=False)
    byte_positions = [i for i, t in enumerate(ids) if t in tok.byte_fallback_ids]
    assert len(byte_positions) == 10
    chunks = _stream(tok, ids)
    assert all(chunks[i] == "" for i in byte_positions)  # a byte piece never completes a chunk by itself
    assert all("\ufffd" not in c for c in chunks)
    assert "".join(chunks) == tok.decode(ids) == text


@needs_ref
def test_stream_chat_with_special_tokens(tok: Tokenizer) -> None:
    ids = tok.encode_chat(MESSAGES, add_generation_prompt=False)
    for skip in (False, True):
        chunks = _stream(tok, ids, skip)
        assert "".join(chunks) == tok.decode(ids, skip_special_tokens=skip)


@needs_ref
def test_stream_random_ids_equal_decode(tok: Tokenizer) -> None:
    """Any ids, including invalid byte runs and skipped specials inside byte runs, stream to decode(all)."""
    rng = random.Random(1)
    pool = sorted(tok.byte_fallback_ids) + list(tok.special_token_ids.values()) + [59320, 21045, 5]
    for _ in range(300):
        ids = [rng.choice(pool) if rng.random() < 0.7 else rng.randrange(tok.vocab_size) for _ in range(20)]
        for skip in (False, True):
            assert "".join(_stream(tok, ids, skip)) == tok.decode(ids, skip_special_tokens=skip), ids


@needs_ref
def test_stream_window_stays_small(tok: Tokenizer) -> None:
    # O(1) per token: the decoder only keeps the tokens behind the last chunk, not the whole sequence.
    ids = tok.encode("流式解码 streaming decode 😀 " * 200)
    decoder = StreamDecoder(tok)
    out = []
    for i in ids:
        out.append(decoder.push(i))
        assert len(decoder._ids) <= 4
    garbage = [tok.token_to_id("<0x80>")] * 300  # invalid bytes forever: held, but never more than the cap
    for i in garbage:
        out.append(decoder.push(i))
        assert len(decoder._ids) <= 2 * StreamDecoder._MAX_PENDING  # held tokens + the chunk behind them
    out.append(decoder.flush())
    assert "".join(out) == tok.decode(ids + garbage)


# -- loading and errors -----------------------------------------------------------------------------------


def test_missing_folder(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="tokenizer folder not found: .*nope"):
        Tokenizer.from_pretrained(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="tokenizer_config.json"):
        Tokenizer.from_pretrained(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="no tokenizer.json or tokenizer.model"):
        Tokenizer.from_pretrained(tmp_path)


def test_unreadable_files(tmp_path: Path) -> None:
    (tmp_path / "tokenizer_config.json").write_text("{not json")
    with pytest.raises(ValueError, match="tokenizer_config.json"):
        Tokenizer.from_pretrained(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text("{}")
    (tmp_path / "tokenizer.model").write_bytes(b"\xff\x00garbage")
    with pytest.raises(ValueError, match="tokenizer.model"):
        Tokenizer.from_pretrained(tmp_path)
    (tmp_path / "tokenizer.json").write_text('{"model": 1}')
    with pytest.raises(ValueError, match="tokenizer.json"):
        Tokenizer.from_pretrained(tmp_path)


@needs_ref
def test_decode_rejects_bad_ids(tok: Tokenizer) -> None:
    with pytest.raises(ValueError, match="token id 73448 at position 1"):
        tok.decode([1, 73448])
    with pytest.raises(ValueError, match="token id -1"):
        tok.decode([-1])


# -- a tokenizer.json folder ------------------------------------------------------------------------------

SPECIALS = ["<unk>", "<s>", "</s>", "<|im_end|>", "<|im_start|>", "<|tool_call|>", "<|execute_start|>",
            "<|execute_end|>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>"]  # fmt: skip


@pytest.fixture(scope="module")
def json_dir(tmp_path_factory) -> Path:
    """A tiny byte-level BPE trained here, with MiniCPM4's special tokens and ChatML template."""
    from tokenizers import Tokenizer as Backend
    from tokenizers import decoders, models, pre_tokenizers, processors, trainers

    backend = Backend(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=SPECIALS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    corpus = ["hello world, the quick brown fox", "你好，世界！MiniCPM4 runs on a laptop.", "streaming 🌏 emoji"]
    backend.train_from_iterator(corpus * 5, trainer)
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    folder = tmp_path_factory.mktemp("json_tok")
    backend.save(str(folder / "tokenizer.json"))
    config = {
        "bos_token": "<s>", "eos_token": "<|im_end|>", "unk_token": "<unk>", "chat_template": CHATML_TEMPLATE,
        "added_tokens_decoder": {str(i): {"content": t, "special": True} for i, t in enumerate(SPECIALS)},
    }  # fmt: skip
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return folder


def test_tokenizer_json_folder(json_dir: Path) -> None:
    tok = Tokenizer.from_pretrained(json_dir)
    trained = len(json.loads((json_dir / "tokenizer.json").read_text())["model"]["vocab"])
    assert (tok.vocab_size, tok.bos_token_id, tok.eos_token_id, tok.add_bos) == (trained, 1, 3, True)
    assert tok.special_token_ids == {t: i for i, t in enumerate(SPECIALS)}
    for text in ["hello world", " 你好 🌏\n", "unseen Ünïcödé ☃ and   spaces "]:
        ids = tok.encode(text)
        assert ids[0] == 1 and tok.decode(ids, skip_special_tokens=True) == text  # byte-level BPE is lossless
        assert "".join(_stream(tok, ids, skip=True)) == text
    assert tok.apply_chat_template(MESSAGES) == CHATML
    ids = tok.encode_chat(MESSAGES)
    assert ids[:2] == [1, 4] and ids.count(3) == 4  # BOS, <|im_start|>, and one <|im_end|> per message
    assert tok.decode(ids) == "<s>" + CHATML


def test_tokenizer_json_matches_transformers(json_dir: Path) -> None:
    transformers = pytest.importorskip("transformers")
    transformers.logging.set_verbosity_error()
    hf = transformers.AutoTokenizer.from_pretrained(str(json_dir))
    tok = Tokenizer.from_pretrained(json_dir)
    for text in ["hello world", "<|im_start|>user\n你好<|im_end|>\n", " 🌏  x"]:
        assert tok.encode(text) == hf(text)["input_ids"]
    assert tok.apply_chat_template(MESSAGES) == hf.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)


def test_chatml_fallback_and_json_preferred(json_dir: Path, tmp_path: Path) -> None:
    folder = tmp_path / "both"
    shutil.copytree(json_dir, folder)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    del config["chat_template"]
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    if (REF / "tokenizer.model").is_file():  # both files present: tokenizer.json wins
        shutil.copy(REF / "tokenizer.model", folder / "tokenizer.model")
    tok = Tokenizer.from_pretrained(folder)
    assert tok.vocab_size == Tokenizer.from_pretrained(json_dir).vocab_size < 1000
    assert tok.chat_template == CHATML_TEMPLATE and tok.apply_chat_template(MESSAGES) == CHATML


def test_added_token_id_mismatch(json_dir: Path, tmp_path: Path) -> None:
    shutil.copytree(json_dir, tmp_path / "gap")
    config = json.loads((tmp_path / "gap/tokenizer_config.json").read_text())
    config["added_tokens_decoder"]["999"] = {"content": "<|gap|>", "special": True}  # not the next free id
    (tmp_path / "gap/tokenizer_config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"tokenizer_config.json: added token '<\|gap\|>' got id \d+, the config says 999"):
        Tokenizer.from_pretrained(tmp_path / "gap")

"""GGUF export for llama.cpp's `minicpm` architecture (MINICPM4.md §2.7, oracle 2).

Fast tests write tiny models and read them back with `gguf.GGUFReader`; the llama.cpp tests
(skipped unless `llama_cpp` is installed) load the files and compare logits and tokenization.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf", reason="GGUF export needs the `gguf` package")

from minicpm4.config import RopeScaling, tiny  # noqa: E402
from minicpm4.export import export_gguf, export_model, export_model_dir, permute_qk, unpermute_qk  # noqa: E402
from minicpm4.model import build_model  # noqa: E402

REF_DIR = Path(__file__).resolve().parents[2] / "shared/reference/minicpm4-0.5b"
needs_ref = pytest.mark.skipif(not (REF_DIR / "tokenizer.model").is_file(),
                               reason=f"reference MiniCPM4 tokenizer not found at {REF_DIR}")
T = gguf.TokenType
VOCAB_05B = 73448


# ---- helpers ----------------------------------------------------------------------------------

def field(reader, key):
    f = reader.fields[key]
    return f.contents()


def tensor_of(reader, name: str) -> torch.Tensor:
    """A GGUF tensor as torch [out, in] float32 (BF16 comes back from the reader as raw bytes)."""
    t = next(t for t in reader.tensors if t.name == name)
    data = np.asarray(t.data)
    if t.tensor_type == gguf.GGMLQuantizationType.BF16:
        raw = data.view(np.uint16).reshape([int(n) for n in reversed(t.shape)])
        return torch.from_numpy(raw.astype(np.int16)).view(torch.bfloat16).float()
    return torch.from_numpy(data.copy()).float()


def real_tiny(**overrides):
    """Tiny shapes with the real MiniCPM4 vocabulary and its eos pair [</s>, <|im_end|>]."""
    return tiny(**{"vocab_size": VOCAB_05B, "eos_token_id": [2, 73440], **overrides})


BPE_SPECIALS = ["<unk>", "<s>", "</s>", "<|im_end|>"]  # ids 0..3 = tiny()'s unk/bos/eos pair [2, 3]


def make_bpe_tokenizer(folder: Path) -> Path:
    """A small byte-level BPE trained with `tokenizers`, saved as tokenizer.json (+ tokenizer_config)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=BPE_SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    text = ["the quick brown fox jumps over the lazy dog", "MiniCPM4 runs on end devices, fast and small.",
            "hello world, hello llama, hello gguf 12345", "数据 清洗 模型 推理"] * 50
    tok.train_from_iterator(text, trainer)
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "chat_template": "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}",
        "add_bos_token": True, "add_eos_token": False}))
    return folder


@pytest.fixture(scope="module")
def bpe_dir(tmp_path_factory) -> Path:
    return make_bpe_tokenizer(tmp_path_factory.mktemp("bpe"))


# ---- the RoPE layout claim itself ---------------------------------------------------------------

def test_permute_qk_turns_rotate_half_into_interleaved_rope():
    """permute(W) x, rotated pairwise (llama.cpp), equals permute of (W x rotated half-by-half) (HF)."""
    torch.manual_seed(0)
    H, D, hidden, pos = 3, 8, 16, 5
    W, x = torch.randn(H * D, hidden), torch.randn(hidden)
    theta = pos / (10000.0 ** (torch.arange(0, D, 2).float() / D))  # [D/2]
    cos, sin = theta.cos(), theta.sin()

    q = (W @ x).view(H, D)  # HF: pairs (i, i + D/2)
    a, b = q[:, : D // 2], q[:, D // 2:]
    hf = torch.cat([a * cos - b * sin, b * cos + a * sin], dim=-1).reshape(-1)

    p = (permute_qk(W, H) @ x).view(H, D // 2, 2)  # llama.cpp: pairs (2i, 2i + 1)
    a, b = p[..., 0], p[..., 1]
    gg = torch.stack([a * cos - b * sin, b * cos + a * sin], dim=-1).reshape(-1)

    torch.testing.assert_close(gg, permute_qk(hf[:, None], H)[:, 0])
    assert torch.equal(unpermute_qk(permute_qk(W, H), H), W)


# ---- SentencePiece (the real MiniCPM4 tokenizer), F32 ---------------------------------------------

@pytest.fixture(scope="module")
def spm_export(tmp_path_factory):
    config = real_tiny()
    model = build_model(config, seed=0)
    path = export_model(model, REF_DIR, tmp_path_factory.mktemp("spm") / "tiny-f32.gguf", "f32")
    return config, model, gguf.GGUFReader(path), path


@needs_ref
def test_spm_metadata(spm_export):
    config, _, r, _ = spm_export
    rs = config.rope_scaling
    expected = {
        "general.architecture": "minicpm", "general.type": "model", "general.file_type": 0,  # ALL_F32
        "minicpm.vocab_size": VOCAB_05B,
        "minicpm.context_length": config.max_position_embeddings,
        "minicpm.embedding_length": config.hidden_size,
        "minicpm.block_count": config.num_hidden_layers,
        "minicpm.feed_forward_length": config.intermediate_size,
        "minicpm.attention.head_count": config.num_attention_heads,
        "minicpm.attention.head_count_kv": config.num_key_value_heads,
        "minicpm.rope.dimension_count": config.head_dim,
        "minicpm.rope.scaling.type": "longrope",
        "minicpm.rope.scaling.original_context_length": rs.original_max_position_embeddings,
        "tokenizer.ggml.model": "llama", "tokenizer.ggml.pre": "default",
        "tokenizer.ggml.bos_token_id": 1, "tokenizer.ggml.eos_token_id": 2, "tokenizer.ggml.eot_token_id": 73440,
        "tokenizer.ggml.unknown_token_id": 0,
        "tokenizer.ggml.add_bos_token": True, "tokenizer.ggml.add_eos_token": False,
        "tokenizer.ggml.add_space_prefix": True,
    }
    for key, value in expected.items():
        assert field(r, key) == value, key
    approx = {  # stored as float32
        "minicpm.attention.layer_norm_rms_epsilon": config.rms_norm_eps,
        "minicpm.rope.freq_base": config.rope_theta,
        "minicpm.rope.scaling.attn_factor": 1.0,  # max_position_embeddings == original
        "minicpm.embedding_scale": 12.0,
        "minicpm.residual_scale": 1.4 / math.sqrt(config.num_hidden_layers),  # scale_depth / sqrt(L)
        "minicpm.logit_scale": config.hidden_size / config.dim_model_base,  # llama.cpp divides by it
    }
    for key, value in approx.items():
        assert field(r, key) == pytest.approx(value, rel=1e-6), key
    template = json.loads((REF_DIR / "tokenizer_config.json").read_text())["chat_template"]
    assert field(r, "tokenizer.chat_template") == template
    assert "<|im_start|>" in template


@needs_ref
def test_spm_tensors_round_trip(spm_export):
    config, model, r, _ = spm_export
    names = {t.name for t in r.tensors}
    assert "output.weight" not in names  # tied: llama.cpp reuses token_embd
    assert len(names) == 2 + 9 * config.num_hidden_layers + 2
    assert all(t.tensor_type == gguf.GGMLQuantizationType.F32 for t in r.tensors)
    sd = model.state_dict()
    h = config.hidden_size
    emb = next(t for t in r.tensors if t.name == "token_embd.weight")
    assert [int(n) for n in emb.shape] == [h, VOCAB_05B]  # GGUF ne order: [in, out]
    assert torch.equal(tensor_of(r, "token_embd.weight"), sd["model.embed_tokens.weight"])
    assert torch.equal(tensor_of(r, "output_norm.weight"), sd["model.norm.weight"])
    for i in range(config.num_hidden_layers):
        p, b = f"model.layers.{i}.", f"blk.{i}."
        q, k = tensor_of(r, b + "attn_q.weight"), tensor_of(r, b + "attn_k.weight")
        assert not torch.equal(q, sd[p + "self_attn.q_proj.weight"])  # really permuted
        assert torch.equal(unpermute_qk(q, config.num_attention_heads), sd[p + "self_attn.q_proj.weight"])
        assert torch.equal(unpermute_qk(k, config.num_key_value_heads), sd[p + "self_attn.k_proj.weight"])
        for ours, theirs in (("self_attn.v_proj", "attn_v"), ("self_attn.o_proj", "attn_output"),
                             ("mlp.gate_proj", "ffn_gate"), ("mlp.up_proj", "ffn_up"), ("mlp.down_proj", "ffn_down"),
                             ("input_layernorm", "attn_norm"), ("post_attention_layernorm", "ffn_norm")):
            assert torch.equal(tensor_of(r, f"{b}{theirs}.weight"), sd[f"{p}{ours}.weight"]), theirs
    rs = config.rope_scaling
    assert tensor_of(r, "rope_factors_long.weight").tolist() == pytest.approx(rs.long_factor, rel=1e-7)
    assert tensor_of(r, "rope_factors_short.weight").tolist() == pytest.approx(rs.short_factor, rel=1e-7)
    assert rs.long_factor != rs.short_factor  # tiny() keeps them apart, so a swap would show


@needs_ref
def test_spm_vocabulary(spm_export):
    import sentencepiece as spm

    _, _, r, _ = spm_export
    tokens = field(r, "tokenizer.ggml.tokens")
    types = field(r, "tokenizer.ggml.token_type")
    scores = field(r, "tokenizer.ggml.scores")
    assert len(tokens) == len(types) == len(scores) == VOCAB_05B
    sp = spm.SentencePieceProcessor(model_file=str(REF_DIR / "tokenizer.model"))
    assert tokens[: sp.vocab_size()] == [sp.id_to_piece(i) for i in range(sp.vocab_size())]
    assert (tokens[0], types[0]) == ("<unk>", T.UNKNOWN)
    assert (tokens[1], types[1]) == ("<s>", T.CONTROL)
    assert (tokens[2], types[2]) == ("</s>", T.CONTROL)
    byte0 = tokens.index("<0x00>")
    assert types[byte0] == T.BYTE and sum(t == T.BYTE for t in types) == 256
    added = json.loads((REF_DIR / "added_tokens.json").read_text())
    for text, tid in added.items():  # <|im_end|> 73440 ... <|fim_suffix|> 73447
        assert (tokens[tid], types[tid]) == (text, T.CONTROL)
    assert tokens[73440] == "<|im_end|>" and tokens[73441] == "<|im_start|>"
    hello = sp.piece_to_id("▁Hello")
    assert scores[hello] == pytest.approx(sp.get_score(hello))
    assert types[hello] == T.NORMAL


@needs_ref
def test_spm_pads_vocab_to_embedding():
    from minicpm4.export.gguf import _sentencepiece_vocab  # the file-level path is covered by the BPE tests

    vocab = _sentencepiece_vocab(REF_DIR, VOCAB_05B + 8)
    assert len(vocab.tokens) == len(vocab.types) == len(vocab.scores) == VOCAB_05B + 8
    assert vocab.tokens[VOCAB_05B] == f"[PAD{VOCAB_05B}]" and vocab.types[VOCAB_05B] == T.UNUSED
    with pytest.raises(ValueError, match="outside vocab_size"):  # added tokens 73440.. do not fit
        _sentencepiece_vocab(REF_DIR, 73440)


# ---- byte-level BPE (our own future tokenizer), BF16, untied ----------------------------------------

@pytest.fixture(scope="module")
def bpe_export(bpe_dir, tmp_path_factory):
    config = tiny(vocab_size=512, tie_word_embeddings=False)
    model = build_model(config, seed=1)
    path = export_model(model, bpe_dir, tmp_path_factory.mktemp("bpe-out") / "tiny-bf16.gguf", "BF16")
    return config, model, gguf.GGUFReader(path), path


def test_bpe_vocabulary_and_merges(bpe_export, bpe_dir):
    from tokenizers import Tokenizer

    config, _, r, _ = bpe_export
    tok = Tokenizer.from_file(str(bpe_dir / "tokenizer.json"))
    tokens, types = field(r, "tokenizer.ggml.tokens"), field(r, "tokenizer.ggml.token_type")
    assert field(r, "tokenizer.ggml.model") == "gpt2" and field(r, "tokenizer.ggml.pre") == "gpt-2"
    assert "tokenizer.ggml.scores" not in r.fields
    assert len(tokens) == config.vocab_size  # padded from the tokenizer's 400
    n = tok.get_vocab_size()
    for text, tid in tok.get_vocab().items():
        assert tokens[tid] == text
    assert [tokens[i] for i in range(4)] == BPE_SPECIALS and all(types[i] == T.CONTROL for i in range(4))
    assert all(types[i] == T.NORMAL for i in range(4, n))
    assert tokens[n] == f"[PAD{n}]" and all(types[i] == T.UNUSED for i in range(n, config.vocab_size))
    merges = field(r, "tokenizer.ggml.merges")
    src = json.loads((bpe_dir / "tokenizer.json").read_text())["model"]["merges"]
    assert merges == [m if isinstance(m, str) else " ".join(m) for m in src]
    assert field(r, "tokenizer.ggml.bos_token_id") == 1
    assert field(r, "tokenizer.ggml.eos_token_id") == 2 and field(r, "tokenizer.ggml.eot_token_id") == 3
    assert "tokenizer.ggml.add_space_prefix" not in r.fields
    assert "<|im_start|>" in field(r, "tokenizer.chat_template")


def test_bf16_untied_tensors(bpe_export):
    config, model, r, _ = bpe_export
    assert field(r, "general.file_type") == gguf.LlamaFileType.MOSTLY_BF16
    sd = model.state_dict()
    for t in r.tensors:  # 2-D weights in BF16; norms and RoPE factors stay F32 (as llama.cpp's converter)
        want = gguf.GGMLQuantizationType.BF16 if len(t.shape) == 2 else gguf.GGMLQuantizationType.F32
        assert t.tensor_type == want, t.name
    bf = lambda x: x.to(torch.bfloat16).float()  # noqa: E731
    assert torch.equal(tensor_of(r, "output.weight"), bf(sd["lm_head.weight"]))
    assert torch.equal(tensor_of(r, "token_embd.weight"), bf(sd["model.embed_tokens.weight"]))
    assert torch.equal(unpermute_qk(tensor_of(r, "blk.1.attn_q.weight"), config.num_attention_heads),
                       bf(sd["model.layers.1.self_attn.q_proj.weight"]))
    assert torch.equal(unpermute_qk(tensor_of(r, "blk.1.attn_k.weight"), config.num_key_value_heads),
                       bf(sd["model.layers.1.self_attn.k_proj.weight"]))
    assert torch.equal(tensor_of(r, "blk.0.ffn_norm.weight"), sd["model.layers.0.post_attention_layernorm.weight"])


def test_long_rope_when_max_exceeds_original(bpe_dir, tmp_path):
    """max_position_embeddings > original: our model always uses the long factors and scales cos/sin."""
    base = tiny(vocab_size=512)
    config = base.replace(max_position_embeddings=2048)
    r = gguf.GGUFReader(export_model(build_model(config), bpe_dir, tmp_path / "long.gguf"))
    rs = config.rope_scaling
    assert tensor_of(r, "rope_factors_long.weight").tolist() == pytest.approx(rs.long_factor, rel=1e-7)
    assert tensor_of(r, "rope_factors_short.weight").tolist() == pytest.approx(rs.long_factor, rel=1e-7)
    scaling = math.sqrt(1 + math.log(2048 / 512) / math.log(512))
    assert field(r, "minicpm.rope.scaling.attn_factor") == pytest.approx(scaling, rel=1e-6)


def test_export_model_dir_matches_in_memory_export(bpe_dir, tmp_path):
    from safetensors.torch import save_file

    config = tiny(vocab_size=512)
    model = build_model(config, seed=3)
    folder = tmp_path / "ckpt"
    folder.mkdir()
    config.save_json(folder / "config.json")
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / "model.safetensors"))
    for f in ("tokenizer.json", "tokenizer_config.json"):
        (folder / f).write_bytes((bpe_dir / f).read_bytes())
    a = export_model_dir(folder, tmp_path / "a.gguf", "bf16")
    b = export_model(model, bpe_dir, tmp_path / "b.gguf", "bf16")
    assert a.read_bytes() == b.read_bytes()


# ---- errors at the boundary -----------------------------------------------------------------------

def test_bad_out_type(bpe_dir, tmp_path):
    with pytest.raises(ValueError, match="out_type"):
        export_model(build_model(tiny(vocab_size=512)), bpe_dir, tmp_path / "x.gguf", "q3_k")
    assert not list(tmp_path.iterdir())


# ---- quantized file types ---------------------------------------------------------------------------------------
# Relative mean error |dequant - w| / |w| of gguf-py's quantizers on Gaussian weights (measured: Q8_0 0.006,
# Q4_0 0.09); the bounds leave ~2x room. Ternary types fit only ternary weights (see the exact test below).
QUANT_ERRORS = {"q8_0": 0.012, "q4_0": 0.18}
# A 2-layer tiny model whose rows (256 inputs) fit every block size: 32 (Q8_0, Q4_0) and 256 (TQ*).
QUANT_CONFIG = dict(vocab_size=512, hidden_size=256, intermediate_size=256, num_attention_heads=16,
                    num_key_value_heads=4)  # head_dim 16, as tiny()'s RoPE factors


def _dequant(reader, name: str) -> tuple[torch.Tensor, str]:
    t = next(t for t in reader.tensors if t.name == name)
    if t.tensor_type in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.BF16):
        return tensor_of(reader, name), t.tensor_type.name
    data = gguf.quants.dequantize(np.asarray(t.data), t.tensor_type)
    return torch.from_numpy(np.ascontiguousarray(data)).float().reshape([int(n) for n in reversed(t.shape)]), t.tensor_type.name


@pytest.fixture(scope="module")
def quant_model():
    return build_model(tiny(**QUANT_CONFIG), seed=3)


@pytest.mark.parametrize("out_type", ["q8_0", "q4_0", "tq1_0", "tq2_0"])
def test_quantized_export_types_shapes_and_error(quant_model, bpe_dir, tmp_path, out_type):
    path = export_model(quant_model, bpe_dir, tmp_path / f"m-{out_type}.gguf", out_type)
    reader = gguf.GGUFReader(path)
    ftype = field(reader, "general.file_type")
    assert ftype == int(gguf.LlamaFileType[f"MOSTLY_{out_type.upper()}"])
    sd = quant_model.state_dict()
    w, t = _dequant(reader, "blk.0.ffn_down.weight")
    assert t == out_type.upper() and tuple(w.shape) == tuple(sd["model.layers.0.mlp.down_proj.weight"].shape)
    assert _dequant(reader, "blk.0.attn_norm.weight")[1] == "F32"
    assert _dequant(reader, "token_embd.weight")[1] == "Q8_0"  # the tied output matrix: see EMBEDDING_TYPE
    if out_type in QUANT_ERRORS:
        ref = sd["model.layers.0.mlp.down_proj.weight"]
        rel = float((w - ref).abs().mean() / ref.abs().mean())
        assert rel < QUANT_ERRORS[out_type], rel


def test_tiny_rows_fall_back_as_llama_cpp(bpe_dir, tmp_path):
    """tiny(): rows of 64 and 160 inputs hold no 256-block, so the ternary types fall back to Q4_0 (32 divides both)."""
    path = export_model(build_model(tiny(vocab_size=512)), bpe_dir, tmp_path / "t.gguf", "tq2_0")
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(path).tensors}
    assert types["blk.0.attn_q.weight"] == "Q4_0" and types["blk.0.ffn_down.weight"] == "Q4_0"


@pytest.mark.parametrize("out_type", ["tq1_0", "tq2_0"])
def test_ternary_weights_round_trip_ternary_types(bpe_dir, tmp_path, out_type):
    """Ternary weights with one scale per 256-input block (what TQ1_0/TQ2_0 store) come back to fp16 scale
    precision; our per-group ternary with smaller groups is only approximated by one scale per 256 (measured)."""
    from minicpm4.quant import TernaryQATConfig, quantize_
    from minicpm4.quant.linear import dense_weight

    model = build_model(tiny(**QUANT_CONFIG), seed=4)
    quantize_(model, TernaryQATConfig(step="convert", group_size=256))
    path = export_model(model, bpe_dir, tmp_path / "t.gguf", out_type)
    reader = gguf.GGUFReader(path)
    ours = dense_weight(model.model.layers[1].mlp.gate_proj)
    back, t = _dequant(reader, "blk.1.ffn_gate.weight")
    assert t == out_type.upper()
    assert torch.allclose(back, ours, rtol=2e-3, atol=1e-6), float((back - ours).abs().max())

    model64 = build_model(tiny(**QUANT_CONFIG), seed=4)
    quantize_(model64, TernaryQATConfig(step="convert", group_size=64))
    path = export_model(model64, bpe_dir, tmp_path / "t64.gguf", out_type)
    ours = dense_weight(model64.model.layers[1].mlp.gate_proj)
    back, _ = _dequant(gguf.GGUFReader(path), "blk.1.ffn_gate.weight")
    rel = float((back - ours).norm() / ours.norm())
    # Per-64 scales squeezed into one per 256: an approximation, not exact (measured 0.135; 0.069 at group 128).
    assert 0.05 < rel < 0.25, rel


def test_quantized_folder_exports(bpe_dir, tmp_path):
    """A packed INT4 folder exports from its dequantized weights."""
    import shutil

    from minicpm4.checkpoint import save_model
    from minicpm4.quant import Int4WeightOnlyConfig, quantize_

    model = build_model(tiny(**QUANT_CONFIG), seed=5)
    quantize_(model, Int4WeightOnlyConfig(group_size=32))
    folder = save_model(model, tmp_path / "q")
    for f in bpe_dir.iterdir():
        shutil.copy(f, folder / f.name)
    path = export_model_dir(folder, tmp_path / "q.gguf", "q8_0")
    w, _ = _dequant(gguf.GGUFReader(path), "blk.0.ffn_up.weight")
    ref = model.model.layers[0].mlp.up_proj.dequantize()
    assert float((w - ref).abs().mean() / ref.abs().mean()) < QUANT_ERRORS["q8_0"]


def test_convert_without_gguf_is_one_line(monkeypatch, capsys, tmp_path):
    import minicpm4.export.gguf as gguf_module
    from minicpm4.checkpoint import save_model
    from minicpm4.cli import main

    save_model(build_model(tiny(vocab_size=512)), tmp_path / "m")
    monkeypatch.setattr(gguf_module, "gguf", None)  # as when the import failed
    assert main(["convert", str(tmp_path / "m"), "--to", "gguf", "--outtype", "q4_0"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["minicpm4 convert: error: GGUF export needs the 'gguf' package: pip install 'minicpm4[gguf]'"]


def test_bad_tensors_leave_no_file(bpe_dir, tmp_path):
    config = tiny(vocab_size=512)
    sd = dict(build_model(config).state_dict())
    with pytest.raises(ValueError, match="missing"):
        export_gguf(config, {k: v for k, v in sd.items() if "down_proj" not in k}, bpe_dir, tmp_path / "x.gguf")
    bad = dict(sd)
    bad["model.layers.1.mlp.up_proj.weight"] = torch.zeros(7, config.hidden_size)
    with pytest.raises(ValueError, match="up_proj.weight: shape"):  # found while streaming
        export_gguf(config, bad, bpe_dir, tmp_path / "x.gguf")
    with pytest.raises(ValueError, match="lm_head.weight differs"):
        export_gguf(config, {**sd, "lm_head.weight": torch.zeros(512, config.hidden_size)}, bpe_dir, tmp_path / "x.gguf")
    assert not list(tmp_path.iterdir())  # atomic: no half-written file, no temp file


def test_existing_file_survives_failed_export(bpe_dir, tmp_path):
    out = tmp_path / "model.gguf"
    out.write_bytes(b"previous")
    config = tiny(vocab_size=512)
    bad = dict(build_model(config).state_dict())
    bad["model.norm.weight"] = torch.zeros(3)
    with pytest.raises(ValueError):
        export_gguf(config, bad, bpe_dir, out)
    assert out.read_bytes() == b"previous" and [p.name for p in tmp_path.iterdir()] == ["model.gguf"]


def test_inexpressible_configs(bpe_dir, tmp_path):
    with pytest.raises(ValueError, match="at most 3"):
        export_model(build_model(tiny(vocab_size=512, eos_token_id=[2, 3, 4, 5])), bpe_dir, tmp_path / "x.gguf")
    with pytest.raises(ValueError, match="vocab_size"):  # tokenizer has 400 tokens
        export_model(build_model(tiny(vocab_size=256)), bpe_dir, tmp_path / "x.gguf")
    tj = json.loads((bpe_dir / "tokenizer.json").read_text())
    tj["pre_tokenizer"] = {"type": "Whitespace"}
    other = tmp_path / "other-tok"
    other.mkdir()
    (other / "tokenizer.json").write_text(json.dumps(tj))
    with pytest.raises(ValueError, match="bpe_pre"):
        export_model(build_model(tiny(vocab_size=512)), other, tmp_path / "x.gguf")


def test_sparse_config_exports_dense_with_a_warning(bpe_dir, tmp_path):
    from minicpm4.config import SparseConfig

    dense = tiny(vocab_size=512)
    sparse = dense.replace(sparse_config=SparseConfig())  # same weights: InfLLM v2 adds no parameters
    with pytest.warns(UserWarning, match="dense attention"):
        export_gguf(sparse, build_model(dense).state_dict(), bpe_dir, tmp_path / "sparse.gguf")


# ---- llama.cpp itself (needs llama-cpp-python; CI skips) -------------------------------------------

def _llama_cpp():
    return pytest.importorskip("llama_cpp", reason="llama.cpp parity needs llama-cpp-python "
                               "(CMAKE_ARGS='-DGGML_NATIVE=ON' pip install llama-cpp-python)")


def llama_cpp_logits(path: Path, tokens: list[int], n_ctx: int, f32_kv: bool = True) -> torch.Tensor:
    """All-position logits [T, V] from llama.cpp (no flash attention; F32 KV cache unless asked)."""
    llama_cpp = _llama_cpp()
    kv = {"type_k": llama_cpp.GGML_TYPE_F32, "type_v": llama_cpp.GGML_TYPE_F32} if f32_kv else {}
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=n_ctx, n_batch=n_ctx, n_ubatch=n_ctx, logits_all=True,
                          flash_attn=False, n_threads=min(4, os.cpu_count() or 1), seed=0, verbose=False, **kv)
    try:
        llm.eval(tokens)
        return torch.from_numpy(np.array(llm.scores[: len(tokens)], dtype=np.float32))
    finally:
        llm.close()


def errors(ours: torch.Tensor, ref: torch.Tensor) -> tuple[float, float]:
    """(max abs difference, that divided by the largest |logit|)."""
    diff = float((ours - ref).abs().max())
    return diff, diff / float(ref.abs().max())


def _tokens(config, T: int, seed: int = 0) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return [1] + torch.randint(3, min(config.vocab_size, 70000), (T - 1,), generator=g).tolist()


def _ours(model, tokens, kv_len: int | None = None) -> torch.Tensor:
    from minicpm4.kv_cache import StaticKVCache

    ids = torch.tensor([tokens])
    cache = StaticKVCache.for_model(model, 1, kv_len) if kv_len else None
    with torch.no_grad():
        return model(ids, kv_cache=cache)[0].float()


# (config, llama.cpp n_ctx, our KV-cache length or None): llama.cpp picks rope_factors_long iff
# n_ctx > rope.scaling.original_context_length; our model iff max(max_pos, context) > original.
PARITY_CASES = {
    # short factors on both sides (max_position_embeddings == original, as the released configs)
    "short": (lambda: real_tiny(), 512, None),
    # max_pos 2048 > original 512: long factors + cos/sin x sqrt(1 + ln 4 / ln 512) on both sides
    "long-max-pos": (lambda: real_tiny(max_position_embeddings=2048), 256, None),
    # max_pos == original == 256 but a 512 context: long factors, no scaling, on both sides
    "long-context": (lambda: real_tiny(max_position_embeddings=256, rope_scaling=RopeScaling(
        tiny().rope_scaling.long_factor, tiny().rope_scaling.short_factor, 256)), 512, 512),
}


@needs_ref
@pytest.mark.parametrize("case", list(PARITY_CASES))
def test_llama_cpp_logits_f32(case, tmp_path):
    _llama_cpp()
    make_config, n_ctx, kv_len = PARITY_CASES[case]
    config = make_config()
    model = build_model(config, seed=0).eval()
    path = export_model(model, REF_DIR, tmp_path / "m.gguf", "f32")
    tokens = _tokens(config, 48)
    ref = llama_cpp_logits(path, tokens, n_ctx)
    abs_err, rel = errors(_ours(model, tokens, kv_len), ref)
    print(f"\n[gguf f32 {case}] max|logit| {float(ref.abs().max()):.3f} max abs {abs_err:.3e} rel {rel:.3e}")
    # Same weights, F32 everywhere (F32 KV cache): only summation order differs. Measured ~2.5e-7
    # relative; each real mistake measured >= 1.9e-2 (short<->long factors 2.7e-2, no LongRoPE 1.9e-2,
    # missing attn_factor 2.8e-2, unpermuted q/k 1.0e-1). llama.cpp's default F16 KV cache: 8.5e-5.
    assert rel < 1e-5, (abs_err, rel)


@needs_ref
def test_llama_cpp_logits_bf16(tmp_path):
    _llama_cpp()
    config = real_tiny()
    model = build_model(config, seed=0).eval()
    path = export_model(model, REF_DIR, tmp_path / "m.gguf", "bf16")
    tokens = _tokens(config, 48)
    ref = llama_cpp_logits(path, tokens, 512)
    # Our model on the same bf16-rounded weights, computed in fp32: isolates llama.cpp's BF16 compute
    # (ggml rounds activations to bf16 before every BF16 matmul).
    rounded = build_model(config, seed=0).eval()
    with torch.no_grad():
        for p in rounded.parameters():
            p.copy_(p.to(torch.bfloat16).float())
    abs_err, rel = errors(_ours(rounded, tokens), ref)
    bf16_abs, bf16_rel = errors(_ours(build_model(config, dtype=torch.bfloat16, seed=0).eval(), tokens), ref)
    print(f"\n[gguf bf16] max|logit| {float(ref.abs().max()):.3f} vs fp32-on-bf16-weights: max abs {abs_err:.3e} "
          f"rel {rel:.3e}; vs our bf16 model: max abs {bf16_abs:.3e} rel {bf16_rel:.3e}")
    # bf16 keeps 8 mantissa bits (unit roundoff 2^-9 = 2e-3) and ggml rounds every matmul input;
    # measured 1.6e-3. 5e-3 stays well below the smallest real mistake measured in F32 (1.9e-2).
    assert rel < 5e-3, (abs_err, rel)


@needs_ref
def test_llama_cpp_tokenizes_like_hf(tmp_path, spm_export):
    """llama.cpp's SPM tokenizer on our GGUF agrees with transformers' LlamaTokenizer on MiniCPM4.

    Known difference, not fixable in metadata: a text chunk that already starts with a space
    (" hi", "<|im_end|> x") gets a second "▁" from llama.cpp (add_space_prefix is unconditional),
    while transformers' Metaspace skips the prefix then.
    """
    llama_cpp = _llama_cpp()
    transformers = pytest.importorskip("transformers")
    path = spm_export[3]
    hf = transformers.AutoTokenizer.from_pretrained(str(REF_DIR))
    llm = llama_cpp.Llama(model_path=str(path), vocab_only=True, verbose=False)
    try:
        for text in ["Hello world", "Hello  world\n\nok", "你好，世界！MiniCPM4 runs 1234.", "a...b <SEP> c",
                     "\n\nnewline first", "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"]:
            assert llm.tokenize(text.encode(), add_bos=True, special=True) == hf.encode(text), text
    finally:
        llm.close()


def test_llama_cpp_tokenizes_bpe_like_tokenizers(bpe_export, bpe_dir, tmp_path):
    llama_cpp = _llama_cpp()
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(bpe_dir / "tokenizer.json"))
    path = bpe_export[3]  # BF16 weights; only the vocabulary matters here
    llm = llama_cpp.Llama(model_path=str(path), vocab_only=True, verbose=False)
    try:
        for text in ["the quick brown fox", "hello gguf 12345, world!", "数据 推理 <|im_end|>"]:
            assert llm.tokenize(text.encode(), add_bos=False, special=True) == tok.encode(text).ids, text
    finally:
        llm.close()


def model_from_gguf(path: Path, config):
    """Our model holding a GGUF file's dequantized weights (q/k rows back to rotate-half order)."""
    from minicpm4.export.gguf import gguf_name_map

    reader = gguf.GGUFReader(path)
    sd = {}
    for hf_name, gguf_name in gguf_name_map(config).items():
        w, _ = _dequant(reader, gguf_name)
        if hf_name.endswith("q_proj.weight"):
            w = unpermute_qk(w, config.num_attention_heads)
        elif hf_name.endswith("k_proj.weight"):
            w = unpermute_qk(w, config.num_key_value_heads)
        sd[hf_name] = w
    model = build_model(config).eval()
    model.load_state_dict(sd, strict=False)  # a tied model has no lm_head.weight to load
    return model


# llama.cpp on a quantized file vs our fp32 model on the same (dequantized) weights: what remains is ggml quantizing
# the activations to 8 bits before each quantized matmul (Q8_0 blocks of 32 for Q8_0 / Q4_0 weights and the Q8_0
# head, Q8_K blocks of 256 for TQ1_0 / TQ2_0). Measured (relative to max|logit|): Q8_0 1.2e-2, Q4_0 1.3e-2, TQ*
# 5.4e-3 (the Q8_0 file's dequantized weights written as F32 agree to 9.5e-7, so this is ggml's 8-bit compute);
# real mistakes on the same files measured >= 4.8e-2 (swapped LongRoPE factors, no LongRoPE).
QUANT_PARITY = {"q8_0": 2.5e-2, "q4_0": 2.5e-2, "tq1_0": 1.5e-2, "tq2_0": 1.5e-2}


@pytest.mark.parametrize("out_type", list(QUANT_PARITY))
def test_llama_cpp_logits_quantized(out_type, bpe_dir, tmp_path):
    """Q8_0 / Q4_0 files of a float model, TQ1_0 / TQ2_0 files of a ternary model (one scale per 256 inputs)."""
    _llama_cpp()
    config = tiny(**QUANT_CONFIG)
    model = build_model(config, seed=3).eval()
    if out_type.startswith("tq"):
        from minicpm4.quant import TernaryQATConfig, quantize_

        quantize_(model, TernaryQATConfig(step="convert", group_size=256))
    path = export_model(model, bpe_dir, tmp_path / f"m-{out_type}.gguf", out_type)
    tokens = _tokens(config, 48)
    ref = llama_cpp_logits(path, tokens, 512)
    abs_err, rel = errors(_ours(model_from_gguf(path, config), tokens), ref)
    src_abs, src_rel = errors(_ours(model, tokens), ref)
    print(f"\n[gguf {out_type}] max|logit| {float(ref.abs().max()):.3f} vs ours on the file's weights: max abs "
          f"{abs_err:.3e} rel {rel:.3e}; vs the source model: max abs {src_abs:.3e} rel {src_rel:.3e}")
    assert rel < QUANT_PARITY[out_type], (abs_err, rel)
    if out_type.startswith("tq"):  # exact ternary: the file is the model, so llama.cpp runs our ternary model
        assert src_rel < QUANT_PARITY[out_type], (src_abs, src_rel)

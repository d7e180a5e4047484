"""Export a MiniCPM4 checkpoint to GGUF for llama.cpp's `minicpm` architecture (MINICPM4.md §2.7, oracle 2).

Every key, tensor name and transform below was checked against llama.cpp itself: the converter
(`conversion/minicpm.py` `MiniCPMModel`, `conversion/base.py` `TextModel.set_gguf_parameters` and
`_create_vocab_sentencepiece`, `conversion/llama.py` `LlamaModel.permute`) and the loader / graph
(`src/models/minicpm.cpp`, which reuses `granite.cpp`'s graph; `llama-model.cpp` `get_rope_factors`;
`llama-context.cpp`; `llama-vocab.cpp`), as vendored in llama-cpp-python 0.3.36. Facts, not code:

  minicpm.embedding_scale = scale_emb                          graph: embeddings x scale
  minicpm.residual_scale  = scale_depth / sqrt(L)              graph: each branch x scale before the add
  minicpm.logit_scale     = hidden_size / dim_model_base       graph: logits x 1/scale
  q_proj / k_proj rows permuted from HF rotate-half to llama.cpp's interleaved (pairwise) RoPE
  LongRoPE: rope.scaling.type = "longrope" is required, or llama.cpp does not load the factor
            tensors (and then rejects the file for having unused tensors).

Where llama.cpp and our model choose LongRoPE factors differently, we write what our model does
(see `_rope_plan`), so the GGUF reproduces `MiniCPMForCausalLM` rather than a third behaviour.
"""

from __future__ import annotations

import json
import logging
import math
import warnings
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from minicpm4.config import MiniCPMConfig
from minicpm4.io import atomic_path

logger = logging.getLogger(__name__)

ARCH = "minicpm"
OUT_TYPES = ("f32", "bf16", "q8_0", "q4_0", "tq1_0", "tq2_0")
# Quantized file types (llama.cpp's ftype names): every 2-D weight in the type, except as below.
QUANT_TYPES = {"q8_0": "Q8_0", "q4_0": "Q4_0", "tq1_0": "TQ1_0", "tq2_0": "TQ2_0"}
# The token embedding (also the output matrix of a tied MiniCPM4): llama.cpp's quantize gives the output Q6_K in
# Q4_0 and ternary files (its most sensitive matrix); gguf-py has no Q6_K quantizer, so Q8_0 here: more bytes than
# llama.cpp's own file, never less precision. Q8_0 files keep it Q8_0.
EMBEDDING_TYPE = "Q8_0"
# A row length the type's block does not divide falls back as llama.cpp's quantize does (`tensor_type_fallback`):
# the ternary types (256-blocks) to Q4_0 where 32 divides the row, else F16. llama.cpp defines no fallback for
# Q8_0 / Q4_0 and refuses the model; we write F16 there, the type it takes when its own fallback still does not fit.
FALLBACK = {"TQ1_0": "Q4_0", "TQ2_0": "Q4_0"}
# TQ1_0 / TQ2_0 store codes in {-1, 0, +1} and ONE fp16 scale per 256 inputs (gguf-py quantizes with scale = max|x|
# of the block). A ternary model with one scale per 256 inputs round-trips to fp16 precision; per-group scales of
# smaller groups (BitCPM's 64 / 128) are only approximated (measured in tests/test_gguf.py: relative error 0.07 at
# group 128, 0.14 at 64); float (non-ternary) weights lose most of their information in these types.

try:  # gguf is an optional dependency (llama.cpp interop); fail on use, not on import.
    import gguf
except ImportError:  # pragma: no cover - exercised only without the package
    gguf = None  # type: ignore[assignment]


def _require_gguf():
    if gguf is None:
        from minicpm4.errors import MissingDependency

        raise MissingDependency("GGUF export", "gguf", "gguf")
    return gguf


def tensor_type(gguf_name: str, shape: tuple[int, ...], out_type: str) -> str:
    """The GGML type name a tensor is written in for a quantized out_type (rules above QUANT_TYPES)."""
    if len(shape) == 1:
        return "F32"
    wanted = EMBEDDING_TYPE if gguf_name.startswith(("token_embd", "output.")) else QUANT_TYPES[out_type]
    row = shape[-1]  # [out, in]: blocks run along the input dimension
    while row % gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[wanted]][0]:
        wanted = FALLBACK.get(wanted, "F16")
        if wanted == "F16":
            break
    return wanted


# ---- weights ------------------------------------------------------------------------------------

def permute_qk(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    """HF rotate-half row order -> llama.cpp interleaved RoPE row order, per head (MINICPM4.md §2.1).

    In each head of D rows, HF rotates row i with row i + D/2; llama.cpp rotates rows 2i and 2i+1.
    Rows [h, half, i] move to [h, i, half] (llama.cpp `LlamaModel.permute`). weight [H*D, in].
    """
    out, *rest = weight.shape
    return weight.reshape(n_heads, 2, out // n_heads // 2, *rest).transpose(1, 2).reshape(weight.shape)


def unpermute_qk(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Inverse of `permute_qk`: llama.cpp interleaved rows -> HF rotate-half rows."""
    out, *rest = weight.shape
    return weight.reshape(n_heads, out // n_heads // 2, 2, *rest).transpose(1, 2).reshape(weight.shape)


@dataclass
class _TensorPlan:
    gguf_name: str
    shape: tuple[int, ...]  # PyTorch order [out, in]; GGUF stores it reversed (ne)
    source: Callable[[], torch.Tensor]  # loads (and transforms) the tensor when it is written
    keep_f32: bool  # norms and RoPE factors stay F32 in every file type (as llama.cpp's converter)


def _layer_map(i: int) -> dict[str, str]:
    """HF parameter name -> GGUF tensor name for layer i (gguf-py TENSOR_NAMES, arch minicpm)."""
    p, b = f"model.layers.{i}.", f"blk.{i}."
    return {
        p + "input_layernorm.weight": b + "attn_norm.weight",
        p + "self_attn.q_proj.weight": b + "attn_q.weight",
        p + "self_attn.k_proj.weight": b + "attn_k.weight",
        p + "self_attn.v_proj.weight": b + "attn_v.weight",
        p + "self_attn.o_proj.weight": b + "attn_output.weight",
        p + "post_attention_layernorm.weight": b + "ffn_norm.weight",
        p + "mlp.gate_proj.weight": b + "ffn_gate.weight",
        p + "mlp.up_proj.weight": b + "ffn_up.weight",
        p + "mlp.down_proj.weight": b + "ffn_down.weight",
    }


def gguf_name_map(config: MiniCPMConfig) -> dict[str, str]:
    """The one declarative HF -> GGUF name map (tied models have no `lm_head.weight`)."""
    names = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight"}
    if not config.tie_word_embeddings:
        names["lm_head.weight"] = "output.weight"
    for i in range(config.num_hidden_layers):
        names.update(_layer_map(i))
    return names


def _expected_shape(config: MiniCPMConfig, hf_name: str) -> tuple[int, ...]:
    h, d, i_ff = config.hidden_size, config.head_dim, config.intermediate_size
    suffix_shapes = {
        "embed_tokens.weight": (config.vocab_size, h), "lm_head.weight": (config.vocab_size, h),
        "layernorm.weight": (h,), "model.norm.weight": (h,),
        "q_proj.weight": (config.num_attention_heads * d, h), "k_proj.weight": (config.num_key_value_heads * d, h),
        "v_proj.weight": (config.num_key_value_heads * d, h), "o_proj.weight": (h, config.num_attention_heads * d),
        "gate_proj.weight": (i_ff, h), "up_proj.weight": (i_ff, h), "down_proj.weight": (h, i_ff),
    }
    return next(shape for suffix, shape in suffix_shapes.items() if hf_name.endswith(suffix))


def _check_tensor_names(config: MiniCPMConfig, tensors: Mapping[str, torch.Tensor]) -> None:
    expected = set(gguf_name_map(config))
    present = set(tensors)
    if config.tie_word_embeddings and "lm_head.weight" in present:
        # Some writers store the tied head anyway; accept it only if it really is the embedding.
        if not torch.equal(tensors["lm_head.weight"], tensors["model.embed_tokens.weight"]):
            raise ValueError("tie_word_embeddings is true but the checkpoint's lm_head.weight differs from "
                             "model.embed_tokens.weight; set tie_word_embeddings=false to export both")
        present.discard("lm_head.weight")
    missing, unexpected = sorted(expected - present), sorted(present - expected)
    if missing or unexpected:
        raise ValueError(f"checkpoint tensors do not match the config: missing {missing[:8]}, "
                         f"unexpected {unexpected[:8]} (GGUF 'minicpm' stores exactly the MiniCPM dense weights)")


def _tensor_plan(config: MiniCPMConfig, tensors: Mapping[str, torch.Tensor],
                 rope_factors: tuple[list[float], list[float]] | None) -> list[_TensorPlan]:
    plan: list[_TensorPlan] = []
    for hf_name, gguf_name in gguf_name_map(config).items():
        shape = _expected_shape(config, hf_name)

        def load(hf_name: str = hf_name, shape: tuple[int, ...] = shape) -> torch.Tensor:
            t = tensors[hf_name]
            if tuple(t.shape) != shape:
                raise ValueError(f"{hf_name}: shape {tuple(t.shape)} does not match the config's {shape}")
            if not t.is_floating_point():
                raise ValueError(f"{hf_name}: expected a floating-point tensor, got {t.dtype}")
            t = t.detach().to("cpu", torch.float32)
            if hf_name.endswith("q_proj.weight"):
                t = permute_qk(t, config.num_attention_heads)
            elif hf_name.endswith("k_proj.weight"):
                t = permute_qk(t, config.num_key_value_heads)
            return t

        plan.append(_TensorPlan(gguf_name, shape, load, keep_f32=len(shape) == 1))
    if rope_factors is not None:
        # One copy each, not per layer: llama.cpp's loader duplicates them into every layer.
        for gguf_name, factors in zip(("rope_factors_long.weight", "rope_factors_short.weight"), rope_factors):
            plan.append(_TensorPlan(gguf_name, (len(factors),),
                                    lambda f=factors: torch.tensor(f, dtype=torch.float32), keep_f32=True))
    return plan


# ---- RoPE ---------------------------------------------------------------------------------------

@dataclass
class _RopePlan:
    factors: tuple[list[float], list[float]] | None  # (long slot, short slot)
    original_context_length: int | None
    attn_factor: float


def _rope_plan(config: MiniCPMConfig) -> _RopePlan:
    """What llama.cpp must be told so that it picks the same LongRoPE factors and scaling as we do.

    llama.cpp (`get_rope_factors`): long factors iff n_ctx > rope.scaling.original_context_length
    (default: context_length), and cos/sin x rope.scaling.attn_factor. Our model (like the remote code,
    MINICPM4.md §2.4): long iff max(max_position_embeddings, context length) > original, and cos/sin
    x sqrt(1 + ln(max/original) / ln(original)) when max > original.
      - max <= original: write original_context_length = original; both switch to long factors at the
        same context length, attention factor 1.
      - max >  original: our model always uses the long factors, so both slots hold the long factors
        (the short list is unreachable in our model) and attn_factor carries the scaling.
    """
    rs = config.rope_scaling
    if rs is None:
        return _RopePlan(None, None, 1.0)
    original, max_pos = rs.original_max_position_embeddings, config.max_position_embeddings
    if max_pos > original:
        scaling = math.sqrt(1 + math.log(max_pos / original) / math.log(original))
        return _RopePlan((list(rs.long_factor), list(rs.long_factor)), original, scaling)
    return _RopePlan((list(rs.long_factor), list(rs.short_factor)), original, 1.0)


# ---- tokenizer ----------------------------------------------------------------------------------

@dataclass
class _Vocab:
    model: str  # "llama" (SentencePiece) or "gpt2" (byte-level BPE)
    pre: str
    tokens: list[str]
    types: list[int]
    scores: list[float] | None = None
    merges: list[str] | None = None
    unk_id: int | None = None
    add_space_prefix: bool | None = None


def _looks_special(text: str) -> bool:
    # llama.cpp's converter treats `<|...|>` added tokens as control even when not marked special.
    return text.startswith("<|") and text.endswith("|>")


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def _pad_vocab(tokens: list[str | None], types: list[int], scores: list[float] | None) -> None:
    T = gguf.TokenType
    for i, tok in enumerate(tokens):
        if tok is None:  # ids the embedding has but the tokenizer never produces
            tokens[i], types[i] = f"[PAD{i}]", T.UNUSED
            if scores is not None:
                scores[i] = -10000.0


def _added_tokens(tokenizer_dir: Path, vocab_size: int) -> dict[int, tuple[str, bool]]:
    """id -> (text, special) from added_tokens.json and tokenizer_config.json (the latter wins)."""
    added: dict[int, tuple[str, bool]] = {}
    for text, tid in _read_json(tokenizer_dir / "added_tokens.json").items():
        added[int(tid)] = (text, False)
    for tid, data in _read_json(tokenizer_dir / "tokenizer_config.json").get("added_tokens_decoder", {}).items():
        added[int(tid)] = (data["content"], bool(data.get("special")))
    too_big = sorted(t for t in added if t >= vocab_size)
    if too_big:
        raise ValueError(f"tokenizer added tokens {too_big[:5]} are outside vocab_size {vocab_size}")
    return added


def _sentencepiece_vocab(tokenizer_dir: Path, vocab_size: int) -> _Vocab:
    """SentencePiece -> llama.cpp `llama` vocab: pieces, scores, types (as `_create_vocab_sentencepiece`)."""
    import sentencepiece as spm

    T = gguf.TokenType
    sp = spm.SentencePieceProcessor(model_file=str(tokenizer_dir / "tokenizer.model"))
    n = sp.vocab_size()
    if n > vocab_size:
        raise ValueError(f"tokenizer.model has {n} pieces but the model's vocab_size is {vocab_size}")
    ids = list(range(n))
    tokens: list[str | None] = [*sp.id_to_piece(ids), *[None] * (vocab_size - n)]
    scores = [*sp.get_score(ids), *[-10000.0] * (vocab_size - n)]
    types = [int(T.NORMAL)] * n + [int(T.UNUSED)] * (vocab_size - n)
    # Same precedence as llama.cpp's converter: unknown, control, unused, byte, else normal.
    for check, typ in ((sp.is_byte, T.BYTE), (sp.is_unused, T.UNUSED), (sp.is_control, T.CONTROL),
                       (sp.is_unknown, T.UNKNOWN)):
        for i in ids:
            if check(i):
                types[i] = int(typ)
    for tid, (text, special) in _added_tokens(tokenizer_dir, vocab_size).items():
        if tid < n and types[tid] in (T.UNKNOWN, T.CONTROL) and tokens[tid] == text:
            continue  # <unk>, <s>, </s> re-listed by tokenizer_config.json: keep SentencePiece's own type
        tokens[tid], scores[tid] = text, -1000.0
        types[tid] = int(T.CONTROL if special or _looks_special(text) else T.USER_DEFINED)
    _pad_vocab(tokens, types, scores)
    # add_space_prefix: HF's LlamaTokenizer (legacy, and the fast converter) prepends "▁" even though
    # MiniCPM4's SentencePiece proto has add_dummy_prefix=false; llama.cpp's SPM default is the same
    # (true). Written explicitly so the behaviour does not hang on a default.
    return _Vocab("llama", "default", tokens, types, scores=scores,  # type: ignore[arg-type]
                  unk_id=sp.unk_id() if sp.unk_id() >= 0 else None, add_space_prefix=True)


def _bpe_pre(tokenizer_json: dict, bpe_pre: str | None) -> str:
    """llama.cpp names its BPE pre-tokenizers; only the plain GPT-2 one is recognised automatically."""
    if bpe_pre is not None:
        return bpe_pre
    pre = tokenizer_json.get("pre_tokenizer") or {}
    if pre.get("type") == "ByteLevel" and pre.get("use_regex", True) and not pre.get("add_prefix_space", False):
        return "gpt-2"
    raise ValueError(f"cannot name the BPE pre-tokenizer {pre.get('type')!r} for llama.cpp automatically; pass "
                     "bpe_pre= with a name llama.cpp knows (e.g. 'llama3', 'qwen2'), see llama-vocab.cpp")


def _bpe_vocab(tokenizer_dir: Path, vocab_size: int, bpe_pre: str | None) -> _Vocab:
    """HF tokenizer.json byte-level BPE -> llama.cpp `gpt2` vocab: tokens, types, merges."""
    from tokenizers import Tokenizer

    T = gguf.TokenType
    path = tokenizer_dir / "tokenizer.json"
    tj = _read_json(path)
    if tj.get("model", {}).get("type") != "BPE":
        raise ValueError(f"{path}: only BPE tokenizers export as GGUF 'gpt2', got {tj.get('model', {}).get('type')!r}")
    pre = _bpe_pre(tj, bpe_pre)
    tok = Tokenizer.from_file(str(path))
    vocab = tok.get_vocab(with_added_tokens=True)
    if vocab and max(vocab.values()) >= vocab_size:
        raise ValueError(f"tokenizer.json has token id {max(vocab.values())} but the model's vocab_size is {vocab_size}")
    added = {tid: (t.content, t.special) for tid, t in tok.get_added_tokens_decoder().items()}
    tokens: list[str | None] = [None] * vocab_size
    types = [int(T.UNUSED)] * vocab_size
    for text, tid in vocab.items():
        tokens[tid], types[tid] = text, int(T.NORMAL)
    for tid, (text, special) in added.items():
        tokens[tid], types[tid] = text, int(T.CONTROL if special or _looks_special(text) else T.USER_DEFINED)
    _pad_vocab(tokens, types, None)
    # gguf-py's SpecialVocab knows both merge encodings ("a b" and ["a", "b"]) of tokenizer.json.
    merges = gguf.SpecialVocab(tokenizer_dir, load_merges=True, special_token_types=()).merges
    if not merges:
        raise ValueError(f"{path}: no BPE merges found")
    unk = tj["model"].get("unk_token")
    return _Vocab("gpt2", pre, tokens, types, merges=merges,  # type: ignore[arg-type]
                  unk_id=vocab.get(unk) if unk is not None else None)


def _load_vocab(tokenizer_dir: Path, vocab_size: int, bpe_pre: str | None) -> _Vocab:
    if (tokenizer_dir / "tokenizer.model").is_file():  # MiniCPM4 ships SentencePiece (MINICPM4.md §2.5)
        return _sentencepiece_vocab(tokenizer_dir, vocab_size)
    if (tokenizer_dir / "tokenizer.json").is_file():
        return _bpe_vocab(tokenizer_dir, vocab_size, bpe_pre)
    raise FileNotFoundError(f"no tokenizer.model or tokenizer.json in {tokenizer_dir}")


def _chat_template(tokenizer_dir: Path):
    template = _read_json(tokenizer_dir / "tokenizer_config.json").get("chat_template")
    jinja = tokenizer_dir / "chat_template.jinja"
    if template is None and jinja.is_file():
        template = jinja.read_text(encoding="utf-8")
    return template


# ---- writer -------------------------------------------------------------------------------------

def _write_metadata(w, config: MiniCPMConfig, vocab: _Vocab, rope: _RopePlan, file_type: int, name: str,
                    tokenizer_dir: Path) -> None:
    w.add_type("model")
    w.add_name(name)
    w.add_file_type(file_type)
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)

    w.add_vocab_size(config.vocab_size)
    w.add_context_length(config.max_position_embeddings)
    w.add_embedding_length(config.hidden_size)
    w.add_block_count(config.num_hidden_layers)
    w.add_feed_forward_length(config.intermediate_size)
    w.add_head_count(config.num_attention_heads)
    w.add_head_count_kv(config.num_key_value_heads)
    w.add_layer_norm_rms_eps(config.rms_norm_eps)
    w.add_rope_dimension_count(config.head_dim)
    w.add_rope_freq_base(config.rope_theta)
    if rope.factors is not None:
        w.add_rope_scaling_type(gguf.RopeScalingType.LONGROPE)
        w.add_rope_scaling_orig_ctx_len(rope.original_context_length)
        w.add_rope_scaling_attn_factors(rope.attn_factor)
    # muP (MINICPM4.md §2.1), in llama.cpp's convention (see module docstring).
    w.add_embedding_scale(float(config.scale_emb))
    w.add_residual_scale(config.residual_scale)
    w.add_logit_scale(config.logit_divisor)

    w.add_tokenizer_model(vocab.model)
    w.add_tokenizer_pre(vocab.pre)
    w.add_token_list(vocab.tokens)
    if vocab.scores is not None:
        w.add_token_scores(vocab.scores)
    w.add_token_types(vocab.types)
    if vocab.merges is not None:
        w.add_token_merges(vocab.merges)
    w.add_bos_token_id(config.bos_token_id)
    # llama.cpp has one eos id plus eot/eom; every one of them ends generation (EOG).
    eos = config.eos_token_ids
    if len(eos) > 3:
        raise ValueError(f"eos_token_id has {len(eos)} ids; GGUF can carry at most 3 (eos, eot, eom)")
    for add, tid in zip((w.add_eos_token_id, w.add_eot_token_id, w.add_eom_token_id), eos):
        add(tid)
    if vocab.unk_id is not None:
        w.add_unk_token_id(vocab.unk_id)
    if config.pad_token_id is not None:
        w.add_pad_token_id(config.pad_token_id)
    tok_cfg = _read_json(tokenizer_dir / "tokenizer_config.json")
    for key, add in (("add_bos_token", w.add_add_bos_token), ("add_eos_token", w.add_add_eos_token)):
        if isinstance(tok_cfg.get(key), bool):
            add(tok_cfg[key])
    if vocab.add_space_prefix is not None:
        w.add_add_space_prefix(vocab.add_space_prefix)
    if (template := _chat_template(tokenizer_dir)) is not None:
        w.add_chat_template(template)


def _encode(t: torch.Tensor, type_name: str) -> np.ndarray:
    """A float tensor as the bytes of GGML type `type_name` (quantized with gguf-py's reference quantizers)."""
    if type_name == "F32":
        return t.numpy()
    if type_name == "BF16":  # round-to-nearest-even, stored as raw uint16 (numpy has no bfloat16)
        return t.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    if type_name == "F16":
        return t.to(torch.float16).numpy().view(np.uint8)
    return gguf.quants.quantize(t.numpy(), gguf.GGMLQuantizationType[type_name])


def export_gguf(config: MiniCPMConfig, tensors: Mapping[str, torch.Tensor], tokenizer_dir: str | Path,
                out_path: str | Path, out_type: str = "f32", *, name: str = "MiniCPM4",
                bpe_pre: str | None = None) -> Path:
    """Write a llama.cpp GGUF (arch `minicpm`) from HF-named tensors, atomically; returns out_path.

    tensors: HF names (`model.layers.0.self_attn.q_proj.weight`, ...), any float dtype; loaded one at
    a time while writing, so a lazy mapping keeps memory at one tensor. tokenizer_dir: holds
    `tokenizer.model` (SentencePiece -> `llama` vocab) or `tokenizer.json` (byte-level BPE -> `gpt2`),
    plus `tokenizer_config.json` (chat template, add_bos). out_type: one of OUT_TYPES: "f32", "bf16" (2-D
    weights in BF16), or a llama.cpp quantized type "q8_0", "q4_0", "tq1_0", "tq2_0" (2-D weights in that type, the
    embedding / tied output Q8_0, llama.cpp's fallbacks for rows the block does not divide: `tensor_type`); norms
    and RoPE factors stay F32 in every type. The ternary types keep one scale per 256 inputs: ternary weights with
    smaller scale groups are approximated, not reproduced (see FALLBACK's note). Quantized tensor by tensor, after
    the q/k permutation. bpe_pre: llama.cpp pre-tokenizer name for BPE tokenizers
    that are not plain GPT-2 byte-level.
    """
    _require_gguf()
    out_type = out_type.lower() if isinstance(out_type, str) else out_type
    if out_type not in OUT_TYPES:
        raise ValueError(f"out_type must be one of {', '.join(OUT_TYPES)}, got {out_type!r}")
    if config.sparse_config is not None:
        warnings.warn("llama.cpp has no InfLLM v2: the GGUF runs the same weights with dense attention", stacklevel=2)
    bf16 = out_type == "bf16"
    file_type = (gguf.LlamaFileType.MOSTLY_BF16 if bf16 else gguf.LlamaFileType.ALL_F32) if out_type not in QUANT_TYPES \
        else gguf.LlamaFileType[f"MOSTLY_{QUANT_TYPES[out_type]}"]
    tokenizer_dir, out_path = Path(tokenizer_dir), Path(out_path)

    _check_tensor_names(config, tensors)
    rope = _rope_plan(config)
    vocab = _load_vocab(tokenizer_dir, config.vocab_size, bpe_pre)
    plan = _tensor_plan(config, tensors, rope.factors)

    writer = gguf.GGUFWriter(path=None, arch=ARCH)
    _write_metadata(writer, config, vocab, rope, int(file_type), name, tokenizer_dir)
    types = [tensor_type(p.gguf_name, p.shape, out_type) if out_type in QUANT_TYPES
             else ("BF16" if bf16 and not p.keep_f32 else "F32") for p in plan]
    for p, t in zip(plan, types):
        qtype = gguf.GGMLQuantizationType[t]
        block, type_size = gguf.GGML_QUANT_SIZES[qtype]
        nbytes = math.prod(p.shape) // block * type_size
        # The element shape with a raw type (a uint8 dtype would make gguf-py read the shape as bytes).
        writer.add_tensor_info(p.gguf_name, p.shape, np.dtype(np.float32), nbytes, raw_dtype=None if t == "F32" else qtype)

    with atomic_path(out_path) as tmp:
        try:
            writer.write_header_to_file(path=tmp)
            writer.write_kv_data_to_file()
            writer.write_ti_data_to_file()
            for p, t in zip(plan, types):  # streamed in plan order, the order of the tensor infos
                writer.write_tensor_data(_encode(p.source(), t))
        finally:
            writer.close()
    logger.info("wrote %s (%s, %d tensors)", out_path, out_type, len(plan))
    return out_path


def export_model(model: torch.nn.Module, tokenizer_dir: str | Path, out_path: str | Path, out_type: str = "f32",
                 **kwargs) -> Path:
    """Export an in-memory `MiniCPMForCausalLM` (its state dict carries the HF names). Packed or fake-quantized
    linears (minicpm4.quant) are written from the float weights they compute with (quant.dense_weight)."""
    return export_gguf(model.config, dense_state_dict(model), tokenizer_dir, out_path, out_type, **kwargs)


def dense_state_dict(model: torch.nn.Module) -> Mapping[str, torch.Tensor]:
    """HF name -> float tensor for every weight, linears read through dense_weight (an INT4 / ternary model's
    dequantized weights); a packed head of a tied model is dropped (llama.cpp reads the tied embedding).
    Lazy: a packed linear is dequantized when the writer reaches it, so memory stays at one float tensor."""
    from minicpm4.quant.linear import FakeTernaryLinear, QuantLinearBase, dense_weight

    loaders: dict[str, Callable[[], torch.Tensor]] = {}
    packed = {name: m for name, m in model.named_modules() if isinstance(m, (QuantLinearBase, FakeTernaryLinear))}
    for name, t in model.state_dict().items():
        if name.rpartition(".")[0] not in packed:
            loaders[name] = lambda t=t: t
    for name, m in packed.items():
        if name == "lm_head" and model.config.tie_word_embeddings:
            continue
        loaders[f"{name}.weight"] = lambda m=m: dense_weight(m)
    return _LazyTensors(loaders)


class _LazyTensors(Mapping[str, torch.Tensor]):
    """Read-only name -> tensor view whose values are computed when indexed."""

    def __init__(self, loaders: dict[str, Callable[[], torch.Tensor]]) -> None:
        self._loaders = loaders

    def __getitem__(self, key: str) -> torch.Tensor:
        return self._loaders[key]()

    def __iter__(self) -> Iterator[str]:
        return iter(self._loaders)

    def __len__(self) -> int:
        return len(self._loaders)


# ---- a checkpoint folder ------------------------------------------------------------------------

class _SafetensorsMapping(Mapping[str, torch.Tensor]):
    """Read-only, lazy view of one or more safetensors files: a tensor is read when indexed."""

    def __init__(self, files: list[Path]) -> None:
        from safetensors import safe_open

        self._handles = [safe_open(str(f), framework="pt") for f in files]
        self._where: dict[str, int] = {}
        for i, h in enumerate(self._handles):
            for key in h.keys():
                self._where[key] = i

    def __getitem__(self, key: str) -> torch.Tensor:
        return self._handles[self._where[key]].get_tensor(key)

    def __iter__(self) -> Iterator[str]:
        return iter(self._where)

    def __len__(self) -> int:
        return len(self._where)


def _safetensors_files(model_dir: Path) -> list[Path]:
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        return [model_dir / f for f in sorted(set(_read_json(index)["weight_map"].values()))]
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors in {model_dir}")
    return files


def export_model_dir(model_dir: str | Path, out_path: str | Path, out_type: str = "f32", **kwargs) -> Path:
    """Export a HF-layout folder (config.json, *.safetensors, tokenizer files) to GGUF."""
    from minicpm4.quant.format import read_quantization, with_quantize_config

    model_dir = Path(model_dir)
    config = with_quantize_config(MiniCPMConfig.from_json(model_dir / "config.json"), model_dir)
    if read_quantization(config) is not None:  # a packed folder: its dequantized weights, then quantized again
        from minicpm4.checkpoint import load_model

        _require_gguf()
        return export_model(load_model(model_dir, dtype=torch.float32), model_dir, out_path, out_type, **kwargs)
    tensors = _SafetensorsMapping(_safetensors_files(model_dir))
    return export_gguf(config, tensors, model_dir, out_path, out_type, **kwargs)

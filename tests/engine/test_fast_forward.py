"""FastDecoder (engine/fast_forward.py) equals the model's own forward: packed batches of several sequences,
fp32 (tight) and bf16 (close), tied and untied heads, LongRoPE long factors, and every fast path (the C++
kernel, PyTorch) against the plain one."""

import pytest
import torch

from minicpm4.attention.dense import DenseAttention
from minicpm4.attention.metadata import AttentionMetadata
from minicpm4.config import tiny
from minicpm4.engine import fast_kernel
from minicpm4.engine.fast_forward import FastDecoder
from minicpm4.model import build_model

KERNEL = fast_kernel.library() is not None
needs_kernel = pytest.mark.skipif(not KERNEL, reason="FastDecoder C++ kernel not built (no AVX-512 / compiler)")
SMALL, LARGE = [3, 1, 6], [9, 17, 5]  # 10 and 31 packed tokens (a decode-sized batch and a small prefill)


def packed_attend(lengths):
    """Causal attention per sequence over the packed tokens, through the model's own DenseAttention (the
    same numerics as model(input_ids) per sequence)."""
    starts = torch.tensor([0] + lengths).cumsum(0).tolist()
    dense = DenseAttention()

    def attend(layer, q, k, v):
        out = torch.empty_like(q)
        for a, b in zip(starts[:-1], starts[1:]):
            meta = AttentionMetadata(positions=torch.arange(b - a)[None])
            o = dense(layer, q[None, a:b].transpose(1, 2), k[None, a:b].transpose(1, 2), v[None, a:b].transpose(1, 2), meta)
            out[a:b] = o[0].transpose(0, 1)
        return out

    return attend


def batch(lengths, vocab, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = [torch.randint(0, vocab, (n,), generator=g) for n in lengths]
    return ids, torch.cat(ids), torch.cat([torch.arange(n) for n in lengths])


def reference_logits(model, ids, context_len=None):
    out = []
    for x in ids:
        h = model.hidden_states(x[None], torch.arange(len(x))[None], context_len=context_len)
        out.append(model.logits(h)[0])
    return torch.cat(out)


def fast_logits(fd, lengths, flat, pos):
    return fd.logits(fd.hidden_states(flat, pos, packed_attend(lengths)))


def rel_err(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.fixture(scope="module")
def models():
    torch.manual_seed(0)
    cfgs = {
        "tied": tiny(initializer_range=0.3),
        "untied": tiny(initializer_range=0.3, tie_word_embeddings=False),
        "long": tiny(initializer_range=0.3, max_position_embeddings=1024),  # > original 512: long factors
        # odd widths: K tails (72 % 32, 100 % 32), N not a multiple of the tile rows (1001, 100)
        "odd": tiny(vocab_size=1001, hidden_size=72, intermediate_size=100, num_attention_heads=4,
                    num_key_value_heads=2, initializer_range=0.3,
                    rope_scaling=None),
    }
    return {name: build_model(cfg, seed=3).eval() for name, cfg in cfgs.items()}


@pytest.mark.parametrize("lengths", [SMALL, LARGE], ids=["kernel-sized", "prefill-sized"])
@pytest.mark.parametrize("name", ["tied", "untied", "long", "odd"])
@pytest.mark.parametrize("kernel", [False, pytest.param(True, marks=needs_kernel)], ids=["torch", "kernel"])
def test_fp32_matches_model(models, name, lengths, kernel):
    model = models[name]
    ids, flat, pos = batch(lengths, model.config.vocab_size)
    ref = reference_logits(model, ids)
    # max_kernel_tokens=32: the kernel path also runs the 31-token batch
    fd = FastDecoder(model, model.config.max_position_embeddings, kernel=kernel, max_kernel_tokens=32)
    out = fast_logits(fd, lengths, flat, pos)
    assert out.dtype == torch.float32 and out.shape == ref.shape
    assert rel_err(out, ref) < 2e-5


@pytest.mark.parametrize("name", ["tied", "untied", "odd"])
@pytest.mark.parametrize("kernel", [False, pytest.param(True, marks=needs_kernel)], ids=["torch", "kernel"])
def test_bf16_close_to_model(models, name, kernel):
    model = build_model(models[name].config, seed=3).to(torch.bfloat16).eval()
    ids, flat, pos = batch(SMALL, model.config.vocab_size)
    ref = reference_logits(model, ids)
    out = fast_logits(FastDecoder(model, 512, kernel=kernel), SMALL, flat, pos)
    assert out.dtype == torch.float32
    assert rel_err(out, ref) < 0.03
    assert (out.argmax(-1) == ref.argmax(-1)).float().mean() >= 0.9


def test_long_factors_follow_context_len(models):
    """tiny: max_position_embeddings = original = 512, so the short factors hold unless the engine's context
    length exceeds 512 (model.hidden_states(context_len=...) makes the same choice)."""
    model = models["tied"]
    ids, flat, pos = batch(SMALL, model.config.vocab_size)
    for context_len in (512, 600):
        ref = reference_logits(model, ids, context_len=context_len)
        out = fast_logits(FastDecoder(model, context_len, kernel=False), SMALL, flat, pos)
        assert rel_err(out, ref) < 2e-5
    assert model.rotary.uses_long_factors(600) and not model.rotary.uses_long_factors(512)


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kernel_equals_torch_path_at_real_widths(dtype):
    """Two layers at MiniCPM4-0.5B widths (hidden 1024, 16/2 heads, intermediate 4096, the real 73,448 vocab for
    bf16): the kernel path against the PyTorch path, decode-sized and batched."""
    cfg = tiny(vocab_size=73448 if dtype == torch.bfloat16 else 4096, hidden_size=1024, intermediate_size=4096,
               num_attention_heads=16, num_key_value_heads=2, num_hidden_layers=2, dim_model_base=256,
               initializer_range=0.02, rope_scaling=None, max_position_embeddings=4096)
    model = build_model(cfg, seed=1).to(dtype).eval()
    plain = FastDecoder(model, 4096, kernel=False)
    fast = FastDecoder(model, 4096, kernel=True, max_kernel_tokens=16)
    for lengths in ([1], [4, 1, 11]):
        _, flat, pos = batch(lengths, cfg.vocab_size)
        pos = pos + 1000  # positions away from 0: RoPE tables indexed for real
        attend = packed_attend(lengths)
        a = plain.logits(plain.hidden_states(flat, pos, attend))
        b = fast.logits(fast.hidden_states(flat, pos, attend))
        assert rel_err(b, a) < (2e-5 if dtype == torch.float32 else 0.03)
        if dtype == torch.bfloat16:
            assert (a.argmax(-1) == b.argmax(-1)).float().mean() >= 0.9


@needs_kernel
def test_kernel_threads_are_bitwise_equal(models):
    """Each output is computed by the same code whichever thread (or a stealing caller) runs its chunk."""
    assert_threads_bitwise_equal(models["odd"], repeats=20)


def assert_threads_bitwise_equal(model, repeats: int) -> None:
    """Logits of the kernel path on 2 threads equal those on 1 thread bit for bit, `repeats` times."""
    _, flat, pos = batch(SMALL, model.config.vocab_size)
    one = FastDecoder(model, 512, kernel=True, threads=1)
    two = FastDecoder(model, 512, kernel=True, threads=2)
    attend = packed_attend(SMALL)
    ref = one.logits(one.hidden_states(flat, pos, attend))
    for _ in range(repeats):
        assert torch.equal(two.logits(two.hidden_states(flat, pos, attend)), ref)


@pytest.mark.parametrize("kernel", [False, pytest.param(True, marks=needs_kernel)], ids=["torch", "kernel"])
def test_positions_outside_the_table_are_rejected(models, kernel):
    fd = FastDecoder(models["tied"], 64, kernel=kernel)
    with pytest.raises(ValueError, match="context_len"):
        fd.hidden_states(torch.tensor([5]), torch.tensor([64]), packed_attend([1]))


def test_fused_weights_are_the_only_copies(models):
    model = models["untied"]
    fd = FastDecoder(model, 512, kernel=False)
    layer = model.model.layers[0]
    assert fd.layers[0].o.data_ptr() == layer.self_attn.o_proj.weight.data_ptr()
    assert fd.layers[0].down.data_ptr() == layer.mlp.down_proj.weight.data_ptr()
    assert fd.head.data_ptr() == model.lm_head.weight.data_ptr()
    assert torch.equal(fd.layers[0].qkv[: 64], layer.self_attn.q_proj.weight)


# ---- packed (INT4 / ternary) linears ---------------------------------------------------------------------------
from minicpm4.quant import Int4Linear, Int4WeightOnlyConfig, TernaryQATConfig, kernels, quantize_  # noqa: E402

needs_packed = pytest.mark.skipif(not (KERNEL and kernels.available()),
                                  reason="the packed GEMV needs an AVX512-VNNI CPU and a C++ compiler")
QUANT = {
    "int4-head": Int4WeightOnlyConfig(group_size=32, lm_head=True),
    "int4-asym": Int4WeightOnlyConfig(group_size=16, sym=False),
    "ternary-head": TernaryQATConfig(step="convert", group_size=32, lm_head=True),
}


# Packed linears quantize their input to int8 per group: where the two paths' elementwise ops differ by an ulp
# (the kernel's vectorised RMSNorm sums in another order), an activation can cross a rounding boundary and move
# one int8 step (~1e-3 of the output at 0.5B widths per flip; measured 3e-3 max after two layers in fp32). So the
# kernel path is held to PACKED_TOL, the torch path (model.py's ops) to the dense tolerances.
PACKED_TOL = 1e-2


def quantized_model(config, dtype=torch.float32, tied=False):
    model = build_model(tiny(initializer_range=0.3, tie_word_embeddings=tied), seed=3, dtype=dtype).eval()
    quantize_(model, config)
    return model


@needs_packed
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("name", list(QUANT))
@pytest.mark.parametrize("kernel", [False, True], ids=["torch", "kernel"])
def test_packed_model_matches_its_forward(name, dtype, kernel):
    """Both paths run the packed modules' arithmetic (int8 activations, integer group sums): the C++ path reads
    the same kernel layout as the modules' forward, so logits agree to elementwise rounding (measured on this tiny
    model: fp32 3e-7, bf16 bit-equal; the bound is PACKED_TOL for the kernel path)."""
    model = quantized_model(QUANT[name], dtype, tied=name == "int4-asym")
    ids, flat, pos = batch(SMALL, model.config.vocab_size)
    ref = reference_logits(model, ids)
    fd = FastDecoder(model, 512, kernel=kernel)
    assert (fd.kernel is not None) == kernel
    out = fast_logits(fd, SMALL, flat, pos)
    assert rel_err(out, ref) < (PACKED_TOL if kernel else 2e-5 if dtype == torch.float32 else 0.03)
    assert (out.argmax(-1) == ref.argmax(-1)).float().mean() >= 0.9


@needs_packed
def test_mixed_dense_and_packed_layers():
    """Layer 0 packed (INT4 attention, ternary MLP), layer 1 and the head dense."""
    from minicpm4.quant import int4, ternary
    from minicpm4.quant.linear import TernaryLinear

    model = build_model(tiny(initializer_range=0.3, tie_word_embeddings=False), seed=3).eval()
    layer = model.model.layers[0]
    for parent, names in ((layer.self_attn, ("q_proj", "k_proj", "v_proj", "o_proj")), (layer.mlp, ("gate_proj", "up_proj", "down_proj"))):
        for n in names:
            w = getattr(parent, n).weight.detach()
            packed = (Int4Linear.from_codes(*int4.rtn_quantize(w, 32), None, 32) if parent is layer.self_attn
                      else TernaryLinear.from_codes(*ternary.ternarize(w, 32), torch.float32))
            setattr(parent, n, packed)
    ids, flat, pos = batch(LARGE, model.config.vocab_size)
    ref = reference_logits(model, ids)
    fd = FastDecoder(model, 512, kernel=True, max_kernel_tokens=32)
    assert rel_err(fast_logits(fd, LARGE, flat, pos), ref) < PACKED_TOL


@needs_packed
def test_packed_kernel_threads_are_bitwise_equal():
    assert_threads_bitwise_equal(quantized_model(QUANT["ternary-head"]), repeats=10)


@needs_packed
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_packed_kernel_equals_torch_path_at_real_widths(dtype):
    """Two INT4 layers (group 128) and an INT4 head at MiniCPM4-0.5B widths, decode-sized and batched."""
    cfg = tiny(vocab_size=4096, hidden_size=1024, intermediate_size=4096, num_attention_heads=16,
               num_key_value_heads=2, num_hidden_layers=2, dim_model_base=256, initializer_range=0.02,
               rope_scaling=None, max_position_embeddings=4096)
    model = build_model(cfg, seed=1, dtype=dtype).eval()
    quantize_(model, Int4WeightOnlyConfig(group_size=128, lm_head=True))
    plain = FastDecoder(model, 4096, kernel=False)
    fast = FastDecoder(model, 4096, kernel=True, max_kernel_tokens=16)
    for lengths in ([1], [4, 1, 11]):
        _, flat, pos = batch(lengths, cfg.vocab_size)
        attend = packed_attend(lengths)
        a = plain.logits(plain.hidden_states(flat, pos + 1000, attend))
        b = fast.logits(fast.hidden_states(flat, pos + 1000, attend))
        assert rel_err(b, a) < (PACKED_TOL if dtype == torch.float32 else 0.03)
        assert (a.argmax(-1) == b.argmax(-1)).float().mean() >= 0.9


@needs_packed
def test_kernel_refuses_packed_linears_it_cannot_take():
    model = quantized_model(Int4WeightOnlyConfig(group_size=8))  # groups of 8: the int4pack / dequant paths only
    with pytest.raises(ValueError, match="packed linears the C"):
        FastDecoder(model, 512, kernel=True)
    assert FastDecoder(model, 512).kernel is None
    ids, flat, pos = batch(SMALL, model.config.vocab_size)
    assert rel_err(fast_logits(FastDecoder(model, 512), SMALL, flat, pos), reference_logits(model, ids)) < 2e-5

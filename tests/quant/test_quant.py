"""Quantization core: packing round trips, packed linears vs their dequantized reference, GPTQ / P-GPTQ vs RTN,
ternary math and QAT's straight-through estimator, quantized checkpoints (GPTQ layout) save -> load."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open

from minicpm4.checkpoint import load_model, save_model
from minicpm4.config import tiny
from minicpm4.model import build_model
from minicpm4.quant import (FakeTernaryLinear, GPTQConfig, Int4Linear, Int4WeightOnlyConfig, TernaryLinear,
                            TernaryQATConfig, detect_fake_ternary, quantize_)
from minicpm4.quant import int4, linear, ternary
from minicpm4.quant.calibrate import gptq_layers
from minicpm4.quant.gptq import Hessian, gptq_quantize, output_error

pytestmark = pytest.mark.usefixtures("one_thread")
DEFAULT_MODEL = Path(__file__).resolve().parents[2] / "minicpm4" / "assets" / "default-model"


@pytest.fixture
def no_kernel(monkeypatch):
    """The PyTorch paths only (int4pack / dequantize); the C++ kernel has its own tests (test_kernels.py)."""
    monkeypatch.setattr(linear, "_kernels", lambda: None)


# ---- packing ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("sym", [True, False])
def test_gptq_pack_unpack_round_trip(sym):
    g = torch.Generator().manual_seed(0)
    w = torch.randn(48, 256, generator=g)
    codes, scales, zeros = int4.rtn_quantize(w, 64, sym)
    g_idx = int4.default_g_idx(256, 64)
    packed = int4.pack_gptq(codes, scales, zeros, g_idx)
    assert packed["qweight"].shape == (256 // 8, 48) and packed["qweight"].dtype == torch.int32
    assert packed["qzeros"].shape == (4, 48 // 8) and packed["scales"].shape == (4, 48)
    if sym:  # AutoGPTQ's symmetric files store zero - 1 = 7 in every nibble
        assert bool((packed["qzeros"] == 0x77777777).all())
    c2, s2, z2, gi2 = int4.unpack_gptq(**packed)
    assert torch.equal(c2, codes) and torch.equal(z2, zeros) and torch.equal(gi2, g_idx)
    assert torch.allclose(s2, scales.half().float())


def test_gptq_bit_layout_matches_the_autogptq_convention():
    """Code k of column n sits at bits 4 (k % 8) of qweight[k // 8, n] (pinned by hand, not by the packer)."""
    codes = torch.zeros(8, 16, dtype=torch.uint8)
    codes[3, 9] = 0xA  # row (output) 3, input channel 9 -> word [1, 3], nibble 1
    packed = int4.pack_gptq(codes, torch.ones(8, 1), torch.full((8, 1), 8, dtype=torch.int32), torch.zeros(16, dtype=torch.int32))
    assert int(packed["qweight"][1, 3]) == 0xA << 4 and int(packed["qweight"].count_nonzero()) == 1


def test_ternary_pack_unpack_round_trip():
    codes = torch.randint(-1, 2, (16, 128), dtype=torch.int8)
    packed = ternary.pack_ternary(codes)
    assert packed.shape == (16, 32) and packed.dtype == torch.uint8
    assert torch.equal(ternary.unpack_ternary(packed), codes)
    with pytest.raises(ValueError, match="unused code 3"):
        ternary.unpack_ternary(torch.full((1, 1), 0xFF, dtype=torch.uint8))


# ---- packed linears vs the dequantized reference --------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("act_order", [False, True])
def test_int4_linear_matches_dequantized_reference(no_kernel, dtype, act_order):
    g = torch.Generator().manual_seed(1)
    w = torch.randn(64, 256, generator=g)
    H = torch.randn(512, 256, generator=g).pow(2)
    res = gptq_quantize(w, H.t() @ H, group_size=64, act_order=act_order)
    lin = Int4Linear.from_codes(res.codes, res.scales, res.zeros, res.g_idx, 64)
    x = torch.randn(5, 256, generator=g).to(dtype)
    ref = F.linear(x.float().to(torch.bfloat16).float(), lin.dequantize())  # int4pack takes bf16 activations
    y = lin(x)
    assert y.dtype == dtype and y.shape == (5, 64)
    # bf16 output rounding (~2^-8 relative) on values of |y| ~ 10: 0.2 absolute at most
    assert torch.allclose(y.float(), ref, rtol=1e-2, atol=0.2), (y.float() - ref).abs().max()
    assert not torch.equal(res.g_idx, int4.default_g_idx(256, 64)) or not act_order


def test_ternary_linear_matches_dequantized_reference(no_kernel):
    w = torch.randn(32, 128, generator=torch.Generator().manual_seed(2))
    codes, scales = ternary.ternarize(w, 32)
    lin = TernaryLinear.from_codes(codes, scales, torch.float32)
    x = torch.randn(3, 128)
    assert torch.allclose(lin(x), x @ lin.dequantize().t(), atol=1e-5)
    assert torch.equal(lin.dequantize(), ternary.dequantize_ternary(codes, scales))


# ---- GPTQ ---------------------------------------------------------------------------------------------------
def _correlated_inputs(n: int, k: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, k, generator=g) @ torch.randn(k, k, generator=g) * 0.3 + torch.randn(n, k, generator=g)


def test_gptq_beats_rtn_on_correlated_inputs():
    X = _correlated_inputs(2048, 128, 3)
    H = Hessian(128)
    H.add(X)
    w = torch.randn(64, 128, generator=torch.Generator().manual_seed(4))
    rtn = int4.dequantize(*int4.rtn_quantize(w, 32), int4.default_g_idx(128, 32))
    for kwargs in ({}, {"act_order": True}, {"act_order": True, "static_groups": True}):
        gq = gptq_quantize(w, H.H, group_size=32, **kwargs).dequantize()
        assert output_error(w, gq, H.H) < 0.8 * output_error(w, rtn, H.H), kwargs
        # the exact identity behind output_error
        direct = ((X @ (gq - w).t()).norm() / (X @ w.t()).norm()).item()
        assert output_error(w, gq, H.H) == pytest.approx(direct, rel=1e-3)


def test_static_groups_keep_contiguous_groups():
    X = _correlated_inputs(512, 64, 5)
    res = gptq_quantize(torch.randn(16, 64), X.t() @ X, group_size=16, act_order=True, static_groups=True)
    assert torch.equal(res.g_idx, int4.default_g_idx(64, 16))


def test_pgptq_beats_gptq_on_non_prefix_tokens_with_planted_outliers():
    """The first 4 positions of every sequence carry 30x activations in a few channels (MINICPM4.md §4.5's
    observation); P-GPTQ leaves them out of H and must do at least as well on the other tokens."""
    g = torch.Generator().manual_seed(6)
    seqs = _correlated_inputs(32 * 64, 128, 7).view(32, 64, 128)
    seqs[:, :4, :8] *= 30
    every, rest = Hessian(128), Hessian(128, skip_prefix=4)
    every.add(seqs)
    rest.add(seqs)
    w = torch.randn(64, 128, generator=g)
    gptq = gptq_quantize(w, every.H, group_size=32).dequantize()
    pgptq = gptq_quantize(w, rest.H, group_size=32).dequantize()
    assert output_error(w, pgptq, rest.H) <= output_error(w, gptq, rest.H)
    assert output_error(w, pgptq, rest.H) < 0.9 * output_error(w, gptq, rest.H)  # and by a clear margin here


def _default_model_calibration(model, n: int = 16, seq_len: int = 128) -> list[torch.Tensor]:
    from minicpm4.quant.calibration import calibration_sequences

    return calibration_sequences(DEFAULT_MODEL / "val_tokens.npy", None, model.config.bos_token_id, n, seq_len)


def test_gptq_per_layer_error_below_rtn_on_the_default_model():
    errors = {}
    for rtn in (False, True):
        model = load_model(DEFAULT_MODEL, dtype=torch.float32)
        reports = gptq_layers(model, _default_model_calibration(model), GPTQConfig(group_size=64), rtn=rtn)
        errors[rtn] = {r.name: r.error for r in reports if not r.name.endswith("(all tokens)")}
    assert errors[False].keys() == errors[True].keys() and len(errors[False]) == 4 * 7
    worse = [n for n in errors[False] if not errors[False][n] < errors[True][n]]
    assert not worse, worse
    assert np.mean(list(errors[False].values())) < 0.8 * np.mean(list(errors[True].values()))


@pytest.mark.parametrize("config", [GPTQConfig(group_size=64, prefix_tokens=4),
                                    GPTQConfig(group_size=64, prefix_tokens=4, smooth=True),
                                    GPTQConfig(group_size=64, act_order=True)], ids=["pgptq", "spgptq", "act-order"])
def test_gptq_variants_quantize_the_default_model(config):
    model = load_model(DEFAULT_MODEL, dtype=torch.float32)
    ids = torch.tensor([[1, 345, 23, 900, 17, 4000]])
    ref = model(ids)
    report = quantize_(model, config, calibration=_default_model_calibration(model, 8))
    assert report.method == config.method and all(r.error < 0.2 for r in report.layers)
    assert isinstance(model.model.layers[3].mlp.down_proj, Int4Linear)
    out = model(ids)
    assert (out - ref).norm() / ref.norm() < 0.1


def test_gptq_needs_calibration():
    with pytest.raises(ValueError, match="calibration"):
        quantize_(build_model(tiny()), GPTQConfig(group_size=32))


# ---- ternary ----------------------------------------------------------------------------------------------
def test_ternarize_is_absmean_per_group():
    w = torch.randn(4, 64)
    codes, scales = ternary.ternarize(w, 16)
    assert torch.allclose(scales, w.view(4, 4, 16).abs().mean(-1))
    assert set(codes.unique().tolist()) <= {-1, 0, 1}
    assert torch.equal(codes.float().view(4, 4, 16), torch.clamp(torch.round(w.view(4, 4, 16) / scales[..., None]), -1, 1))


def test_fake_ternary_values_and_straight_through_gradient():
    torch.manual_seed(0)
    lin = torch.nn.Linear(64, 8, bias=False)
    fake = FakeTernaryLinear(lin.weight, 16)
    wq = ternary.fake_ternary(lin.weight, 16).detach()
    per_group = (wq.view(8, 4, 16) / ternary.ternary_scales(lin.weight, 16)[..., None])
    assert torch.allclose(per_group, per_group.round()) and per_group.abs().max() <= 1
    x = torch.randn(3, 64)
    fake(x).square().sum().backward()
    w_ref = wq.clone().requires_grad_()
    F.linear(x, w_ref).square().sum().backward()
    assert torch.allclose(lin.weight.grad, w_ref.grad)  # STE: the gradient at the quantized weight, passed through


def test_ternary_prepare_then_convert(no_kernel):
    model = build_model(tiny(), seed=1)
    quantize_(model, TernaryQATConfig(step="prepare", group_size=16))
    assert isinstance(model.model.layers[0].self_attn.q_proj, FakeTernaryLinear)
    ids = torch.tensor([[1, 5, 9, 22]])
    fake_logits = model(ids)
    quantize_(model, TernaryQATConfig(step="convert", group_size=16))
    assert isinstance(model.model.layers[0].self_attn.q_proj, TernaryLinear)
    assert torch.allclose(model(ids), fake_logits, atol=1e-5)
    assert model.config.extra["quantization_config"]["quant_method"] == "minicpm4_ternary"


def test_fake_quantized_release_is_detected_and_packed_exactly(tmp_path):
    """BitCPM4 ships bf16 tensors holding ternary x scale: convert keeps those exact values, at their group size."""
    model = build_model(tiny(), seed=2, dtype=torch.bfloat16)
    with torch.no_grad():
        for _, lin in [(n, m) for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]:
            lin.weight.copy_(ternary.fake_ternary(lin.weight.float(), 32).to(torch.bfloat16))
    assert detect_fake_ternary(model) == 32
    ref = {n: m.weight.detach().float().clone() for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    report = quantize_(model, TernaryQATConfig(step="convert", group_size=64))
    assert "fake-quantized release" in report.method
    for name, w in ref.items():
        assert torch.allclose(model.get_submodule(name).dequantize(), w, rtol=1e-2), name
    assert detect_fake_ternary(build_model(tiny(), seed=2)) is None  # float weights are not ternary


# ---- checkpoints ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_quantized_checkpoint_round_trip_in_gptq_layout(tmp_path, no_kernel, dtype):
    model = build_model(tiny(), seed=3, dtype=dtype)
    quantize_(model, Int4WeightOnlyConfig(group_size=32, lm_head=True))
    ids = torch.tensor([[1, 7, 8, 100]])
    save_model(model, tmp_path / "q")
    q = json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]
    assert q["quant_method"] == "gptq" and q["bits"] == 4 and q["group_size"] == 32 and q["lm_head"] is True
    assert q["checkpoint_format"] == "gptq" and q["desc_act"] is False and q["sym"] is True
    with safe_open(tmp_path / "q" / "model.safetensors", "pt") as f:
        names = set(f.keys())
        assert f.get_tensor("model.layers.0.mlp.down_proj.qweight").dtype == torch.int32
        assert f.get_tensor("model.layers.0.mlp.down_proj.scales").dtype == torch.float16
        assert f.get_tensor("model.layers.0.mlp.down_proj.qweight").shape == (160 // 8, 64)
    assert "model.layers.0.mlp.down_proj.weight" not in names and "lm_head.qzeros" in names
    back = load_model(tmp_path / "q")
    assert back.dtype == dtype and isinstance(back.lm_head, Int4Linear)
    assert torch.equal(back(ids), model(ids))
    for name, t in model.state_dict().items():
        assert torch.equal(back.state_dict()[name], t), name


def test_ternary_checkpoint_round_trip(tmp_path):
    model = build_model(tiny(), seed=4)
    quantize_(model, TernaryQATConfig(step="convert", group_size=16))
    save_model(model, tmp_path / "t")
    back = load_model(tmp_path / "t")
    ids = torch.tensor([[1, 2, 50]])
    assert isinstance(back.model.layers[1].mlp.up_proj, TernaryLinear) and torch.equal(back(ids), model(ids))


def test_quantizing_twice_is_refused():
    model = build_model(tiny())
    quantize_(model, Int4WeightOnlyConfig(group_size=32))
    with pytest.raises(ValueError, match="already quantized"):
        quantize_(model, Int4WeightOnlyConfig(group_size=32))


def test_bad_quantization_config_names_the_key(tmp_path):
    from minicpm4.checkpoint import CheckpointError  # noqa: F401 (QuantFormatError is a ValueError as well)

    model = build_model(tiny())
    quantize_(model, Int4WeightOnlyConfig(group_size=32))
    save_model(model, tmp_path / "q")
    cfg = json.loads((tmp_path / "q" / "config.json").read_text())
    cfg["quantization_config"]["bits"] = 3
    (tmp_path / "q" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="quantization_config.bits"):
        load_model(tmp_path / "q")


def test_autogptq_release_layout_loads(tmp_path):
    """AutoGPTQ-era releases (openbmb/MiniCPM3-4B-GPTQ-Int4): quantization in quantize_config.json, one freely
    named safetensors file, act-order (desc_act) with g_idx."""
    model = build_model(tiny(), seed=5)
    calib = [torch.randint(4, 1000, (40,), generator=torch.Generator().manual_seed(i)) for i in range(4)]
    quantize_(model, GPTQConfig(group_size=32, act_order=True), calibration=calib)
    save_model(model, tmp_path / "ours")
    release = tmp_path / "release"
    release.mkdir()
    cfg = json.loads((tmp_path / "ours" / "config.json").read_text())
    q = cfg.pop("quantization_config")
    assert q["desc_act"] is True
    (release / "config.json").write_text(json.dumps(cfg))
    (release / "quantize_config.json").write_text(json.dumps({k: v for k, v in q.items() if k != "quant_method"}))
    (tmp_path / "ours" / "model.safetensors").rename(release / "gptq_model-4bit-32g.safetensors")
    back = load_model(release)
    ids = torch.tensor([[1, 9, 99, 999]])
    assert isinstance(back.model.layers[0].mlp.up_proj, Int4Linear) and torch.equal(back(ids), model(ids))

"""Quantized models in the engine: greedy output equals the reference path (minicpm4/generate.py) on the same
packed weights, with staggered concurrent requests, chunked prefill and both engine forwards."""

from __future__ import annotations

import pytest
import torch

from minicpm4.config import tiny
from minicpm4.engine import EngineConfig, LLMEngine, SamplingParams
from minicpm4.generate import generate
from minicpm4.model import build_model
from minicpm4.quant import GPTQConfig, Int4WeightOnlyConfig, TernaryQATConfig, kernels, quantize_

GREEDY = SamplingParams(max_new_tokens=10, ignore_eos=True)
pytestmark = pytest.mark.usefixtures("one_thread")


def prompts_of(lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [[1] + torch.randint(3, 1024, (n - 1,), generator=g).tolist() for n in lengths]


PROMPTS = prompts_of([3, 40, 9, 70, 1])
CONFIGS = {
    # fp32 activations: in bf16, random-weight logits are nearly tied and batch-shape rounding flips greedy picks
    # (the dense engine tests are fp32 for the same reason); ternary's dequantize path is exact enough in bf16.
    "int4-rtn": (torch.float32, Int4WeightOnlyConfig(group_size=32)),
    "int4-gptq-actorder-head": (torch.float32, GPTQConfig(group_size=32, act_order=True, lm_head=True)),
    "int4-asym-fp32": (torch.float32, Int4WeightOnlyConfig(group_size=16, sym=False)),
    "ternary-head": (torch.float32, TernaryQATConfig(step="convert", group_size=16, lm_head=True)),
    "ternary-bf16": (torch.bfloat16, TernaryQATConfig(step="convert", group_size=32)),
    # groups of 64: every forward takes the C++ kernel (quant/kernels.py) where it is built
    "int4-kernel": (torch.float32, Int4WeightOnlyConfig(group_size=64, lm_head=True)),
    "ternary-kernel": (torch.float32, TernaryQATConfig(step="convert", group_size=64)),
}
# The ternary kernel takes rows of whole 128-input blocks: that case runs on a wider tiny model.
WIDE = dict(hidden_size=128, num_attention_heads=8, num_key_value_heads=4, intermediate_size=256)


@pytest.fixture(scope="module", params=list(CONFIGS))
def quantized(request):
    dtype, config = CONFIGS[request.param]
    shape = WIDE if request.param == "ternary-kernel" else dict(intermediate_size=192)
    model = build_model(tiny(initializer_range=0.3, **shape), seed=4, dtype=dtype).eval()
    calib = [torch.tensor(p) for p in prompts_of([32] * 4, seed=9)]
    quantize_(model, config, calibration=calib)
    if request.param.endswith("-kernel") and kernels.available():  # the case is there to run the kernel
        assert model.model.layers[0].mlp.down_proj.kernel_weight() is not None
    return model, [o.token_ids for o in generate(model, PROMPTS, GREEDY)]


def _run(engine: LLMEngine, prompts, params) -> list[list[int]]:
    out, pending, step = {}, list(enumerate(prompts)), 0
    while pending or engine.has_unfinished():
        if pending and step % 2 == 0:
            i, p = pending.pop(0)
            engine.add_request(p, params, request_id=f"r{i}")
        for o in engine.step():
            if o.finished:
                out[o.request_id] = o.token_ids
        step += 1
    return [out[f"r{i}"] for i in range(len(prompts))]


def native_bf16() -> bool:
    try:
        flags = open("/proc/cpuinfo").read()
    except OSError:
        return True
    return "avx512_bf16" in flags or "amx_bf16" in flags


@pytest.mark.parametrize("fast", [False, True], ids=["model-forward", "fast-forward"])
def test_quantized_engine_greedy_equals_reference(quantized, fast, request):
    if "ternary-bf16" in request.node.callspec.id and not native_bf16():
        # Without native bf16 (e.g. AVX-512 without the BF16 extension) oneDNN's bf16 GEMM rounds differently for
        # the engine's batch shapes and the reference's, and the nearly tied random-weight logits flip greedy
        # picks; the fp32 cases above cover the same code paths exactly.
        pytest.skip("bf16 greedy equality needs a CPU with native bf16 (avx512_bf16 / amx_bf16)")
    model, reference = quantized
    engine = LLMEngine(model, config=EngineConfig(fast_forward=fast, max_num_batched_tokens=24, block_size=16))
    assert _run(engine, PROMPTS, GREEDY) == reference
    assert engine.blocks.num_used == 0

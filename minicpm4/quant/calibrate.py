"""GPTQ over a whole model: decoder layers one at a time, each quantized on the activations that the already
quantized earlier layers produce (so later layers correct for earlier layers' error), and inside a layer in
the order the data flows ("true sequential"): q|k|v, then o_proj, then gate|up, then down_proj, each stage's
Hessian captured with forward hooks from a pass through the partly quantized layer.

Linears sharing an input (q, k, v; gate, up) share one Hessian, and GPTQ quantizes them as one stacked matrix
(rows are independent under GPTQ, so this is the same result in one sweep).
Optional AWQ-style smoothing (S-GPTQ, S-P-GPTQ) runs first on each layer's float activations (smooth.py).
"""

from __future__ import annotations

from typing import Callable, Iterable

import torch
import torch.nn as nn

from minicpm4.attention import AttentionMetadata
from minicpm4.model import DecoderLayer, MiniCPMForCausalLM
from minicpm4.quant import int4, smooth
from minicpm4.quant.configs import GPTQConfig, LayerReport
from minicpm4.quant.gptq import GPTQResult, Hessian, gptq_quantize, output_error
from minicpm4.quant.linear import Int4Linear

# Stages of one decoder layer: (attribute paths of linears sharing one input).
STAGES: tuple[tuple[str, ...], ...] = (
    ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    ("self_attn.o_proj",),
    ("mlp.gate_proj", "mlp.up_proj"),
    ("mlp.down_proj",),
)

Progress = Callable[[str], None]


class _LayerRunner:
    """Runs one decoder layer over the calibration set (one sequence at a time, dense attention, no cache)."""

    def __init__(self, model: MiniCPMForCausalLM, lengths: list[int]) -> None:
        self.model = model
        self.rope: dict[int, tuple[torch.Tensor, torch.Tensor, AttentionMetadata]] = {}
        for T in set(lengths):
            positions = torch.arange(T, device=model.device)[None]
            cos, sin = model.rotary(positions, T)
            self.rope[T] = (cos, sin, AttentionMetadata.for_cache(positions, None))

    def run(self, layer: DecoderLayer, hidden: list[torch.Tensor]) -> list[torch.Tensor]:
        out = []
        for h in hidden:
            cos, sin, meta = self.rope[h.shape[1]]
            out.append(layer(h, cos, sin, meta, self.model.attention_backend))
        return out


def _capture(layer: DecoderLayer, names: tuple[str, ...], runner: _LayerRunner, hidden: list[torch.Tensor],
             skip_prefix: int) -> tuple[Hessian, Hessian]:
    """Hessians of the input the named linears share: (prefix-skipping one used by the quantizer, all-token one)."""
    first = layer.get_submodule(names[0])
    used = Hessian(first.in_features, skip_prefix)
    every = Hessian(first.in_features, 0)

    def hook(_module, args) -> None:
        used.add(args[0])
        every.add(args[0])

    handle = first.register_forward_pre_hook(hook)
    try:
        runner.run(layer, hidden)
    finally:
        handle.remove()
    return used, every


def _set(layer: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, leaf = path.rpartition(".")
    setattr(layer.get_submodule(parent), leaf, module)


@torch.no_grad()
def gptq_layers(model: MiniCPMForCausalLM, calibration: Iterable[torch.Tensor], config: GPTQConfig,
                progress: Progress | None = None, rtn: bool = False) -> list[LayerReport]:
    """Quantize every decoder layer's linears in place with GPTQ (P-GPTQ / smoothing by `config`).
    rtn=True rounds to nearest instead (same walk, same error measure: the GPTQ-vs-RTN baseline).

    calibration: token-id sequences (1-D LongTensors), each starting at position 0 (BOS first, as at inference:
    P-GPTQ's premise is that the first positions carry the outlier activations).
    Returns one report per linear: relative output error on the non-prefix calibration tokens (the tokens P-GPTQ
    optimises) and, as `name + " (all tokens)"`, on all of them.
    """
    seqs = [s.reshape(1, -1).to(model.device) for s in calibration]
    if not seqs:
        raise ValueError("GPTQ needs calibration sequences (got none)")
    if config.prefix_tokens and min(s.shape[1] for s in seqs) <= config.prefix_tokens:
        raise ValueError(f"calibration sequences must be longer than prefix_tokens={config.prefix_tokens}")
    dtype = model.dtype
    runner = _LayerRunner(model, [s.shape[1] for s in seqs])
    hidden = [model.model.embed_tokens(s) * model.config.scale_emb for s in seqs]  # muP: embedding x scale_emb
    reports: list[LayerReport] = []
    n = len(model.model.layers)
    for li, layer in enumerate(model.model.layers):
        if config.smooth:
            smooth.smooth_layer(layer, runner, hidden, config)
        for names in STAGES:
            if progress:
                progress(f"layer {li + 1}/{n} {'+'.join(p.rpartition('.')[2] for p in names)}")
            used, every = _capture(layer, names, runner, hidden, config.prefix_tokens)
            if used.tokens == 0:
                raise ValueError("no calibration tokens left after prefix_tokens")
            linears = [layer.get_submodule(p) for p in names]
            W = torch.cat([m.weight.detach().float() for m in linears])  # [sum N, K]
            if rtn:
                codes, scales, zeros = int4.rtn_quantize(W, config.group_size, config.sym)
                res = GPTQResult(codes, scales, zeros, int4.default_g_idx(W.shape[1], config.group_size))
            else:
                res = gptq_quantize(W, used.H, config.group_size, config.sym, config.damp_percent, config.act_order,
                                    config.static_groups, config.block_size)
            Wq = res.dequantize()
            row = 0
            for path, lin in zip(names, linears):
                rows = slice(row, row + lin.out_features)
                row += lin.out_features
                name = f"model.layers.{li}.{path}"
                reports.append(LayerReport(name, output_error(W[rows], Wq[rows], used.H)))
                reports.append(LayerReport(name + " (all tokens)", output_error(W[rows], Wq[rows], every.H)))
                _set(layer, path, Int4Linear.from_codes(res.codes[rows], res.scales[rows], res.zeros[rows],
                                                        res.g_idx.clone(), config.group_size, dtype))
        hidden = runner.run(layer, hidden)  # the quantized layer's output feeds the next layer
    return reports

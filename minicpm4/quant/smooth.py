"""AWQ-style smoothing before GPTQ (S-GPTQ / S-P-GPTQ, MINICPM4.md §4.5; Lin et al. 2023, "AWQ").

For linears sharing an input x, scale input channel j of their weights by s_j and divide x_j by s_j, folding
1/s into the op that produces x, so the float function is unchanged while salient channels (large mean |x_j|)
get finer quantization. s = mean|x|^alpha, normalised to geometric mean 1, alpha picked from a grid by the
round-to-nearest output error on the calibration activations (computed exactly from the Hessian, see
gptq.output_error; alpha = 0 is "no smoothing", so smoothing never scores worse than none under this proxy).

Folds: q|k|v <- input_layernorm, gate|up <- post_attention_layernorm, down <- up_proj's rows (act = silu(gate) *
up is linear in up). o_proj is not smoothed: its input channels are GQA-shared value channels, and a fold into
v_proj would need one scale per KV channel for every query head that reads it (AWQ skips it in this case too).
"""

from __future__ import annotations

import torch

from minicpm4.quant import int4
from minicpm4.quant.configs import GPTQConfig
from minicpm4.quant.gptq import Hessian, output_error

# (linears sharing one input, module whose output channels absorb 1/s: a norm's weight or a linear's rows)
GROUPS = (
    (("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), "input_layernorm"),
    (("mlp.gate_proj", "mlp.up_proj"), "post_attention_layernorm"),
    (("mlp.down_proj",), "mlp.up_proj"),
)


def _rtn_dequant(w: torch.Tensor, config: GPTQConfig) -> torch.Tensor:
    codes, scales, zeros = int4.rtn_quantize(w, config.group_size, config.sym)
    return int4.dequantize(codes, scales, zeros, int4.default_g_idx(w.shape[1], config.group_size))


def best_scales(weights: list[torch.Tensor], stats: Hessian, config: GPTQConfig) -> tuple[torch.Tensor, float]:
    """-> (per-channel scales s [K], chosen alpha) minimising the summed RTN output error of `weights` [N_i, K]."""
    a = stats.mean_abs.clamp(min=1e-8)
    best: tuple[float, torch.Tensor, float] | None = None
    for alpha in config.smooth_grid:
        s = a.pow(alpha)
        s = s / torch.sqrt(s.max() * s.min())
        Hs = stats.H / (s[:, None] * s[None, :])  # Hessian of x / s
        err = sum(output_error(w * s, _rtn_dequant(w * s, config), Hs) ** 2 for w in weights)
        if best is None or err < best[0]:
            best = (err, s, alpha)
    assert best is not None, "smooth_grid must not be empty"
    return best[1], best[2]


@torch.no_grad()
def smooth_layer(layer: torch.nn.Module, runner, hidden: list[torch.Tensor], config: GPTQConfig) -> dict[str, float]:
    """Smooth one float decoder layer in place; returns the alpha chosen per group."""
    stats = {names[0]: Hessian(layer.get_submodule(names[0]).in_features, config.prefix_tokens) for names, _ in GROUPS}
    handles = [layer.get_submodule(n).register_forward_pre_hook(lambda _m, args, h=h: h.add(args[0]))
               for n, h in stats.items()]
    try:
        runner.run(layer, hidden)
    finally:
        for handle in handles:
            handle.remove()
    chosen = {}
    for names, owner_path in GROUPS:
        linears = [layer.get_submodule(n) for n in names]
        s, alpha = best_scales([m.weight.float() for m in linears], stats[names[0]], config)
        chosen["+".join(names)] = alpha
        if alpha == 0:
            continue
        owner = layer.get_submodule(owner_path)
        if isinstance(owner, torch.nn.Linear):  # rows of up_proj produce the channels down_proj reads
            owner.weight.copy_((owner.weight.float() / s[:, None]).to(owner.weight.dtype))
        else:  # an RMSNorm: y = weight * normed
            owner.weight.copy_((owner.weight.float() / s).to(owner.weight.dtype))
        for m in linears:
            m.weight.copy_((m.weight.float() * s[None, :]).to(m.weight.dtype))
    return chosen

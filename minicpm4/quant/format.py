"""Quantized checkpoints: what `config.json`'s `quantization_config` says, the tensor names it adds to the
checkpoint name map (checkpoint.py asks `packed_names`), and the meta-device module swap before loading.

INT4 (RTN, GPTQ, P-GPTQ, S-P-GPTQ) is written in the AutoGPTQ / transformers / optimum GPTQ layout
(`quant_method: "gptq"`, `bits: 4`, `checkpoint_format: "gptq"`; tensors `<linear>.qweight/.qzeros/.scales/
.g_idx`, int4.py), so GPTQ-format MiniCPM4 releases load here and our files load in GPTQ-aware tools. How a file
was made (rtn / gptq / p-gptq, prefix tokens, smoothing) goes in `meta`, which those tools ignore.
Ternary has no public packed format; ours is `quant_method: "minicpm4_ternary"` with `<linear>.qweight` (2-bit
codes) and `<linear>.scales` (ternary.py).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from minicpm4.config import MiniCPMConfig
from minicpm4.quant.configs import GPTQConfig, Int4WeightOnlyConfig, QuantConfig, TernaryQATConfig

GPTQ_TENSORS = ("qweight", "qzeros", "scales", "g_idx")
TERNARY_TENSORS = ("qweight", "scales")
TERNARY_METHOD = "minicpm4_ternary"
LINEAR_NAMES = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


class QuantFormatError(ValueError):
    """A quantization_config this project cannot load; the message names the key."""


def quantization_config_for(model: nn.Module, config: QuantConfig) -> dict[str, Any]:
    """The config.json entry for a model quantized with `config`."""
    head = model.lm_head is not None and not isinstance(model.lm_head, nn.Linear)
    if isinstance(config, TernaryQATConfig):
        return {"quant_method": TERNARY_METHOD, "bits": 2, "group_size": config.group_size, "lm_head": head}
    meta: dict[str, Any] = {"quantizer": ["minicpm4"]}
    if isinstance(config, GPTQConfig):
        meta.update(method=config.method, prefix_tokens=config.prefix_tokens, smooth=config.smooth)
        extra = {"desc_act": config.act_order and not config.static_groups, "static_groups": config.static_groups,
                 "damp_percent": config.damp_percent, "true_sequential": True}
    else:
        assert isinstance(config, Int4WeightOnlyConfig), config
        meta.update(method="rtn")
        extra = {"desc_act": False, "static_groups": False}
    return {"quant_method": "gptq", "bits": 4, "group_size": config.group_size, "sym": config.sym,
            "checkpoint_format": "gptq", "lm_head": head, **extra, "meta": meta}


AUTOGPTQ_CONFIG = "quantize_config.json"  # AutoGPTQ-era releases (e.g. openbmb/MiniCPM3-4B-GPTQ-Int4) keep it apart


def with_quantize_config(config: MiniCPMConfig, folder: Path) -> MiniCPMConfig:
    """config.json without quantization_config but an AutoGPTQ `quantize_config.json` beside it: take that one."""
    side = Path(folder) / AUTOGPTQ_CONFIG
    if "quantization_config" in config.extra or not side.is_file():
        return config
    try:
        q = json.loads(side.read_text(encoding="utf-8"))
    except ValueError as e:
        raise QuantFormatError(f"{side} is not valid JSON ({e})") from e
    q = {"quant_method": "gptq", **q} if isinstance(q, dict) else q
    return config.replace(extra={**config.extra, "quantization_config": q})


def read_quantization(config: MiniCPMConfig) -> dict[str, Any] | None:
    """The validated quantization_config of a config.json, or None for a float checkpoint."""
    q = config.extra.get("quantization_config")
    if q is None:
        return None
    if not isinstance(q, dict):
        raise QuantFormatError("config.json quantization_config must be an object")
    method = q.get("quant_method")
    if method == "gptq":
        if q.get("bits") != 4:
            raise QuantFormatError(f"quantization_config.bits: only 4-bit GPTQ is supported, got {q.get('bits')!r}")
        fmt = q.get("checkpoint_format", "gptq")
        if fmt != "gptq":
            raise QuantFormatError(f"quantization_config.checkpoint_format: only 'gptq' (v1) is supported, got {fmt!r} "
                                   "(marlin / gptq_v2 files: convert them to the v1 layout with their tool)")
    elif method != TERNARY_METHOD:
        raise QuantFormatError(f"quantization_config.quant_method: supported are 'gptq' and '{TERNARY_METHOD}', "
                               f"got {method!r}")
    g = q.get("group_size")
    if not isinstance(g, int) or g == 0:
        raise QuantFormatError(f"quantization_config.group_size must be a positive integer (-1: per channel), got {g!r}")
    return q


def _group_size(q: dict[str, Any], in_features: int) -> int:
    return in_features if q["group_size"] == -1 else q["group_size"]


def _packed_linears(config: MiniCPMConfig, q: dict[str, Any]) -> list[tuple[str, int, int]]:
    """(module name, in_features, out_features) of every packed linear the quantization_config implies."""
    h, i = config.hidden_size, config.intermediate_size
    qd, kvd = config.num_attention_heads * config.head_dim, config.num_key_value_heads * config.head_dim
    shapes = {"self_attn.q_proj": (h, qd), "self_attn.k_proj": (h, kvd), "self_attn.v_proj": (h, kvd),
              "self_attn.o_proj": (qd, h), "mlp.gate_proj": (h, i), "mlp.up_proj": (h, i), "mlp.down_proj": (i, h)}
    out = [(f"model.layers.{li}.{n}", *shapes[n]) for li in range(config.num_hidden_layers) for n in LINEAR_NAMES]
    if q.get("lm_head"):
        out.append(("lm_head", h, config.vocab_size))
    return out


def packed_names(config: MiniCPMConfig, names: dict[str, str]) -> dict[str, str]:
    """Extend a float checkpoint name map (checkpoint name -> ours): each packed linear's `.weight` becomes its
    packed tensors. Identity names, like the float map (model.py uses the HF names)."""
    q = read_quantization(config)
    if q is None:
        return names
    tensors = GPTQ_TENSORS if q["quant_method"] == "gptq" else TERNARY_TENSORS
    out = dict(names)
    for module, _, _ in _packed_linears(config, q):
        out.pop(f"{module}.weight", None)
        out.update({f"{module}.{t}": f"{module}.{t}" for t in tensors})
    return out


def is_packed_tensor(name: str, config: MiniCPMConfig) -> bool:
    """True for a tensor the quantization_config adds (qweight, scales, ...): the loader keeps its stored dtype
    (integer codes; fp16 GPTQ scales stay fp16 in a bf16 model, as in the file)."""
    q = read_quantization(config)
    if q is None:
        return False
    tensors = GPTQ_TENSORS if q["quant_method"] == "gptq" else TERNARY_TENSORS
    return name.rpartition(".")[2] in tensors and not name.endswith("norm.weight")


def prepare_packed_modules(model: nn.Module, dtype: torch.dtype) -> None:
    """On a meta-device model: swap the linears the config's quantization_config names for empty packed modules,
    so load_state_dict(assign=True) fills them (no-op for a float config)."""
    from minicpm4.quant.linear import Int4Linear, TernaryLinear

    q = read_quantization(model.config)
    if q is None:
        return
    for name, k, n in _packed_linears(model.config, q):
        g = _group_size(q, k)
        module = (Int4Linear(k, n, g, device="meta") if q["quant_method"] == "gptq"
                  else TernaryLinear(k, n, g, dtype=dtype, device="meta"))
        parent, _, leaf = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, leaf, module)

"""`quantize_(model, config)`: the one verb (DESIGN.md principle 10). Swaps a MiniCPMForCausalLM's linears for
packed or fake-quantized modules in place; model.py is untouched (its logits already go through the head module).

Which linears: every decoder layer's q/k/v/o/gate/up/down; the LM head only with `lm_head=True`. For a tied model
the packed head is a quantized copy of the embedding used for logits only (the lookup keeps the float table).
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Iterable

import torch
import torch.nn as nn

from minicpm4.model import MiniCPMForCausalLM
from minicpm4.quant import int4, ternary
from minicpm4.quant.configs import (GPTQConfig, Int4WeightOnlyConfig, LayerReport, QuantConfig, QuantReport,
                                    TernaryQATConfig)
from minicpm4.quant.format import LINEAR_NAMES as LAYER_LINEARS
from minicpm4.quant.linear import FakeTernaryLinear, Int4Linear, QuantLinearBase, TernaryLinear



def target_linears(model: MiniCPMForCausalLM) -> list[tuple[str, nn.Module]]:
    """(name, module) of every decoder-layer linear, in model order."""
    return [(f"model.layers.{i}.{p}", layer.get_submodule(p)) for i, layer in enumerate(model.model.layers)
            for p in LAYER_LINEARS]


def _replace(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, module)


def _head_linear(model: MiniCPMForCausalLM) -> nn.Module:
    """The head as a linear to quantize: lm_head, or for a tied model a stand-in holding the embedding weight."""
    if model.lm_head is not None:
        return model.lm_head
    stand_in = nn.Linear(model.config.hidden_size, model.config.vocab_size, bias=False, device="meta")
    stand_in.weight = model.model.embed_tokens.weight
    return stand_in


def quantize_linear_rtn(linear: nn.Module, group_size: int, sym: bool = True) -> Int4Linear:
    w = linear.weight.detach()
    codes, scales, zeros = int4.rtn_quantize(w, group_size, sym)
    return Int4Linear.from_codes(codes, scales, zeros, None, group_size, w.dtype)


def ternary_linear(linear: nn.Module, group_size: int, exact: bool = False) -> TernaryLinear:
    """Pack a float or fake-quantized (QAT) linear as ternary codes + scales. exact: the weight already holds
    ternary x scale per group (a fake-quantized release): keep those values instead of re-ternarising."""
    w = linear.weight.detach()
    if exact:
        found = ternary.find_ternary_groups(w, candidates=(group_size,))
        if found is None:
            raise ValueError(f"weight [{w.shape[0]}, {w.shape[1]}] is not ternary x scale in groups of {group_size}")
        _, codes, scales = found
    else:
        codes, scales = ternary.ternarize(w, group_size)
    return TernaryLinear.from_codes(codes, scales, w.dtype)


def detect_fake_ternary(model: MiniCPMForCausalLM) -> int | None:
    """The group size of a fake-quantized ternary model (BitCPM4's release: bf16 tensors holding {-1, 0, +1} x a
    per-group scale), verified on every decoder linear; None when any linear is not ternary. A finer split of the
    true groups fits too, so the largest size fitting every linear is the release's."""
    sizes = []
    for _, lin in target_linears(model):
        if not isinstance(lin, nn.Linear):
            return None
        found = ternary.find_ternary_groups(lin.weight.detach())
        if found is None:
            return None
        sizes.append(found[0])
    return min(sizes) if sizes else None


def _check_float(model: MiniCPMForCausalLM, config: QuantConfig) -> None:
    packed = [n for n, m in model.named_modules() if isinstance(m, QuantLinearBase)]
    if packed:
        raise ValueError(f"{type(config).__name__}: the model is already quantized ({packed[0]}, ...); "
                         "quantize the float checkpoint instead")


def quantize_(model: MiniCPMForCausalLM, config: QuantConfig, calibration: Iterable[torch.Tensor] | None = None,
              progress: Callable[[str], None] | None = None) -> QuantReport:
    """Quantize `model` in place as `config` says; returns per-linear reports (GPTQ: calibration output errors).

    calibration: token-id sequences for GPTQConfig (required there, ignored otherwise). The method is recorded in
    `model.config.extra["quantization_config"]` (what save_quantized writes to config.json).
    """
    from minicpm4.quant.format import quantization_config_for

    report = QuantReport(method=type(config).__name__)
    if isinstance(config, TernaryQATConfig) and config.step == "prepare":
        _check_float(model, config)
        for name, lin in target_linears(model) + ([("lm_head", _head_linear(model))] if config.lm_head else []):
            if isinstance(lin, nn.Linear):
                _replace(model, name, FakeTernaryLinear(lin.weight, config.group_size))
        return report  # fake-quantized modules train; nothing is recorded until convert
    if isinstance(config, TernaryQATConfig):
        if config.step != "convert":
            raise ValueError(f"TernaryQATConfig.step must be 'prepare' or 'convert', got {config.step!r}")
        _check_float(model, config)
        todo = target_linears(model)
        head = model.lm_head if isinstance(model.lm_head, FakeTernaryLinear) else None
        if config.lm_head or head is not None:
            todo.append(("lm_head", head or _head_linear(model)))
        released = detect_fake_ternary(model) if config.detect else None
        if released is not None:  # pack the release's own values, at its own group size
            config = dataclasses.replace(config, group_size=released)
        for name, lin in todo:
            exact = released is not None and name != "lm_head"
            _replace(model, name, ternary_linear(lin, config.group_size, exact=exact))
        report.method = "ternary (packed a fake-quantized release)" if released is not None else "ternary"
    elif isinstance(config, Int4WeightOnlyConfig):
        _check_float(model, config)
        todo = target_linears(model) + ([("lm_head", _head_linear(model))] if config.lm_head else [])
        for k, (name, lin) in enumerate(todo):
            if progress:
                progress(f"{k + 1}/{len(todo)} {name}")
            _replace(model, name, quantize_linear_rtn(lin, config.group_size, config.sym))
        report.method = "rtn"
    elif isinstance(config, GPTQConfig):
        _check_float(model, config)
        if calibration is None:
            raise ValueError("GPTQConfig needs calibration sequences: quantize_(model, config, calibration=[ids, ...])")
        from minicpm4.quant.calibrate import gptq_layers

        report.layers = gptq_layers(model, calibration, config, progress)
        if config.lm_head:  # the head's input is the final norm: RTN (GPTQ on it would need one more pass)
            _replace(model, "lm_head", quantize_linear_rtn(_head_linear(model), config.group_size, config.sym))
        report.method = config.method
    else:
        raise TypeError(f"quantize_: unknown config type {type(config).__name__}")
    # A new config object: configs may be shared by several models (tests, presets); only this one is quantized.
    model.config = model.config.replace(extra={**model.config.extra,
                                               "quantization_config": quantization_config_for(model, config)})
    return report


__all__ = ["quantize_", "target_linears", "quantize_linear_rtn", "ternary_linear", "LayerReport"]

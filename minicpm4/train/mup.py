"""MiniCPM muP: width-scaled init and per-group learning rates, plus a standard-parametrisation switch.

The forward-pass muP factors (embedding x scale_emb, residual x scale_depth/sqrt(L), logits from
hidden / width_mult) live in model.py. This file holds the two training-side rules. They are
MiniCPM v1 / Tensor Programs V style; MiniCPM4's exact rules are unpublished (MINICPM4.md §6.2):

  width_mult = hidden_size / dim_model_base
  parameter kind    init std                               AdamW learning rate     weight decay
  embedding         initializer_range                      base_lr                 yes
  (and an untied lm_head: the 1/width_mult logit divisor makes it an "output" weight that muP keeps
   at constant init and LR, like the embedding)
  hidden matrix     initializer_range / sqrt(width_mult)   base_lr / width_mult    yes
  vector (norms)    1                                      base_lr                 no

"Hidden matrix" is every 2-D weight that maps hidden-sized activations to hidden-sized activations:
q/k/v/o, gate/up/down, and the MTP head's projection and layer. With Adam, TP5 (Table 8) scales the
hidden-matrix LR by 1/width and the init variance by 1/fan_in; we keep MiniCPM's base std 0.1 at
width dim_model_base and scale it by 1/sqrt(width_mult), which is the same rule relative to the base.
Weight decay is AdamW's decoupled lr * wd, so hidden matrices also decay 1/width_mult as fast in
absolute terms; that is the torch default behaviour and what a plain MiniCPM v1 setup does.

`standard` parametrisation (for a ModelTunnel muP-vs-SP comparison): scale_emb = 1, residual factor 1
(scale_depth = sqrt(L)), logit divisor 1 (dim_model_base = hidden_size, so width_mult = 1), hence every
group gets the same LR and every matrix the same constant init std. It is expressed purely through the
config, so an SP-trained checkpoint still loads as a MiniCPM model.
"""

from __future__ import annotations

import math
from typing import Iterable

import torch
import torch.nn as nn

from minicpm4.config import MiniCPMConfig

PARAMETRIZATIONS = ("mup", "standard")
EMBEDDING_NAMES = ("embed_tokens.weight", "lm_head.weight")


def width_mult(config: MiniCPMConfig) -> float:
    return config.hidden_size / config.dim_model_base


def apply_parametrization(config: MiniCPMConfig, kind: str = "mup", init_std: float | None = None) -> MiniCPMConfig:
    """The model config for a parametrisation. "mup" returns it unchanged; "standard" turns every muP
    factor into 1 (see the module docstring) and optionally sets the constant init std."""
    if kind == "mup":
        return config if init_std is None else config.replace(initializer_range=init_std)
    if kind == "standard":
        return config.replace(
            scale_emb=1.0,
            scale_depth=math.sqrt(config.num_hidden_layers),  # residual factor scale_depth / sqrt(L) = 1
            dim_model_base=config.hidden_size,  # logit divisor and width_mult = 1
            initializer_range=config.initializer_range if init_std is None else init_std,
        )
    raise ValueError(f"parametrization: unknown value {kind!r}; choose from {', '.join(PARAMETRIZATIONS)}")


def parameter_kind(name: str, param: torch.Tensor) -> str:
    """'vector' (norm weights), 'embedding' (embedding / untied lm_head) or 'hidden' (other matrices)."""
    if param.ndim < 2:
        return "vector"
    if name.endswith(EMBEDDING_NAMES):
        return "embedding"
    return "hidden"


def _named(modules: nn.Module | Iterable[nn.Module]) -> list[tuple[str, nn.Parameter]]:
    if isinstance(modules, nn.Module):
        modules = [modules]
    seen: set[int] = set()
    out = []
    for module in modules:
        for name, p in module.named_parameters():
            if id(p) not in seen:  # tied weights appear once
                seen.add(id(p))
                out.append((name, p))
    return out


@torch.no_grad()
def init_weights(modules: nn.Module | Iterable[nn.Module], config: MiniCPMConfig,
                 generator: torch.Generator | None = None) -> None:
    """muP init (module docstring), in named_parameters order so a seed gives the same weights anywhere."""
    hidden_std = config.initializer_range / math.sqrt(width_mult(config))
    for name, p in _named(modules):
        kind = parameter_kind(name, p)
        if kind == "vector":
            p.fill_(1.0)
        else:
            p.normal_(0.0, config.initializer_range if kind == "embedding" else hidden_std, generator=generator)


def param_groups(modules: nn.Module | Iterable[nn.Module], config: MiniCPMConfig, lr: float,
                 weight_decay: float) -> list[dict]:
    """AdamW parameter groups. Each group carries `lr_scale` (its LR = base LR x schedule x lr_scale) and
    a `name`; the trainer sets `lr` every step from these, so the groups are the single source of truth."""
    scales = {"embedding": 1.0, "hidden": 1.0 / width_mult(config), "vector": 1.0}
    decay = {"embedding": weight_decay, "hidden": weight_decay, "vector": 0.0}
    buckets: dict[str, list[nn.Parameter]] = {k: [] for k in scales}
    for name, p in _named(modules):
        if p.requires_grad:
            buckets[parameter_kind(name, p)].append(p)
    return [{"name": k, "params": ps, "lr": lr * scales[k], "lr_scale": scales[k], "weight_decay": decay[k]}
            for k, ps in buckets.items() if ps]

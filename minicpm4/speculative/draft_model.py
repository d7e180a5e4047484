"""The EAGLE-2 draft head in the MiniCPM4 Eagle format (MINICPM4.md §4.2), loaded and saved as a folder.

Layout of `openbmb/MiniCPM4-8B-Eagle-FRSpec` (and CPM.cu's minicpm4_eagle.cuh, which reads it):

    e = input_norm1(Embed(x_{t+1}) * scale_emb)          the target's embedding, shared (not stored here)
    f = input_norm2(h_t)                                  h_t: the target's final-normed hidden at t
    x = fc([e; f])                                        Linear(2H -> H), embedding half first
    x = x + rs * Attn(ln1(x)) ;  x = x + rs * MLP(ln2(x))  one MiniCPM decoder layer, residual scale rs
    logits = head(x / out_div)                           the target's head (FR-Spec: its rows V_high)

Tensor names: fc.weight [H, 2H] (fc.bias optional), input_norm1.weight, input_norm2.weight,
layers.0.{self_attn.{q,k,v,o}_proj, mlp.{gate,up,down}_proj, input_layernorm, post_attention_layernorm}.weight,
norm.weight (defined by the release, unused by CPM.cu and vLLM: kept for round trips). No embedding, no head.
config.json is a MiniCPM config with num_hidden_layers = 1 (CPM.cu reads num_hidden_layers as the draft's
layer count and checks scale_depth / dim_model_base / scale_emb against the target).

The two parity traps of §4.2 are named options (DraftOptions), stored in config.json under `draft_*` keys:
  residual_scale  "cpmcu": scale_depth / sqrt(L_target + 1) (CPM.cu, the released draft's engine; default)
                  "vllm":  scale_depth / sqrt(mup_denominator)
                  "mtp":   scale_depth / sqrt(L_target), the target's own (our MTP head's layer, minicpm4/mtp.py)
  output_scale    "none":  the layer output goes to the head as is (CPM.cu; default)
                  "width": divided by hidden_size / dim_model_base first (vLLM, = the target's muP divisor)
A positive output scale does not change one step's top-k but changes log-probabilities, hence the cumulative
scores that rank tree nodes; a draft must run with the options it was trained with.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file

from minicpm4.config import MiniCPMConfig
from minicpm4.io import atomic_paths
from minicpm4.model import DecoderLayer, MiniCPMForCausalLM, RMSNorm

RESIDUAL_SCALES = ("cpmcu", "vllm", "mtp")
OUTPUT_SCALES = ("none", "width")
WEIGHTS_FILE = "model.safetensors"


@dataclass(frozen=True)
class DraftOptions:
    residual_scale: str = "cpmcu"
    output_scale: str = "none"
    fc_bias: bool = False  # the release has none; CPM.cu accepts one (it loads it into fc1)
    final_norm: bool = False  # apply `norm` before the head: drafts converted from our MTP head (trained so)
    # input_norm1's eps; None = the target's rms_norm_eps. Our MTP head normalises Embed(x) where the format
    # normalises Embed(x) * scale_emb: RMSNorm is scale-invariant except for eps, so a converted head uses
    # eps * scale_emb^2 to compute the same function.
    embed_norm_eps: float | None = None

    def __post_init__(self) -> None:
        if self.residual_scale not in RESIDUAL_SCALES:
            raise ValueError(f"DraftOptions.residual_scale must be one of {RESIDUAL_SCALES}, got {self.residual_scale!r}")
        if self.output_scale not in OUTPUT_SCALES:
            raise ValueError(f"DraftOptions.output_scale must be one of {OUTPUT_SCALES}, got {self.output_scale!r}")


def residual_scale(target: MiniCPMConfig, mode: str) -> float:
    if mode == "cpmcu":
        return target.scale_depth / math.sqrt(target.num_hidden_layers + 1)
    if mode == "mtp":
        return target.residual_scale
    if target.mup_denominator is None:
        raise ValueError("DraftOptions.residual_scale='vllm' needs mup_denominator in the config")
    return target.scale_depth / math.sqrt(target.mup_denominator)


def draft_config(target: MiniCPMConfig) -> MiniCPMConfig:
    """The draft's config: the target's widths and muP constants, one layer, dense attention."""
    return target.replace(num_hidden_layers=1, sparse_config=None)


class EagleDraft(nn.Module):
    """The draft head (module docstring). `layer` attends through whatever backend the caller passes."""

    def __init__(self, target: MiniCPMConfig, options: DraftOptions | None = None) -> None:
        super().__init__()
        self.options = options = options or DraftOptions()
        self.target_config = target
        h = target.hidden_size
        self.input_norm1 = RMSNorm(h, target.rms_norm_eps if options.embed_norm_eps is None else options.embed_norm_eps)
        self.input_norm2 = RMSNorm(h, target.rms_norm_eps)
        self.fc = nn.Linear(2 * h, h, bias=options.fc_bias)
        # layer_idx one past the target's stack, as the MTP head (a backend keyed by layer never collides).
        self.layers = nn.ModuleList([DecoderLayer(target, target.num_hidden_layers)])
        self.layers[0].residual_scale = residual_scale(target, options.residual_scale)
        self.norm = RMSNorm(h, target.rms_norm_eps)  # in the format, unused (module docstring)
        self.out_div = target.logit_divisor if options.output_scale == "width" else 1.0

    @property
    def layer(self) -> DecoderLayer:
        return self.layers[0]

    def fuse_inputs(self, target: MiniCPMForCausalLM, tokens: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        """tokens [N] (x_{t+1}), hidden [N, H] (h_t or a draft feature) -> fc input projection [N, H]."""
        e = target.model.embed_tokens(tokens) * target.config.scale_emb
        x = torch.cat([self.input_norm1(e), self.input_norm2(hidden.to(e.dtype))], dim=-1)
        return self.fc(x)

    def head_input(self, features: torch.Tensor) -> torch.Tensor:
        """The layer output -> what the target's head multiplies (before the target's own muP divisor)."""
        if self.options.final_norm:
            features = self.norm(features)
        return features / self.out_div if self.out_div != 1.0 else features

    @torch.no_grad()
    def init_weights(self, generator: torch.Generator | None = None) -> None:
        std = self.target_config.initializer_range
        for module in self.modules():
            if isinstance(module, nn.Linear):
                module.weight.normal_(0.0, std, generator=generator)
                if module.bias is not None:
                    module.bias.zero_()
            elif isinstance(module, RMSNorm):
                module.weight.fill_(1.0)


def build_draft(target: MiniCPMConfig, options: DraftOptions | None = None, dtype: torch.dtype = torch.float32,
                seed: int | None = 0) -> EagleDraft:
    draft = EagleDraft(target, options)
    draft.init_weights(torch.Generator().manual_seed(seed) if seed is not None else None)
    return draft.to(dtype)


def draft_from_mtp(mtp, target: MiniCPMConfig, options: DraftOptions | None = None) -> EagleDraft:
    """An EagleDraft from the pretraining MTP head (minicpm4/mtp.py): the same shapes, copied exactly. The
    projection's columns are reordered to the embedding-first layout when the head was trained hidden-first.
    The MTP head applies a final norm before the shared head, so the converted draft runs with
    final_norm=True (the format's `norm.weight`, which the released draft defines but does not use); its
    layer keeps the MTP layer's residual scale (residual_scale="mtp") and its embedding norm the eps that
    makes Norm(Embed(x) * scale_emb) equal the MTP head's Norm(Embed(x)) (DraftOptions.embed_norm_eps)."""
    # eps as RMSNorm adds it (fp32), times scale_emb^2: exact when scale_emb is a power of two
    eps = float(torch.tensor(target.rms_norm_eps, dtype=torch.float32)) * target.scale_emb ** 2
    options = options or DraftOptions(residual_scale="mtp", final_norm=True, embed_norm_eps=eps)
    draft = EagleDraft(target, options).to(mtp.proj.weight.dtype)
    h = target.hidden_size
    w = mtp.proj.weight.detach()
    with torch.no_grad():
        draft.fc.weight.copy_(w if mtp.embed_first else torch.cat([w[:, h:], w[:, :h]], dim=1))
        draft.input_norm1.weight.copy_(mtp.embed_norm.weight)
        draft.input_norm2.weight.copy_(mtp.hidden_norm.weight)
        draft.layer.load_state_dict(mtp.layer.state_dict())
        draft.norm.weight.copy_(mtp.norm.weight)
    return draft


# ---- the folder format -------------------------------------------------------------------------------------

def save_draft(draft: EagleDraft, folder: str | os.PathLike, extra: dict | None = None) -> Path:
    """Write config.json + model.safetensors atomically (a crash leaves the old folder or none)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    cfg = draft_config(draft.target_config).to_dict()
    cfg.update({"architectures": ["MiniCPMEagleDraft"], "draft_residual_scale": draft.options.residual_scale,
                "draft_output_scale": draft.options.output_scale, "draft_final_norm": draft.options.final_norm,
                **({} if draft.options.embed_norm_eps is None else {"draft_embed_norm_eps": draft.options.embed_norm_eps}),
                "draft_target_layers": draft.target_config.num_hidden_layers, **(extra or {})})
    tensors = {k: v.detach().contiguous().cpu() for k, v in draft.state_dict().items()}
    with atomic_paths({"w": folder / WEIGHTS_FILE, "c": folder / "config.json"}) as tmp:
        save_file(tensors, str(tmp["w"]), metadata={"format": "pt"})
        os.chmod(tmp["w"], 0o644)  # safetensors re-creates the file 0600 (atomic_paths' temp was 0644)
        tmp["c"].write_text(json.dumps(cfg, indent=2) + "\n")
    return folder


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        bins = sorted(folder.glob("*.bin"))
        if not bins:
            raise FileNotFoundError(f"{folder}: no draft weights (*.safetensors or *.bin)")
        out = {}
        for b in bins:
            out.update(torch.load(b, map_location="cpu", weights_only=True))
        return out
    out = {}
    for f in files:
        out.update(load_file(str(f)))
    return out


def load_draft(folder: str | os.PathLike, target: MiniCPMConfig, options: DraftOptions | None = None,
               dtype: torch.dtype | None = None) -> EagleDraft:
    """Read a draft folder for `target`. Options: given, else the folder's draft_* keys, else the defaults.
    Raises ValueError naming the key when the draft's widths or muP constants differ from the target's."""
    folder = Path(folder)
    cfg_path = folder / "config.json"
    if not cfg_path.is_file():
        raise FileNotFoundError(f"{folder}: no config.json (an EAGLE draft folder holds config.json + weights)")
    cfg = json.loads(cfg_path.read_text())
    for key in ("hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads", "scale_depth",
                "dim_model_base", "scale_emb"):
        if key in cfg and cfg[key] != getattr(target, key):
            raise ValueError(f"draft config.json {key}={cfg[key]} differs from the target's {getattr(target, key)}")
    if cfg.get("num_hidden_layers", 1) != 1:
        raise ValueError(f"draft config.json num_hidden_layers={cfg['num_hidden_layers']}: only one-layer EAGLE "
                         "drafts are supported")
    state = _weights(folder)
    state = {k.removeprefix("model."): v for k, v in state.items()
             if not k.endswith("embed_tokens.weight") and k not in ("lm_head.weight", "token_id_remap")}
    if options is None:
        options = DraftOptions(residual_scale=cfg.get("draft_residual_scale", "cpmcu"),
                               output_scale=cfg.get("draft_output_scale", "none"), fc_bias="fc.bias" in state,
                               final_norm=bool(cfg.get("draft_final_norm", False)),
                               embed_norm_eps=cfg.get("draft_embed_norm_eps"))
    draft = EagleDraft(target, options)
    if "norm.weight" not in state:  # unused by the forward; some exports omit it
        state["norm.weight"] = torch.ones(target.hidden_size)
    missing, unexpected = draft.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(f"{folder}: draft weights do not match the MiniCPM4 Eagle layout "
                         f"(missing {sorted(missing)[:6]}, unexpected {sorted(unexpected)[:6]})")
    dtype = dtype or next(iter(state.values())).dtype
    return draft.to(dtype)

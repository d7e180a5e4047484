"""Stage presets as Python functions (DESIGN.md principle 14): each returns (model config, TrainConfig).

    pretrain      muP + WSD (1% warmup, 10% exponential decay) + MTP, 4K-style dense training
    long_context  longer sequences with LongRoPE factors, optional InfLLM v2 sparse attention (MINICPM4.md §6.1 4.)
    sft           ChatML SFT with assistant-only loss (sft_data.py)
    qat           BitCPM4 ternary quantization-aware training from a high-precision checkpoint (qat.py)
Every keyword of TrainConfig can be overridden. Values the report does not publish are our choices and
say so (MINICPM4.md §11.2: warmup, decay shape, batch size, betas, λ of MTP).
"""

from __future__ import annotations

import math
from typing import Any

from minicpm4.config import MINICPM4_05B_ROPE_FACTORS, MiniCPMConfig, RopeScaling, SparseConfig
from minicpm4.train.trainer import TrainConfig


def model_10m(vocab_size: int = 8192, **overrides: Any) -> MiniCPMConfig:
    """A ~10M-parameter MiniCPM4-shaped model for CPU training (9.7M at vocab 8192): hidden 256, 8 layers,
    4 query heads on 1 KV head (head_dim 64 as in MiniCPM4-0.5B, so its released LongRoPE factors fit),
    MLP 4x, tied embeddings, the 0.5B's muP constants (scale_emb 12, scale_depth 1.4, dim_model_base 256)."""
    cfg = dict(
        vocab_size=vocab_size, hidden_size=256, intermediate_size=1024, num_hidden_layers=8,
        num_attention_heads=4, num_key_value_heads=1, max_position_embeddings=32768, rms_norm_eps=1e-5,
        rope_scaling=RopeScaling(list(MINICPM4_05B_ROPE_FACTORS), list(MINICPM4_05B_ROPE_FACTORS), 32768),
        scale_emb=12, scale_depth=1.4, dim_model_base=256, tie_word_embeddings=True,
        bos_token_id=1, eos_token_id=2,
    )
    cfg.update(overrides)
    return MiniCPMConfig(**cfg)


MODEL_PRESETS = {"cpu-10m": model_10m}


def _wsd_steps(steps: int, warmup_fraction: float, decay_fraction: float) -> dict[str, int]:
    warmup = min(steps, max(1, round(warmup_fraction * steps))) if warmup_fraction > 0 else 0
    decay = min(steps - warmup, round(decay_fraction * steps))
    return {"warmup_steps": warmup, "decay_steps": decay}


def pretrain(model_config: MiniCPMConfig, steps: int = 1000, warmup_fraction: float = 0.01,
             decay_fraction: float = 0.1, **overrides: Any) -> tuple[MiniCPMConfig, TrainConfig]:
    """Stable + decay pre-training in one WSD run. lr 1e-2 is MiniCPM v1's muP base LR; betas (0.9, 0.95),
    wd 0.1, clip 1.0 follow the MiniCPM-style Megatron setup of MINICPM4.md §6.2; λ_MTP = 0.3 is
    DeepSeek-V3's early-training weight (MiniCPM4's is unpublished); decay 10% exponential (MiniCPM v1)."""
    cfg = dict(stage="pretrain", out_dir="runs/pretrain", steps=steps, lr=1e-2, weight_decay=0.1, betas=(0.9, 0.95),
               grad_clip=1.0, decay_shape="exp", min_lr_ratio=0.1, mtp_weight=0.3, seq_len=512,
               **_wsd_steps(steps, warmup_fraction, decay_fraction))
    cfg.update(overrides)
    return model_config, TrainConfig(**cfg)


# Ramp end points as rotation counts over the trained length: a rotary pair that turns more than
# RAMP_FAST_ROTATIONS times keeps its factor, one that turns fewer than RAMP_SLOW_ROTATIONS times is divided
# by the full scale. Fitted so that head_dim 128, theta 1e4, 32K -> 128K (s = 4) gives the ramp of the
# README's published 128K list exactly (pair index 20 -> 46; minicpm4/rope_factors.py derives that list);
# YaRN's defaults would be 32 and 1.
RAMP_FAST_ROTATIONS = 32768 / (2 * math.pi) * 10000.0 ** (-40 / 128)  # ~293.3
RAMP_SLOW_ROTATIONS = 32768 / (2 * math.pi) * 10000.0 ** (-92 / 128)  # ~6.95


def longrope_ramp(head_dim: int, scale: float, trained_len: int, theta: float = 10000.0) -> list[float]:
    """Per-pair LongRoPE divisors for a `scale`x extension of a model trained to `trained_len` tokens:
    YaRN's NTK-by-parts rule (Peng et al. 2023), blended in frequency space as YaRN does:
        r(i) = 1 / ((1 - m(i)) / scale + m(i)),  m(i) = 1 (keep) .. 0 (interpolate), linear in the pair index
    between the indices whose pairs turn RAMP_FAST_ROTATIONS and RAMP_SLOW_ROTATIONS times over trained_len.
    LongRoPE's own factors come from an evolutionary search we do not run; this is the README's 128K recipe
    generalised to any length and head size."""
    def pair_index(rotations: float) -> float:  # the (fractional) pair i that turns `rotations` times
        return head_dim * math.log(trained_len / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    low, high = pair_index(RAMP_FAST_ROTATIONS), pair_index(RAMP_SLOW_ROTATIONS)
    out = []
    for i in range(head_dim // 2):
        m = min(1.0, max(0.0, 1.0 - (i - low) / (high - low)))
        out.append(1.0 / ((1.0 - m) / scale + m))
    return out


def extend_rope(config: MiniCPMConfig, seq_len: int, trained_len: int | None = None) -> MiniCPMConfig:
    """The config for training/serving at `seq_len` tokens.

    Covered length = rope_scaling.original_max_position_embeddings when LongRoPE factors exist (MiniCPM4's
    factors already hold at 32K), else `trained_len` (the pretraining sequence length; default the
    config's max_position_embeddings). Within it nothing changes. Beyond it the factors are multiplied by
    longrope_ramp(seq_len / covered) (the README's 128K recipe) and both max_position_embeddings and
    original_max_position_embeddings become seq_len, so LongRoPE's attention_scaling stays 1.0 and the
    long/short choice cannot flip mid-context."""
    rs = config.rope_scaling
    covered = rs.original_max_position_embeddings if rs is not None else (trained_len or config.max_position_embeddings)
    if seq_len <= covered:
        return config if seq_len <= config.max_position_embeddings else config.replace(max_position_embeddings=seq_len)
    ramp = longrope_ramp(config.head_dim, seq_len / covered, covered, config.rope_theta)
    base = rs.long_factor if rs is not None else [1.0] * (config.head_dim // 2)
    factors = [f * r for f, r in zip(base, ramp)]
    return config.replace(max_position_embeddings=seq_len,
                          rope_scaling=RopeScaling(list(factors), list(factors), seq_len))


def sparse_backend_available() -> bool:
    """True when the InfLLM v2 backend is registered in minicpm4.attention.BACKENDS and imports."""
    from minicpm4 import attention

    if "infllmv2" not in attention.BACKENDS:
        return False
    try:
        import minicpm4.attention.infllmv2.backend  # noqa: F401  (what the registered factory imports)
    except ImportError:
        return False
    return True


def long_context(model_config: MiniCPMConfig, seq_len: int = 32768, sparse: bool = False, steps: int = 1000,
                 trained_len: int | None = None, sparse_config: SparseConfig | None = None,
                 **overrides: Any) -> tuple[MiniCPMConfig, TrainConfig]:
    """4K -> `seq_len` continuation (MINICPM4.md §6.1 stage 4). LR 3e-4 decaying linearly to 2.75e-4 without
    warmup is the InfLLM-V2 paper's long-adaptation recipe (§6.2). sparse=True sets `sparse_config`
    (README defaults, as the report's 32K stage: weights unchanged, InfLLM v2 switched on and trained);
    it needs the InfLLM v2 backend registered in minicpm4.attention.BACKENDS and raises otherwise, rather
    than silently training dense attention."""
    config = extend_rope(model_config, seq_len, trained_len)
    if sparse:
        if not sparse_backend_available():
            raise ValueError("--sparse: the InfLLM v2 attention backend is not available yet "
                             "(minicpm4.attention.BACKENDS has no 'infllmv2'); train dense or wait for it")
        config = config.replace(sparse_config=sparse_config or config.sparse_config or SparseConfig())
    cfg = dict(stage="long", out_dir="runs/long", steps=steps, seq_len=seq_len, lr=3e-4, warmup_steps=0,
               decay_steps=steps, decay_shape="linear", min_lr_ratio=2.75e-4 / 3e-4, mtp_weight=0.0,
               weight_decay=0.1, micro_batch_size=1)
    cfg.update(overrides)
    return config, TrainConfig(**cfg)


def sft(model_config: MiniCPMConfig, steps: int = 1000, **overrides: Any) -> tuple[MiniCPMConfig, TrainConfig]:
    """Chat SFT (recipe unpublished; our choice): lr 1e-3 muP base, 3% warmup then linear decay to 10% over
    the rest, no MTP, document (conversation) masking on."""
    cfg = dict(stage="sft", out_dir="runs/sft", steps=steps, lr=1e-3, decay_shape="linear", min_lr_ratio=0.1,
               mtp_weight=0.0, weight_decay=0.1, seq_len=1024, **_wsd_steps(steps, 0.03, 0.97))
    cfg.update(overrides)
    return model_config, TrainConfig(**cfg)


# BitCPM4 stage 2 (MINICPM4.md §5): the pilot ran stage 1 at LR 1e-2 and the QAT stage at 5e-3, i.e. half our
# pretrain default. The re-warmup length and the decay are unpublished: 10% warmup (a fresh Adam state meets
# weights whose forward just jumped to their ternary values, which is why the report calls the re-warmup critical;
# QAT runs are short, so 1% would be one or two steps) and the pilot's own run shape for the rest (decay over the
# last 20%, exponential as in pretrain).
QAT_LR = 5e-3
QAT_WARMUP_FRACTION = 0.1
QAT_DECAY_FRACTION = 0.2


def qat(model_config: MiniCPMConfig, steps: int | None = None, tokens: int | None = None, world_size: int = 1,
        **overrides: Any) -> tuple[MiniCPMConfig, TrainConfig]:
    """Ternary QAT: every decoder linear fake-quantized in groups of qat_group_size input channels (qat.py), a
    fresh WSD warmup, LR 5e-3, no MTP. The length is `steps`, or `tokens` over the step's B x A x world x T tokens
    (qat.default_tokens: about 2x the decay-phase tokens of the source run). Group 64 is configs.TernaryQATConfig's
    default (the team's sweep: 32 slightly better than 64, the BitCPM4 value unpublished)."""
    cfg = dict(stage="qat", out_dir="runs/qat", lr=QAT_LR, weight_decay=0.1, betas=(0.9, 0.95), grad_clip=1.0,
               decay_shape="exp", min_lr_ratio=0.1, mtp_weight=0.0, seq_len=512, qat_group_size=64)
    cfg.update(overrides)
    if steps is None:
        if tokens is None:
            raise ValueError("qat: give steps or tokens")
        B, A = cfg.get("micro_batch_size", TrainConfig.micro_batch_size), cfg.get("grad_accum", TrainConfig.grad_accum)
        steps = max(1, math.ceil(tokens / (B * A * world_size * cfg["seq_len"])))
    schedule = _wsd_steps(steps, QAT_WARMUP_FRACTION, QAT_DECAY_FRACTION)
    cfg = {**schedule, **cfg, "steps": steps}  # explicit warmup/decay overrides win over the fractions
    return model_config, TrainConfig(**cfg)


STAGES = {"pretrain": pretrain, "long": long_context, "sft": sft, "qat": qat}

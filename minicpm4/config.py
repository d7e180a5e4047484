"""MiniCPM4 configuration: typed dataclasses that round-trip Hugging Face `config.json`.

Facts and defaults come from MINICPM4.md §2.2 (model fields) and §3.2 (`sparse_config`).
A load -> save round trip reproduces the JSON content: keys that were absent stay absent
unless their value changed, and keys we do not model are kept verbatim in `extra`.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from minicpm4.errors import UserError
from minicpm4.io import write_text_atomic


class ConfigError(ValueError):
    """An invalid configuration value; the message always names the key."""


def _fail(key: str, message: str) -> None:
    raise ConfigError(f"config key '{key}': {message}")


def _require_int(key: str, value: Any, minimum: int | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        _fail(key, f"expected an integer, got {value!r}")
    if minimum is not None and value < minimum:
        _fail(key, f"must be >= {minimum}, got {value}")


def _require_positive_number(key: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        _fail(key, f"expected a positive number, got {value!r}")


@dataclass
class RopeScaling:
    """LongRoPE parameters (MINICPM4.md §2.4). Per-frequency divisors of length head_dim/2."""

    long_factor: list[float]
    short_factor: list[float]
    original_max_position_embeddings: int
    rope_type: str = "longrope"
    # Older configs spell the key "type"; we remember which spelling to write back.
    type_key: str = "rope_type"
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RopeScaling:
        if not isinstance(d, dict):
            _fail("rope_scaling", f"expected an object, got {d!r}")
        d = dict(d)
        type_key = "rope_type" if "rope_type" in d else "type"
        rope_type = d.pop(type_key, None)
        if rope_type != "longrope":
            _fail(f"rope_scaling.{type_key}", f"only 'longrope' is supported, got {rope_type!r}")
        for key in ("long_factor", "short_factor", "original_max_position_embeddings"):
            if key not in d:
                _fail(f"rope_scaling.{key}", "missing")
        return cls(
            long_factor=[float(x) for x in d.pop("long_factor")],
            short_factor=[float(x) for x in d.pop("short_factor")],
            original_max_position_embeddings=d.pop("original_max_position_embeddings"),
            rope_type=rope_type,
            type_key=type_key,
            extra=d,
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            self.type_key: self.rope_type,
            "long_factor": list(self.long_factor),
            "short_factor": list(self.short_factor),
            "original_max_position_embeddings": self.original_max_position_embeddings,
            **self.extra,
        }

    def validate(self, head_dim: int) -> None:
        _require_int("rope_scaling.original_max_position_embeddings", self.original_max_position_embeddings, 1)
        for name in ("long_factor", "short_factor"):
            factors = getattr(self, name)
            if len(factors) != head_dim // 2:
                _fail(f"rope_scaling.{name}", f"needs head_dim/2 = {head_dim // 2} values, got {len(factors)}")
            if not all(math.isfinite(x) and x > 0 for x in factors):
                _fail(f"rope_scaling.{name}", "all factors must be finite and > 0")


@dataclass
class SparseConfig:
    """InfLLM v2 `sparse_config` (MINICPM4.md §3.2); defaults are the README / remote-code defaults."""

    kernel_size: int = 32  # C1 semantic kernel length
    kernel_stride: int = 16  # C1 stride (50% overlap)
    init_blocks: int = 1  # leading blocks every query sees (attention sink)
    block_size: int = 64  # KV block granularity
    window_size: int = 2048  # local window in tokens -> 32 local blocks
    topk: int = 64  # blocks chosen per query token per KV group
    use_nope: bool = False  # score blocks with pre-RoPE q/k
    dense_len: int = 8192  # dense while kv length < dense_len; -1 = always sparse
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SparseConfig:
        if not isinstance(d, dict):
            _fail("sparse_config", f"expected an object, got {d!r}")
        known = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        cfg = cls(**{k: v for k, v in d.items() if k in known}, extra={k: v for k, v in d.items() if k not in known})
        cfg.validate()
        return cfg

    def to_dict(self) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "extra"}
        return {**d, **self.extra}

    def validate(self) -> None:
        for key in ("kernel_size", "kernel_stride", "block_size", "window_size", "topk"):
            _require_int(f"sparse_config.{key}", getattr(self, key), 1)
        _require_int("sparse_config.init_blocks", self.init_blocks, 0)
        _require_int("sparse_config.dense_len", self.dense_len, -1)
        if not isinstance(self.use_nope, bool):
            _fail("sparse_config.use_nope", f"expected true/false, got {self.use_nope!r}")
        # Constraints enforced by SGLang's backend (MINICPM4.md §3.2): adopt them.
        if self.kernel_size % self.kernel_stride:
            _fail("sparse_config.kernel_stride", f"must divide kernel_size ({self.kernel_size})")
        if self.block_size % self.kernel_stride:
            _fail("sparse_config.kernel_stride", f"must divide block_size ({self.block_size})")
        if self.window_size % self.block_size:
            _fail("sparse_config.window_size", f"must be a multiple of block_size ({self.block_size})")


# Fields written only when present in the source JSON or changed from these defaults; this is
# what makes the real 0.5B config (which omits rope_theta and tie_word_embeddings) round-trip.
@dataclass
class MiniCPMConfig:
    vocab_size: int = 73448
    hidden_size: int = 1024
    intermediate_size: int = 4096
    num_hidden_layers: int = 24
    num_attention_heads: int = 16
    num_key_value_heads: int = 2
    max_position_embeddings: int = 32768
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    # muP (MINICPM4.md §2.1): embedding x scale_emb, residual x scale_depth/sqrt(L),
    # logits from hidden / (hidden_size / dim_model_base).
    scale_emb: float = 12.0
    scale_depth: float = 1.4
    dim_model_base: int = 256
    initializer_range: float = 0.1
    hidden_act: str = "silu"
    # Absent in the 0.5B config.json: the remote-code class default is tied (MINICPM4.md §2.2).
    tie_word_embeddings: bool = True
    bos_token_id: int = 1
    eos_token_id: int | list[int] = field(default_factory=lambda: [2, 73440])
    pad_token_id: int | None = None
    torch_dtype: str = "bfloat16"
    use_cache: bool = True
    model_type: str = "minicpm"
    architectures: list[str] = field(default_factory=lambda: ["MiniCPMForCausalLM"])
    sparse_config: SparseConfig | None = None
    mup_denominator: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    # Keys present in the JSON this config was read from (None: built in Python, write every key).
    source_keys: frozenset[str] | None = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        self.validate()

    # ---- derived quantities -------------------------------------------------------------
    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def num_key_value_groups(self) -> int:
        return self.num_attention_heads // self.num_key_value_heads

    @property
    def residual_scale(self) -> float:
        return self.scale_depth / math.sqrt(self.num_hidden_layers)

    @property
    def logit_divisor(self) -> float:
        return self.hidden_size / self.dim_model_base

    @property
    def eos_token_ids(self) -> list[int]:
        return [self.eos_token_id] if isinstance(self.eos_token_id, int) else list(self.eos_token_id)

    # ---- validation ---------------------------------------------------------------------
    def validate(self) -> None:
        for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                    "num_attention_heads", "num_key_value_heads", "max_position_embeddings", "dim_model_base"):
            _require_int(key, getattr(self, key), 1)
        for key in ("rms_norm_eps", "rope_theta", "scale_emb", "scale_depth", "initializer_range"):
            _require_positive_number(key, getattr(self, key))
        if self.hidden_size % self.num_attention_heads:
            _fail("num_attention_heads", f"must divide hidden_size ({self.hidden_size})")
        if self.head_dim % 2:
            _fail("num_attention_heads", f"head_dim = hidden_size / num_attention_heads = {self.head_dim} must be even for RoPE")
        if self.num_attention_heads % self.num_key_value_heads:
            _fail("num_key_value_heads", f"must divide num_attention_heads ({self.num_attention_heads})")
        if self.hidden_act != "silu":
            _fail("hidden_act", f"MiniCPM4 uses 'silu', got {self.hidden_act!r}")
        if not isinstance(self.tie_word_embeddings, bool):
            _fail("tie_word_embeddings", f"expected true/false, got {self.tie_word_embeddings!r}")
        eos = self.eos_token_id
        if not (isinstance(eos, int) and not isinstance(eos, bool)) and not (
            isinstance(eos, list) and eos and all(isinstance(x, int) and not isinstance(x, bool) for x in eos)
        ):
            _fail("eos_token_id", f"expected an integer or a non-empty list of integers, got {eos!r}")
        for tid in self.eos_token_ids + [self.bos_token_id] + ([self.pad_token_id] if self.pad_token_id is not None else []):
            if not 0 <= tid < self.vocab_size:
                _fail("eos_token_id/bos_token_id/pad_token_id", f"token id {tid} outside vocab_size {self.vocab_size}")
        if self.rope_scaling is not None:
            self.rope_scaling.validate(self.head_dim)
        if self.sparse_config is not None:
            self.sparse_config.validate()

    # ---- JSON ---------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> MiniCPMConfig:
        if not isinstance(d, dict):
            raise ConfigError(f"config.json must hold a JSON object, got {type(d).__name__}")
        known = {f.name for f in dataclasses.fields(cls)} - {"extra", "source_keys"}
        kwargs: dict[str, Any] = {}
        extra: dict[str, Any] = {}
        for key, value in d.items():
            if key not in known:
                extra[key] = value
            elif key == "rope_scaling":
                kwargs[key] = None if value is None else RopeScaling.from_dict(value)
            elif key == "sparse_config":
                kwargs[key] = None if value is None else SparseConfig.from_dict(value)
            elif key in ("rms_norm_eps", "rope_theta", "scale_emb", "scale_depth", "initializer_range") and isinstance(value, int) and not isinstance(value, bool):
                kwargs[key] = value  # keep ints as ints so `12` is written back as `12`
            else:
                kwargs[key] = value
        return cls(**kwargs, extra=extra, source_keys=frozenset(d))

    def to_dict(self) -> dict[str, Any]:
        defaults = MiniCPMConfig.__new__(MiniCPMConfig)
        for f in dataclasses.fields(MiniCPMConfig):
            if f.default is not dataclasses.MISSING:
                setattr(defaults, f.name, f.default)
            elif f.default_factory is not dataclasses.MISSING:
                setattr(defaults, f.name, f.default_factory())
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            if f.name in ("extra", "source_keys"):
                continue
            value = getattr(self, f.name)
            present = self.source_keys is None or f.name in self.source_keys
            if not present and value == getattr(defaults, f.name):
                continue
            if isinstance(value, (RopeScaling, SparseConfig)):
                value = value.to_dict()
            out[f.name] = value
        out.update(self.extra)
        return out

    @classmethod
    def from_json(cls, path: str | Path) -> MiniCPMConfig:
        path = Path(path)
        if path.is_dir():
            path = path / "config.json"
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise FileNotFoundError(f"no config.json at {path}") from None
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path} is not valid JSON: {e}") from None
        return cls.from_dict(data)

    def save_json(self, path: str | Path) -> Path:
        path = Path(path)
        if path.is_dir():
            path = path / "config.json"
        write_text_atomic(path, json.dumps(self.to_dict(), indent=2, ensure_ascii=False) + "\n")
        return path

    def replace(self, **changes: Any) -> MiniCPMConfig:
        """A copy with some fields changed (validated); keeps the record of source keys."""
        new = dataclasses.replace(self, **changes)
        new.source_keys = self.source_keys
        return new

    # ---- runtime switches (no weight changes) -------------------------------------------
    def with_sparse(self, enabled: bool, variant: str | None = None, **overrides: Any) -> MiniCPMConfig:
        """InfLLM v2 on (the config's own `sparse_config`, else the README defaults, with `overrides`
        applied, e.g. dense_len=-1) or off (dense attention). Any checkpoint switches: no weights change.
        variant names an InfLLM v2 semantics preset (attention/infllmv2/settings.py); it is kept as the
        extra key sparse_config["variant"], which the remote code ignores."""
        if not enabled:
            if overrides or variant is not None:
                raise ConfigError("sparse_config: overrides given while turning sparse attention off")
            return self.replace(sparse_config=None)
        base = self.sparse_config or SparseConfig()
        known = {f.name for f in dataclasses.fields(SparseConfig)} - {"extra"}
        unknown = set(overrides) - known
        if unknown:
            raise ConfigError(f"sparse_config: unknown key(s) {', '.join(sorted(unknown))}; known: {', '.join(sorted(known))}")
        extra = dict(base.extra) if variant is None else {**base.extra, "variant": variant}
        sparse = dataclasses.replace(base, **overrides, extra=extra)
        sparse.validate()
        return self.replace(sparse_config=sparse)

    def with_yarn_128k(self) -> MiniCPMConfig:
        """The report's 128K context extension (MINICPM4.md §2.4; rope_factors.py): both LongRoPE lists
        become the YaRN-extended list, original_max_position_embeddings stays 32768 and
        max_position_embeddings becomes 131072. Refuses a model that was not trained to 32K with LongRoPE."""
        from minicpm4.rope_factors import EXTENDED_CONTEXT, ORIGINAL_CONTEXT, factors_128k

        rs = self.rope_scaling
        if rs is None:
            _fail("rope_scaling", "the 128K extension multiplies the model's LongRoPE factors, but this config has none")
        if rs.original_max_position_embeddings != ORIGINAL_CONTEXT:
            _fail("rope_scaling.original_max_position_embeddings",
                  f"the 128K list extends a model trained to {ORIGINAL_CONTEXT} tokens; this one says "
                  f"{rs.original_max_position_embeddings} (e.g. MiniCPM4.1 ships its own list): edit rope_scaling instead")
        if self.max_position_embeddings >= EXTENDED_CONTEXT:  # applying it twice would stretch twice
            _fail("max_position_embeddings", f"already {self.max_position_embeddings}: the 128K extension applies to a "
                  f"32K model, and this config looks extended already")
        if list(rs.long_factor) != list(rs.short_factor):
            _fail("rope_scaling.short_factor", "differs from long_factor; the 128K recipe assumes short == long")
        factors = factors_128k(self.head_dim, rs.long_factor)
        new_rs = dataclasses.replace(rs, long_factor=list(factors), short_factor=list(factors), extra=dict(rs.extra))
        return self.replace(rope_scaling=new_rs, max_position_embeddings=EXTENDED_CONTEXT)


# ---- presets ------------------------------------------------------------------------------
# The released LongRoPE factors of MiniCPM4-0.5B (head_dim 64 -> 32 values; short == long).
MINICPM4_05B_ROPE_FACTORS = [
    1.0004360675811768, 1.0668443441390991, 1.1631425619125366, 1.3025742769241333, 1.5040205717086792,
    1.7941505908966064, 2.2101221084594727, 2.802666664123535, 3.6389970779418945, 4.804192543029785,
    6.39855432510376, 8.527148246765137, 11.277542114257812, 14.684998512268066, 18.69317054748535,
    23.13019371032715, 27.72362518310547, 32.1606559753418, 36.168827056884766, 39.57627868652344,
    42.32667541503906, 44.45526885986328, 46.04962921142578, 47.21482849121094, 48.05115509033203,
    48.64370346069336, 49.05967712402344, 49.34980392456055, 49.551246643066406, 49.69068145751953,
    49.78697967529297, 49.85338592529297,
]


def _geometric_factors(n: int, last: float) -> list[float]:
    """Smoothly rising LongRoPE-like factors 1 .. last (for tests and small presets)."""
    return [last ** (i / (n - 1)) for i in range(n)]


def tiny(vocab_size: int = 1024, **overrides: Any) -> MiniCPMConfig:
    """A 2-layer model for tests and CPU demos; LongRoPE with distinct long/short factors."""
    head_dim = 16
    cfg = dict(
        vocab_size=vocab_size, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, rms_norm_eps=1e-5,
        rope_scaling=RopeScaling(
            long_factor=_geometric_factors(head_dim // 2, 8.0),
            short_factor=_geometric_factors(head_dim // 2, 2.0),
            original_max_position_embeddings=512,
        ),
        scale_emb=12, scale_depth=1.4, dim_model_base=16, bos_token_id=1, eos_token_id=[2, 3],
    )
    cfg.update(overrides)
    return MiniCPMConfig(**cfg)


def minicpm4_05b(**overrides: Any) -> MiniCPMConfig:
    """openbmb/MiniCPM4-0.5B (MINICPM4.md §2.2)."""
    cfg = dict(
        vocab_size=73448, hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
        num_attention_heads=16, num_key_value_heads=2, max_position_embeddings=32768, rms_norm_eps=1e-5,
        rope_scaling=RopeScaling(list(MINICPM4_05B_ROPE_FACTORS), list(MINICPM4_05B_ROPE_FACTORS), 32768),
        scale_emb=12, scale_depth=1.4, dim_model_base=256, tie_word_embeddings=True,
    )
    cfg.update(overrides)
    return MiniCPMConfig(**cfg)


# MINICPM4.md §2.2 publishes only the end points of the 8B factor list (0.9978 ... 31.0239), so this
# preset uses a geometric ramp between them: right shapes for memory estimates and benchmarks, not
# the exact RoPE of the checkpoint. Load the real config.json for that.
def minicpm4_8b(**overrides: Any) -> MiniCPMConfig:
    """openbmb/MiniCPM4-8B shapes (MINICPM4.md §2.2); RoPE factors approximate, see above."""
    factors = [0.9977997 * (31.0239 / 0.9977997) ** (i / 63) for i in range(64)]
    cfg = dict(
        vocab_size=73448, hidden_size=4096, intermediate_size=16384, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=2, max_position_embeddings=32768, rms_norm_eps=1e-6,
        rope_scaling=RopeScaling(list(factors), list(factors), 32768),
        scale_emb=12, scale_depth=1.4, dim_model_base=256, tie_word_embeddings=False, pad_token_id=2,
    )
    cfg.update(overrides)
    return MiniCPMConfig(**cfg)


PRESETS = {"tiny": tiny, "minicpm4-0.5b": minicpm4_05b, "minicpm4-8b": minicpm4_8b}


def preset(name: str, **overrides: Any) -> MiniCPMConfig:
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; choose from {', '.join(PRESETS)}")
    return PRESETS[name](**overrides)


def read_config(target: str) -> MiniCPMConfig:
    """A preset name, a config.json, or a model folder holding one (what the CLI's MODEL_DIR / --model-config take)."""
    if target in PRESETS:
        return preset(target)
    path = Path(target)
    if not path.exists():
        raise UserError(f"{target}: no such folder or file, and not a preset ({', '.join(PRESETS)})")
    return MiniCPMConfig.from_json(path)

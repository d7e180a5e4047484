"""InfLLM v2 settings: one typed value for everything selection and stage 2 need (MINICPM4.md §3.2, §3.4).

`sparse_config` (SparseConfig) is what a checkpoint says; `InfLLMv2Settings` is what the kernels do
with it. The public implementations read the same keys differently (§3.4, §11.1), so the translation
is a named BUDGET VARIANT.

The local set of a query at position i, block q_b = i // block_size, is ALWAYS the `local_blocks`
blocks q_b - local_blocks + 1 .. q_b (its own block included). `local_mode` says how it is served:

  separate_window  Selection scores the local blocks -inf (never picked), top-k picks `topk` blocks
                   (init blocks included), blocks >= q_b are dropped from the top-k, and stage 2
                   attends the top-k blocks UNION the local window. MiniCPM4 remote code + the
                   `feature_infer`-era kernels (infllmv2_cuda_impl up to Aug 2025): the pooling
                   kernel wrote -inf where `q_b >= b and q_b < b + local_blocks` and the stage-2
                   kernel's window was blocks `q_b - block_window_size + 1 .. q_b`, with both
                   numbers = window_size // block_size = 32.
  forced_in_topk   Selection scores the local blocks +inf (always picked, counted in `topk`), blocks
                   > q_b are dropped, and stage 2 attends exactly the top-k set (no extra window).
                   infllmv2_cuda_impl main since 1706a4a ("max pooling, fa no sliding window"): its
                   pooling rule `q_b <= b + local_blocks` with local_blocks = 32 forces 33 blocks,
                   i.e. local_blocks = 33 here.

The stage-2 window is BLOCK-aligned (whole blocks q_b - local_blocks + 1 .. q_b, then causal), not the
last window_size tokens: that is the window rule of the feature_infer-era forward kernel, and it is
the same block set that selection excludes, so the window and the top-k never overlap.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from minicpm4.config import SparseConfig

LOCAL_MODES = ("separate_window", "forced_in_topk")
LSE_MODES = ("exact", "coarse")


@dataclass(frozen=True)
class InfLLMv2Settings:
    kernel_size: int = 32  # C1 kernel length p (mean-pooled keys)
    kernel_stride: int = 16  # C1 stride s
    block_size: int = 64  # KV block B
    init_blocks: int = 1  # blocks 0 .. init_blocks-1 always selected (scored +inf, counted in topk)
    topk: int = 64  # top-k budget K as the variant defines it (see BUDGET_VARIANTS)
    local_blocks: int = 32  # local set = blocks q_b - local_blocks + 1 .. q_b (window_size // block_size for "hf")
    local_mode: str = "separate_window"  # or "forced_in_topk" (module docstring)
    lse: str = "exact"  # stage-1 normaliser: "exact" (over C1) or "coarse" (over C2 = 4x kernel, 4x stride)
    use_nope: bool = False  # select with pre-RoPE q/k (the caller passes them as q_select/k_select)
    dense_len: int = 8192  # dense while kv length < dense_len; -1 = always sparse (the backend decides)
    variant: str = "hf"  # the BUDGET_VARIANTS name this was built from (documentation only)

    def __post_init__(self) -> None:
        for name in ("kernel_size", "kernel_stride", "block_size", "local_blocks"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"InfLLMv2Settings.{name} must be a positive integer, got {getattr(self, name)!r}")
        for name in ("init_blocks", "topk"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 0:
                raise ValueError(f"InfLLMv2Settings.{name} must be a non-negative integer, got {getattr(self, name)!r}")
        if self.local_mode not in LOCAL_MODES:
            raise ValueError(f"InfLLMv2Settings.local_mode must be one of {LOCAL_MODES}, got {self.local_mode!r}")
        if self.lse not in LSE_MODES:
            raise ValueError(f"InfLLMv2Settings.lse must be one of {LSE_MODES}, got {self.lse!r}")
        # Same constraints as SparseConfig (SGLang's): kernels start on block boundaries.
        if self.kernel_size % self.kernel_stride or self.block_size % self.kernel_stride:
            raise ValueError(f"InfLLMv2Settings.kernel_stride ({self.kernel_stride}) must divide kernel_size "
                             f"({self.kernel_size}) and block_size ({self.block_size})")
        if self.local_mode == "forced_in_topk" and self.topk < self.init_blocks + self.local_blocks:
            # Otherwise the top-k would drop forced blocks arbitrarily (ties at +inf), own block included.
            raise ValueError(f"InfLLMv2Settings.topk ({self.topk}) must cover the forced init + local blocks "
                             f"({self.init_blocks} + {self.local_blocks}) when local_mode='forced_in_topk'")

    @property
    def coarse_kernel_size(self) -> int:
        return 4 * self.kernel_size  # C2 (LSE approximation): not configurable, 4x (MINICPM4.md §3.2)

    @property
    def coarse_kernel_stride(self) -> int:
        return 4 * self.kernel_stride

    @property
    def window_blocks(self) -> int:
        """Blocks stage 2 attends on top of block_idx: the local set, or 0 when it is inside the top-k."""
        return self.local_blocks if self.local_mode == "separate_window" else 0

    @property
    def max_blocks(self) -> int:
        """Upper bound of distinct blocks a query attends (top-k + separate window)."""
        return self.topk + self.window_blocks

    def is_sparse(self, num_keys: int) -> bool:
        """The remote-code switch: sparse iff kv length >= dense_len (dense_len -1: always)."""
        return self.dense_len == -1 or num_keys >= self.dense_len


@dataclass(frozen=True)
class BudgetVariant:
    """How one public implementation turns sparse_config into (topk, local_blocks, local_mode)."""

    description: str
    local_mode: str
    # (sparse_config, W = window_size // block_size) -> (topk budget, local_blocks)
    resolve: Callable[[SparseConfig, int], tuple[int, int]]


# Worked numbers are for the README defaults (topk 64, window 2048 -> W = 32, init 1): init + scored + local.
BUDGET_VARIANTS: dict[str, BudgetVariant] = {
    # MiniCPM4 remote code (modeling_minicpm.py): topk=64 goes to the selector, local_blocks = W both to
    # the pooling kernel and as block_window_size to stage 2 (feature_infer-era kernels, see module doc).
    "hf": BudgetVariant("MiniCPM4 HF remote code: top-64 incl. sink + separate 32-block window = 1 + 63 + 32",
                        "separate_window", lambda c, w: (c.topk, w)),
    # InfLLM-V2 paper §4: one unified mask of 96 blocks, 1 init + 63 scored + 32 local.
    "paper": BudgetVariant("InfLLM-V2 paper: unified top-96 with 32 forced local blocks = 1 + 63 + 32",
                           "forced_in_topk", lambda c, w: (c.topk + w, w)),
    # infllmv2_cuda_impl main (training pooling), MiniCPM-SALA remote code, SGLang: topk + W, and the
    # pooling rule forces blocks q_b - W .. q_b (W + 1 blocks).
    "training": BudgetVariant("infllmv2_cuda_impl main / SALA / SGLang: top-96 with 33 forced local = 1 + 62 + 33",
                              "forced_in_topk", lambda c, w: (c.topk + w, w + 1)),
    # CPM.cu command line: --sparse-topk-k 64 (sink counted inside), --block-window-size 8 separate.
    "cpmcu": BudgetVariant("CPM.cu CLI: top-64 incl. sink + separate 8-block window = 1 + 63 + 8",
                           "separate_window", lambda c, w: (64, 8)),
    # CPM.cu Python LLM class defaults: sparse_topk_k 32, block_window_size 32.
    "cpmcu-class": BudgetVariant("CPM.cu LLM class: top-32 incl. sink + separate 32-block window = 1 + 31 + 32",
                                 "separate_window", lambda c, w: (32, 32)),
}


def settings_from_config(sparse: SparseConfig, variant: str = "hf", lse: str = "exact") -> InfLLMv2Settings:
    """Translate a checkpoint's sparse_config with a named budget variant (default: HF checkpoint behaviour).

    lse: "exact" as the MiniCPM4 remote code (compressed_v = compressed_k); CPM.cu's CLI uses "coarse".
    """
    if variant not in BUDGET_VARIANTS:
        raise ValueError(f"unknown InfLLM v2 budget variant {variant!r}; choose one of {sorted(BUDGET_VARIANTS)}")
    v = BUDGET_VARIANTS[variant]
    topk, local_blocks = v.resolve(sparse, sparse.window_size // sparse.block_size)
    return InfLLMv2Settings(
        kernel_size=sparse.kernel_size, kernel_stride=sparse.kernel_stride, block_size=sparse.block_size,
        init_blocks=sparse.init_blocks, topk=topk, local_blocks=local_blocks, local_mode=v.local_mode, lse=lse,
        use_nope=sparse.use_nope, dense_len=sparse.dense_len, variant=variant)

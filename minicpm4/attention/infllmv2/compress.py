"""InfLLM v2 compressed keys (MINICPM4.md §3.3 step 1): means of key windows, complete windows only.

C1 = kernels of 32 keys every 16 (selection), C2 = kernels of 128 every 64 (coarse LSE normaliser).
Only keys are compressed, never values.
"""

from __future__ import annotations

import torch


def num_windows(num_keys: int, kernel_size: int, kernel_stride: int) -> int:
    """Number of complete windows: (L - p) // s + 1, or 0 when L < p."""
    return 0 if num_keys < kernel_size else (num_keys - kernel_size) // kernel_stride + 1


def compress_keys(k: torch.Tensor, kernel_size: int, kernel_stride: int) -> torch.Tensor:
    """k [H, L, D] -> [H, n, D] in fp32, window j = mean(k[:, j*s : j*s + p])."""
    H, L, D = k.shape
    n = num_windows(L, kernel_size, kernel_stride)
    if n == 0:
        return k.new_zeros(H, 0, D, dtype=torch.float32)
    windows = k.float().unfold(1, kernel_size, kernel_stride)  # [H, n, D, p]
    return windows.mean(-1)

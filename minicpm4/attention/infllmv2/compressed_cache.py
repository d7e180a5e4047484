"""Incremental C1/C2 compressed-key caches for InfLLM v2 inference (MINICPM4.md §3.7).

C1 (kernel 32, stride 16) scores blocks; C2 (kernel 128, stride 64) gives the coarse LSE normaliser
and is kept only when the settings use it. Both are means of key windows (`compress.py`), maintained
independently, per layer and per batch row, in fp32 buffers preallocated for the cache length.

One rule covers prefill, chunked prefill, decode, crossing dense_len and draft verification:

    windows are a function of the key slots. A forward call that writes slots >= P (its first
    position) first drops every window that covers a slot >= P, then, when a sparse query needs
    them, computes the missing windows from the key slots < P + T.

- Tail buffers. §3.7 describes a tail of not-yet-compressed keys per cache: "append each new key;
  when the tail holds >= p keys emit mean(tail[:p]) and drop tail[:s]". Because the KV cache keeps
  slot == position, that tail is exactly the slot range K[n*s : L] (n = windows so far, L = keys
  written), so it is read from the key source instead of copied. Emitting "while tail >= p" is
  computing windows n .. num_windows(L) - 1. No copy means no second buffer to roll back.
- Bootstrap. Nothing is computed while every query of the layer is dense; the first sparse call
  computes all windows from slot 0 (the remote code compresses the whole cache when it crosses
  dense_len), later calls only the new ones.
- use_nope. Selection uses pre-RoPE keys, which the KV cache does not hold, so a pre-RoPE key cache of
  the KV cache's shape is written on every call from the first token on (§3.7: the bootstrap needs
  all of them) and is the key source instead of the KV cache.
- Verification (speculative decoding) and commit. Draft tokens go in as a multi-token call at
  positions P .. P+n-1 (a linear chain: slot == position leaves no room for siblings). Windows
  covering draft keys are computed for that call only; select_blocks shows a query at position i
  only windows whose last key is <= i, i.e. built from the query's own ancestors, so each draft gets
  exactly the selection sequential decoding would give it (greedy speculative decoding stays
  identical to plain decoding). The commit is the next call's position: the next call starts at
  P + accepted, and its write drops every window that touched a rejected slot before anything reads
  the state. So no rejected key ever reaches a query that is not its descendant, and there is no
  commit() to forget; `truncate(row, num_keys)` exists for callers that rewind without a forward.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from minicpm4.attention.infllmv2.compress import compress_keys, num_windows


@dataclass
class KernelCache:
    """Window means of one (kernel_size p, kernel_stride s) for every row of a batch.

    entries [B, Hkv, cap, D] fp32, cap = windows of a full cache. valid[b]: entries[b, :, :valid[b]]
    are the means of the keys now in the slots; beyond that the buffer is scratch. Python ints, so
    the bookkeeping never waits on the device.
    """

    kernel_size: int
    kernel_stride: int
    entries: torch.Tensor
    valid: list[int]

    @classmethod
    def allocate(cls, batch_size: int, num_kv_heads: int, max_seq_len: int, head_dim: int, kernel_size: int,
                 kernel_stride: int, device: torch.device | str) -> KernelCache:
        cap = num_windows(max_seq_len, kernel_size, kernel_stride)
        entries = torch.zeros(batch_size, num_kv_heads, cap, head_dim, dtype=torch.float32, device=device)
        return cls(kernel_size, kernel_stride, entries, [0] * batch_size)

    def truncate(self, row: int, num_keys: int) -> None:
        """Keep only windows made entirely of slots < num_keys (a write at num_keys is coming)."""
        self.valid[row] = min(self.valid[row], num_windows(num_keys, self.kernel_size, self.kernel_stride))

    def up_to(self, row: int, keys: torch.Tensor) -> torch.Tensor:
        """keys [Hkv, L, D]: slots 0 .. L-1 of this row's key source -> its windows [Hkv, n, D] fp32.

        Computes only windows valid[row] .. n-1, i.e. empties the implicit tail K[valid*s : L] of
        every complete window.
        """
        p, s = self.kernel_size, self.kernel_stride
        n = num_windows(keys.shape[1], p, s)
        first = self.valid[row]
        if n > first:
            # Windows first .. n-1 cover slots first*s .. (n-1)*s + p - 1.
            self.entries[row, :, first:n] = compress_keys(keys[:, first * s:(n - 1) * s + p], p, s)
            self.valid[row] = n
        return self.entries[row, :, :n]


@dataclass
class LayerCompressedKeys:
    """One layer's selection state: C1, optional C2, and (use_nope) the pre-RoPE key cache."""

    c1: KernelCache
    c2: KernelCache | None
    pre_rope_k: torch.Tensor | None  # [B, Hkv, S, D] in the KV cache dtype, slot == position

    def truncate(self, row: int, num_keys: int) -> None:
        self.c1.truncate(row, num_keys)
        if self.c2 is not None:
            self.c2.truncate(row, num_keys)

    def write_pre_rope(self, k: torch.Tensor, positions: torch.Tensor) -> None:
        """k [B, Hkv, T, D] pre-RoPE keys at positions [B, T] (same slots as StaticKVCache.update)."""
        assert self.pre_rope_k is not None
        B, T = positions.shape
        rows = torch.arange(B, device=positions.device)[:, None]
        self.pre_rope_k[rows, :, positions] = k.transpose(1, 2).to(self.pre_rope_k.dtype)  # view [B, T, Hkv, D]


@dataclass
class CompressedKeyCache:
    """Selection state of every layer, created lazily per layer. It lives beside the K/V it summarises
    (on `StaticKVCache.backend_state`), so it dies with the cache and a new cache starts empty."""

    batch_size: int
    num_kv_heads: int
    max_seq_len: int
    head_dim: int
    kernel_size: int
    kernel_stride: int
    coarse_kernel_size: int | None  # None: no C2 (exact LSE over C1)
    coarse_kernel_stride: int | None
    use_nope: bool
    layers: dict[int, LayerCompressedKeys] = field(default_factory=dict)

    def layer(self, layer_idx: int, device: torch.device, dtype: torch.dtype) -> LayerCompressedKeys:
        if layer_idx not in self.layers:
            shape = (self.batch_size, self.num_kv_heads, self.max_seq_len, self.head_dim)
            args = (self.batch_size, self.num_kv_heads, self.max_seq_len, self.head_dim)
            c1 = KernelCache.allocate(*args, self.kernel_size, self.kernel_stride, device)
            c2 = None if self.coarse_kernel_size is None else KernelCache.allocate(
                *args, self.coarse_kernel_size, self.coarse_kernel_stride, device)
            pre = torch.zeros(shape, dtype=dtype, device=device) if self.use_nope else None
            self.layers[layer_idx] = LayerCompressedKeys(c1, c2, pre)
        return self.layers[layer_idx]

    def truncate(self, row: int, num_keys: int) -> None:
        """Forget everything derived from slots >= num_keys of `row` in every layer (rewind, row reuse)."""
        for state in self.layers.values():
            state.truncate(row, num_keys)

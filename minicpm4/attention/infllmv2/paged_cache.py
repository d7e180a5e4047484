"""InfLLM v2 compressed keys (C1, optional C2) stored per KV page, next to the engine's paged K/V pools.

Layout. Per layer and kernel (size p, stride s), a pool entries [Hkv, num_blocks, B / s, D] fp32, B =
the page size = the sparse block size (head-major, so gathering a sequence's pages is one copy that is
already the [Hkv, n, D] selection layout). Window i (keys s*i .. s*i + p - 1) is stored at VIRTUAL index
e = i + p/s - 1, so that its LAST key s*(e + 1) - 1 lies in the page of e: page block_table[e // (B/s)],
slot e % (B/s). An entry therefore depends only on keys of its own page and the page before it
(p - s <= B), which makes a full page shared through the prefix cache carry valid entries for every
sequence that maps it. (Virtual entries below p/s - 1, the first of logical page 0, are no window:
they are padding, never read.)

Validity: per physical page a host int, `valid[page]`: entries 0 .. valid - 1 of the page are the
means of the keys now in their slots. Two rules keep that true without any hook into the block manager:

  1. Write rule (invalidate). Before a step reads anything, for every page a sequence writes at
     offsets >= o this step: valid = min(valid, o // s) (the entries whose last key is at an offset
     < o survive). A freshly (re)allocated page is always first written from offset 0 in the step it
     is handed out (the engine writes at positions >= num_computed_tokens, contiguously, and a page
     past the computed count is new), so it drops everything a previous owner left: no generation
     counter is needed. A page written from offset o > 0 is the sequence's own partially filled page
     (pages are shared only once full and computed), so its earlier entries are the sequence's own.
     An entry of page X that reads keys of the previous page Y is dropped whenever Y is rewritten:
     writes are a contiguous suffix, so a write into Y also writes X from offset 0.
  2. Lazy fill (compute). A sparse query that needs windows up to n first computes the missing
     entries of each page from the keys in the pages (one compress_keys over the missing slot range).

Together: an entry marked valid was computed after the last write of every key it covers, by a
sequence whose block table maps the same pages for those keys (or, for a prefix-cache hit, pages of
the same tokens at the same positions: the prefix cache's own premise). Rollback for verification is
the write rule again: the call that rewrites slots >= P drops every entry covering them first.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch

from minicpm4.attention.infllmv2.compress import compress_keys, num_windows


def gather_slots(pool: torch.Tensor, table: Sequence[int], lo: int, hi: int) -> torch.Tensor:
    """Key slots lo .. hi - 1 of one sequence: pool [NB, Hkv, B, D], table = its pages -> [Hkv, hi - lo, D]."""
    _, Hkv, B, D = pool.shape
    first, last = lo // B, (hi - 1) // B
    pages = torch.tensor(list(table[first:last + 1]), dtype=torch.long, device=pool.device)
    keys = pool[pages].transpose(0, 1).reshape(Hkv, (last - first + 1) * B, D)
    return keys[:, lo - first * B:hi - first * B]


@dataclass
class PagedKernelEntries:
    """The window means of one kernel (p, s) for every page of the pool (module docstring)."""

    kernel_size: int
    kernel_stride: int
    block_size: int
    entries: torch.Tensor  # [Hkv, NB, B // s, D] fp32
    valid: list[int]  # per physical page

    @classmethod
    def allocate(cls, num_blocks: int, num_kv_heads: int, block_size: int, head_dim: int, kernel_size: int,
                 kernel_stride: int, device: torch.device | str) -> PagedKernelEntries:
        if block_size % kernel_stride or kernel_size - kernel_stride > block_size:
            raise ValueError(f"compressed keys of kernel {kernel_size} / stride {kernel_stride} do not tile "
                             f"pages of {block_size} tokens")
        entries = torch.zeros(num_kv_heads, num_blocks, block_size // kernel_stride, head_dim, dtype=torch.float32,
                              device=device)
        return cls(kernel_size, kernel_stride, block_size, entries, [0] * num_blocks)

    @property
    def per_page(self) -> int:
        return self.block_size // self.kernel_stride

    @property
    def offset(self) -> int:
        """Virtual index of window 0 (= p/s - 1): the entry whose last key is slot p - 1."""
        return self.kernel_size // self.kernel_stride - 1

    def invalidate(self, page: int, first_offset: int) -> None:
        """Rule 1: slots first_offset .. B - 1 of `page` are about to be (re)written."""
        keep = first_offset // self.kernel_stride
        if self.valid[page] > keep:
            self.valid[page] = keep

    def ensure(self, pool: torch.Tensor, table: Sequence[int], num_keys: int) -> int:
        """Rule 2: compute the missing entries of the windows of keys 0 .. num_keys - 1 of the sequence with
        pages `table` (pool [NB, Hkv, B, D]). Returns n = num_windows(num_keys). Host ints only, except for
        the compute itself (in decode one new window every s tokens)."""
        p, s, r, off = self.kernel_size, self.kernel_stride, self.per_page, self.offset
        n = num_windows(num_keys, p, s)
        if n == 0:
            return 0
        end = n + off  # virtual entries 0 .. end - 1
        npages = -(-end // r)
        valid = self.valid
        first = end
        for idx in range(npages):  # the first missing virtual entry (pages before it are complete)
            have = valid[table[idx]]
            if have < min(r, end - idx * r):
                first = idx * r + have
                break
        if first < end:
            self._compute(pool, table, max(first, off), end)
            for idx in range(first // r, npages):
                page, need = table[idx], min(r, end - idx * r)
                if valid[page] < need:
                    valid[page] = need
        return n

    def gather(self, pages: torch.Tensor, n: int) -> torch.Tensor:
        """Windows 0 .. n - 1 read through block tables: pages [W] -> [Hkv, n, D], or [S, W] -> [Hkv, S, n, D]
        (n the longest; a shorter sequence's tail is whatever its pages hold: callers mask by position)."""
        r, off = self.per_page, self.offset
        Hkv, D = self.entries.shape[0], self.entries.shape[3]
        npages = -(-(n + off) // r)
        pages = pages[..., :npages].long()
        e = self.entries[:, pages]  # [Hkv, (S,) npages, r, D], contiguous
        return e.view(*e.shape[:-3], npages * r, D)[..., off:off + n, :]

    def up_to(self, pool: torch.Tensor, table: Sequence[int], num_keys: int,
              table_t: torch.Tensor | None = None) -> torch.Tensor:
        """Windows of keys 0 .. num_keys - 1 of the sequence with pages `table` -> [Hkv, n, D] fp32 (ensure +
        gather). table_t: the same pages as a tensor on the pool's device (saves a host-to-device copy)."""
        n = self.ensure(pool, table, num_keys)
        if n == 0:
            return self.entries.new_zeros(self.entries.shape[0], 0, self.entries.shape[3])
        if table_t is None:
            npages = -(-(n + self.offset) // self.per_page)
            table_t = torch.tensor(list(table[:npages]), dtype=torch.long, device=self.entries.device)
        return self.gather(table_t, n)

    def _compute(self, pool: torch.Tensor, table: Sequence[int], e0: int, e1: int) -> None:
        """Entries e0 .. e1 - 1 (virtual, >= offset) from the keys: windows e0 - off .. e1 - off - 1."""
        if e0 >= e1:
            return
        p, s, r, off = self.kernel_size, self.kernel_stride, self.per_page, self.offset
        i0, i1 = e0 - off, e1 - off  # windows i0 .. i1 - 1 cover slots i0*s .. (i1-1)*s + p - 1
        keys = gather_slots(pool, table, i0 * s, (i1 - 1) * s + p)
        means = compress_keys(keys, p, s)  # [Hkv, e1 - e0, D]
        dev = self.entries.device
        pages = torch.tensor([table[e // r] for e in range(e0, e1)], dtype=torch.long, device=dev)
        slots = torch.arange(e0, e1, device=dev) % r
        self.entries[:, pages, slots] = means  # [Hkv, n, D]


@dataclass
class PagedLayerKeys:
    c1: PagedKernelEntries
    c2: PagedKernelEntries | None  # only with the coarse LSE normaliser

    def kernels(self) -> list[PagedKernelEntries]:
        return [self.c1] if self.c2 is None else [self.c1, self.c2]

    def invalidate(self, writes: Sequence[tuple[int, int]]) -> None:
        for kc in self.kernels():
            for page, first_offset in writes:
                kc.invalidate(page, first_offset)


@dataclass
class PagedCompressedKeys:
    """Selection state of every layer of one PagedKVCache, created per layer on its first sparse query
    (until then nothing is valid, so nothing needs invalidating)."""

    num_blocks: int
    num_kv_heads: int
    block_size: int
    head_dim: int
    kernel_size: int
    kernel_stride: int
    coarse_kernel_size: int | None  # None: no C2
    coarse_kernel_stride: int | None
    layers: dict[int, PagedLayerKeys] = field(default_factory=dict)

    def layer(self, layer_idx: int, device: torch.device) -> PagedLayerKeys:
        if layer_idx not in self.layers:
            args = (self.num_blocks, self.num_kv_heads, self.block_size, self.head_dim)
            c1 = PagedKernelEntries.allocate(*args, self.kernel_size, self.kernel_stride, device)
            c2 = None if self.coarse_kernel_size is None else PagedKernelEntries.allocate(
                *args, self.coarse_kernel_size, self.coarse_kernel_stride, device)
            self.layers[layer_idx] = PagedLayerKeys(c1, c2)
        return self.layers[layer_idx]

    @property
    def bytes(self) -> int:
        return sum(kc.entries.numel() * 4 for st in self.layers.values() for kc in st.kernels())


def page_writes(tables: Sequence[Sequence[int]], query_lens: Sequence[int], context_lens: Sequence[int],
                block_size: int) -> list[tuple[int, int]]:
    """(page, first offset written) of every page a packed step writes: sequence s writes positions
    context_lens[s] - query_lens[s] .. context_lens[s] - 1 into its pages `tables[s]`."""
    out = []
    for table, T, L in zip(tables, query_lens, context_lens):
        if T <= 0:
            continue
        P = L - T
        for idx in range(P // block_size, -(-L // block_size)):
            out.append((table[idx], P - idx * block_size if idx == P // block_size else 0))
    return out

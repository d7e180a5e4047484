"""InfLLM v2 over the engine's paged KV cache: the sparse counterpart of attention/paged.py's PagedAttention.

The runner builds it with `make_paged_infllmv2_backend(config)` when the model config has a
sparse_config, and calls `attend(layer_idx, q [N, Hq, D], k [N, Hkv, D], v [N, Hkv, D], batch)` with
post-RoPE q/k of one packed step (PagedBatch). One InfLLM block is one KV page (the page size must
equal sparse block_size: `check_page_size`), so a logical block id maps to a page through the block table.

Per call:
  1. write the step's K/V into the pools (as PagedAttention), and apply the write rule to the layer's
     paged compressed keys (paged_cache.py: entries covering a rewritten slot are dropped first);
  2. split every sequence's rows into dense ones (kv length position + 1 < dense_len, exactly as
     backend.py decides per query) and sparse ones; all dense rows of the step go through one
     paged_attention call (the dense engine path);
  3. selection (stage 1) from the paged C1 (and C2 for lse="coarse"), brought up to date from the pages
     first and gathered through the block table: all decode rows of the step (one sparse query of its
     sequence) together, each with its own compressed keys (select_blocks' per-query form, padded), and
     every multi-query sequence on its own. Block ids are logical;
  4. stage 2 for every sparse row of the step in ONE in-place pass (impl "auto"): the attended logical
     blocks go through the block table to pages, and query t of KV head h becomes a one-query
     pseudo-sequence whose block table is its attended pages (ascending; every one full but its own block,
     which is last), run through the dense paged_attention (its CPU kernel reads the pages in place; on
     a GPU its torch path gathers only the attended blocks, in chunks). Nothing of size L is copied.

Other impls, kept as cross-checks (tests/engine/test_engine_infllmv2.py runs each against the reference
generate()): "kernel" = the InfLLM v2 CPU
kernel's row entry point (cpu_kernel.stage2_forward_rows: the kernel and per-token lists the reference
decode uses, bitwise equal to it) for sequences with < CONVERT_WHOLE_MIN_QUERIES sparse rows; "torch" =
a torch gather of the attended blocks for those; longer chunks of both, and every sequence of
"gather", gather the sequence's K/V [Hkv, L, D] and call sparse_attention (the reference path). Measured
on the 2-core dev box, 8B head shapes (Hq 32, Hkv 2, D 128, bf16, top-64 + 32-block window), one
layer: decode of 16 sequences at 8K: auto 43-82 ms, kernel 72-128 ms, gather 148-333 ms, dense paged
28-68 ms (the box's load varied between runs); a 256-query chunk at 16K: auto 433 ms, gather 1172 ms,
dense 1245 ms; 512 queries at 32K: auto 771 ms, gather 1836 ms, dense 3890 ms.

Queries must sit at consecutive positions context_len - query_len .. context_len - 1 of their sequence
(prefill chunks and decode; what the runner builds). Draft-tree rows, whose positions are not slots, go
through speculative/tree_sparse.py instead (the tree's root is an ordinary decode row here).
use_nope (selection with pre-RoPE q/k) is not supported: MiniCPM4 checkpoints
have use_nope false.
"""

from __future__ import annotations

import math
import weakref

import torch

from minicpm4.attention.infllmv2 import cpu_kernel
from minicpm4.attention.infllmv2.blocksparse import CONVERT_WHOLE_MIN_QUERIES, attended_blocks
from minicpm4.attention.infllmv2.paged_cache import PagedCompressedKeys, PagedLayerKeys, gather_slots, page_writes
from minicpm4.attention.infllmv2.selection import select_blocks
from minicpm4.attention.infllmv2.settings import InfLLMv2Settings, settings_from_config
from minicpm4.attention.infllmv2.sparse_attention import sparse_attention
from minicpm4.attention.paged import PagedAttention, PagedBatch, PagedKVCache
from minicpm4.config import MiniCPMConfig

IMPLS = ("auto", "paged", "kernel", "torch", "gather")
# The torch in-place path gathers [Hkv, T, NB, B, D] attended keys per chunk of queries: bound its size.
TORCH_GATHER_ELEMENTS = 1 << 24


def check_page_size(settings: InfLLMv2Settings | MiniCPMConfig, block_size: int) -> None:
    """ValueError unless the engine's KV page size equals the InfLLM v2 block size (one block = one page)."""
    if isinstance(settings, MiniCPMConfig):
        if settings.sparse_config is None:
            return
        sparse_block = settings.sparse_config.block_size
    else:
        sparse_block = settings.block_size
    if block_size != sparse_block:
        raise ValueError(f"EngineConfig.block_size ({block_size}) must equal the InfLLM v2 sparse_config.block_size "
                         f"({sparse_block}) for a sparse model: one attention block is one KV page")


def _table_rows(batch: PagedBatch) -> list[list[int]]:
    host = getattr(batch, "block_tables_host", None)
    return host if host is not None else batch.block_tables.tolist()


class _Step:
    """What every layer of one packed step shares, computed once (the same PagedBatch object is handed
    to each layer): host block tables, the pages written and from which offset, the dense/sparse split."""

    def __init__(self, batch: PagedBatch, settings: InfLLMv2Settings) -> None:
        self.batch = batch
        B = batch.cache.block_size
        qlens, ctx = batch.query_lens_host, batch.context_lens_host
        self.tables = _table_rows(batch)
        self.writes = page_writes(self.tables, qlens, ctx, B)
        first_sparse = max(settings.dense_len - 1, 0)  # position i is sparse iff i + 1 >= dense_len
        self.dense_rows: list[int] = []  # packed row indices of every dense query
        self.dense_seqs: list[tuple[int, int, int]] = []  # (sequence, dense rows, context of its last dense row)
        self.sparse_seqs: list[tuple[int, int, int]] = []  # (sequence, first sparse row, number of sparse rows)
        start = 0
        for s, (T, L) in enumerate(zip(qlens, ctx)):
            P = L - T
            d = min(max(first_sparse - P, 0), T)
            if d:
                self.dense_rows.extend(range(start, start + d))
                self.dense_seqs.append((s, d, P + d))
            if T - d:
                self.sparse_seqs.append((s, start + d, T - d))
            start += T
        if batch.positions.device.type == "cpu":  # the consecutive-positions contract (module docstring)
            expected = [p for T, L in zip(qlens, ctx) for p in range(L - T, L)]
            assert batch.positions.tolist() == expected, \
                "paged InfLLM v2 needs each sequence's queries at positions context_len - query_len .. context_len - 1"


class PagedInfLLMv2Attention(PagedAttention):
    """The paged InfLLM v2 backend (module docstring). impl: "auto" = "paged" (stage 2 in place for every row,
    as pseudo-sequences through paged_attention), "kernel" / "torch" (in place for sequences with few sparse
    rows through the InfLLM v2 CPU kernel / a torch gather of the attended blocks), "gather" (always gather
    the sequence's K/V and call sparse_attention: the simplest path, one sequence at a time)."""

    needs_pre_rope = False

    def __init__(self, settings: InfLLMv2Settings, impl: str = "auto") -> None:
        if settings.use_nope:
            raise NotImplementedError("InfLLM v2 with use_nope (selection with pre-RoPE q/k) is not supported by the "
                                      "engine's paged backend; MiniCPM4 checkpoints have use_nope false")
        if impl not in IMPLS:
            raise ValueError(f"paged InfLLM v2 impl must be one of {IMPLS}, got {impl!r}")
        self.settings = settings
        self.impl = impl
        self._states: weakref.WeakKeyDictionary[PagedKVCache, PagedCompressedKeys] = weakref.WeakKeyDictionary()
        self._step: _Step | None = None

    # ---- state ----------------------------------------------------------------------------------------
    def state(self, cache: PagedKVCache) -> PagedCompressedKeys:
        st = self._states.get(cache)
        if st is None:
            check_page_size(self.settings, cache.block_size)
            s, k = self.settings, cache.k[0]
            coarse = s.lse == "coarse"
            st = PagedCompressedKeys(
                num_blocks=cache.num_blocks, num_kv_heads=k.shape[1], block_size=cache.block_size, head_dim=k.shape[3],
                kernel_size=s.kernel_size, kernel_stride=s.kernel_stride,
                coarse_kernel_size=s.coarse_kernel_size if coarse else None,
                coarse_kernel_stride=s.coarse_kernel_stride if coarse else None)
            self._states[cache] = st
        return st

    def invalidate_pages(self, cache: PagedKVCache, pages: list[int]) -> None:
        """Drop every compressed entry of `pages` in every layer. Not needed by the engine as it is (the write
        rule covers reallocation, paged_cache.py); for a caller that changes page contents outside attend()
        (page copy or compaction), or as a BlockManager allocation hook."""
        st = self._states.get(cache)
        if st is not None:
            for layer in st.layers.values():
                layer.invalidate([(page, 0) for page in pages])

    def note_external_writes(self, cache: PagedKVCache, writes: list[tuple[int, int]]) -> None:
        """(page, first offset) pairs written outside attend() (speculative decoding's accepted draft K/V,
        speculative/tree_attention.py): the write rule drops the compressed entries that covered them."""
        st = self._states.get(cache)
        if st is not None:
            for layer in st.layers.values():
                layer.invalidate(writes)

    def step_info(self, batch: PagedBatch) -> _Step:
        if self._step is None or self._step.batch is not batch:
            self._step = _Step(batch, self.settings)
        return self._step

    # ---- the seam --------------------------------------------------------------------------------------
    def attend(self, layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               batch: PagedBatch) -> torch.Tensor:
        """q [N, Hq, D], k/v [N, Hkv, D] (post-RoPE) -> [N, Hq, D]."""
        from minicpm4.attention.paged_attention import paged_attention, write_kv

        cache = batch.cache
        st = self.state(cache)
        step = self.step_info(batch)
        k_pool, v_pool = cache.k[layer_idx], cache.v[layer_idx]
        layer = st.layers.get(layer_idx)
        if layer is not None:  # write rule before anything reads (paged_cache.py)
            layer.invalidate(step.writes)
        write_kv(k_pool, v_pool, k, v, batch.slot_mapping)
        q = q.contiguous()
        if not step.sparse_seqs:
            return paged_attention(q, k_pool, v_pool, batch.block_tables, batch.query_start_loc, batch.context_lens,
                                   batch.positions)
        out = torch.empty_like(q)
        if step.dense_rows:
            rows = torch.tensor(step.dense_rows, dtype=torch.long, device=q.device)
            seqs = torch.tensor([s for s, _, _ in step.dense_seqs], dtype=torch.long, device=q.device)
            qsl = [0]
            for _, d, _ in step.dense_seqs:
                qsl.append(qsl[-1] + d)
            out[rows] = paged_attention(q[rows], k_pool, v_pool, batch.block_tables[seqs], qsl,
                                        [L for _, _, L in step.dense_seqs], batch.positions[rows])
        if layer is None:
            layer = st.layer(layer_idx, q.device)
        self.attend_sparse(layer, q, k_pool, v_pool, batch, step, out)
        return out

    def attend_sparse(self, layer: PagedLayerKeys, q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor,
                      batch: PagedBatch, step: _Step, out: torch.Tensor) -> None:
        s = self.settings
        ctx = batch.context_lens_host
        inplace = []  # (rows [T], positions [T], logical block lists [Hkv, T, NB], block table of each row [T, W])
        # Decode rows (one sparse query of its sequence) are selected together, each with its own compressed
        # keys (select_blocks' per-query form): one pass of torch ops for the whole step instead of one per row.
        decode = [(seq, a) for seq, a, T in step.sparse_seqs if T == 1 and self.impl != "gather"]
        if decode:
            seqs = torch.tensor([seq for seq, _ in decode], dtype=torch.long, device=q.device)
            rows = torch.tensor([a for _, a in decode], dtype=torch.long, device=q.device)
            tables = batch.block_tables[seqs]  # [S', W]
            c1, c2 = (None if kc is None else kc.gather(tables, max([kc.ensure(k_pool, step.tables[seq], ctx[seq])
                                                                      for seq, _ in decode]))
                      for kc in (layer.c1, layer.c2))
            positions = batch.positions[rows]
            block_idx = select_blocks(q[rows].transpose(0, 1), c1, c2, positions, max(ctx[seq] for seq, _ in decode), s)
            inplace.append((rows, positions, attended_blocks(positions, block_idx, s), tables))
        for seq, a, T in step.sparse_seqs:
            if T == 1 and decode:
                continue
            L, table, table_t = ctx[seq], step.tables[seq], batch.block_tables[seq]
            positions = batch.positions[a:a + T]
            q_s = q[a:a + T].transpose(0, 1)  # [Hq, T, D]
            c1 = layer.c1.up_to(k_pool, table, L, table_t)
            c2 = None if layer.c2 is None else layer.c2.up_to(k_pool, table, L, table_t)
            block_idx = select_blocks(q_s, c1, c2, positions, L, s)  # [Hkv, T, K] logical block ids
            if self.in_place(T):
                rows = torch.arange(a, a + T, device=q.device)
                inplace.append((rows, positions, attended_blocks(positions, block_idx, s), table_t[None].expand(T, -1)))
            else:  # long chunk: one gather of the sequence's K/V, the reference prefill path
                k_s = gather_slots(k_pool, table, 0, L)
                v_s = gather_slots(v_pool, table, 0, L)
                out[a:a + T] = sparse_attention(q_s, k_s, v_s, positions, block_idx, s).transpose(0, 1)
        if not inplace:
            return
        # Every in-place row of the step in one stage-2 call: logical block lists -> pages through the block tables.
        B, Hkv = s.block_size, k_pool.shape[1]
        NB = max(lists.shape[-1] for _, _, lists, _ in inplace)
        pages, cnts = [], []
        for rows, positions, lists, tables in inplace:
            lists = torch.nn.functional.pad(lists, (0, NB - lists.shape[-1]), value=-1)
            valid = lists >= 0
            cnts.append(torch.where(valid, (positions[None, :, None] + 1 - lists * B).clamp(max=B), 0))
            page = torch.gather(tables.long()[None].expand(Hkv, -1, -1), 2, lists.clamp(min=0))
            pages.append(torch.where(valid, page, 0))
        rows_t = torch.cat([rows for rows, _, _, _ in inplace])
        page = torch.cat(pages, dim=1)  # [Hkv, T_all, NB] physical pages
        cnt = torch.cat(cnts, dim=1).int()
        out[rows_t] = self.stage2_in_place(q[rows_t], k_pool, v_pool, page, cnt)

    def in_place(self, num_queries: int) -> bool:
        """Whether a sequence's sparse rows read the attended pages in place (else: gather its K/V)."""
        if self.impl == "gather":
            return False
        return self.impl in ("auto", "paged") or num_queries < CONVERT_WHOLE_MIN_QUERIES

    def stage2_in_place(self, q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor, page: torch.Tensor,
                        cnt: torch.Tensor) -> torch.Tensor:
        """q [T, Hq, D]; page / cnt [Hkv, T, NB]: physical page and key count (from the page start) of every
        attended block (cnt 0: skipped) -> [T, Hq, D] in q's dtype."""
        if self.impl in ("auto", "paged"):
            return self._stage2_paged(q, k_pool, v_pool, page, cnt)
        T, Hq, D = q.shape
        NBLK, Hkv, B, _ = k_pool.shape
        G = Hq // Hkv
        qs = (q.float() * (1.0 / math.sqrt(D))).view(T, Hkv, G, D).transpose(0, 1)  # [Hkv, T, G, D]
        if self.impl == "kernel":
            if not (cpu_kernel.supports(q, k_pool, B) and k_pool.dtype in (torch.float32, torch.bfloat16)):
                raise RuntimeError("the InfLLM v2 CPU kernel does not apply here (not built, or not CPU fp32/bf16)")
            head = torch.arange(Hkv, device=q.device)[:, None, None]
            row0 = (page * Hkv + head) * B  # first row of (page, head) in the pool's [NB * Hkv * B, D] view
            o, _ = cpu_kernel.stage2_forward_rows(qs, k_pool, v_pool, row0, cnt, B)  # pools are contiguous
            return o.view(Hkv, T, G, D).transpose(0, 1).reshape(T, Hq, D).to(q.dtype)
        return self._stage2_torch(qs, k_pool, v_pool, page, cnt).to(q.dtype)

    @staticmethod
    def _stage2_paged(q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor, page: torch.Tensor,
                      cnt: torch.Tensor) -> torch.Tensor:
        """Stage 2 as dense paged attention over pseudo-sequences: for KV head h, query t is a sequence of one
        query whose block table is its attended pages (ascending; every block but its own is full and its own
        block is the last), so its keys are exactly the attended keys and all of them are visible."""
        from minicpm4.attention import paged_kernel
        from minicpm4.attention.paged_attention import paged_attention

        T, Hq, D = q.shape
        _, Hkv, B, _ = k_pool.shape
        NB = page.shape[-1]
        G = Hq // Hkv
        out = torch.empty_like(q)
        ctx = cnt.sum(-1).to(torch.int32)  # [Hkv, T] attended keys
        tables = page.to(torch.int32)
        # The kernel walks the tables in place; the torch fallback (GPU) gathers [rows, NB * B, D] per call.
        chunk = T if paged_kernel.supports(q, k_pool) else max(1, TORCH_GATHER_ELEMENTS // (NB * B * D))
        for h in range(Hkv):
            kh, vh = k_pool[:, h:h + 1], v_pool[:, h:h + 1]  # [NB, 1, B, D] views: each page tile stays contiguous
            for t0 in range(0, T, chunk):
                t1 = min(T, t0 + chunk)
                c = ctx[h, t0:t1].contiguous()
                qsl = torch.arange(t1 - t0 + 1, dtype=torch.int32, device=q.device)
                out[t0:t1, h * G:(h + 1) * G] = paged_attention(q[t0:t1, h * G:(h + 1) * G], kh, vh,
                                                                tables[h, t0:t1].contiguous(), qsl, c, (c - 1).long())
        return out

    @staticmethod
    def _stage2_torch(qs: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor, page: torch.Tensor,
                      cnt: torch.Tensor) -> torch.Tensor:
        """Torch in-place path: gather only the attended blocks. qs [Hkv, T, G, D] fp32 pre-scaled -> [T, Hq, D] fp32."""
        Hkv, T, G, D = qs.shape
        NBLK, _, B, _ = k_pool.shape
        NB = page.shape[-1]
        kv_k = k_pool.view(NBLK * Hkv, B, D)
        kv_v = v_pool.view(NBLK * Hkv, B, D)
        idx = page * Hkv + torch.arange(Hkv, device=qs.device)[:, None, None]  # [Hkv, T, NB]
        out = qs.new_empty(Hkv, T, G, D)
        chunk = max(1, TORCH_GATHER_ELEMENTS // max(1, Hkv * NB * B * D))
        key = torch.arange(B, device=qs.device)
        for t0 in range(0, T, chunk):
            t1 = min(T, t0 + chunk)
            kb = kv_k[idx[:, t0:t1]].float().reshape(Hkv, t1 - t0, NB * B, D)
            vb = kv_v[idx[:, t0:t1]].float().reshape(Hkv, t1 - t0, NB * B, D)
            mask = (key < cnt[:, t0:t1, :, None]).reshape(Hkv, t1 - t0, NB * B)  # [Hkv, t, NB*B]
            scores = torch.matmul(qs[:, t0:t1], kb.transpose(-1, -2))  # [Hkv, t, G, NB*B]
            scores = scores.masked_fill(~mask[:, :, None], float("-inf"))
            probs = scores.softmax(-1).nan_to_num(0.0)
            out[:, t0:t1] = torch.matmul(probs, vb)
        return out.transpose(0, 1).reshape(T, Hkv * G, D)


def make_paged_infllmv2_backend(config: MiniCPMConfig, block_size: int | None = None,
                                impl: str = "auto") -> PagedInfLLMv2Attention:
    """The engine's InfLLM v2 backend, with the same settings as the reference backend
    (backend.make_infllmv2_backend: sparse_config plus its optional "variant" / "lse" extra keys).
    block_size: the engine's page size, checked here when given (else on the first call)."""
    sparse = config.sparse_config
    if sparse is None:
        raise ValueError("make_paged_infllmv2_backend: the model config has no sparse_config")
    settings = settings_from_config(sparse, variant=sparse.extra.get("variant", "hf"), lse=sparse.extra.get("lse", "exact"))
    if block_size is not None:
        check_page_size(settings, block_size)
    return PagedInfLLMv2Attention(settings, impl=impl)

"""InfLLM v2 stage 2, fast path in plain PyTorch (CPU and CUDA), forward and backward.

Same contract as `sparse_attention_reference` (sparse_attention.py): query t attends the keys of the
blocks in block_idx[h, t] UNION its local window, causally. Instead of a dense [Hq, T, L] mask, the
queries are cut into chunks of tokens that share a query block q_b (at most `rows` tokens each), and
every chunk attends two key sets:

  region A  the contiguous keys of blocks q_b - local_blocks + 1 .. q_b (up to the chunk's last
            position), shared by the chunk: ONE matmul with the G query heads x Tc tokens as rows.
            separate_window: all of it (causal); forced_in_topk: the blocks of it that are in block_idx.
  region B  the remaining block_idx entries (all wholly in the past, no causal mask): gathered per
            token into [Tc, KB*B, D] and multiplied per token (batched matmul, G heads as rows: the
            CUDA kernel's layout, MINICPM4.md §3.3 step 4).

One softmax spans A and B. The forward returns the log-sum-exp per row, and the backward recomputes
the probabilities chunk by chunk (FlashAttention's recipe), so memory stays O(chunk), never O(T x L).
Gradients of gathered blocks are scattered back with index_add_.

The bottom of this file prepares the optional CPU kernel (cpu_kernel.py): `attended_blocks` turns
block_idx + window into one sorted block list per token, `kernel_forward` lays K/V out as fp32 blocks
and calls it. The kernel needs no gather copies and is the default forward on CPU (measured ~2x faster
than the gather path here: benchmarks/infllmv2_layer.py --impls auto,torch); the backward below serves
both forwards, since they return the same log-sum-exp.

bf16/fp16 on CPU compute in fp32: PyTorch's CPU bf16 matmul is 10-100x slower than fp32 on machines
without AVX512-BF16 (measured on the 2-core AMD EPYC dev box: 0.4 vs 16 GFLOP/s per core at 1024^3).
"""

from __future__ import annotations

import math

import torch

from minicpm4.attention.infllmv2.settings import InfLLMv2Settings

# Tokens per chunk: bounds the gathered region-B keys+values to ~rows * K * B * D * 8 bytes in fp32
# (8 rows, 63 blocks of 64 x 128: 33 MB). Larger chunks make region A a bigger matmul.
DEFAULT_ROWS = 8
# Convert all of K/V to the compute dtype once when at least this many queries will reuse them;
# below (decode) only the touched slices and gathered blocks are converted.
CONVERT_WHOLE_MIN_QUERIES = 64


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    if x.device.type == "cpu" and x.dtype in (torch.bfloat16, torch.float16):
        return torch.float32
    return x.dtype


def query_chunks(positions: torch.Tensor, block_size: int, rows: int) -> tuple[torch.Tensor | None, list[tuple[int, int]]]:
    """Order the queries by position and cut them into runs that share a query block, <= rows each.

    Returns (order or None when already sorted, [(start, end)] into the ordered queries).
    """
    T = positions.shape[0]
    order = None
    if T > 1 and not bool((positions[1:] >= positions[:-1]).all()):
        order = torch.argsort(positions, stable=True)
        positions = positions[order]
    qb = positions // block_size
    _, counts = torch.unique_consecutive(qb, return_counts=True)
    spans, start = [], 0
    for c in counts.tolist():
        for s0 in range(start, start + c, rows):
            spans.append((s0, min(s0 + rows, start + c)))
        start += c
    return order, spans


class _Chunk:
    """Key sets of one chunk of queries (module docstring). Shapes for Tc tokens and Hkv heads."""

    def __init__(self, positions: torch.Tensor, block_idx: torch.Tensor, num_keys: int, s: InfLLMv2Settings):
        B = s.block_size
        Hkv, Tc, K = block_idx.shape
        dev = positions.device
        qb = int(positions[0]) // B
        first = max(0, qb - s.local_blocks + 1)
        self.a0, self.a1 = first * B, min(num_keys, int(positions.max()) + 1)
        keys = torch.arange(self.a0, self.a1, device=dev)
        allow = (keys[None, :] <= positions[:, None])[None]  # [1, Tc, nA] causal
        in_local = (block_idx >= first) & (block_idx <= qb)  # [Hkv, Tc, K]
        if s.window_blocks == 0 or bool(in_local.any()):
            # Membership of region-A blocks in block_idx (always the case for forced_in_topk).
            member = torch.zeros(Hkv, Tc, qb - first + 2, dtype=torch.bool, device=dev)
            member.scatter_(2, torch.where(in_local, block_idx - first, qb - first + 1), True)
            member = member[..., :-1].repeat_interleave(B, dim=2)[..., : self.a1 - self.a0]
            if s.window_blocks:
                member = member | (keys >= (qb - s.window_blocks + 1) * B)[None, None]
            allow = allow & member
        self.allow_a = allow  # [1 or Hkv, Tc, nA]
        # Region B: valid ids before the local blocks, deduplicated, compacted to the left.
        big = 1 << 62
        ids = torch.where((block_idx >= 0) & (block_idx < first), block_idx, big).sort(-1).values
        if K > 1:
            dup = torch.cat([torch.zeros_like(ids[..., :1], dtype=torch.bool), ids[..., 1:] == ids[..., :-1]], -1)
            if bool((dup & (ids != big)).any()):
                ids = ids.masked_fill(dup, big).sort(-1).values
        kb = int((ids != big).sum(-1).max()) if K else 0
        ids = ids[..., :kb]
        self.mask_b = ids != big  # [Hkv, Tc, KB]
        self.ids_b = ids.masked_fill(~self.mask_b, 0)  # dummy block 0 where empty (probability 0)


def _scores(qs: torch.Tensor, kc: torch.Tensor, kblk: torch.Tensor, c: _Chunk, cdt: torch.dtype):
    """qs [Hkv, Tc, G, D] (scaled) -> masked fp32 scores sA [Hkv, Tc, G, nA], sB [Hkv, Tc, G, KB*B] and the
    region keys kA [Hkv, nA, D], kB [Hkv, Tc, KB*B, D] in the compute dtype."""
    Hkv, Tc, G, D = qs.shape
    kA = kc[:, c.a0:c.a1].to(cdt)
    sA = torch.matmul(qs.reshape(Hkv, Tc * G, D), kA.transpose(1, 2)).float().view(Hkv, Tc, G, -1)
    sA.masked_fill_(~c.allow_a[:, :, None, :], float("-inf"))
    heads = torch.arange(Hkv, device=qs.device)[:, None, None]
    kB = kblk[heads, c.ids_b].to(cdt).flatten(2, 3)  # [Hkv, Tc, KB*B, D]
    sB = torch.matmul(qs, kB.transpose(-1, -2)).float()  # [Hkv, Tc, G, KB*B]
    B = kblk.shape[2]
    sB.view(Hkv, Tc, G, -1, B).masked_fill_(~c.mask_b[:, :, None, :, None], float("-inf"))
    return sA, sB, kA, kB


def _prepare(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, s: InfLLMv2Settings):
    Hq, T, D = q.shape
    Hkv, L, _ = k.shape
    if Hq % Hkv:
        raise ValueError(f"query heads ({Hq}) must be a multiple of KV heads ({Hkv})")
    cdt = compute_dtype(q)
    if T >= CONVERT_WHOLE_MIN_QUERIES:
        k, v = k.to(cdt), v.to(cdt)
    nfull = L // s.block_size
    kblk = k[:, : nfull * s.block_size].unflatten(1, (nfull, s.block_size))  # [Hkv, nfull, B, D] (a view)
    vblk = v[:, : nfull * s.block_size].unflatten(1, (nfull, s.block_size))
    return cdt, k, v, kblk, vblk


def _chunk_queries(x: torch.Tensor, rows: torch.Tensor | slice, Hkv: int, cdt: torch.dtype) -> torch.Tensor:
    """[Hq, T, D] -> rows of one chunk as [Hkv, Tc, G, D] (contiguous, compute dtype)."""
    xs = x[:, rows]
    Hq, Tc, D = xs.shape
    return xs.to(cdt).view(Hkv, Hq // Hkv, Tc, D).transpose(1, 2).contiguous()


def _rows(order: torch.Tensor | None, a: int, b: int):
    return slice(a, b) if order is None else order[a:b]


def blocksparse_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor,
                        block_idx: torch.Tensor, settings: InfLLMv2Settings, rows: int | None = None
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (out [Hq, T, D] in q.dtype, lse [Hkv, T, G] fp32; +inf where a row attends nothing)."""
    rows = rows or DEFAULT_ROWS
    Hq, T, D = q.shape
    Hkv, L, _ = k.shape
    G = Hq // Hkv
    cdt, kc, vc, kblk, vblk = _prepare(q, k, v, settings)
    scale = 1.0 / math.sqrt(D)
    out = q.new_empty(Hq, T, D)
    lse = torch.empty(Hkv, T, G, dtype=torch.float32, device=q.device)
    order, spans = query_chunks(positions, settings.block_size, rows)
    heads = torch.arange(Hkv, device=q.device)[:, None, None]
    for a, b in spans:
        r = _rows(order, a, b)
        c = _Chunk(positions[r], block_idx[:, r], L, settings)
        qs = _chunk_queries(q, r, Hkv, cdt) * scale  # [Hkv, Tc, G, D]
        sA, sB, _, _ = _scores(qs, kc, kblk, c, cdt)
        m = torch.maximum(sA.amax(-1), sB.amax(-1)) if sB.shape[-1] else sA.amax(-1)  # [Hkv, Tc, G]
        m = m.masked_fill(m == float("-inf"), 0.0)
        pA = sA.sub_(m[..., None]).exp_()
        pB = sB.sub_(m[..., None]).exp_()
        l = pA.sum(-1) + pB.sum(-1)
        Tc = qs.shape[1]
        o = torch.matmul(pA.to(cdt).view(Hkv, Tc * G, -1), vc[:, c.a0:c.a1].to(cdt)).view(Hkv, Tc, G, D).float()
        if pB.shape[-1]:
            vB = vblk[heads, c.ids_b].to(cdt).flatten(2, 3)
            o += torch.matmul(pB.to(cdt), vB).float()
        o = o / l.clamp_min(1e-30)[..., None]  # a row with nothing allowed has l = 0 and o = 0
        out[:, r] = o.transpose(1, 2).reshape(Hq, Tc, D).to(q.dtype)
        lse[:, r] = torch.where(l > 0, m + l.log(), float("inf"))
    return out, lse


def blocksparse_backward(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                         lse: torch.Tensor, positions: torch.Tensor, block_idx: torch.Tensor,
                         settings: InfLLMv2Settings, rows: int | None = None):
    """Gradients (dq, dk, dv) of blocksparse_forward, recomputing probabilities per chunk."""
    rows = rows or DEFAULT_ROWS
    Hq, T, D = q.shape
    Hkv, L, _ = k.shape
    G, B = Hq // Hkv, settings.block_size
    cdt, kc, vc, kblk, vblk = _prepare(q, k, v, settings)
    scale = 1.0 / math.sqrt(D)
    nblk = -(-L // B)
    dq = torch.zeros(Hq, T, D, dtype=torch.float32, device=q.device)
    # Padded to whole blocks so that [Hkv * nblk, B, D] is a view: the index_add_ target of region B.
    dk = torch.zeros(Hkv, nblk * B, D, dtype=torch.float32, device=q.device)
    dv = torch.zeros(Hkv, nblk * B, D, dtype=torch.float32, device=q.device)
    dk_blk, dv_blk = dk.view(Hkv * nblk, B, D), dv.view(Hkv * nblk, B, D)
    order, spans = query_chunks(positions, B, rows)
    heads = torch.arange(Hkv, device=q.device)[:, None, None]
    for a, b in spans:
        r = _rows(order, a, b)
        c = _Chunk(positions[r], block_idx[:, r], L, settings)
        qs = _chunk_queries(q, r, Hkv, cdt) * scale
        Tc = qs.shape[1]
        do = _chunk_queries(dout, r, Hkv, torch.float32)  # [Hkv, Tc, G, D]
        o = _chunk_queries(out, r, Hkv, torch.float32)
        delta = (do * o).sum(-1, keepdim=True)  # [Hkv, Tc, G, 1]
        sA, sB, kA, kB = _scores(qs, kc, kblk, c, cdt)
        row_lse = lse[:, r][..., None]
        pA, pB = sA.sub_(row_lse).exp_(), sB.sub_(row_lse).exp_()
        vA = vc[:, c.a0:c.a1].to(cdt)
        doc = do.to(cdt)
        # region A (contiguous keys): rows = (token, head) pairs
        pA2, do2 = pA.view(Hkv, Tc * G, -1), doc.view(Hkv, Tc * G, D)
        dv[:, c.a0:c.a1] += torch.matmul(pA2.to(cdt).transpose(1, 2), do2).float()
        dsA = pA2 * (torch.matmul(do2, vA.transpose(1, 2)).float() - delta.view(Hkv, Tc * G, 1))
        dqc = torch.matmul(dsA.to(cdt), kA).float().view(Hkv, Tc, G, D)
        dk[:, c.a0:c.a1] += torch.matmul(dsA.to(cdt).transpose(1, 2), qs.reshape(Hkv, Tc * G, D)).float()
        # region B (gathered blocks): per token
        if pB.shape[-1]:
            vB = vblk[heads, c.ids_b].to(cdt).flatten(2, 3)  # [Hkv, Tc, KB*B, D]
            flat = (c.ids_b + torch.arange(Hkv, device=q.device)[:, None, None] * nblk).reshape(-1)
            dv_blk.index_add_(0, flat, torch.matmul(pB.to(cdt).transpose(-1, -2), doc).float().view(-1, B, D))
            dsB = pB * (torch.matmul(doc, vB.transpose(-1, -2)).float() - delta)
            dqc += torch.matmul(dsB.to(cdt), kB).float()
            dk_blk.index_add_(0, flat, torch.matmul(dsB.to(cdt).transpose(-1, -2), qs).float().view(-1, B, D))
        dq[:, r] = (dqc * scale).transpose(1, 2).reshape(Hq, Tc, D)
    return dq.to(q.dtype), dk[:, :L].to(k.dtype), dv[:, :L].to(v.dtype)


class BlockSparseAttention(torch.autograd.Function):
    """Differentiable stage 2: forward saves (out, lse), backward recomputes (see module docstring)."""

    @staticmethod
    def forward(ctx, q, k, v, positions, block_idx, settings, use_kernel=False):  # noqa: D401 - autograd signature
        fwd = kernel_forward if use_kernel else blocksparse_forward
        out, lse = fwd(q, k, v, positions, block_idx, settings)
        ctx.save_for_backward(q, k, v, positions, block_idx, out, lse)
        ctx.settings = settings
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, positions, block_idx, out, lse = ctx.saved_tensors
        dq, dk, dv = blocksparse_backward(dout, q, k, v, out, lse, positions, block_idx, ctx.settings)
        return dq, dk, dv, None, None, None, None


# ---- the per-token block lists of the optional CPU kernel (cpu_kernel.py) ---------------------------------

# Tokens per kernel call: bounds the [Hkv, chunk, NB] list tensors (a few MB) at any length.
KERNEL_CHUNK = 4096


def attended_blocks(positions: torch.Tensor, block_idx: torch.Tensor, settings: InfLLMv2Settings) -> torch.Tensor:
    """[Hkv, T, NB] every block a query attends: valid block_idx ids (0 <= b <= q_b) UNION the separate
    window, sorted and deduplicated, -1 padded (NB = the longest row). Causality inside q_b is left to the caller."""
    B = settings.block_size
    Hkv, T, K = block_idx.shape
    qb = (positions // B)[None, :, None]  # [1, T, 1]
    big = 1 << 62
    ids = torch.where((block_idx >= 0) & (block_idx <= qb), block_idx, big)
    W = settings.window_blocks
    if W:
        win = qb - torch.arange(W - 1, -1, -1, device=positions.device)  # [1, T, W]: q_b - W + 1 .. q_b
        ids = torch.cat([ids, torch.where(win >= 0, win, big).expand(Hkv, -1, -1)], dim=-1)
    ids = ids.sort(-1).values
    if ids.shape[-1] > 1:
        dup = torch.cat([torch.zeros_like(ids[..., :1], dtype=torch.bool), ids[..., 1:] == ids[..., :-1]], -1)
        ids = ids.masked_fill(dup, big).sort(-1).values
    nb = int((ids != big).sum(-1).max()) if ids.numel() else 0
    ids = ids[..., :nb]
    return ids.masked_fill(ids == big, -1)


def kernel_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor,
                   block_idx: torch.Tensor, settings: InfLLMv2Settings) -> tuple[torch.Tensor, torch.Tensor]:
    """Same result as blocksparse_forward, computed by the CPU kernel. -> (out [Hq, T, D], lse [Hkv, T, G])."""
    from minicpm4.attention.infllmv2 import cpu_kernel

    Hq, T, D = q.shape
    Hkv, L, _ = k.shape
    G, B = Hq // Hkv, settings.block_size
    scale = 1.0 / math.sqrt(D)
    nblk = -(-L // B)
    whole = T >= CONVERT_WHOLE_MIN_QUERIES or k.dtype not in (torch.float32, torch.bfloat16)
    if whole:  # prefill: every key block is reused by many queries, lay all of K/V out once
        kt, vb = cpu_kernel.key_blocks(k, v, B)
    else:  # rows of head h start at h * head_rows in memory (k may be a [Hkv, L, D] slice of a longer cache)
        kr, vr = k, v
        if k.stride(2) != 1 or k.stride(1) != D or v.stride() != k.stride():
            kr, vr = k.contiguous(), v.contiguous()
        head_rows = kr.stride(0) // D
    out = q.new_empty(Hq, T, D)
    lse = torch.empty(Hkv, T, G, dtype=torch.float32)
    heads = torch.arange(Hkv)[:, None, None]
    for t0 in range(0, T, KERNEL_CHUNK):
        t1 = min(T, t0 + KERNEL_CHUNK)
        pos = positions[t0:t1]
        lists = attended_blocks(pos, block_idx[:, t0:t1], settings)  # [Hkv, Tc, NB]
        valid = lists >= 0
        cnt = torch.where(valid, (pos[None, :, None] + 1 - lists * B).clamp(max=B), 0).int()
        qs = (q[:, t0:t1].float() * scale).view(Hkv, G, t1 - t0, D).transpose(1, 2)  # [Hkv, Tc, G, D]
        if whole:
            o, l = cpu_kernel.stage2_forward(qs, kt, vb, heads * nblk + lists.clamp(min=0), cnt)
        else:  # decode / a few queries: the kernel reads the attended rows in place (no layout pass over K/V)
            o, l = cpu_kernel.stage2_forward_rows(qs, kr, vr, heads * head_rows + lists.clamp(min=0) * B, cnt, B)
        out[:, t0:t1] = o.transpose(1, 2).reshape(Hq, t1 - t0, D).to(q.dtype)
        lse[:, t0:t1] = l
    return out, lse

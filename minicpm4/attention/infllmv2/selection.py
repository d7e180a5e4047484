"""InfLLM v2 stage 1: which 64-token KV blocks each query token attends (MINICPM4.md §3.3 steps 2-8).

For one sequence and every KV head h (all G = Hq / Hkv query heads of the group vote together):

  x[g, t, j] = q[g, t] . C1[j] / sqrt(D)          only kernels in the query's past: j*s + p - 1 <= pos_t
  p[g, t, j] = exp(x - lse[g, t])                  lse over C1 ("exact") or over visible C2 ("coarse")
  S[h, t, j] = sum over the G heads of p           the kernels' "fused head-group summation" (the TR says
                                                   average; top-k is the same, values differ by G)
  score[h, t, b] = max of S over the kernels that intersect block b (TR Eq. 1; for p = 2s this is the
                   kernels' max-pool of width B/s + 1, stride B/s, padding 1: 5 kernels for 32/16/64)
  init blocks -> +inf; local blocks -> -inf (separate_window) or +inf (forced_in_topk)
  blocks >= q_b (separate_window) / > q_b (forced_in_topk) -> -inf  (own/future blocks: see settings.py)
  idx = top-k of score (K = min(topk, num_blocks)); slots whose score is -inf become -1

Output [Hkv, T, K] int64: the valid block ids of a row ascending, then the -1 slots.

Against the remote code this is exact for the attended block SET, with two well-defined deviations that
never change it: (1) the remote code drops own/future blocks after top-k (`idx >= q_b -> -1`) while we
score them -inf before, so a row's -1 slots sit where the remote code had future blocks; (2) slots filled
with -inf local blocks in separate_window mode (possible only when fewer than K blocks are candidates)
become -1 instead of repeating a window block. Ties between a visible block whose probability underflowed
to exactly 0 and a future block resolve in favour of the visible one.

Exact ties at the K-th score go to the lowest block ids (a stable descending sort). They are common:
adjacent blocks share a kernel, so both can pool the same maximum. torch.topk's own tie order depends on
the row length, so without this rule a chunked prefill would select differently from a one-shot pass.

No gradient: selection is not trained (§3.6).
"""

from __future__ import annotations

import math
import time

import torch

from minicpm4.attention.infllmv2.settings import InfLLMv2Settings

# Stage 1 works on query chunks so that the fp32 score tensor [Hq, chunk, n1] stays below this many
# elements (2M = 8 MB, the L3 of the dev box): memory stays small at any length while the matmul keeps
# >= 256 rows. Measured once on the busy 2-core box at 128K: 512K-element chunks were ~35% slower,
# 16M-element chunks no faster. At 128K keys n1 = 8191: 16 queries x 16 heads per chunk.
STAGE1_CHUNK_ELEMENTS = 1 << 21
STAGE1_MIN_CHUNK = 4


def num_blocks(num_keys: int, block_size: int) -> int:
    return -(-num_keys // block_size)


def visible_kernels(positions: torch.Tensor, kernel_size: int, kernel_stride: int, num_kernels: int) -> torch.Tensor:
    """[T] how many kernels lie wholly in each query's past: j is visible iff j*s + p - 1 <= pos (§3.3 step 2)."""
    count = torch.div(positions - kernel_size + 1, kernel_stride, rounding_mode="floor") + 1
    return count.clamp(0, num_kernels)


def kernel_range_of_block(block: int, num_kernels: int, s: InfLLMv2Settings) -> tuple[int, int]:
    """Kernels j intersecting block b: j*s < (b+1)*B and j*s + p > b*B. Returns [lo, hi] (empty if lo > hi)."""
    lo = max(0, -(-(block * s.block_size - s.kernel_size + 1) // s.kernel_stride))
    hi = min(num_kernels - 1, ((block + 1) * s.block_size - 1) // s.kernel_stride)
    return lo, hi


def _kernel_logits(qs: torch.Tensor, c: torch.Tensor, m: int, G: int) -> torch.Tensor:
    """qs [Hkv, G*T, D] pre-scaled queries; c [Hkv, n, D] shared by all queries, or [Hkv, T, n, D] one set per
    query (the engine's batched decode rows, each of its own sequence) -> logits of the first m kernels [Hkv, G, T, m]."""
    Hkv, GT, D = qs.shape
    T = GT // G
    if c.dim() == 3:
        return torch.matmul(qs, c[:, :m].float().transpose(1, 2)).view(Hkv, G, T, m)
    q4 = qs.view(Hkv, G, T, D).transpose(1, 2)  # [Hkv, T, G, D]: per query the same [G, D] x [D, m] product
    return torch.matmul(q4, c[:, :, :m].float().transpose(2, 3)).transpose(1, 2).contiguous()


def group_kernel_scores(q: torch.Tensor, c1: torch.Tensor, c2: torch.Tensor | None, positions: torch.Tensor,
                        s: InfLLMv2Settings) -> torch.Tensor:
    """Stage-1 scores summed over each KV group: q [Hq, T, D], c1 [Hkv, n1, D] -> S [Hkv, T, n] fp32.

    c1 / c2 may also be per query, [Hkv, T, n, D] (padded beyond each query's visible kernels; the
    padding is masked like any invisible kernel).
    Only the first n = max visible count of these queries are returned: later kernels are invisible to
    every query here, so their S is 0 and they cannot raise a (max-pooled) block score.
    One exp pass: e = exp(x - rowmax) gives both the exact normaliser l = sum(e) and p = e / l.
    """
    Hq, T, D = q.shape
    Hkv, n1 = c1.shape[0], c1.shape[-2]
    G = Hq // Hkv
    vis1 = visible_kernels(positions, s.kernel_size, s.kernel_stride, n1)  # [T]
    n = int(vis1.max()) if T else 0
    if n == 0:
        return q.new_zeros(Hkv, T, 0, dtype=torch.float32)
    qs = q.float().reshape(Hkv, G * T, D) * (1.0 / math.sqrt(D))  # heads of group h are h*G .. h*G + G - 1
    x = _kernel_logits(qs, c1, n, G)  # [Hkv, G, T, n]
    lo = int(vis1.min())  # columns >= lo are hidden from some query of this chunk: mask only that ragged strip
    if lo < n:
        strip = x[..., lo:]
        strip.masked_fill_(torch.arange(lo, n, device=q.device)[None, :] >= vis1[:, None], float("-inf"))
    coarse = s.lse == "coarse" and c2 is not None and c2.shape[-2] > 0
    if coarse:
        n2 = c2.shape[-2]
        vis2 = visible_kernels(positions, s.coarse_kernel_size, s.coarse_kernel_stride, n2)
        m = int(vis2.max())
    if coarse and m > 0:
        x2 = _kernel_logits(qs, c2, m, G)
        x2.masked_fill_(torch.arange(m, device=q.device)[None, :] >= vis2[:, None], float("-inf"))
        lse = x2.logsumexp(-1)  # [Hkv, G, T]
        # A query that sees C1 kernels but no C2 kernel yet (pos < 4p - 1) keeps the exact normaliser:
        # the coarse one would be -inf. Such queries' past is all init/local blocks with the defaults.
        exact = vis2 == 0
        if bool(exact.any()):
            lse = torch.where(exact[None, None, :], x.logsumexp(-1), lse)
        lse = lse.masked_fill(lse == float("-inf"), 0.0)  # no visible kernel: every p = exp(-inf) = 0
        return x.sub_(lse[..., None]).exp_().sum(1)  # [Hkv, T, n]
    mx = x.amax(-1, keepdim=True)  # [Hkv, G, T, 1]
    mx = mx.masked_fill(mx == float("-inf"), 0.0)  # a query with no visible kernel: all e = 0
    e = x.sub_(mx).exp_()
    inv = 1.0 / e.sum(-1).clamp_min(1e-30)  # [Hkv, G, T]; rows of zeros stay zero
    # S[h, t, j] = sum_g e[h, g, t, j] * inv[h, g, t]: one batched weighted sum over the G heads
    return torch.einsum("hgtn,hgt->htn", e, inv)


def pool_block_scores(S: torch.Tensor, nb: int, s: InfLLMv2Settings) -> torch.Tensor:
    """[Hkv, T, n] kernel scores -> [Hkv, T, nb] max over the kernels intersecting each block (-inf if none).

    With s | p and s | B the ranges are sliding windows: block b covers kernels b*r - (p/s - 1) .. b*r + r - 1
    (r = B/s), so pad p/s - 1 on the left and unfold windows of width r + p/s - 1 with step r.
    """
    Hkv, T, n = S.shape
    r, left = s.block_size // s.kernel_stride, s.kernel_size // s.kernel_stride - 1
    width = r + left
    right = max(0, (nb - 1) * r + width - (n + left))
    padded = torch.nn.functional.pad(S, (left, right), value=float("-inf"))
    return padded.unfold(-1, width, r)[:, :, :nb].amax(-1)


def force_and_topk(score: torch.Tensor, positions: torch.Tensor, s: InfLLMv2Settings) -> torch.Tensor:
    """[Hkv, T, nb] pooled scores -> block ids [Hkv, T, K]: init/local forcing, own/future removal, top-k."""
    Hkv, T, nb = score.shape
    inf = float("inf")
    qb = (positions // s.block_size)[:, None]  # [T, 1]
    b = torch.arange(nb, device=score.device)[None, :]  # [1, nb]
    local = (b > qb - s.local_blocks) & (b <= qb)
    score = score.masked_fill(local, inf if s.local_mode == "forced_in_topk" else -inf)
    score = score.masked_fill(b < s.init_blocks, inf)
    dropped = b >= qb if s.local_mode == "separate_window" else b > qb  # remote code: topk_idx >= q_idx -> -1
    score = score.masked_fill(dropped, -inf)
    K = min(s.topk, nb)
    if K == 0:
        return torch.empty(Hkv, T, 0, dtype=torch.long, device=score.device)
    # Ties at the K-th score go to the LOWEST block ids (what a stable descending sort would keep). Exact
    # ties are common: adjacent blocks share a kernel (4b+3 for 32/16/64), so both pool the same maximum.
    # torch.topk breaks them by row length and layout, which would make a chunked prefill (shorter rows)
    # select differently from a one-shot forward.
    kth = score.topk(K, dim=-1).values[..., -1:]  # [Hkv, T, 1]
    above = score > kth
    tied = score == kth
    keep = above | (tied & (tied.cumsum(-1) <= K - above.sum(-1, keepdim=True)))  # exactly K per row
    idx = keep.nonzero()[:, 2].view(Hkv, T, K)  # ascending block ids per row
    idx = idx.masked_fill(score.gather(-1, idx) == -inf, nb)  # not a candidate: sorts last, becomes -1
    idx = idx.sort(-1).values
    return idx.masked_fill(idx == nb, -1)


@torch.no_grad()
def select_blocks(q: torch.Tensor, c1: torch.Tensor, c2: torch.Tensor | None, positions: torch.Tensor,
                  num_keys: int, settings: InfLLMv2Settings, timings: dict[str, float] | None = None) -> torch.Tensor:
    """q [Hq, T, D] (selection queries), c1 [Hkv, n1, D], c2 [Hkv, n2, D] or None, positions [T] absolute,
    num_keys = L -> block ids [Hkv, T, K] int64, K = min(topk, ceil(L / B)), valid ids ascending then -1.

    c1 / c2 may be per query instead, [Hkv, T, n, D]: queries of different sequences in one call (the
    engine's decode rows, attention/infllmv2/paged.py); num_keys is then the longest sequence. That gives
    each query the block SET it gets alone: blocks past its own are dropped (-1) whatever num_keys is.

    Chunked over queries so [Hq, chunk, n1] stays small; the group sum, pooling and top-k run per chunk.
    timings: if given, seconds are added under "scores" (scores, normaliser, group sum, pooling) and "topk".
    """
    Hq, T, D = q.shape
    per_query = c1.dim() == 4
    Hkv, n1 = c1.shape[0], c1.shape[-2]
    if Hq % Hkv:
        raise ValueError(f"query heads ({Hq}) must be a multiple of KV heads ({Hkv})")
    if settings.lse == "coarse" and c2 is None:
        raise ValueError("InfLLMv2Settings.lse='coarse' needs the coarse compressed keys c2 (got None)")
    positions = positions.to(q.device)
    nb = num_blocks(num_keys, settings.block_size)
    K = min(settings.topk, nb)
    out = torch.empty(Hkv, T, K, dtype=torch.long, device=q.device)
    chunk = max(STAGE1_MIN_CHUNK, STAGE1_CHUNK_ELEMENTS // max(1, Hq * n1))
    clock = time.perf_counter if timings is not None else None
    for t0 in range(0, T, chunk):
        pos = positions[t0:t0 + chunk]
        t_a = clock() if clock else 0.0
        c1c = c1[:, t0:t0 + chunk] if per_query else c1
        c2c = c2[:, t0:t0 + chunk] if per_query and c2 is not None else c2
        pooled = pool_block_scores(group_kernel_scores(q[:, t0:t0 + chunk], c1c, c2c, pos, settings), nb, settings)
        t_b = clock() if clock else 0.0
        out[:, t0:t0 + chunk] = force_and_topk(pooled, pos, settings)
        if clock:
            timings["scores"] = timings.get("scores", 0.0) + t_b - t_a
            timings["topk"] = timings.get("topk", 0.0) + clock() - t_b
    return out


@torch.no_grad()
def select_blocks_reference(q: torch.Tensor, c1: torch.Tensor, c2: torch.Tensor | None, positions: torch.Tensor,
                            num_keys: int, settings: InfLLMv2Settings) -> torch.Tensor:
    """The readable spec of select_blocks (MINICPM4.md §3.8): whole matrices, explicit per-block loop."""
    score = reference_block_scores(q, c1, c2, positions, num_keys, settings)
    neg = float("-inf")
    Hkv, T, nb = score.shape
    K = min(settings.topk, nb)
    values, ids = score.sort(dim=-1, descending=True, stable=True)  # ties: lower block id first
    values, ids = values[..., :K], ids[..., :K]
    idx = torch.full_like(ids, -1)
    for h in range(Hkv):
        for t in range(T):
            chosen = sorted(i for v, i in zip(values[h, t].tolist(), ids[h, t].tolist()) if v != neg)
            idx[h, t, :len(chosen)] = torch.tensor(chosen, dtype=torch.long)
    return idx


def reference_block_scores(q: torch.Tensor, c1: torch.Tensor, c2: torch.Tensor | None, positions: torch.Tensor,
                           num_keys: int, settings: InfLLMv2Settings) -> torch.Tensor:
    """The reference's score of every block [Hkv, T, nb] after forcing (inf) and masking (-inf): what its top-k
    ranks. Tests use it to tell a real selection difference from a float-rounding tie."""
    s = settings
    Hq, T, D = q.shape
    Hkv, n1, _ = c1.shape
    G = Hq // Hkv
    qg = q.float().view(Hkv, G, T, D)
    neg = float("-inf")

    def scores(c: torch.Tensor, p: int, stride: int) -> torch.Tensor:
        x = torch.einsum("hgtd,hnd->hgtn", qg, c.float()) / math.sqrt(D)
        visible = (torch.arange(c.shape[1], device=x.device) * stride + p - 1)[None, :] <= positions[:, None]
        return x.masked_fill(~visible, neg)  # [T, n] broadcast

    x1 = scores(c1, s.kernel_size, s.kernel_stride)  # [Hkv, G, T, n1]
    lse = x1.logsumexp(-1, keepdim=True)
    if s.lse == "coarse" and c2 is not None and c2.shape[1] > 0:
        lse2 = scores(c2, s.coarse_kernel_size, s.coarse_kernel_stride).logsumexp(-1, keepdim=True)
        lse = torch.where(lse2 == neg, lse, lse2)  # no visible coarse kernel yet: exact normaliser
    S = (x1 - lse).exp().nan_to_num(0.0).sum(1)  # [Hkv, T, n1]; rows without any kernel -> 0
    nb = num_blocks(num_keys, s.block_size)
    score = torch.full((Hkv, T, nb), neg, device=q.device)
    for b in range(nb):
        lo, hi = kernel_range_of_block(b, n1, s)
        if lo <= hi:
            score[..., b] = S[..., lo:hi + 1].amax(-1)
    qb = (positions // s.block_size)[:, None]  # [T, 1]
    b = torch.arange(nb, device=q.device)[None, :]  # [1, nb]
    local = (b > qb - s.local_blocks) & (b <= qb)
    score = score.masked_fill(local, float("inf") if s.local_mode == "forced_in_topk" else neg)
    score = score.masked_fill(b < s.init_blocks, float("inf"))
    own_or_future = (b >= qb) if s.local_mode == "separate_window" else (b > qb)
    return score.masked_fill(own_or_future, neg)

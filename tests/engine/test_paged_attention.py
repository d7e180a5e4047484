"""Paged attention: the C++ kernel and the PyTorch path against the reference, the reference against SDPA."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from minicpm4.attention import paged_kernel
from minicpm4.attention.paged_attention import (paged_attention, paged_attention_reference, paged_attention_torch,
                                                write_kv)

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny shapes: a second OpenMP thread only adds barrier waits
needs_kernel = pytest.mark.skipif(not paged_kernel.available(), reason="no C++ compiler for the paged kernel")
TOL = {torch.float32: dict(atol=2e-5, rtol=1e-5), torch.bfloat16: dict(atol=2e-2, rtol=2e-2)}


def ragged_batch(seqs: list[tuple[int, int]], Hq: int, Hkv: int, D: int, B: int, dtype: torch.dtype, seed: int = 0,
                 shuffle_positions: bool = False):
    """seqs: (query tokens, context length) per sequence; the queries are the last tokens of the context.

    Blocks are a random permutation of a pool with spare blocks; table entries past a context are garbage.
    -> q, k_cache, v_cache, block_tables, query_start_loc, context_lens, positions.
    """
    g = torch.Generator().manual_seed(seed)
    nbs = [-(-L // B) for _, L in seqs]
    pool = sum(nbs) + 5
    perm = torch.randperm(pool, generator=g).int()
    tables = torch.randint(-(2**30), 2**30, (len(seqs), max(nbs) + 3), generator=g, dtype=torch.int32)
    used = 0
    for s, nb in enumerate(nbs):
        tables[s, :nb] = perm[used:used + nb]
        used += nb
    k_cache = torch.randn(pool, Hkv, B, D, generator=g).to(dtype)
    v_cache = torch.randn(pool, Hkv, B, D, generator=g).to(dtype)
    starts, positions = [0], []
    for T, L in seqs:
        starts.append(starts[-1] + T)
        pos = torch.arange(L - T, L)
        positions.append(pos[torch.randperm(T, generator=g)] if shuffle_positions else pos)
    q = torch.randn(starts[-1], Hq, D, generator=g).to(dtype)
    return (q, k_cache, v_cache, tables, torch.tensor(starts, dtype=torch.int32),
            torch.tensor([L for _, L in seqs], dtype=torch.int32), torch.cat(positions))


# decode rows, a short chunk (grouped-matmul path), a long prefill chunk (SDPA path), a whole-prompt prefill,
# context 1, contexts on and off block boundaries
MIXED = [(1, 37), (5, 100), (1, 1), (40, 40), (1, 300), (3, 64), (17, 129), (1, 128)]


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("G", [1, 2, 8])
@pytest.mark.parametrize("B", [16, 64])
def test_kernel_matches_reference(B, G, D, dtype):
    Hkv = 2
    args = ragged_batch(MIXED, G * Hkv, Hkv, D, B, dtype, seed=B + G + D)
    ref = paged_attention_reference(*args)
    out = paged_attention(*args, impl="kernel")
    assert out.dtype == dtype and out.shape == ref.shape
    torch.testing.assert_close(out, ref, **TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("G", [1, 8])
def test_torch_path_matches_reference(G, dtype):
    args = ragged_batch(MIXED, G * 2, 2, 64, 16, dtype, seed=G)
    torch.testing.assert_close(paged_attention_torch(*args), paged_attention_reference(*args), **TOL[dtype])
    torch.testing.assert_close(paged_attention(*args, impl="torch"), paged_attention_reference(*args), **TOL[dtype])


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kernel_odd_shapes_and_shuffled_positions(dtype):
    """Head dim 80 (a 16-wide output tail), 3 KV heads x G 3, block 32, query rows in any position order
    (tree verification), fp32 q on a bf16 cache, and Python-int lists for the per-sequence metadata."""
    args = ragged_batch([(7, 90), (1, 33), (12, 12)], 9, 3, 80, 32, dtype, seed=3, shuffle_positions=True)
    ref = paged_attention_reference(*args)
    q, kc, vc, bt, qsl, ctx, pos = args
    out = paged_attention(q, kc, vc, bt, qsl.tolist(), ctx.tolist(), pos, impl="kernel")
    torch.testing.assert_close(out, ref, **TOL[dtype])
    if dtype == torch.bfloat16:
        out32 = paged_attention(q.float(), kc, vc, bt, qsl, ctx, pos, impl="kernel")
        ref32 = paged_attention_reference(q.float(), kc, vc, bt, qsl, ctx, pos)
        torch.testing.assert_close(out32, ref32, atol=2e-5, rtol=1e-5)


@needs_kernel
def test_kernel_threads_are_deterministic(monkeypatch):
    """Every work item runs on one thread, so any thread count gives bit-identical results."""
    monkeypatch.setattr(paged_kernel, "PARALLEL_MIN_WORK", 1)
    args = ragged_batch([(1, 200)] * 6 + [(30, 90)], 16, 2, 64, 16, torch.float32, seed=7)
    one = paged_attention(*args, impl="kernel", threads=1)
    assert torch.equal(one, paged_attention(*args, impl="kernel", threads=2))


@pytest.mark.parametrize("T", [1, 9, 40])
def test_reference_matches_sdpa_on_one_contiguous_sequence(T):
    """One sequence laid out in blocks 0, 1, 2, ... (a plain [Hkv, L, D] cache): the last T tokens of L."""
    Hq, Hkv, D, B, L = 8, 2, 64, 16, 75
    g = torch.Generator().manual_seed(T)
    k, v = torch.randn(Hkv, L, D, generator=g), torch.randn(Hkv, L, D, generator=g)
    q = torch.randn(T, Hq, D, generator=g)
    nb = -(-L // B)
    pad = nb * B - L
    k_cache = F.pad(k, (0, 0, 0, pad)).view(Hkv, nb, B, D).transpose(0, 1).contiguous()  # [nb, Hkv, B, D]
    v_cache = F.pad(v, (0, 0, 0, pad)).view(Hkv, nb, B, D).transpose(0, 1).contiguous()
    tables = torch.arange(nb, dtype=torch.int32)[None]
    out = paged_attention_reference(q, k_cache, v_cache, tables, [0, T], [L], torch.arange(L - T, L))
    mask = torch.arange(L)[None, :] <= torch.arange(L - T, L)[:, None]  # [T, L]
    want = F.scaled_dot_product_attention(q.transpose(0, 1)[None], k[None], v[None], attn_mask=mask, enable_gqa=True)
    torch.testing.assert_close(out, want[0].transpose(0, 1), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("use_kernel", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_write_kv_round_trip(use_kernel, dtype, monkeypatch):
    if use_kernel and not paged_kernel.available():
        pytest.skip("no C++ compiler for the paged kernel")
    if not use_kernel:
        monkeypatch.setattr(paged_kernel, "available", lambda: False)
    NB, Hkv, B, D, N = 6, 2, 16, 64, 21
    g = torch.Generator().manual_seed(1)
    k_cache, v_cache = torch.zeros(NB, Hkv, B, D, dtype=dtype), torch.zeros(NB, Hkv, B, D, dtype=dtype)
    slots = torch.randperm(NB * B, generator=g)[:N]
    k, v = torch.randn(N, Hkv, D, generator=g), torch.randn(N, Hkv, D, generator=g)  # fp32: cast on write
    write_kv(k_cache, v_cache, k, v, slots)
    assert torch.equal(k_cache[slots // B, :, slots % B], k.to(dtype))
    assert torch.equal(v_cache[slots // B, :, slots % B], v.to(dtype))
    untouched = torch.ones(NB * B, dtype=torch.bool)
    untouched[slots] = False
    assert not k_cache.transpose(1, 2).reshape(NB * B, Hkv, D)[untouched].any()

    # written tokens are what attention reads: slots of sequence 0 = its positions through its block table
    tables = torch.tensor([[4, 1]], dtype=torch.int32)
    pos_slots = torch.cat([4 * B + torch.arange(B), 1 * B + torch.arange(5)])  # positions 0 .. 20
    write_kv(k_cache, v_cache, k, v, pos_slots)
    q = torch.randn(1, 2 * Hkv, D, generator=g).to(dtype)
    out = paged_attention_reference(q, k_cache, v_cache, tables, [0, 1], [N], torch.tensor([N - 1]))
    kk, vv = k.to(dtype).float().transpose(0, 1), v.to(dtype).float().transpose(0, 1)  # [Hkv, N, D]
    want = F.scaled_dot_product_attention(q.float().transpose(0, 1)[None], kk[None], vv[None], enable_gqa=True)
    torch.testing.assert_close(out.float(), want[0].transpose(0, 1), **TOL[dtype])


def test_bad_impl_is_rejected():
    args = ragged_batch([(1, 5)], 2, 1, 64, 16, torch.float32)
    with pytest.raises(ValueError, match="impl"):
        paged_attention(*args, impl="cuda")


@needs_kernel
def test_kernel_rejects_metadata_that_would_read_outside_the_cache():
    q, kc, vc, bt, qsl, ctx, pos = ragged_batch([(1, 40), (2, 20)], 4, 2, 64, 16, torch.float32)
    bad = bt.clone()
    bad[1, 1] = kc.shape[0]  # block 1 of sequence 1 (positions 16 .. 19) is read
    with pytest.raises(ValueError, match="block id"):
        paged_attention(q, kc, vc, bad, qsl, ctx, pos, impl="kernel")
    with pytest.raises(ValueError, match="more blocks"):
        paged_attention(q, kc, vc, bt[:, :1], qsl, ctx, pos, impl="kernel")
    with pytest.raises(ValueError, match="query_start_loc"):
        paged_attention(q, kc, vc, bt, torch.tensor([0, 2, 4], dtype=torch.int32), ctx, pos, impl="kernel")
    with pytest.raises(IndexError, match="slot"):
        write_kv(kc, vc, q[:, :2], q[:, :2], torch.tensor([0, 1, kc.shape[0] * 16]))


def tree_batch(B: int, G: int, dtype: torch.dtype):
    """MIXED plus two draft trees (sequences whose last m keys are tree nodes under ancestor bits), one crossing a
    page boundary and one of 64 nodes (every bit of the mask)."""
    import random

    rng = random.Random(B + G)
    trees = [(7, 130), (64, 200), (1, 20)]  # (nodes, context incl. nodes)
    seqs = MIXED + trees
    q, k, v, tables, qsl, ctx, positions = ragged_batch(seqs, G * 2, 2, 64, B, dtype, seed=G)
    masks = torch.zeros(q.shape[0], dtype=torch.int64)
    bases = [-1] * len(MIXED)
    for s, (m, L) in enumerate(trees, start=len(MIXED)):
        parents = [-1] + [rng.randrange(i) for i in range(1, m)]  # a random tree over the m nodes
        a = int(qsl[s])
        for i in range(m):
            bits, j = 0, i
            while j >= 0:
                bits |= 1 << j
                j = parents[j]
            masks[a + i] = bits - (1 << 64) if bits >= 1 << 63 else bits  # the uint64 pattern as int64
        positions[a:a + m] = L - 1  # tree rows pass their tree's last key as position
        bases.append(L - m)
    return (q, k, v, tables, qsl, ctx, positions), masks, bases


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("G", [1, 3])
@pytest.mark.parametrize("B", [16, 64])
def test_tree_mask_kernel_and_torch_match_reference(B, G, dtype):
    args, masks, bases = tree_batch(B, G, dtype)
    ref = paged_attention_reference(*args, tree_mask=masks, tree_base=bases)
    impls = ["torch"] + (["kernel"] if paged_kernel.available() else [])
    for impl in impls:
        out = paged_attention(*args, impl=impl, tree_mask=masks, tree_base=bases)
        torch.testing.assert_close(out, ref, **TOL[dtype])


def test_tree_mask_reference_equals_attention_over_the_path():
    """A node with ancestor bits sees exactly the committed keys plus its path: the reference equals plain causal
    attention of a sequence holding only those keys."""
    args, masks, bases = tree_batch(16, 2, torch.float32)
    q, k, v, tables, qsl, ctx, positions = args
    s = len(MIXED)  # the 7-node tree
    a, base = int(qsl[s]), bases[s]
    ref = paged_attention_reference(*args, tree_mask=masks, tree_base=bases)
    from minicpm4.attention.infllmv2.paged_cache import gather_slots

    keys = gather_slots(k, tables[s].tolist(), 0, int(ctx[s]))  # [Hkv, L, D]
    values = gather_slots(v, tables[s].tolist(), 0, int(ctx[s]))
    for i in range(7):
        bits = int(masks[a + i])
        keep = list(range(base)) + [base + j for j in range(7) if bits >> j & 1]
        kk, vv = keys[:, keep].repeat_interleave(2, 0), values[:, keep].repeat_interleave(2, 0)
        want = F.scaled_dot_product_attention(q[a + i][:, None], kk, vv)[:, 0]
        torch.testing.assert_close(ref[a + i], want, atol=2e-5, rtol=1e-5)

"""InfLLM v2 core: settings/variants, stage-1 selection, stage-2 attention (fast path == spec), backward.

Most cases use small parametric settings (block 16, kernels 8/4) so the sequences stay short; a few run
the real 64 / 32 / 16 sizes with the MiniCPM4-8B group (16 query heads per KV head).
"""

import math

import pytest
import torch
import torch.nn.functional as F

from minicpm4.attention.infllmv2 import blocksparse, cpu_kernel, selection
from minicpm4.attention.infllmv2.compress import compress_keys
from minicpm4.attention.infllmv2.selection import (
    kernel_range_of_block,
    pool_block_scores,
    select_blocks,
    select_blocks_reference, reference_block_scores,
    visible_kernels,
)
from minicpm4.attention.infllmv2.settings import BUDGET_VARIANTS, InfLLMv2Settings, settings_from_config
from minicpm4.attention.infllmv2.sparse_attention import (
    infllmv2_attention,
    sparse_attention,
    sparse_attention_reference,
    stage2_mask,
)
from minicpm4.config import SparseConfig

pytestmark = pytest.mark.usefixtures("one_thread")


SMALL = dict(kernel_size=8, kernel_stride=4, block_size=16)
# The same budgets as the real variants, scaled down: 4 local blocks, top-k 6 (+ window for forced).
SMALL_VARIANTS = {
    "hf": InfLLMv2Settings(**SMALL, topk=6, local_blocks=4),
    "paper": InfLLMv2Settings(**SMALL, topk=10, local_blocks=4, local_mode="forced_in_topk"),
    "training": InfLLMv2Settings(**SMALL, topk=10, local_blocks=5, local_mode="forced_in_topk"),
    "hf-coarse": InfLLMv2Settings(**SMALL, topk=6, local_blocks=4, lse="coarse"),
    "hf-2init": InfLLMv2Settings(**SMALL, topk=6, local_blocks=2, init_blocks=2),
}


def rand(*shape, seed=0, dtype=torch.float32):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


def qkv(Hq, Hkv, T, L, D, seed=0):
    return rand(Hq, T, D, seed=seed), rand(Hkv, L, D, seed=seed + 1), rand(Hkv, L, D, seed=seed + 2)


def compressed(k, s):
    c1 = compress_keys(k, s.kernel_size, s.kernel_stride)
    c2 = compress_keys(k, s.coarse_kernel_size, s.coarse_kernel_stride) if s.lse == "coarse" else None
    return c1, c2


def dense_causal(q, k, v, positions):
    """Plain causal attention over absolute positions (the dense oracle), fp32."""
    mask = torch.arange(k.shape[1])[None, :] <= positions[:, None]
    return F.scaled_dot_product_attention(q[None].float(), k[None].float(), v[None].float(), attn_mask=mask[None, None],
                                          enable_gqa=True)[0]


# ---- settings and budget variants -------------------------------------------------------------------

def test_budget_variants_on_the_readme_defaults():
    cfg = SparseConfig()  # topk 64, window 2048 / block 64 = 32 local blocks, init 1
    got = {name: settings_from_config(cfg, name) for name in BUDGET_VARIANTS}
    table = {  # name: (topk, local_blocks, local_mode, blocks attended = init + scored + local)
        "hf": (64, 32, "separate_window", 96),
        "paper": (96, 32, "forced_in_topk", 96),
        "training": (96, 33, "forced_in_topk", 96),
        "cpmcu": (64, 8, "separate_window", 72),
        "cpmcu-class": (32, 32, "separate_window", 64),
    }
    for name, (topk, local, mode, total) in table.items():
        s = got[name]
        assert (s.topk, s.local_blocks, s.local_mode, s.max_blocks, s.variant) == (topk, local, mode, total, name)
    assert settings_from_config(cfg) == got["hf"]  # the HF checkpoint behaviour is the default
    s = got["hf"]
    assert (s.kernel_size, s.kernel_stride, s.block_size, s.init_blocks, s.dense_len, s.use_nope) == (32, 16, 64, 1, 8192, False)
    assert (s.coarse_kernel_size, s.coarse_kernel_stride) == (128, 64)
    assert settings_from_config(cfg, lse="coarse").lse == "coarse"
    assert s.is_sparse(8192) and not s.is_sparse(8191)
    assert InfLLMv2Settings(dense_len=-1).is_sparse(1)


def test_bad_settings_fail_with_the_field_name():
    with pytest.raises(ValueError, match="unknown InfLLM v2 budget variant"):
        settings_from_config(SparseConfig(), "nsa")
    with pytest.raises(ValueError, match="local_mode"):
        InfLLMv2Settings(local_mode="window")
    with pytest.raises(ValueError, match="lse"):
        InfLLMv2Settings(lse="approx")
    with pytest.raises(ValueError, match="topk"):
        InfLLMv2Settings(topk=20, local_blocks=32, local_mode="forced_in_topk")
    with pytest.raises(ValueError, match="kernel_stride"):
        InfLLMv2Settings(kernel_size=32, kernel_stride=24)


# ---- stage 1 ----------------------------------------------------------------------------------------

def test_visibility_and_block_kernel_ranges_at_the_real_sizes():
    s = InfLLMv2Settings()
    pos = torch.arange(0, 300)
    brute = torch.tensor([sum(1 for j in range(100) if 16 * j + 31 <= i) for i in pos.tolist()])
    assert torch.equal(visible_kernels(pos, 32, 16, 100), brute)
    assert visible_kernels(torch.tensor([30, 31, 46, 47]), 32, 16, 100).tolist() == [0, 1, 1, 2]  # §3.3: max(0, (i-15)//16)
    n1 = 200
    for b in range(1, 45):  # block b meets kernels 4b-1 .. 4b+3 (5 kernels), clipped to [0, n1-1]
        assert kernel_range_of_block(b, n1, s) == (4 * b - 1, min(4 * b + 3, n1 - 1))
    assert kernel_range_of_block(0, n1, s) == (0, 3)
    S = rand(2, 3, n1).abs()
    pooled = pool_block_scores(S, 52, s)
    for b in range(52):
        lo, hi = kernel_range_of_block(b, n1, s)
        want = S[..., lo:hi + 1].amax(-1) if lo <= hi else torch.full((2, 3), float("-inf"))
        assert torch.equal(pooled[..., b], want)


@pytest.mark.parametrize("variant", list(SMALL_VARIANTS))
@pytest.mark.parametrize("Hq, Hkv", [(16, 2), (16, 1), (4, 4)])
def test_select_blocks_equals_the_reference(variant, Hq, Hkv, monkeypatch):
    s = SMALL_VARIANTS[variant]
    monkeypatch.setattr(selection, "STAGE1_CHUNK_ELEMENTS", 4096)  # force several query chunks
    L = 300
    q, k, _ = qkv(Hq, Hkv, L, L, 16, seed=3)
    c1, c2 = compressed(k, s)
    for positions in (torch.arange(L), torch.arange(L - 37, L), torch.tensor([L - 1])):  # prefill, chunk, decode
        qq = q[:, positions]
        idx = select_blocks(qq, c1, c2, positions, L, s)
        assert idx.dtype == torch.long and idx.shape == (Hkv, len(positions), min(s.topk, math.ceil(L / 16)))
        assert_same_selection_up_to_ties(idx, select_blocks_reference(qq, c1, c2, positions, L, s),
                                         reference_block_scores(qq, c1, c2, positions, L, s))


def assert_same_selection_up_to_ties(idx, ref, score, rtol=1e-4):
    """idx == ref, except for queries whose sets swap blocks the reference scores equally up to fp32 rounding
    (the chunked fast path and the reference sum in different orders; which of two near-tied blocks wins then
    depends on the CPU's kernels: seen on an AVX-512 Xeon without bf16, not on an EPYC)."""
    for h, t in (idx != ref).any(-1).nonzero().tolist():
        a, b = set(idx[h, t].tolist()) - {-1}, set(ref[h, t].tolist()) - {-1}
        assert len(a) == len(b), (h, t, a, b)
        swapped = [score[h, t, i] for i in a ^ b]
        kth = min(score[h, t, i] for i in b)
        assert all(abs(v - kth) <= rtol * abs(kth) for v in swapped), (h, t, a ^ b, swapped, kth)
    differing = int((idx != ref).any(-1).sum())
    assert differing <= max(1, 0.05 * idx.shape[0] * idx.shape[1]), differing  # ties are rare; a bug changes many


def test_select_blocks_equals_the_reference_at_the_real_sizes():
    for s in (InfLLMv2Settings(), InfLLMv2Settings(topk=96, local_blocks=33, local_mode="forced_in_topk", lse="coarse")):
        L = 64 * 40 + 17
        q, k, _ = qkv(16, 1, 200, L, 32, seed=5)
        positions = torch.arange(L - 200, L)
        c1, c2 = compressed(k, s)
        idx = select_blocks(q, c1, c2, positions, L, s)
        assert torch.equal(idx, select_blocks_reference(q, c1, c2, positions, L, s))


@pytest.mark.parametrize("variant", ["hf", "paper", "training", "hf-2init"])
def test_selection_invariants(variant):
    s = SMALL_VARIANTS[variant]
    L = 400
    q, k, _ = qkv(8, 2, L, L, 16, seed=7)
    positions = torch.arange(L)
    idx = select_blocks(q, *compressed(k, s), positions, L, s)
    qb = positions // 16
    for t in range(0, L, 7):
        b = int(qb[t])
        for h in range(2):
            row = idx[h, t].tolist()
            valid = [i for i in row if i >= 0]
            assert row == valid + [-1] * (len(row) - len(valid)) and valid == sorted(set(valid))
            local = set(range(max(0, b - s.local_blocks + 1), b + 1))
            init = set(range(min(s.init_blocks, b + (s.local_mode == "forced_in_topk"))))
            past = set(range(b + (s.local_mode == "forced_in_topk")))
            assert init <= set(valid) and set(valid) <= past
            if s.local_mode == "separate_window":
                assert not (local & set(valid)) - init  # the window serves them (init blocks win: +inf)
                candidates = (past - local) | (init & past)
            else:
                assert local <= set(valid)  # forced inside the top-k
                candidates = past
            assert len(valid) == min(s.topk, len(candidates))


@pytest.mark.parametrize("variant", ["hf", "training"])
def test_chunked_selection_equals_one_shot_selection(variant):
    """A query selects the same blocks whether the keys after it exist or not (chunked prefill, decode):
    exact score ties (adjacent blocks share a kernel) must not be broken by the row length."""
    s = SMALL_VARIANTS[variant]
    L = 320
    q, k, _ = qkv(16, 2, L, L, 16, seed=47)
    q = q.round(decimals=1)  # coarse values: many exact ties
    positions = torch.arange(L)
    c1, c2 = compressed(k, s)
    full = select_blocks(q, c1, c2, positions, L, s)
    for start, end in ((0, 37), (37, 100), (100, 101), (101, 250), (250, L)):
        part = select_blocks(q[:, start:end], c1, c2, positions[start:end], end, s)
        want = full[:, start:end, : part.shape[-1]]
        assert torch.equal(part, want) and (full[:, start:end, part.shape[-1]:] == -1).all()


def test_group_of_8_selects_like_its_heads_repeated_to_16():
    """MINICPM4.md §3.5 (b): duplicating every query head scales the group sum by 2, top-k unchanged."""
    s = SMALL_VARIANTS["hf"]
    L = 320
    q, k, _ = qkv(16, 2, L, L, 16, seed=11)  # G = 8 (MiniCPM4-0.5B layout)
    c1, c2 = compressed(k, s)
    idx8 = select_blocks(q, c1, c2, torch.arange(L), L, s)
    idx16 = select_blocks(q.repeat_interleave(2, dim=0), c1, c2, torch.arange(L), L, s)
    assert torch.equal(idx8, idx16)


def test_planted_keys_far_back_are_retrieved():
    """Synthetic retrieval at the real sizes: a key block 40 blocks back that the queries match is selected."""
    s = InfLLMv2Settings()
    L, D, needle_block = 64 * 160, 64, 7  # 127 candidate blocks for 63 scored slots
    _, k, v = qkv(16, 1, 1, L, D, seed=13)
    k = 0.3 * k
    u = F.normalize(rand(D, seed=14), dim=0)
    k[0, needle_block * 64:(needle_block + 1) * 64] += 8.0 * u  # the needle: 64 keys along u
    q = rand(16, 8, D, seed=15) * 0.3 + 8.0 * u  # the last 8 queries all look for u
    positions = torch.arange(L - 8, L)
    for lse in ("exact", "coarse"):
        st = InfLLMv2Settings(lse=lse)
        idx = select_blocks(q, *compressed(k, st), positions, L, st)
        assert (idx == needle_block).any(-1).all(), f"needle not selected with lse={lse}"
    out = sparse_attention(q, k, v, positions, idx, s)
    needle_v = v[0, needle_block * 64:(needle_block + 1) * 64].mean(0)
    assert F.cosine_similarity(out.mean(1), needle_v[None], dim=-1).min() > 0.9  # the output reads the needle
    # the needle is far outside the 32-block window: without selection the query would not see it
    assert needle_block < (L - 1) // 64 - s.local_blocks


# ---- stage 2 ----------------------------------------------------------------------------------------

def test_stage2_window_is_block_aligned():
    """Separate window = whole blocks q_b - W + 1 .. q_b (W = local_blocks), then causal; nothing else."""
    s = InfLLMv2Settings(**SMALL, topk=3, local_blocks=3)
    pos = torch.tensor([16 * 9 + 5])  # q_b = 9: window = blocks 7, 8, 9 -> keys 112 .. 149
    none = torch.full((1, 1, 3), -1)
    m = stage2_mask(pos, none, 200, s)[0, 0]
    assert m.nonzero().squeeze(1).tolist() == list(range(112, 150))
    m = stage2_mask(pos, torch.tensor([[[0, 4, -1]]]), 200, s)[0, 0]
    assert m.nonzero().squeeze(1).tolist() == list(range(0, 16)) + list(range(64, 80)) + list(range(112, 150))
    forced = InfLLMv2Settings(**SMALL, topk=4, local_blocks=3, local_mode="forced_in_topk")  # no extra window
    assert stage2_mask(pos, torch.tensor([[[0, 8, 9, -1]]]), 200, forced)[0, 0].nonzero().squeeze(1).tolist() == (
        list(range(0, 16)) + list(range(128, 150)))


@pytest.mark.parametrize("variant", ["hf", "paper", "training", "hf-coarse"])
def test_full_budget_equals_dense(variant):
    """A top-k that covers every block turns the layer into dense causal attention (fp32, 1e-5)."""
    base = SMALL_VARIANTS[variant]
    L = 150  # 10 blocks
    s = InfLLMv2Settings(**{**base.__dict__, "topk": 12 + base.local_blocks})
    q, k, v = qkv(16, 2, L, L, 16, seed=17)
    for positions in (torch.arange(L), torch.arange(100, L), torch.tensor([L - 1])):
        qq = q[:, positions]
        dense = dense_causal(qq, k, v, positions)
        out = infllmv2_attention(qq, k, v, positions, s)
        assert (out - dense).abs().max() <= 1e-5
        idx = select_blocks(qq, *compressed(k, s), positions, L, s)
        assert (sparse_attention_reference(qq, k, v, positions, idx, s) - dense).abs().max() <= 1e-5


def test_full_budget_equals_dense_at_the_real_sizes():
    s = InfLLMv2Settings(topk=40)  # 40 + 32 window >= 40 blocks of 64
    L = 64 * 40
    q, k, v = qkv(16, 1, 256, L, 32, seed=19)
    positions = torch.arange(L - 256, L)
    assert (infllmv2_attention(q, k, v, positions, s) - dense_causal(q, k, v, positions)).abs().max() <= 1e-5


def random_block_idx(Hkv, positions, K, nb, seed):
    """Arbitrary block lists (any order, -1 holes, repeats, future blocks) to exercise the general contract."""
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(-1, nb, (Hkv, len(positions), K), generator=g)
    idx[..., 0] = idx[..., 1]  # a repeat
    return idx


needs_kernel = pytest.mark.skipif(not cpu_kernel.available(), reason="no C++ compiler for the CPU kernel")
IMPLS = ["torch", pytest.param("kernel", marks=needs_kernel)]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("variant", ["hf", "paper", "training"])
@pytest.mark.parametrize("Hq, Hkv, L", [(16, 2, 100), (16, 1, 257), (8, 1, 700), (12, 2, 200)])
def test_fast_path_equals_the_reference(variant, Hq, Hkv, L, impl, monkeypatch):
    s = SMALL_VARIANTS[variant]
    monkeypatch.setattr(blocksparse, "KERNEL_CHUNK", 64)  # several kernel calls per prefill
    q, k, v = qkv(Hq, Hkv, L, L, 16, seed=L)
    c1, c2 = compressed(k, s)
    # prefill (the kernel lays out all of K), a chunk, decode and an unsorted suffix (compact layout)
    for positions in (torch.arange(L), torch.arange(L - 70, L), torch.tensor([L - 1]), torch.arange(L).flip(0)[:40]):
        qq = q[:, positions]
        idx = select_blocks(qq, c1, c2, positions, L, s)
        ref = sparse_attention_reference(qq, k, v, positions, idx, s)
        assert (sparse_attention(qq, k, v, positions, idx, s, impl=impl) - ref).abs().max() <= 1e-5
    positions = torch.arange(L)
    idx = random_block_idx(Hkv, positions, 5, math.ceil(L / 16), seed=L)
    ref = sparse_attention_reference(q, k, v, positions, idx, s)
    assert (sparse_attention(q, k, v, positions, idx, s, impl=impl) - ref).abs().max() <= 1e-5


@pytest.mark.parametrize("impl", IMPLS)
def test_fast_path_equals_the_reference_at_the_real_sizes_in_bf16(impl):
    s = InfLLMv2Settings(topk=16, local_blocks=8)
    L = 64 * 30 + 40
    q, k, v = qkv(16, 1, L, L, 64, seed=23)
    for positions in (torch.arange(L - 130, L), torch.tensor([L - 1])):
        qq = q[:, positions]
        idx = select_blocks(qq, *compressed(k, s), positions, L, s)
        ref = sparse_attention_reference(qq, k, v, positions, idx, s)
        assert (sparse_attention(qq, k, v, positions, idx, s, impl=impl) - ref).abs().max() <= 1e-5
        qb, kb, vb = qq.bfloat16(), k.bfloat16(), v.bfloat16()
        out = sparse_attention(qb, kb, vb, positions, idx, s, impl=impl)
        assert out.dtype == torch.bfloat16
        assert (out.float() - sparse_attention_reference(qb, kb, vb, positions, idx, s).float()).abs().max() <= 2e-2


@pytest.mark.parametrize("impl", IMPLS)
def test_keys_may_be_a_slice_of_a_longer_cache(impl):
    """The backend passes k/v = cache[row, :, :L] (strided views of a [Hkv, S, D] buffer)."""
    s = SMALL_VARIANTS["hf"]
    L, S = 150, 256
    q, kc, vc = qkv(16, 2, L, S, 16, seed=59)
    k, v = kc[:, :L], vc[:, :L]
    assert not k.is_contiguous()
    for positions in (torch.tensor([L - 1]), torch.arange(L - 5, L), torch.arange(L)):
        qq = q[:, positions]
        idx = select_blocks(qq, *compressed(k, s), positions, L, s)
        ref = sparse_attention_reference(qq, k, v, positions, idx, s)
        for dt in (torch.float32, torch.bfloat16):
            out = sparse_attention(qq.to(dt), kc.to(dt)[:, :L], vc.to(dt)[:, :L], positions, idx, s, impl=impl)
            assert (out.float() - ref).abs().max() <= (1e-5 if dt == torch.float32 else 3e-2)


def test_kernel_lse_matches_the_torch_path():
    """The kernel's forward feeds the torch backward: its log-sum-exp must be the same."""
    if not cpu_kernel.available():
        pytest.skip("no C++ compiler for the CPU kernel")
    s = SMALL_VARIANTS["training"]
    L = 180
    q, k, v = qkv(16, 2, L, L, 24, seed=43)  # head dim 24: the kernel's 8-wide tail path
    positions = torch.arange(L)
    idx = select_blocks(q, *compressed(k, s), positions, L, s)
    o1, l1 = blocksparse.blocksparse_forward(q, k, v, positions, idx, s)
    o2, l2 = blocksparse.kernel_forward(q, k, v, positions, idx, s)
    assert (o1 - o2).abs().max() <= 1e-5 and (l1 - l2).abs().max() <= 1e-5


def test_hf_and_paper_budgets_attend_the_same_keys():
    """1 + 63 + 32 either way: separate window (hf) or the same 32 blocks forced inside a top-96 (paper)."""
    L = 400
    q, k, v = qkv(16, 1, L, L, 16, seed=53)
    positions = torch.arange(L)
    masks, outs = [], []
    for name in ("hf", "paper"):
        s = SMALL_VARIANTS[name]
        idx = select_blocks(q, *compressed(k, s), positions, L, s)
        masks.append(stage2_mask(positions, idx, L, s))
        outs.append(sparse_attention(q, k, v, positions, idx, s))
    assert torch.equal(masks[0], masks[1]) and (outs[0] - outs[1]).abs().max() <= 1e-5


def test_rows_without_any_key_give_zero_and_finite_gradients():
    s = InfLLMv2Settings(**SMALL, topk=5, local_blocks=4, local_mode="forced_in_topk")  # no separate window
    q, k, v = qkv(4, 1, 40, 40, 8, seed=29)
    q.requires_grad_(True)
    idx = torch.full((1, 40, 5), -1)
    idx[:, 20:, 0] = 0  # queries 20.. see block 0; queries 0..19 see nothing
    out = sparse_attention(q, k, v, torch.arange(40), idx, s)
    assert out[:, :20].abs().max() == 0 and torch.isfinite(out).all()
    out.sum().backward()
    assert torch.isfinite(q.grad).all()


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("variant, Hq, Hkv", [("hf", 16, 2), ("hf", 16, 1), ("training", 8, 1), ("paper", 16, 2)])
def test_backward_matches_autograd_through_the_reference(variant, Hq, Hkv, impl, monkeypatch):
    s = SMALL_VARIANTS[variant]
    monkeypatch.setattr(blocksparse, "DEFAULT_ROWS", 5)  # chunks that do not align with blocks
    L = 230
    q0, k0, v0 = qkv(Hq, Hkv, L, L, 16, seed=31)
    dout = rand(Hq, 90, 16, seed=32)
    positions = torch.arange(L - 90, L)
    idx = select_blocks(q0[:, positions], *compressed(k0, s), positions, L, s)
    grads = []
    for fast in (True, False):
        q, k, v = (t.clone().requires_grad_(True) for t in (q0[:, positions], k0, v0))
        out = sparse_attention(q, k, v, positions, idx, s, impl=impl) if fast else sparse_attention_reference(q, k, v, positions, idx, s)
        (out * dout).sum().backward()
        grads.append((q.grad, k.grad, v.grad))
    for fast, ref in zip(*grads):
        assert (fast - ref).abs().max() <= 1e-5 * max(1.0, ref.abs().max().item())


def test_one_shot_layer_is_trainable_and_selects_with_the_selection_inputs():
    s = SMALL_VARIANTS["hf"]
    L = 200
    q, k, v = (t.requires_grad_(True) for t in qkv(16, 2, L, L, 16, seed=37))
    positions = torch.arange(L)
    out = infllmv2_attention(q, k, v, positions, s)
    out.square().sum().backward()
    assert all(t.grad is not None and t.grad.abs().sum() > 0 for t in (q, k, v))
    # use_nope: selection sees q_select/k_select, stage 2 sees q/k
    q_sel, k_sel = rand(16, L, 16, seed=38), rand(2, L, 16, seed=39)
    with torch.no_grad():
        got = infllmv2_attention(q, k, v, positions, s, q_select=q_sel, k_select=k_sel)
        idx = select_blocks_reference(q_sel, *compressed(k_sel, s), positions, L, s)
        assert (got - sparse_attention_reference(q, k, v, positions, idx, s)).abs().max() <= 1e-5


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_fast_path_on_cuda_equals_the_reference():
    s = InfLLMv2Settings(topk=16, local_blocks=8)
    L = 64 * 30 + 40
    q, k, v = (t.cuda().requires_grad_(True) for t in qkv(16, 1, 200, L, 64, seed=41))
    positions = torch.arange(L - 200, L, device="cuda")
    idx = select_blocks(q, *compressed(k, s), positions, L, s)
    assert torch.equal(idx.cpu(), select_blocks(q.cpu(), *compressed(k.cpu(), s), positions.cpu(), L, s))
    out = sparse_attention(q, k, v, positions, idx, s)
    ref = sparse_attention_reference(q, k, v, positions, idx, s)
    assert (out - ref).abs().max() <= 1e-4
    g = torch.autograd.grad(out.sum(), (q, k, v))
    gr = torch.autograd.grad(ref.sum(), (q, k, v))
    assert all((a - b).abs().max() <= 1e-4 for a, b in zip(g, gr))

"""The engine with InfLLM v2 (attention/infllmv2/paged.py): greedy output equals the reference generate()
token for token, and the paged compressed keys always equal compression from scratch.

Settings: the real block geometry (block 64 = one page, kernels 32/16, coarse 128/64) with a tiny budget
(init 1 + top-1 + a 1-block window), so a few hundred tokens are already well beyond the budget.
"""

from __future__ import annotations

import dataclasses
import importlib.util

import pytest
import torch

from minicpm4.attention.infllmv2.compress import compress_keys
from minicpm4.attention.infllmv2.paged import PagedInfLLMv2Attention, check_page_size, make_paged_infllmv2_backend
from minicpm4.attention.infllmv2.paged_cache import PagedKernelEntries, gather_slots, page_writes
from minicpm4.config import tiny
from minicpm4.engine import LLM, SamplingParams
from minicpm4.generate import generate
from minicpm4.model import build_model

pytestmark = pytest.mark.usefixtures("one_thread")

GEOMETRY = dict(kernel_size=32, kernel_stride=16, block_size=64, window_size=64, topk=2, init_blocks=1)
LENGTHS = (5, 70, 190, 260, 400)  # dense_len 200: below, below, crossing while generating, above, above
NEW = 24
HAS_FAST_FORWARD = importlib.util.find_spec("minicpm4.engine.fast_forward") is not None


def sparse_model(dense_len=200, lse="exact", variant=None, seed=1):
    cfg = tiny(initializer_range=0.3).with_sparse(True, variant=variant, dense_len=dense_len, **GEOMETRY)
    if lse != "exact":
        sparse = cfg.sparse_config
        cfg = cfg.replace(sparse_config=dataclasses.replace(sparse, extra={**sparse.extra, "lse": lse}))
    return build_model(cfg, seed=seed).eval()


def prompts_of(lengths=LENGTHS, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(4, 1024, (n,), generator=g).tolist() for n in lengths]


PARAMS = SamplingParams(max_new_tokens=NEW, ignore_eos=True)
_REFS: dict = {}


def reference(model, key, prompts):
    if key not in _REFS:
        _REFS[key] = [o.token_ids for o in generate(model, prompts, PARAMS)]
    return _REFS[key]


def engine(model, **options):
    options = {"block_size": 64, "kv_cache_tokens": 8192, "max_num_batched_tokens": 96, "fast_forward": False, **options}
    return LLM(model=model, **options)


def run(llm, prompts):
    return [o.token_ids for o in llm.generate(prompts, PARAMS)]


def assert_entries_match_scratch(llm):
    """Every valid paged entry of every running sequence == compress_keys of that sequence's keys now."""
    runner = llm.engine.runner
    backend, cache, bs = runner.backend, runner.cache, runner.config.block_size
    state = backend._states.get(cache)
    if state is None:
        return 0
    checked = 0
    for seq in llm.engine.scheduler.running:
        L = seq.num_computed_tokens
        for layer_idx, layer in state.layers.items():
            for kc in layer.kernels():
                n = (L - kc.kernel_size) // kc.kernel_stride + 1 if L >= kc.kernel_size else 0
                if n == 0:
                    continue
                ref = compress_keys(gather_slots(cache.k[layer_idx], seq.block_table, 0, L), kc.kernel_size, kc.kernel_stride)
                for e in range(kc.offset, n + kc.offset):
                    page = seq.block_table[e // kc.per_page]
                    if e % kc.per_page < kc.valid[page]:
                        assert torch.equal(kc.entries[:, page, e % kc.per_page], ref[:, e - kc.offset]), (layer_idx, e)
                        checked += 1
    return checked


# ---- greedy engine == reference ------------------------------------------------------------------------

@pytest.mark.parametrize("dense_len, lse", [(200, "exact"), (0, "exact"), (200, "coarse"), (10_000, "exact")])
def test_engine_equals_reference_chunked_with_prefix_reuse(dense_len, lse):
    model = sparse_model(dense_len, lse)
    prompts = prompts_of()
    ref = reference(model, (dense_len, lse), prompts)
    if dense_len == 200 and lse == "exact":  # the test is meaningful: sparse attention changes the output
        dense = build_model(model.config.with_sparse(False), seed=1).eval()
        assert [o.token_ids for o in generate(dense, prompts, PARAMS)] != ref
    llm = engine(model)
    assert run(llm, prompts) == ref
    assert llm.engine.stats.prefix_cache_hit_tokens_total == 0
    assert run(llm, prompts) == ref  # second round: the full prompt pages (and their entries) come from the cache
    assert llm.engine.stats.prefix_cache_hit_tokens_total > 0


@pytest.mark.parametrize("fast_forward", [False] + ([True] if HAS_FAST_FORWARD else []))
def test_engine_equals_reference_unchunked_without_prefix_cache(fast_forward):
    model = sparse_model(200)
    prompts = prompts_of()
    llm = engine(model, enable_chunked_prefill=False, enable_prefix_caching=False, max_num_batched_tokens=512,
                 fast_forward=fast_forward)
    assert run(llm, prompts) == reference(model, (200, "exact"), prompts)


@pytest.mark.parametrize("impl", ["paged-torch", "kernel", "torch", "gather"])
def test_stage2_paths_agree(impl, monkeypatch):
    """Every stage-2 path gives the reference tokens: "paged-torch" is the default path (pseudo-sequences
    through paged_attention) with the paged CPU kernel switched off, i.e. what a GPU runs, in small chunks."""
    from minicpm4.attention import paged_kernel
    from minicpm4.attention.infllmv2 import paged

    model = sparse_model(200)
    prompts = prompts_of()
    llm = engine(model)
    if impl == "paged-torch":
        monkeypatch.setattr(paged_kernel, "supports", lambda *args: False)
        monkeypatch.setattr(paged, "TORCH_GATHER_ELEMENTS", 3 * 64 * 16 * 5)  # 5 queries per call
    else:
        llm.engine.runner.backend.impl = impl
    assert run(llm, prompts) == reference(model, (200, "exact"), prompts)


def test_forced_in_topk_variant():
    model = sparse_model(0, variant="training")  # local blocks forced inside the top-k, no separate window
    prompts = prompts_of((70, 260, 400), seed=3)
    assert run(engine(model, max_num_batched_tokens=128), prompts) == [o.token_ids for o in generate(model, prompts, PARAMS)]


def test_preemption_and_prefix_hits_never_leak_stale_entries():
    """A pool too small for the requests: sequences are preempted and recomputed, pages are freed and handed
    to other sequences at other positions. After every step every valid entry equals scratch, and the
    output equals the reference."""
    model = sparse_model(0, "coarse")
    prompts = prompts_of((400, 330, 260, 190, 120), seed=4)
    ref = [o.token_ids for o in generate(model, prompts, PARAMS)]
    llm = engine(model, kv_cache_tokens=16 * 64, max_num_batched_tokens=128)
    ids = [llm.engine.add_request(p, PARAMS) for p in prompts]
    final, checked = {}, 0
    while len(final) < len(ids):
        for out in llm.engine.step():
            if out.finished:
                final[out.request_id] = out.token_ids
        checked += assert_entries_match_scratch(llm)
    assert llm.engine.stats.preemptions_total > 0 and checked > 0
    assert llm.engine.stats.prefix_cache_hit_tokens_total > 0  # resumed sequences remapped their own cached pages
    assert [final[i] for i in ids] == ref
    backend, cache = llm.engine.runner.backend, llm.engine.runner.cache
    backend.invalidate_pages(cache, list(range(cache.num_blocks)))
    assert not any(v for layer in backend._states[cache].layers.values() for kc in layer.kernels() for v in kc.valid)


# ---- the paged compressed keys directly --------------------------------------------------------------

def _write(pool, table, lo, keys, kernels):
    """Write keys [Hkv, T, D] at positions lo .. lo + T - 1 of a sequence with pages `table` (write rule first)."""
    B = pool.shape[2]
    for page, first in page_writes([table], [keys.shape[1]], [lo + keys.shape[1]], B):
        for kc in kernels:
            kc.invalidate(page, first)
    for t in range(keys.shape[1]):
        p = lo + t
        pool[table[p // B], :, p % B] = keys[:, t]


def _check(pool, table, L, kernels):
    for kc in kernels:
        got = kc.up_to(pool, table, L)
        ref = compress_keys(gather_slots(pool, table, 0, L), kc.kernel_size, kc.kernel_stride)
        assert got.shape == ref.shape and torch.equal(got, ref), (kc.kernel_size, L)


def test_paged_entries_equal_scratch_through_reallocation_and_sharing():
    g = torch.Generator().manual_seed(0)
    NB, H, B, D = 8, 2, 64, 8
    pool = torch.zeros(NB, H, B, D, dtype=torch.bfloat16)
    kernels = [PagedKernelEntries.allocate(NB, H, B, D, 32, 16, "cpu"), PagedKernelEntries.allocate(NB, H, B, D, 128, 64, "cpu")]
    rand = lambda n: torch.randn(H, n, D, generator=g).to(pool.dtype)  # noqa: E731
    # Sequence A, pages 3, 1, 4: chunks and decode steps, checked after each.
    a, pos = [3, 1, 4], 0
    for T in (20, 1, 40, 3, 64, 1, 1, 50):
        _write(pool, a, pos, rand(T), kernels)
        pos += T
        _check(pool, a, pos, kernels)
    assert kernels[0].valid[3] == 4 and kernels[0].valid[1] == 4
    # Rollback (verification): rewrite from position 150 on; entries covering slots >= 150 are dropped first.
    _write(pool, a, 150, rand(30), kernels)
    _check(pool, a, 180, kernels)
    # A is freed; B gets pages 4 (A's last page, now at logical 0) and 1 (A's middle page), fresh keys: no stale entry.
    b = [4, 1, 6]
    _write(pool, b, 0, rand(130), kernels)
    _check(pool, b, 130, kernels)
    # C shares B's first (full, computed) page through the prefix cache and continues with its own pages.
    valid_before = kernels[0].valid[4]
    c = [4, 2, 5]
    _write(pool, c, 64, rand(100), kernels)
    assert kernels[0].valid[4] == valid_before  # the shared page was not written, its entries stay
    _check(pool, c, 164, kernels)
    _check(pool, b, 130, kernels)  # B still sees its own pages' entries


def test_page_size_and_use_nope_errors():
    cfg = tiny().with_sparse(True, **GEOMETRY)
    check_page_size(cfg, 64)
    check_page_size(tiny(), 16)  # dense model: any page size
    with pytest.raises(ValueError, match="block_size"):
        check_page_size(cfg, 32)
    with pytest.raises(ValueError, match="block_size"):
        make_paged_infllmv2_backend(cfg, block_size=16)
    with pytest.raises(NotImplementedError, match="use_nope"):
        make_paged_infllmv2_backend(cfg.with_sparse(True, use_nope=True))
    assert isinstance(make_paged_infllmv2_backend(cfg), PagedInfLLMv2Attention)
    model = build_model(cfg, seed=1).eval()
    with pytest.raises(ValueError, match="block_size"):  # refused when the engine is built
        engine(model, block_size=32)
    assert LLM(model=model, kv_cache_tokens=1024).engine.config.block_size == 64  # follows the sparse block


@pytest.mark.parametrize("lse", ["exact", "coarse"])
def test_per_query_selection_equals_one_sequence_at_a_time(lse):
    """select_blocks with per-query compressed keys (the engine's batched decode rows of sequences of different
    lengths, padded) selects for each query the block set it gets alone."""
    from minicpm4.attention.infllmv2.selection import select_blocks
    from minicpm4.attention.infllmv2.settings import InfLLMv2Settings

    s = InfLLMv2Settings(topk=3, local_blocks=1, lse=lse, dense_len=0)
    g = torch.Generator().manual_seed(1)
    H, G, D = 2, 4, 16
    lengths = [40, 700, 129, 1024, 300]
    keys = [torch.randn(H, L, D, generator=g) for L in lengths]
    q = torch.randn(H * G, len(lengths), D, generator=g)
    c1s = [compress_keys(k, 32, 16) for k in keys]
    c2s = [compress_keys(k, 128, 64) for k in keys]
    pad = lambda cs: torch.stack([torch.nn.functional.pad(c, (0, 0, 0, max(x.shape[1] for x in cs) - c.shape[1]), value=7.0)  # noqa: E731
                                  for c in cs], dim=1)  # [H, S, n, D], padding never visible
    pos = torch.tensor(lengths) - 1
    got = select_blocks(q, pad(c1s), pad(c2s), pos, max(lengths), s)
    for i, L in enumerate(lengths):
        alone = select_blocks(q[:, i:i + 1], c1s[i], c2s[i], pos[i:i + 1], L, s)  # [H, 1, K_i]
        want = [sorted(b for b in row if b >= 0) for row in alone[:, 0].tolist()]
        assert [sorted(b for b in row if b >= 0) for row in got[:, i].tolist()] == want

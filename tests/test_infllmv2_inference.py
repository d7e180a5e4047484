"""InfLLM v2 inference integration: incremental compressed keys, the cached backend, config and CLI switches.

Small settings throughout (block 16, kernels 8/4, coarse 32/16, a few blocks of budget) so that a tiny
model reaches the sparse regime in a few hundred tokens.
"""

import json
import math

import pytest
import torch

from minicpm4.attention.infllmv2.compress import compress_keys
from minicpm4.attention.infllmv2.compressed_cache import CompressedKeyCache, KernelCache
from minicpm4.config import ConfigError, MiniCPMConfig, RopeScaling, SparseConfig, minicpm4_05b, minicpm4_8b, tiny
from minicpm4.rope_factors import MINICPM4_8B_128K_FACTORS, factors_128k, yarn_ramp

# ---- incremental compressed keys == compression from scratch ----------------------------------


def _kernel_caches(B, H, S, D):
    return [KernelCache.allocate(B, H, S, D, 8, 4, "cpu"), KernelCache.allocate(B, H, S, D, 32, 16, "cpu")]


def _check(caches, source, row, end):
    for kc in caches:
        inc = kc.up_to(row, source[row, :, :end])
        ref = compress_keys(source[row, :, :end], kc.kernel_size, kc.kernel_stride)
        assert inc.shape == ref.shape and torch.equal(inc, ref), (kc.kernel_size, end)


def test_incremental_windows_equal_scratch_for_chunks_of_every_size():
    g = torch.Generator().manual_seed(0)
    B, H, S, D = 2, 2, 200, 8
    source = torch.zeros(B, H, S, D, dtype=torch.bfloat16)
    caches = _kernel_caches(B, H, S, D)
    pos = 0
    for T in [1, 3, 5, 1, 1, 17, 4, 33, 1, 2, 64, 1, 9, 1, 1]:  # decode steps and prefill chunks
        for kc in caches:
            for row in range(B):
                kc.truncate(row, pos)
        source[:, :, pos:pos + T] = torch.randn(B, H, T, D, generator=g).to(source.dtype)
        for row in range(B):
            _check(caches, source, row, pos + T)
        pos += T
    assert caches[0].valid == [(pos - 8) // 4 + 1] * B


def test_bootstrap_after_dense_phase_then_incremental():
    """Nothing is computed while dense; the first call compresses everything, later calls extend."""
    g = torch.Generator().manual_seed(1)
    source = torch.randn(1, 2, 300, 8, generator=g)
    caches = _kernel_caches(1, 2, 300, 8)
    _check(caches, source, 0, 150)  # bootstrap at 150 keys
    for end in range(151, 200):
        _check(caches, source, 0, end)


def test_verification_rollback_drops_windows_of_rejected_drafts():
    """Drafts at P..P+4 enter the scratch windows; accepting 2 and writing the bonus token at P+2
    (a different key) must leave exactly the windows of the accepted sequence."""
    g = torch.Generator().manual_seed(2)
    B, H, S, D = 1, 2, 128, 8
    source = torch.zeros(B, H, S, D)
    caches = _kernel_caches(B, H, S, D)
    source[:, :, :61] = torch.randn(B, H, 61, D, generator=g)
    _check(caches, source, 0, 61)
    P = 61
    for accepted in [2, 0, 4, 1]:
        for kc in caches:
            kc.truncate(0, P)
        source[:, :, P:P + 5] = torch.randn(B, H, 5, D, generator=g)  # 5 drafts (window ends at 64, 68)
        _check(caches, source, 0, P + 5)
        P += accepted  # next call: the bonus token at P + accepted overwrites the first rejected slot
        for kc in caches:
            kc.truncate(0, P)
        source[:, :, P] = torch.randn(B, H, D, generator=g)
        _check(caches, source, 0, P + 1)
        P += 1


def test_rows_are_independent_and_use_nope_keeps_a_pre_rope_cache():
    st = CompressedKeyCache(batch_size=2, num_kv_heads=2, max_seq_len=64, head_dim=8, kernel_size=8, kernel_stride=4,
                            coarse_kernel_size=None, coarse_kernel_stride=None, use_nope=True)
    layer = st.layer(0, torch.device("cpu"), torch.float32)
    assert layer.c2 is None and layer.pre_rope_k.shape == (2, 2, 64, 8)
    k = torch.randn(2, 2, 3, 8)
    layer.write_pre_rope(k, torch.tensor([[10, 11, 12], [40, 41, 42]]))
    assert torch.equal(layer.pre_rope_k[0, :, 10:13], k[0]) and torch.equal(layer.pre_rope_k[1, :, 40:43], k[1])
    layer.c1.up_to(0, layer.pre_rope_k[0, :, :13])
    layer.c1.up_to(1, layer.pre_rope_k[1, :, :43])
    st.truncate(1, 20)
    assert layer.c1.valid == [2, 4]  # row 0 untouched; row 1 keeps windows ending at or before slot 19


# ---- config switches: sparse on/off and the 128K context extension -------------------------------


def test_with_sparse_turns_on_off_and_overrides():
    cfg = tiny()
    on = cfg.with_sparse(True, dense_len=-1, block_size=16, kernel_size=8, kernel_stride=4, window_size=32)
    assert on.sparse_config.dense_len == -1 and on.sparse_config.topk == 64 and cfg.sparse_config is None
    assert on.with_sparse(True).sparse_config == on.sparse_config  # on again keeps the config's own values
    assert on.with_sparse(False).sparse_config is None
    assert on.with_sparse(True, variant="paper").to_dict()["sparse_config"]["variant"] == "paper"
    with pytest.raises(ConfigError, match="sparse_config: unknown key"):
        cfg.with_sparse(True, top_k=3)
    with pytest.raises(ConfigError, match="sparse_config.kernel_stride"):
        cfg.with_sparse(True, kernel_stride=7)


def test_published_128k_list_is_the_shipped_8b_factors_times_a_yarn_ramp():
    ramp = yarn_ramp(64)
    assert ramp[:21] == [1.0] * 21 and ramp[46:] == [4.0] * 18
    assert [round(r, 3) for r in ramp[21:24]] == [1.03, 1.061, 1.095] and round(ramp[45], 3) == 3.586
    shipped = [p / r for p, r in zip(MINICPM4_8B_128K_FACTORS, ramp)]
    # MINICPM4.md §2.2/§2.4: shipped 8B factors 0.9977997 ... 31.0239, idx 20 = 4.0487, idx 21 = 4.6156
    assert round(shipped[0], 7) == 0.9977997 and round(shipped[63], 4) == 31.0239
    assert round(shipped[20], 4) == 4.0487 and round(shipped[21], 4) == 4.6156
    steps = [math.log(b / a) for a, b in zip(shipped, shipped[1:])]
    assert all(s > 0 for s in steps) and max(steps) < 0.14  # a smooth LongRoPE curve, no kink at the ramp ends


def test_with_yarn_128k_for_8b_and_derived_for_05b():
    big = minicpm4_8b().with_yarn_128k()
    assert big.rope_scaling.long_factor == MINICPM4_8B_128K_FACTORS == big.rope_scaling.short_factor
    assert big.rope_scaling.original_max_position_embeddings == 32768 and big.max_position_embeddings == 131072
    small = minicpm4_05b()
    ext = small.with_yarn_128k().rope_scaling.long_factor
    assert ext == factors_128k(64, small.rope_scaling.long_factor)
    ratios = [e / f for e, f in zip(ext, small.rope_scaling.long_factor)]
    assert ratios[:11] == pytest.approx([1.0] * 11) and ratios[23:] == pytest.approx([4.0] * 9)  # index 2i of the 128 ramp
    from minicpm4.model import LongRoPE

    assert LongRoPE(small.with_yarn_128k()).table(True, torch.device("cpu"))[1] == pytest.approx(math.sqrt(17 / 15))
    with pytest.raises(ConfigError, match="original_max_position_embeddings"):
        tiny().with_yarn_128k()  # trained to 512, not 32K
    with pytest.raises(ConfigError, match="max_position_embeddings"):
        big.with_yarn_128k()  # twice would stretch twice
    with pytest.raises(ConfigError, match="rope_scaling"):
        tiny(rope_scaling=None).with_yarn_128k()


# ---- the backend on a tiny model --------------------------------------------------------------

from minicpm4.attention import make_backend  # noqa: E402
from minicpm4.attention.dense import DenseAttention  # noqa: E402
from minicpm4.generate import generate, prefill  # noqa: E402
from minicpm4.kv_cache import StaticKVCache  # noqa: E402
from minicpm4.model import build_model  # noqa: E402
from minicpm4.sampling import SamplingParams  # noqa: E402

# Blocks of 16 tokens, kernels 8/4 (coarse 32/16), 2 local blocks + 4 chosen: sparse from 40 tokens on,
# and from ~100 tokens on a query sees well under half of its blocks.
SMALL = dict(block_size=16, kernel_size=8, kernel_stride=4, window_size=32, topk=4, init_blocks=1, dense_len=40)
T_LONG = 160


def sparse_model(lse="exact", use_nope=False, variant="hf", seed=1, **overrides):
    from minicpm4.attention.infllmv2.backend import InfLLMv2Attention
    from minicpm4.attention.infllmv2.settings import settings_from_config

    cfg = tiny(initializer_range=0.3).with_sparse(True, **{**SMALL, "use_nope": use_nope, **overrides})
    model = build_model(cfg, seed=seed).eval()
    model.set_attention_backend(InfLLMv2Attention(settings_from_config(cfg.sparse_config, variant=variant, lse=lse)))
    return model


def ids_of(n, seed=0, batch=1):
    return torch.randint(4, 1024, (batch, n), generator=torch.Generator().manual_seed(seed))


def close(a, b, tol=1e-4):
    return (a - b).abs().max().item() <= tol * max(1.0, b.abs().max().item())


@pytest.fixture(scope="module")
def exact_model():
    return sparse_model()


def test_config_selects_the_backend_without_silent_fallback():
    from minicpm4.attention.infllmv2.backend import InfLLMv2Attention

    cfg = tiny().with_sparse(True, **SMALL)
    assert isinstance(make_backend(cfg), InfLLMv2Attention) and isinstance(make_backend(tiny()), DenseAttention)
    assert make_backend(cfg.with_sparse(True, use_nope=True)).needs_pre_rope


@pytest.mark.parametrize("lse, use_nope, variant", [("exact", False, "hf"), ("coarse", False, "hf"), ("exact", True, "hf"),
                                                    ("exact", False, "training")])  # training: local blocks forced in top-k
def test_chunked_prefill_and_decode_equal_the_one_shot_forward(lse, use_nope, variant):
    model = sparse_model(lse, use_nope, variant)
    ids = ids_of(T_LONG)
    full = (lse, use_nope, variant) == ("exact", False, "hf")  # the other cases run a shorter version
    with torch.no_grad():
        ref = model(ids)  # no cache: the training path (one-shot infllmv2_attention)
        if full:
            dense = build_model(model.config.with_sparse(False), seed=1).eval()(ids)
            assert not close(ref, dense, 1e-2), "the sparse model should differ from the dense one at this length"
        for chunk in (T_LONG, 37, 16) if full else (37,):
            cache = StaticKVCache.for_model(model, 1, 192)
            out = [model(ids[:, s:s + chunk], positions=torch.arange(s, min(s + chunk, T_LONG))[None], kv_cache=cache)
                   for s in range(0, T_LONG, chunk)]
            assert close(torch.cat(out, 1), ref), f"chunk {chunk}"
        start = 130 if full else 148
        cache = StaticKVCache.for_model(model, 1, 192)
        out = [model(ids[:, :start], kv_cache=cache)]
        for t in range(start, T_LONG):  # (crossing dense_len while decoding: next test)
            out.append(model(ids[:, t:t + 1], positions=torch.tensor([[t]]), kv_cache=cache))
        assert close(torch.cat(out, 1), ref)


def _assert_state_equals_scratch(model, cache, row, end):
    st = cache.backend_state["infllmv2"]
    for layer_idx, layer in st.layers.items():
        source = cache.k[layer_idx] if layer.pre_rope_k is None else layer.pre_rope_k
        for kc in [layer.c1] + ([layer.c2] if layer.c2 is not None else []):
            inc = kc.up_to(row, source[row, :, :end])
            assert torch.equal(inc, compress_keys(source[row, :, :end], kc.kernel_size, kc.kernel_stride))


@pytest.mark.parametrize("use_nope", [False, True])
def test_crossing_dense_len_keeps_compressed_keys_equal_to_scratch_every_step(use_nope):
    model = sparse_model("coarse", use_nope)
    ids = ids_of(20, seed=3)
    cache = StaticKVCache.for_model(model, 1, 160)
    with torch.no_grad():
        logits = prefill(model, ids, torch.tensor([20]), cache)
        tokens = ids[0].tolist()
        for pos in range(20, 84):  # dense_len = 40; from 80 on a query sees 6 of its 6+ blocks
            nxt = int(logits.argmax(-1))
            tokens.append(nxt)
            logits = model(torch.tensor([[nxt]]), positions=torch.tensor([[pos]]), kv_cache=cache)[:, 0]
            if pos + 1 >= model.config.sparse_config.dense_len:
                _assert_state_equals_scratch(model, cache, 0, pos + 1)
        assert "infllmv2" in cache.backend_state and cache.backend_state["infllmv2"].layers[0].c1.valid[0] > 0
        ref = model(torch.tensor([tokens]))  # greedy tokens are the argmax of the one-shot forward
    assert ref[0, 19:-1].argmax(-1).tolist() == tokens[20:]


def test_draft_verification_equals_sequential_decode_and_rollback(exact_model):
    """Multi-token verification of a draft chain, partial acceptance, then more decoding: logits
    equal the one-shot forward of the accepted text, and the compressed keys equal scratch."""
    model = exact_model
    ids = ids_of(150, seed=5)[0]
    cache = StaticKVCache.for_model(model, 1, 200)
    accepted = ids[:100].tolist()
    with torch.no_grad():
        model(ids[None, :100], kv_cache=cache)
        pos = 100
        for n_draft, n_accept, seed in [(5, 2, 11), (6, 0, 12), (4, 4, 13), (7, 3, 14)]:
            drafts = ids_of(n_draft, seed=seed)[0]
            logits = model(drafts[None], positions=torch.arange(pos, pos + n_draft)[None], kv_cache=cache)
            ref = model(torch.tensor([accepted + drafts.tolist()]))
            assert close(logits, ref[:, pos:]), "verification logits differ from the one-shot forward"
            accepted += drafts[:n_accept].tolist()
            pos += n_accept
            bonus = int(ids[pos])  # the next call writes at pos: the first rejected slot
            model(torch.tensor([[bonus]]), positions=torch.tensor([[pos]]), kv_cache=cache)
            accepted.append(bonus)
            pos += 1
            _assert_state_equals_scratch(model, cache, 0, pos)
        out = [model(ids[None, t:t + 1], positions=torch.tensor([[p]]), kv_cache=cache)
               for p, t in zip(range(pos, pos + 5), range(140, 145))]
        ref = model(torch.tensor([accepted + ids[140:145].tolist()]))
    assert close(torch.cat(out, 1), ref[:, pos:])


def test_full_budget_sparse_equals_dense():
    """Top-k covering every block: the sparse model is the dense model (MINICPM4.md §3.3, last line)."""
    model = sparse_model(topk=64, dense_len=-1)
    dense = build_model(model.config.with_sparse(False), seed=1).eval()
    ids = ids_of(T_LONG, seed=7)
    with torch.no_grad():
        assert close(model(ids), dense(ids))
        cache = StaticKVCache.for_model(model, 1, 192)
        model(ids[:, :100], kv_cache=cache)
        step = model(ids[:, 100:101], positions=torch.tensor([[100]]), kv_cache=cache)
        assert close(step, dense(ids[:, :101])[:, 100:])


def test_batched_rows_at_different_lengths_equal_one_by_one(exact_model):
    prompts = [ids_of(n, seed=n)[0].tolist() for n in (30, 95, 61)]  # dense, sparse, sparse after a few steps
    params = SamplingParams(max_new_tokens=10, ignore_eos=True)
    batched = generate(exact_model, prompts, params, prefill_chunk_size=32)
    for prompt, out in zip(prompts, batched):
        alone = generate(exact_model, [prompt], params)[0].token_ids
        assert out.token_ids == alone
        with torch.no_grad():
            ref = exact_model(torch.tensor([prompt + alone]))[0, len(prompt) - 1:-1].argmax(-1).tolist()
        assert ref == alone


def test_training_path_is_differentiable():
    model = sparse_model()
    model.train()
    ids = ids_of(80, seed=9)
    loss = torch.nn.functional.cross_entropy(model(ids)[0, :-1], ids[0, 1:])
    loss.backward()
    grads = [model.model.layers[i].self_attn.k_proj.weight.grad for i in range(2)]
    assert all(g is not None and torch.isfinite(g).all() and g.abs().sum() > 0 for g in grads)


# ---- CLI and API switches ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def sparse_model_dir(tmp_path_factory, hub_folder):
    """A tiny checkpoint folder whose config.json has a (small) sparse_config and 32K LongRoPE."""
    rope = RopeScaling([1.0 + i for i in range(8)], [1.0 + i for i in range(8)], 32768)
    cfg = tiny(vocab_size=73448, eos_token_id=[2, 73440], max_position_embeddings=32768, rope_scaling=rope)
    return hub_folder(tmp_path_factory.mktemp("tiny-sparse"), cfg.with_sparse(True, **{**SMALL, "dense_len": -1}))


@pytest.fixture(scope="module")
def plain_model_dir(tmp_path_factory, hub_folder):
    """A tiny dense checkpoint trained (so its config says) to 512 tokens."""
    return hub_folder(tmp_path_factory.mktemp("tiny-plain"), tiny(vocab_size=73448, eos_token_id=[2, 73440]))


def test_cli_help_lists_the_switches(capsys):
    from minicpm4.cli import main

    with pytest.raises(SystemExit):
        main(["generate", "--help"])
    out = capsys.readouterr().out
    assert "--sparse {on,off,auto}" in out and "--sparse-variant NAME" in out and "--context {128k}" in out


def test_api_switches_pick_the_backend_and_rope(sparse_model_dir):
    import minicpm4
    from minicpm4.attention.infllmv2.backend import InfLLMv2Attention

    auto = minicpm4.from_pretrained(sparse_model_dir, dtype="float32")
    assert isinstance(auto.model.attention_backend, InfLLMv2Attention)  # config.json has sparse_config
    off = minicpm4.from_pretrained(sparse_model_dir, dtype="float32", sparse=False)
    assert isinstance(off.model.attention_backend, DenseAttention) and off.config.sparse_config is None
    ext = minicpm4.from_pretrained(sparse_model_dir, dtype="float32", context_extension="128k")
    assert ext.config.max_position_embeddings == 131072 and ext.model.rotary.config is ext.config
    assert ext.config.rope_scaling.long_factor == factors_128k(16, [1.0 + i for i in range(8)])
    prompt = "word " * 60  # long enough for the small blocks to leave some out
    a = auto.generate(prompt, max_new_tokens=6, temperature=0, ignore_eos=True).token_ids
    b = off.generate(prompt, max_new_tokens=6, temperature=0, ignore_eos=True).token_ids
    assert len(a) == len(b) == 6


@pytest.mark.parametrize("flags", [["--sparse", "on"], ["--sparse", "off"], ["--sparse", "auto", "--context", "128k"]])
def test_cli_runs_with_each_switch(flags, sparse_model_dir, capsys):
    from minicpm4.cli import main

    assert main(["generate", "--model", str(sparse_model_dir), "--dtype", "float32", "-n", "4", "--temperature", "0",
                 *flags, "Hello"]) == 0
    assert "4 generated" in capsys.readouterr().err


@pytest.mark.parametrize("argv, needle", [
    (["--context", "128k"], "original_max_position_embeddings"),  # trained to 512, not 32K
    (["--sparse", "off", "--sparse-variant", "paper"], "--sparse-variant"),
    (["--sparse-variant", "nope"], "unknown InfLLM v2 budget variant"),
])
def test_cli_switch_errors_are_one_line(argv, needle, plain_model_dir, capsys):
    from minicpm4.cli import main

    assert main(["generate", "--model", str(plain_model_dir), "-n", "2", *argv, "hi"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert needle in err[-1] and not any("Traceback" in line for line in err)

"""Speculative decoding in the engine is lossless: greedy output equals plain greedy decoding (the reference
generate()) token for token — dense and InfLLM v2 attention (across dense_len), every tree shape, random and
oracle drafts, concurrent requests, chunked prefill, both forwards; after compaction the paged KV and the
compressed keys equal plain decoding's; at T > 0 the output distribution is the target's (chi-square)."""

from __future__ import annotations

import pytest
import torch

from minicpm4.config import tiny
from minicpm4.engine import EngineConfig, LLMEngine, SamplingParams
from minicpm4.generate import generate
from minicpm4.model import build_model
from minicpm4.speculative.draft_model import build_draft
from minicpm4.speculative.eagle import EagleDrafter
from minicpm4.speculative.tree import TreeShape
from tests.engine.test_engine_infllmv2 import PARAMS as SPARSE_PARAMS, prompts_of as sparse_prompts, sparse_model
from tests.speculative.drafters import GREEDY, PROMPTS, OracleDrafter, prompts_of, run_all

pytestmark = pytest.mark.usefixtures("one_thread")

SHAPES = {"cpmcu-cli": TreeShape(2, 10, 12), "deep": TreeShape(4, 3, 16), "chain": TreeShape(3, 1, 4),
          "wide": TreeShape(1, 8, 9), "max": TreeShape(6, 10, 64)}


@pytest.mark.parametrize("fast", [False, True], ids=["model-forward", "fast-forward"])
@pytest.mark.parametrize("shape", list(SHAPES))
def test_random_eagle_draft_greedy_equals_plain(model, reference, shape, fast):
    drafter = EagleDrafter(model, build_draft(model.config, seed=1), SHAPES[shape])
    engine = LLMEngine(model, config=EngineConfig(fast_forward=fast, block_size=16), drafter=drafter)
    assert run_all(engine, PROMPTS, GREEDY, stagger=2) == reference
    assert engine.stats.spec_verify_total > 0


@pytest.mark.parametrize("frspec", [16, 200, 1024])
def test_frspec_restricted_draft_greedy_equals_plain(model, reference, frspec):
    ids = torch.randperm(1024, generator=torch.Generator().manual_seed(0))[:frspec]
    drafter = EagleDrafter(model, build_draft(model.config, seed=2), TreeShape(2, 4, 8), frspec_ids=ids)
    engine = LLMEngine(model, config=EngineConfig(block_size=16), drafter=drafter)
    assert run_all(engine, PROMPTS, GREEDY) == reference
    assert drafter.head.shape[0] == frspec


@pytest.mark.parametrize("case", [dict(good_depth=3, depth=4, wrong=1), dict(good_depth=1, depth=3, wrong=3),
                                  dict(good_depth=6, depth=6, wrong=0)], ids=["long-path", "short-path", "chain"])
@pytest.mark.parametrize("engine_case", [dict(block_size=16, max_num_batched_tokens=16),
                                         dict(block_size=64, enable_prefix_caching=False)], ids=["chunked", "plain"])
def test_accepted_paths_commit_the_right_kv(model, reference, case, engine_case):
    """An oracle draft gets long paths accepted: later tokens depend on the committed K/V, so equality with
    the reference checks the compaction; the mean accepted length shows the paths were taken."""
    drafter = OracleDrafter([p + r for p, r in zip(PROMPTS, reference)], **case)
    engine = LLMEngine(model, config=EngineConfig(**engine_case), drafter=drafter)
    assert run_all(engine, PROMPTS, GREEDY, stagger=3) == reference
    accepted = engine.stats.spec_tokens_total / engine.stats.spec_verify_total
    assert accepted > 1 + 0.6 * case["good_depth"] if case["good_depth"] < 6 else accepted > 4


def test_many_concurrent_requests_are_verified_together(model):
    prompts = prompts_of([5 + 7 * i for i in range(24)], seed=5)
    ref = [o.token_ids for o in generate(model, prompts, GREEDY)]
    drafter = OracleDrafter([p + r for p, r in zip(prompts, ref)], good_depth=2, depth=3, wrong=2)
    engine = LLMEngine(model, config=EngineConfig(block_size=16, max_num_seqs=24), drafter=drafter)
    steps_with_many = 0
    original = engine.runner.execute

    def spy(scheduled, trees=None):
        nonlocal steps_with_many
        steps_with_many += len([t for t in (trees or {}).values() if t.size > 1]) >= 8
        return original(scheduled, trees)

    engine.runner.execute = spy
    assert run_all(engine, prompts, GREEDY) == ref
    assert steps_with_many > 0  # several requests' trees in one verification forward


def test_kv_after_compaction_equals_plain_decoding(model, reference):
    prompt, out = PROMPTS[3], reference[3]
    drafter = OracleDrafter([prompt + out], good_depth=3, depth=3, wrong=2)
    spec = LLMEngine(model, config=EngineConfig(block_size=16, enable_prefix_caching=False), drafter=drafter)
    plain = LLMEngine(model, config=EngineConfig(block_size=16, enable_prefix_caching=False))
    params = SamplingParams(max_new_tokens=len(out), ignore_eos=True)
    for engine in (spec, plain):
        engine.add_request(prompt, params, request_id="x")
    checked = 0
    while spec.has_unfinished():
        spec.step()
        seq = spec.requests.get("x")
        if seq is None or seq.is_finished:
            break
        n = seq.num_computed_tokens
        plain_seq = plain.requests["x"]
        while plain_seq.num_computed_tokens < n:
            plain.step()
        assert plain_seq.token_ids[:n + 1] == seq.token_ids[:n + 1]
        for layer in range(model.config.num_hidden_layers):
            for pool in ("k", "v"):
                a = _keys(getattr(spec.runner.cache, pool)[layer], seq.block_table, n)
                b = _keys(getattr(plain.runner.cache, pool)[layer], plain_seq.block_table, n)
                # fp32 rounding only: the tree path projects several rows in one matmul (on AVX2 CPUs another
                # GEMM blocking than one row, so even layer 0 differs in the last bits) and deeper layers sum
                # attention in another order than the paged kernel; a wrong or misplaced row differs by O(1).
                torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
        checked += 1
    assert checked > 3 and spec.stats.spec_tokens_total > 1.5 * spec.stats.spec_verify_total


def _keys(pool, table, n):
    from minicpm4.attention.infllmv2.paged_cache import gather_slots

    return gather_slots(pool, table, 0, n)


# ---- InfLLM v2 -----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("lse", ["exact", "coarse"])
@pytest.mark.parametrize("fast", [False, True], ids=["model-forward", "fast-forward"])
def test_sparse_greedy_equals_plain_across_dense_len(lse, fast):
    """Prompts below, crossing and above dense_len (200) with a budget of a few blocks: each draft node's
    selection includes the compressed windows that end inside its own path (speculative/tree_sparse.py)."""
    model = sparse_model(lse=lse)
    prompts = sparse_prompts()
    ref = [o.token_ids for o in generate(model, prompts, SPARSE_PARAMS)]
    config = EngineConfig(block_size=64, kv_cache_tokens=8192, max_num_batched_tokens=96, fast_forward=fast)
    for drafter in (OracleDrafter([p + r for p, r in zip(prompts, ref)], good_depth=3, depth=4, wrong=1),
                    EagleDrafter(model, build_draft(model.config, seed=2), TreeShape(3, 4, 12))):
        engine = LLMEngine(model, config=config, drafter=drafter)
        assert run_all(engine, prompts, SPARSE_PARAMS) == ref


def test_sparse_compressed_keys_after_compaction_equal_scratch():
    from tests.engine.test_engine_infllmv2 import assert_entries_match_scratch

    model = sparse_model(dense_len=64)
    prompts = sparse_prompts((70, 190, 260))
    ref = [o.token_ids for o in generate(model, prompts, SPARSE_PARAMS)]
    drafter = OracleDrafter([p + r for p, r in zip(prompts, ref)], good_depth=3, depth=3, wrong=1)
    engine = LLMEngine(model, config=EngineConfig(block_size=64, kv_cache_tokens=8192), drafter=drafter)

    class Facade:  # what assert_entries_match_scratch reads
        pass

    facade = Facade()
    facade.engine = engine
    for i, p in enumerate(prompts):
        engine.add_request(p, SPARSE_PARAMS, request_id=f"r{i}")
    checked = 0
    while engine.has_unfinished():
        engine.step()
        checked += assert_entries_match_scratch(facade) or 0
    assert checked > 0


# ---- sampling at T > 0 ---------------------------------------------------------------------------------------

def chi_square_p_value(observed: torch.Tensor, expected: torch.Tensor, min_expected: float = 5.0) -> float:
    """Pearson's test; cells with a small expectation are pooled into one."""
    small = expected < min_expected
    obs = torch.cat([observed[~small], observed[small].sum()[None]])
    exp = torch.cat([expected[~small], expected[small].sum()[None]])
    keep = exp > 0
    obs, exp = obs[keep], exp[keep]
    stat = float(((obs - exp) ** 2 / exp).sum())
    df = obs.numel() - 1
    return float(torch.special.gammaincc(torch.tensor(df / 2, dtype=torch.float64), torch.tensor(stat / 2, dtype=torch.float64)))


def test_sampling_distribution_equals_the_target():
    """Three sampled tokens after a prompt, on a 12-token vocabulary. The first comes from the prefill (plain);
    the next step drafts a tree below it, so x2 is drawn at the root's row and x3 at an accepted child's row or
    at the next step's root, depending on x2. The (x2, x3) frequencies must match the model's
    sum_x1 p(x1) p(x2 | x1) p(x3 | x1, x2)."""
    V = 12
    model = build_model(tiny(vocab_size=V, initializer_range=0.2, eos_token_id=[2]), seed=7).eval()
    prompt = [1, 5, 7, 4]
    with torch.no_grad():
        p1 = torch.softmax(model(torch.tensor([prompt]))[0, -1], -1)  # [V]
        p2 = torch.softmax(model(torch.tensor([prompt + [a] for a in range(V)]))[:, -1], -1)  # [V(x1), V]
        rows = torch.tensor([prompt + [a, b] for a in range(V) for b in range(V)])
        p3 = torch.softmax(model(rows)[:, -1], -1).view(V, V, V)  # [x1, x2, x3]
    expected = (p1[:, None, None] * p2[:, :, None] * p3).sum(0).flatten()  # [(x2, x3)]
    drafter = EagleDrafter(model, build_draft(model.config, seed=3), TreeShape(2, 3, 6))
    engine = LLMEngine(model, config=EngineConfig(block_size=16, max_num_seqs=128, enable_prefix_caching=False,
                                                  max_waiting=8192), drafter=drafter)
    n = 4000
    params = [SamplingParams(max_new_tokens=3, temperature=1.0, seed=s, ignore_eos=True) for s in range(n)]
    outs = run_all(engine, [prompt] * n, params)
    observed = torch.zeros(V * V)
    for o in outs:
        observed[o[1] * V + o[2]] += 1
    # Draft tokens were accepted in a good share of the trees (else x3 would always come from a root row).
    assert engine.stats.spec_tokens_total - engine.stats.spec_verify_total > 50
    assert chi_square_p_value(observed, expected * n) > 1e-3
    # The test has power: the marginal of x3 without the x2 dependence is rejected.
    wrong = (p1[:, None, None] * p2[:, :, None] * p3.mean(1, keepdim=True)).sum(0).flatten()
    assert chi_square_p_value(observed, wrong * n) < 1e-3


def test_seeded_sampling_is_the_same_with_and_without_speculation(model):
    """The acceptance rule draws each emitted token from the target's distribution with the request's own
    generator, once per token, in order (speculative/verify.py): seeded output is unchanged by speculation."""
    params = [SamplingParams(max_new_tokens=16, temperature=0.8, top_p=0.9, seed=s, ignore_eos=True)
              for s in range(len(PROMPTS))]
    plain = run_all(LLMEngine(model, config=EngineConfig(block_size=16)), PROMPTS, params)
    drafter = OracleDrafter([p + r for p, r in zip(PROMPTS, plain)], good_depth=2, depth=3, wrong=2)
    spec = LLMEngine(model, config=EngineConfig(block_size=16), drafter=drafter)
    assert run_all(spec, PROMPTS, params) == plain
    assert spec.stats.spec_tokens_total > 1.5 * spec.stats.spec_verify_total

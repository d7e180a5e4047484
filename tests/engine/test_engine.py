"""The engine equals the reference path (minicpm4/generate.py) token for token under greedy decoding,
whatever the batching: ragged prompts arriving at different steps, chunked prefill, prefix reuse,
preemption under memory pressure; seeded sampling does not depend on the rest of the batch."""

import pytest
import torch

from minicpm4.config import tiny
from minicpm4.engine import EngineConfig, LLM, LLMEngine, SamplingParams
from minicpm4.generate import generate
from minicpm4.model import build_model

GREEDY = SamplingParams(max_new_tokens=12, ignore_eos=True)


def prompts_of(lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [[1] + torch.randint(3, 1024, (n - 1,), generator=g).tolist() for n in lengths]


PROMPTS = prompts_of([3, 40, 7, 150, 1, 90])


@pytest.fixture(scope="module")
def model():
    return build_model(tiny(initializer_range=0.3), seed=4).eval()


@pytest.fixture(scope="module")
def reference(model):
    return [o.token_ids for o in generate(model, PROMPTS, GREEDY)]


def run_staggered(engine: LLMEngine, prompts, params, every: int = 2) -> list[list[int]]:
    """Add one prompt every `every` steps while the engine runs; return each request's tokens."""
    out: dict[str, list[int]] = {}
    ids, pending, step = [], list(enumerate(prompts)), 0
    while pending or engine.has_unfinished():
        if pending and step % every == 0:
            i, p = pending.pop(0)
            ids.append(engine.add_request(p, params, request_id=f"r{i}"))
        for o in engine.step():
            if o.finished:
                out[o.request_id] = o.token_ids
        step += 1
    return [out[f"r{i}"] for i in range(len(prompts))]


ENGINE_CASES = {
    "default": {},
    "small-chunks": dict(max_num_batched_tokens=16, block_size=16),
    "no-chunking": dict(enable_chunked_prefill=False, max_num_batched_tokens=64),
    "no-prefix-cache": dict(enable_prefix_caching=False, max_num_batched_tokens=32),
}


@pytest.mark.parametrize("fast", [False, True], ids=["model-forward", "fast-forward"])
@pytest.mark.parametrize("case", list(ENGINE_CASES))
def test_engine_greedy_equals_reference_with_staggered_arrivals(model, reference, case, fast):
    engine = LLMEngine(model, config=EngineConfig(fast_forward=fast, **ENGINE_CASES[case]))
    assert run_staggered(engine, PROMPTS, GREEDY) == reference
    assert engine.blocks.num_used == 0 and not engine.requests  # everything freed


def test_prefix_reuse_hits_and_changes_nothing(model, reference):
    llm = LLM(model=model, block_size=16, fast_forward=False)
    first = [o.token_ids for o in llm.generate(PROMPTS, GREEDY)]
    hits_before = llm.engine.stats.prefix_cache_hit_tokens_total
    again = llm.generate(PROMPTS, GREEDY)
    assert first == reference and [o.token_ids for o in again] == reference
    hits = llm.engine.stats.prefix_cache_hit_tokens_total - hits_before
    # every full page except the one holding a prompt's last token is reused
    assert hits == sum((len(p) - 1) // 16 * 16 for p in PROMPTS) > 0
    assert sum(o.metrics.num_cached_tokens for o in again) == hits


def test_shared_system_prompt_is_computed_once(model):
    system = prompts_of([64])[0]
    users = [system + tail for tail in prompts_of([5, 9, 17], seed=3)]
    ref = [o.token_ids for o in generate(model, users, GREEDY)]
    llm = LLM(model=model, block_size=16, fast_forward=False)
    llm.generate([system + [7]], SamplingParams(max_new_tokens=1))
    outs = llm.generate(users, GREEDY)
    assert [o.token_ids for o in outs] == ref
    assert all(o.metrics.num_cached_tokens == 64 for o in outs)


@pytest.mark.parametrize("chunked", [True, False])
def test_preemption_under_memory_pressure_keeps_outputs_exact(model, chunked):
    prompts = prompts_of([60, 70, 50, 65], seed=5)
    params = SamplingParams(max_new_tokens=40, ignore_eos=True)
    ref = [o.token_ids for o in generate(model, prompts, params)]
    # 10 pages of 16 = 160 tokens for four requests that grow to ~110 tokens each
    engine = LLMEngine(model, config=EngineConfig(block_size=16, num_kv_blocks=10, max_num_batched_tokens=128,
                                                  enable_chunked_prefill=chunked, fast_forward=False))
    assert run_staggered(engine, prompts, params, every=1) == ref
    assert engine.stats.preemptions_total > 0
    assert engine.blocks.num_used == 0


def test_seeded_sampling_is_independent_of_the_batch(model):
    params = SamplingParams(max_new_tokens=16, temperature=1.0, top_p=0.9, top_k=50, seed=7, ignore_eos=True)
    target = PROMPTS[1]
    alone = LLM(model=model, fast_forward=False).generate([target], params)[0].token_ids
    others = [SamplingParams(max_new_tokens=20, temperature=0.8, seed=s, ignore_eos=True) for s in range(4)]
    crowd = LLM(model=model, max_num_batched_tokens=24, fast_forward=False).generate(
        PROMPTS[:1] + [target] + PROMPTS[2:5], [others[0], params] + others[1:])
    assert crowd[1].token_ids == alone
    # and equal to the reference path run alone with the same seed (one generator, one row)
    assert generate(model, [target], params)[0].token_ids == alone
    different = LLM(model=model, fast_forward=False).generate(
        [target], SamplingParams(max_new_tokens=16, temperature=1.0, top_p=0.9, top_k=50, seed=8, ignore_eos=True))
    assert different[0].token_ids != alone


def test_sampling_options_match_the_reference(model):
    for params in (SamplingParams(max_new_tokens=10, repetition_penalty=1.3, ignore_eos=True),
                   SamplingParams(max_new_tokens=10, temperature=0.7, min_p=0.1, seed=3, repetition_penalty=1.2,
                                  ignore_eos=True)):
        ref = generate(model, [PROMPTS[3]], params)[0].token_ids
        assert LLM(model=model, fast_forward=False).generate([PROMPTS[3]], params)[0].token_ids == ref


def test_frequency_and_presence_penalties(model):
    """OpenAI rule: logit -= f * count + p * (count > 0) over generated tokens; checked step by step."""
    params = SamplingParams(max_new_tokens=8, frequency_penalty=1.5, presence_penalty=0.5, ignore_eos=True)
    out = LLM(model=model, fast_forward=False).generate([PROMPTS[0]], params)[0].token_ids
    ids = list(PROMPTS[0])
    counts = torch.zeros(model.config.vocab_size)
    with torch.no_grad():
        for _ in range(8):
            logits = model(torch.tensor([ids]))[0, -1] - 1.5 * counts - 0.5 * (counts > 0).float()
            token = int(logits.argmax())
            ids.append(token)
            counts[token] += 1
    assert out == ids[len(PROMPTS[0]):]
    plain = LLM(model=model, fast_forward=False).generate([PROMPTS[0]], SamplingParams(max_new_tokens=8, ignore_eos=True))
    assert len(set(out)) >= len(set(plain[0].token_ids))


def test_logprobs_and_prompt_logprobs_match_a_full_forward(model):
    prompt = PROMPTS[1]
    params = SamplingParams(max_new_tokens=5, logprobs=3, prompt_logprobs=2, ignore_eos=True)
    out = LLM(model=model, max_num_batched_tokens=16, fast_forward=False).generate([prompt], params)[0]
    ids = torch.tensor([prompt + out.token_ids])
    with torch.no_grad():
        logp = torch.log_softmax(model(ids)[0].float(), -1)
    n = len(prompt)
    assert out.prompt_logprobs[0] is None and len(out.prompt_logprobs) == n
    for p in range(1, n):
        lp = out.prompt_logprobs[p]
        assert lp.token_id == prompt[p] and abs(lp.logprob - logp[p - 1, prompt[p]].item()) < 1e-4
        assert [t for t, _ in lp.top] == logp[p - 1].topk(2).indices.tolist()
    for i, lp in enumerate(out.logprobs):
        assert lp.token_id == out.token_ids[i] and abs(lp.logprob - logp[n - 1 + i, lp.token_id].item()) < 1e-4
        assert len(lp.top) == 3 and lp.top[0][0] == lp.token_id  # greedy picks the most likely


def test_stop_tokens_length_and_zero_tokens(model, reference):
    free = reference[1]
    stop_at = free[4]
    out = LLM(model=model, fast_forward=False).generate(
        [PROMPTS[1]], SamplingParams(max_new_tokens=12, stop_token_ids=[stop_at]))[0]
    assert out.token_ids == free[:free.index(stop_at)] and out.finish_reason == "stop"
    zero = LLM(model=model, fast_forward=False).generate([PROMPTS[1]], SamplingParams(max_new_tokens=0))[0]
    assert zero.token_ids == [] and zero.finish_reason == "length"


def test_context_limit_and_bad_requests(model):
    engine = LLMEngine(model, config=EngineConfig(max_model_len=64, kv_cache_tokens=256, fast_forward=False))
    with pytest.raises(ValueError, match="prompt"):
        engine.add_request(list(range(1, 65)))
    with pytest.raises(ValueError, match="prompt"):
        engine.add_request([])
    with pytest.raises(ValueError, match="token ids"):
        engine.add_request([1, model.config.vocab_size])
    rid = engine.add_request([1] * 60, SamplingParams(max_new_tokens=100, ignore_eos=True))
    outs = []
    while engine.has_unfinished():
        outs += [o for o in engine.step() if o.request_id == rid]
    assert outs[-1].finish_reason == "length" and len(outs[-1].token_ids) == 4  # 60 + 4 = max_model_len


def test_abort_frees_pages_and_queue_bound(model):
    from minicpm4.engine import QueueFullError

    engine = LLMEngine(model, config=EngineConfig(max_waiting=2, block_size=16, fast_forward=False))
    rid = engine.add_request(PROMPTS[3], SamplingParams(max_new_tokens=50, ignore_eos=True))
    engine.step()
    assert engine.blocks.num_used > 0
    assert engine.abort(rid)
    (final,) = engine.step()
    assert final.finished and final.finish_reason == "abort" and engine.blocks.num_used == 0
    engine.add_request([1, 2])
    engine.add_request([1, 3])
    with pytest.raises(QueueFullError):
        engine.add_request([1, 4])


def test_streaming_deltas_add_up(model, reference):
    llm = LLM(model=model, fast_forward=False)
    deltas = list(llm.stream(PROMPTS[2], GREEDY))
    assert sum((d.new_token_ids for d in deltas), []) == reference[2] == deltas[-1].token_ids
    assert deltas[-1].finished and not any(d.finished for d in deltas[:-1])


def test_closing_a_stream_early_releases_its_request(model):
    llm = LLM(model=model, block_size=16, fast_forward=False)
    stream = llm.stream(PROMPTS[3], SamplingParams(max_new_tokens=50, ignore_eos=True))
    next(stream)
    assert llm.engine.blocks.num_used > 0
    stream.close()
    assert llm.engine.blocks.num_used == 0 and not llm.engine.requests and not llm.engine.has_unfinished()

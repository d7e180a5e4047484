import pytest
import torch

from minicpm4.config import tiny
from minicpm4.generate import generate, generate_tokens
from minicpm4.model import build_model
from minicpm4.sampling import SamplingParams, apply_repetition_penalty, filter_logits, sample_next
from minicpm4.stop_strings import StopStringFilter

PROMPTS = [[1, 5, 6, 7, 8, 9, 10, 11], [1, 44, 55], [1, 100, 200, 300, 400]]


@pytest.fixture(scope="module")
def model():
    return build_model(tiny(initializer_range=0.3), seed=4).eval()


def test_batched_generation_equals_one_by_one(model):
    params = SamplingParams(max_new_tokens=16, ignore_eos=True)
    batched = generate(model, PROMPTS, params)
    for prompt, out in zip(PROMPTS, batched):
        assert out.token_ids == generate(model, [prompt], params)[0].token_ids
        assert len(out.token_ids) == 16 and out.finish_reason == "length"


def test_chunked_prefill_equals_one_shot(model):
    params = SamplingParams(max_new_tokens=8, ignore_eos=True)
    one_shot = generate(model, PROMPTS, params)
    for chunk in (1, 3):
        assert [o.token_ids for o in generate(model, PROMPTS, params, prefill_chunk_size=chunk)] == \
               [o.token_ids for o in one_shot]


def test_greedy_equals_argmax_of_full_forward(model):
    out = generate(model, [PROMPTS[0]], SamplingParams(max_new_tokens=6, ignore_eos=True))[0].token_ids
    ids = torch.tensor([PROMPTS[0]])
    with torch.no_grad():
        for _ in range(6):
            ids = torch.cat([ids, model(ids)[:, -1].argmax(-1, keepdim=True)], 1)
    assert out == ids[0, len(PROMPTS[0]):].tolist()


def test_stop_token_ends_row_and_is_not_emitted(model):
    free = generate(model, [PROMPTS[1]], SamplingParams(max_new_tokens=10, ignore_eos=True))[0].token_ids
    stop_at = free[3]
    first = free.index(stop_at)
    out = generate(model, [PROMPTS[1]], SamplingParams(max_new_tokens=10, stop_token_ids=[stop_at]))[0]
    assert out.token_ids == free[:first] and out.finish_reason == "stop"


def test_seeded_sampling_is_reproducible_and_varies_with_seed(model):
    p = dict(max_new_tokens=12, temperature=1.0, top_k=50, ignore_eos=True)
    a = generate(model, PROMPTS, SamplingParams(seed=1, **p))
    b = generate(model, PROMPTS, SamplingParams(seed=1, **p))
    c = generate(model, PROMPTS, SamplingParams(seed=2, **p))
    assert [o.token_ids for o in a] == [o.token_ids for o in b]
    assert [o.token_ids for o in a] != [o.token_ids for o in c]


def test_should_stop_callback_and_zero_tokens(model):
    out = generate(model, [PROMPTS[0]], SamplingParams(max_new_tokens=10, ignore_eos=True),
                   should_stop=lambda row, ids: len(ids) == 3)[0]
    assert len(out.token_ids) == 3 and out.finish_reason == "stop"
    assert list(generate_tokens(model, [PROMPTS[0]], SamplingParams(max_new_tokens=0))) == []


def test_filters():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    keep = lambda **kw: torch.isfinite(filter_logits(logits, SamplingParams(temperature=1.0, **kw)))[0].tolist()
    assert keep(top_k=2) == [True, True, False, False]
    assert keep(top_p=0.8) == [True, True, False, False]  # 0.5 + 0.3 reaches 0.8: drop the rest
    assert keep(top_p=0.81) == [True, True, True, False]
    assert keep(top_p=0.1) == [True, False, False, False]  # the top token always stays
    assert keep(min_p=0.5) == [True, True, False, False]  # p >= 0.5 * 0.5
    # temperature -> 0 is greedy; sampling with top_k=1 is argmax too
    assert sample_next(logits, SamplingParams(temperature=0.7, top_k=1)).item() == 0


def test_repetition_penalty_rule():
    logits = torch.tensor([[2.0, -2.0, 1.0]])
    seen = torch.tensor([[True, True, False]])
    assert apply_repetition_penalty(logits, seen, 2.0).tolist() == [[1.0, -4.0, 1.0]]


@pytest.mark.parametrize("field, value", [("temperature", -1.0), ("top_p", 0.0), ("top_k", -1), ("min_p", 2.0),
                                          ("max_new_tokens", -5), ("repetition_penalty", 0.0), ("stop", [""])])
def test_bad_sampling_params_name_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**{field: value})


def test_stop_string_filter_holds_back_partial_matches():
    f = StopStringFilter(["</end>", "STOP"])
    pieces = [f.push(x) for x in ["Hello </", "en", "d> more"]]
    assert "".join(pieces) == "Hello " and f.stopped and pieces[0] == "Hello "
    g = StopStringFilter(["STOP"])
    assert g.push("ST") == "" and g.push("ART") == "START" and g.flush() == ""
    h = StopStringFilter(["xyz"])
    assert h.push("abx") == "ab" and h.flush() == "x"

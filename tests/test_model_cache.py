"""KV-cache decoding equals a full forward; the decode attention path equals SDPA."""

import pytest
import torch
import torch.nn.functional as F

from minicpm4.attention.dense import grouped_attention, visible_mask
from minicpm4.config import tiny
from minicpm4.kv_cache import StaticKVCache
from minicpm4.model import build_model


@pytest.fixture(scope="module")
def model():
    return build_model(tiny(), seed=0).eval()


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.bfloat16, 3e-2)])
def test_cached_decoding_equals_full_forward_at_every_position(model, dtype, tol):
    m = build_model(model.config, dtype=dtype, seed=0).eval()
    ids = torch.randint(0, 1024, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full = m(ids)
        cache = StaticKVCache.for_model(m, 2, 64)
        steps = [m(ids[:, :5], kv_cache=cache)]
        for t in range(5, 24):
            steps.append(m(ids[:, t:t + 1], positions=torch.full((2, 1), t), kv_cache=cache))
    inc = torch.cat(steps, dim=1)
    scale = full.abs().max()
    assert ((inc - full).abs().max() / scale) < tol


def test_rows_at_different_positions_write_their_own_slots(model):
    """Right-padded rows decode at their own positions; each equals its unpadded forward."""
    a = torch.randint(0, 1024, (1, 9), generator=torch.Generator().manual_seed(2))
    b = torch.randint(0, 1024, (1, 5), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        cache = StaticKVCache.for_model(model, 2, 32)
        padded = torch.zeros(2, 9, dtype=torch.long)
        padded[0], padded[1, :5] = a[0], b[0]
        model(padded, kv_cache=cache)
        nxt = torch.tensor([[11], [12]])
        out = model(nxt, positions=torch.tensor([[9], [5]]), kv_cache=cache)[:, 0]
        ref_a = model(torch.cat([a, nxt[:1]], 1))[0, -1]
        ref_b = model(torch.cat([b, nxt[1:]], 1))[0, -1]
    assert torch.allclose(out[0], ref_a, atol=1e-5) and torch.allclose(out[1], ref_b, atol=1e-5)


def test_cache_overflow_and_batch_mismatch_are_errors(model):
    cache = StaticKVCache.for_model(model, 1, 8)
    with pytest.raises(ValueError, match="exceeds the KV cache length"):
        model(torch.zeros(1, 9, dtype=torch.long), kv_cache=cache)
    with pytest.raises(ValueError, match="does not fit"):
        model(torch.zeros(2, 3, dtype=torch.long), kv_cache=cache)


@pytest.mark.parametrize("T", [1, 4])
def test_grouped_decode_attention_equals_sdpa(T):
    g = torch.Generator().manual_seed(0)
    B, Hq, Hkv, S, D = 2, 8, 2, 40, 16
    q, k, v = torch.randn(B, Hq, T, D, generator=g), torch.randn(B, Hkv, S, D, generator=g), torch.randn(B, Hkv, S, D, generator=g)
    positions = torch.tensor([[30 + t for t in range(T)], [S - T + t for t in range(T)]])
    mask = visible_mask(positions, S)
    ref = F.scaled_dot_product_attention(q, k.repeat_interleave(4, 1), v.repeat_interleave(4, 1), attn_mask=mask[:, None])
    assert torch.allclose(grouped_attention(q, k, v, mask), ref, atol=1e-6)


def test_muP_factors_act_where_the_config_says(model):
    """Doubling scale_emb changes the output; the logit divisor scales logits exactly."""
    ids = torch.arange(10)[None]
    with torch.no_grad():
        h = model.hidden_states(ids)
        assert torch.allclose(model.logits(h) * model.config.logit_divisor,
                              torch.nn.functional.linear(h, model.output_weight).float(), atol=1e-5)
    assert model.config.residual_scale == pytest.approx(1.4 / 2 ** 0.5)


def test_longrope_selection_and_attention_scaling():
    from minicpm4.config import RopeScaling
    from minicpm4.model import LongRoPE

    rs = RopeScaling([2.0] * 8, [1.0] * 8, original_max_position_embeddings=64)
    same = LongRoPE(tiny(max_position_embeddings=64, rope_scaling=rs))
    longer = LongRoPE(tiny(max_position_embeddings=256, rope_scaling=rs))
    assert not same.uses_long_factors(64) and same.uses_long_factors(65)
    assert longer.uses_long_factors(10)  # the table covers 256 > 64 tokens: long factors (remote-code rule)
    pos = torch.arange(5)[None]
    cos_s, _ = same(pos, 10)
    cos_l, _ = longer(pos, 10)
    import math
    scaling = math.sqrt(1 + math.log(4) / math.log(64))
    assert torch.allclose(cos_l[0, 0], torch.full((16,), scaling))
    # long factors halve every frequency: angle at position 4 (long) == angle at position 2 (short)
    assert torch.allclose(cos_l[0, 4] / scaling, cos_s[0, 2], atol=1e-6)

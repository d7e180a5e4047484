"""Paged KV bookkeeping and the scheduler's decisions, on stub sequences (no model)."""

import pytest

from minicpm4.engine.block_manager import BlockManager
from minicpm4.engine.config import EngineConfig
from minicpm4.engine.scheduler import Scheduler
from minicpm4.engine.sequence import Sequence, SequenceStatus
from minicpm4.sampling import SamplingParams


def seq(tokens, rid="r"):
    return Sequence(rid, list(tokens), len(tokens), SamplingParams(), frozenset(), arrival_time=0.0)


def computed(blocks, s, n):
    """Pretend a step computed n more tokens of s."""
    blocks.allocate(s, n)
    s.num_computed_tokens += n
    blocks.commit(s)


def test_pages_grow_with_tokens_and_free_returns_them():
    bm = BlockManager(num_blocks=8, block_size=4)
    s = seq(range(10))
    assert bm.pages_needed(s, 10) == 3
    computed(bm, s, 10)
    assert len(s.block_table) == 3 and bm.num_free == 5
    bm.free_sequence(s)
    assert bm.num_free == 8 and s.block_table == [] and s.num_computed_tokens == 0


def test_prefix_match_reuses_full_pages_but_never_the_last_token():
    bm = BlockManager(num_blocks=8, block_size=4)
    a = seq(range(12), "a")
    computed(bm, a, 12)
    b = seq(range(12), "b")  # identical: pages 0, 1 reused; page 2 holds the last token, recomputed
    bm.match_prefix(b)
    assert b.block_table == a.block_table[:2] and b.num_computed_tokens == 8
    assert bm.pages[a.block_table[0]].ref_count == 2
    c = seq([0, 1, 2, 3, 9, 9, 9, 9, 9], "c")  # shares page 0 only
    bm.match_prefix(c)
    assert c.block_table == a.block_table[:1]
    d = seq([5, 1, 2, 3, 4, 5, 6, 7, 8], "d")  # differs in the first page: nothing
    bm.match_prefix(d)
    assert d.block_table == [] and d.num_computed_tokens == 0


def test_freed_prefix_survives_until_its_page_is_needed():
    bm = BlockManager(num_blocks=4, block_size=4)
    a = seq(range(9), "a")
    computed(bm, a, 9)
    bm.free_sequence(a)
    b = seq(range(9), "b")
    bm.match_prefix(b)
    assert b.num_computed_tokens == 8  # still cached after a finished
    bm.free_sequence(b)
    big = seq(range(100, 116), "big")  # needs all 4 pages: evicts the cached prefix
    computed(bm, big, 16)
    c = seq(range(9), "c")
    bm.match_prefix(c)
    assert c.num_computed_tokens == 0


def test_unhashed_pages_are_reused_before_cached_ones():
    bm = BlockManager(num_blocks=4, block_size=4)
    a = seq(range(6), "a")  # page 0 full (hashed), page 1 partial (not)
    computed(bm, a, 6)
    cached, partial = a.block_table
    bm.free_sequence(a)
    b = seq([50], "b")
    computed(bm, b, 1)
    assert b.block_table != [cached]


def test_prefix_caching_off_registers_nothing():
    bm = BlockManager(num_blocks=4, block_size=4, enable_prefix_caching=False)
    a = seq(range(9), "a")
    computed(bm, a, 9)
    b = seq(range(9), "b")
    bm.match_prefix(b)
    assert b.num_computed_tokens == 0 and not bm.by_hash


def test_scheduler_budget_decodes_first_and_chunking():
    cfg = EngineConfig(block_size=4, num_kv_blocks=64, max_num_batched_tokens=10)
    sch = Scheduler(cfg, BlockManager(64, 4))
    long = seq(range(25), "long")
    sch.add(long)
    out = sch.schedule()
    assert [(e.seq.request_id, e.num_tokens) for e in out.scheduled] == [("long", 10)]
    long.num_computed_tokens += 10
    dec = seq(range(3), "dec")
    dec.num_computed_tokens = 0
    sch.add(dec)
    out = sch.schedule()  # long continues (10 of budget): dec waits for budget
    assert [(e.seq.request_id, e.num_tokens) for e in out.scheduled] == [("long", 10)]
    long.num_computed_tokens += 10
    out = sch.schedule()  # 5 left of long, then dec's 3-token prompt is admitted
    assert [(e.seq.request_id, e.num_tokens) for e in out.scheduled] == [("long", 5), ("dec", 3)]
    assert out.scheduled[0].completes_prompt and out.scheduled[1].completes_prompt


def test_scheduler_preempts_the_newest_when_pages_run_out():
    cfg = EngineConfig(block_size=4, num_kv_blocks=4, max_num_batched_tokens=64)
    sch = Scheduler(cfg, BlockManager(4, 4, enable_prefix_caching=False))
    a, b = seq(range(8), "a"), seq(range(8), "b")
    sch.add(a)
    sch.add(b)
    out = sch.schedule()
    assert [e.num_tokens for e in out.scheduled] == [8, 8]
    for s in (a, b):
        s.num_computed_tokens = 8
        s.token_ids.append(1)  # each sampled a token: the next decode needs a fifth page
    out = sch.schedule()
    assert out.preempted == [b] and b.status is SequenceStatus.WAITING and b.num_computed_tokens == 0
    assert [e.seq.request_id for e in out.scheduled] == ["a"] and sch.waiting[0] is b


def test_engine_config_validation():
    with pytest.raises(ValueError, match="block_size"):
        EngineConfig(block_size=0)
    with pytest.raises(ValueError, match="max_num_seqs"):
        EngineConfig(max_num_seqs=True)

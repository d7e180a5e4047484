"""The paged tree route (nodes after the root under ancestor masks, one kernel call) equals the readable
reference tree_attention_dense (gather the committed keys, append the path's keys, masked softmax)."""

from __future__ import annotations

import pytest
import torch

from minicpm4.attention.paged import PagedBatch, PagedKVCache
from minicpm4.speculative.tree import single_node_tree
from minicpm4.speculative.tree_attention import TreeRows, TreeStep, paged_tree_attention, paged_tree_plan, \
    tree_attention_dense


@pytest.mark.parametrize("B", [16, 64])
@pytest.mark.parametrize("root_pos", [5, 63, 100])
def test_paged_tree_route_equals_reference(B, root_pos):
    g = torch.Generator().manual_seed(root_pos + B)
    Hq, Hkv, D, m = 4, 2, 64, 9
    cache = PagedKVCache(1, 40, B, Hkv, D, torch.float32)
    cache.k[0].normal_(generator=g)
    cache.v[0].normal_(generator=g)
    table = torch.randperm(40, generator=g)[:-(-(root_pos + 1 + m) // B)].tolist()
    tree = single_node_tree(7)
    for i in range(1, m + 1):
        tree.add(int(torch.randint(i, (1,), generator=g)), 100 + i)
    rows = TreeRows(start=0, positions=[root_pos + d for d in tree.depths[1:]],
                    ancestors=tree.ancestor_mask()[1:, 1:], root_pos=root_pos, block_table=table)
    P = root_pos
    batch = PagedBatch(cache=cache, slot_mapping=torch.tensor([table[P // B] * B + P % B]),
                       positions=torch.tensor([P]), block_tables=torch.tensor([table], dtype=torch.int32),
                       query_start_loc=torch.tensor([0, 1], dtype=torch.int32),
                       context_lens=torch.tensor([P + 1], dtype=torch.int32), query_lens_host=[1],
                       context_lens_host=[P + 1], block_tables_host=[table])
    q = torch.randn(1 + m, Hq, D, generator=g)
    k = torch.randn(1 + m, Hkv, D, generator=g)
    v = torch.randn(1 + m, Hkv, D, generator=g)
    plan = paged_tree_plan(batch, TreeStep([rows], torch.tensor(rows.positions)).rows, B)
    out = paged_tree_attention(q, k, v, cache.k[0], cache.v[0], plan)  # writes the root and the nodes
    ref = tree_attention_dense(q[1:], k[1:], v[1:], cache.k[0], cache.v[0], rows)  # root key now in the pool
    torch.testing.assert_close(out[1:], ref, atol=2e-5, rtol=1e-5)

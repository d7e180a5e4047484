"""Target-side attention of the draft-tree rows in a verification step (MINICPM4.md §3.7, §4.3).

A verification step packs, per speculating sequence, its root (the last committed token at position P,
a plain decode row: it goes through the engine's paged backend, writes its K/V into the pool and attends
exactly as plain decoding) and the m = n - 1 tree nodes below it, node i at position P + depth(i). The
nodes' K/V are NOT written into the pool (a rejected branch never touches the cache or InfLLM v2's
compressed keys): they are kept per layer (`TreeStep.stash`) and the accepted ones are written afterwards
into consecutive slots (`commit_accepted`) — KV compaction by construction.

Node i attends to keys 0 .. P of its sequence (the committed cache, root included) and to the nodes on its
own path (ancestors and itself: `TreeRows.ancestors`). With InfLLM v2 (sparse rows), the committed keys
are further restricted to the blocks the node's selection picks (speculative/tree_sparse.py), exactly what
plain decoding of that path would attend to.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from minicpm4.attention.infllmv2.paged_cache import gather_slots
from minicpm4.attention.paged import PagedKVCache
from minicpm4.attention.paged_attention import write_kv


@dataclass
class TreeRows:
    """The node rows (root excluded) of one speculating sequence in the packed step."""

    start: int  # first node row, counted among the step's tree rows
    positions: list[int]  # [m] absolute positions P + depth
    ancestors: torch.Tensor  # [m, m] bool: node j is node i or an ancestor of it (root excluded)
    root_pos: int  # P
    block_table: list[int]  # the sequence's pages (lookahead included)

    @property
    def num_nodes(self) -> int:
        return len(self.positions)


@dataclass
class TreeStep:
    rows: list[TreeRows]
    positions: torch.Tensor  # [M] every tree row's position, in row order
    stash: dict[int, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)  # layer -> (k, v) [M, Hkv, D]


def attention_with_mask(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """q [m, Hq, D], k/v [S, Hkv, D], mask [m, S] (or per KV head [Hkv, m, S]) -> [m, Hq, D] in q's dtype;
    fp32 softmax (as the paged kernel)."""
    m, Hq, D = q.shape
    Hkv = k.shape[1]
    G = Hq // Hkv
    qf = q.float().view(m, Hkv, G, D).transpose(0, 1).reshape(Hkv, m * G, D)  # rows t-major, heads inner
    kf, vf = k.float().transpose(0, 1), v.float().transpose(0, 1)  # [Hkv, S, D]
    scores = (qf @ kf.transpose(1, 2)) * (1.0 / math.sqrt(D))  # [Hkv, m*G, S]
    mask = mask if mask.dim() == 3 else mask[None]
    scores = scores.view(Hkv, m, G, -1).masked_fill(~mask[:, :, None], float("-inf"))
    out = scores.softmax(-1).view(Hkv, m * G, -1) @ vf  # [Hkv, m*G, D]
    return out.view(Hkv, m, G, D).transpose(0, 1).reshape(m, Hq, D).to(q.dtype)


def tree_attention_dense(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_pool: torch.Tensor,
                         v_pool: torch.Tensor, tree: TreeRows,
                         committed_mask: torch.Tensor | None = None) -> torch.Tensor:
    """One sequence's nodes: q [m, Hq, D], k/v [m, Hkv, D] -> [m, Hq, D]. committed_mask [m, P + 1] (sparse
    selection) restricts the committed keys; None = all of them."""
    L = tree.root_pos + 1
    kc = gather_slots(k_pool, tree.block_table, 0, L).transpose(0, 1)  # [L, Hkv, D]
    vc = gather_slots(v_pool, tree.block_table, 0, L).transpose(0, 1)
    visible = committed_mask if committed_mask is not None else torch.ones(q.shape[0], L, dtype=torch.bool,
                                                                            device=q.device)
    mask = torch.cat([visible, tree.ancestors.to(q.device)], dim=1)
    return attention_with_mask(q, torch.cat([kc, k.to(kc.dtype)]), torch.cat([vc, v.to(vc.dtype)]), mask)


def accepted_slots(tree: TreeRows, num_accepted_nodes: int, block_size: int) -> list[int]:
    """Slots of positions P + 1 .. P + a (the accepted nodes below the root, in path order)."""
    table = tree.block_table
    return [table[p // block_size] * block_size + p % block_size
            for p in range(tree.root_pos + 1, tree.root_pos + 1 + num_accepted_nodes)]


def commit_accepted(cache: PagedKVCache, step: TreeStep, tree: TreeRows, path_nodes: list[int]) -> list[tuple[int, int]]:
    """Write the stashed K/V of the accepted nodes (node indices among tree.rows' nodes, root excluded, in path
    order) into consecutive slots after the root, every layer. Returns the (page, first offset) writes."""
    if not path_nodes:
        return []
    rows = torch.tensor([tree.start + i for i in path_nodes], dtype=torch.long)
    slots = accepted_slots(tree, len(path_nodes), cache.block_size)
    slot_t = torch.tensor(slots, dtype=torch.long, device=cache.k[0].device)
    for layer, (k, v) in step.stash.items():
        write_kv(cache.k[layer], cache.v[layer], k[rows.to(k.device)], v[rows.to(v.device)], slot_t)
    B = cache.block_size
    writes: dict[int, int] = {}
    for s in slots:
        page, off = s // B, s % B
        writes[page] = min(writes.get(page, off), off)
    return sorted(writes.items())

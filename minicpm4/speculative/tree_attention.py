"""Target-side attention of the draft-tree rows in a verification step (MINICPM4.md §3.7, §4.3).

A verification step packs, per speculating sequence, its root (the last committed token at position P,
a plain decode row: it writes its K/V into the pool and attends exactly as plain decoding) and the m = n - 1
tree nodes below it, node i at position P + depth(i). During the step the nodes' K/V sit in slots P + 1 ..
P + m (node order) of pages the scheduler reserved, beyond the committed context, so no committed key and no
InfLLM v2 compressed key covers them; they are also kept per layer (`TreeStep.stash`), and after the walk the
accepted ones are rewritten into slots P + 1 .. P + a in path order (`commit_accepted`): KV compaction.

Node i attends to keys 0 .. P of its sequence (the committed cache, root included) and to the nodes on its
own path (ancestors and itself: `TreeRows.ancestors`). With InfLLM v2 (sparse rows), the committed keys
are further restricted to the blocks the node's selection picks (speculative/tree_sparse.py), exactly what
plain decoding of that path would attend to.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from minicpm4.attention.infllmv2.paged_cache import gather_slots, page_writes
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
                         v_pool: torch.Tensor, tree: TreeRows) -> torch.Tensor:
    """The reference: one sequence's nodes q [m, Hq, D], k/v [m, Hkv, D] -> [m, Hq, D] against every committed
    key (0 .. P, gathered) and their paths."""
    L = tree.root_pos + 1
    kc = gather_slots(k_pool, tree.block_table, 0, L).transpose(0, 1)  # [L, Hkv, D]
    vc = gather_slots(v_pool, tree.block_table, 0, L).transpose(0, 1)
    visible = torch.ones(q.shape[0], L, dtype=torch.bool, device=q.device)
    mask = torch.cat([visible, tree.ancestors.to(q.device)], dim=1)
    return attention_with_mask(q, torch.cat([kc, k.to(kc.dtype)]), torch.cat([vc, v.to(vc.dtype)]), mask)


def node_slots(rows: TreeRows, block_size: int) -> list[int]:
    """Slots of positions P + 1 .. P + m: node i's K/V during verification."""
    table, P = rows.block_table, rows.root_pos
    return [table[p // block_size] * block_size + p % block_size for p in range(P + 1, P + 1 + rows.num_nodes)]


def commit_accepted(cache: PagedKVCache, step: TreeStep, tree: TreeRows, path_nodes: list[int]) -> list[tuple[int, int]]:
    """Write the stashed K/V of the accepted nodes (node indices among tree.rows' nodes, root excluded, in path
    order) into slots P + 1 .. P + a, every layer. Returns the (page, first offset) writes (InfLLM v2's rule)."""
    if not path_nodes:
        return []
    a, B = len(path_nodes), cache.block_size
    rows = torch.tensor([tree.start + i for i in path_nodes], dtype=torch.long)
    slot_t = torch.tensor(node_slots(tree, B)[:a], dtype=torch.long, device=cache.k[0].device)
    for layer, (k, v) in step.stash.items():
        write_kv(cache.k[layer], cache.v[layer], k[rows.to(k.device)], v[rows.to(v.device)], slot_t)
    return page_writes([tree.block_table], [a], [tree.root_pos + 1 + a], B)


# ---- the paged route: each tree one sequence of the paged kernel, under a tree mask ---------------------------
# The nodes' K/V go into the sequence's own pages right after the root, node i at slot P + 1 + i (the scheduler
# reserved those pages), and the tree's rows become one more sequence of the step's paged attention call (the
# same block table, context P + 1 + m) whose keys from P + 1 on obey the nodes' ancestor bits
# (attention/paged_attention.py's tree_mask / tree_base). One kernel call per layer then covers ordinary rows
# and trees, the committed keys read once per tree (the fast path; tree_attention_dense is its reference).
# After acceptance commit_accepted rewrites slots P + 1 .. P + a with the accepted path, in order.

@dataclass
class PagedTreePlan:
    """Built once per step, used by every layer. With include_batch the step's ordinary rows run in the same
    call (a dense model); without it only the trees of `rows` (a sparse model's trees whose nodes all lie below
    dense_len: its ordinary rows go through the InfLLM v2 backend)."""

    rows: list[TreeRows]  # the trees this plan covers
    node_rows: torch.Tensor  # [M'] int64 their nodes' indices among the step's tree rows
    include_batch: bool
    slot_mapping: torch.Tensor  # [N + M'] or [M'] int64 where each row's K/V is written
    block_tables: torch.Tensor  # [S + T, width] int32: the step's sequences (if included), then one per tree
    query_start_loc: torch.Tensor  # int32
    context_lens: torch.Tensor  # int32
    positions: torch.Tensor  # kernel positions (a node passes its tree's last slot; RoPE used the real one)
    tree_mask: torch.Tensor  # int64 ancestor bits per row (ordinary rows: 0, unused)
    tree_base: torch.Tensor  # int64 per sequence: first tree key, -1 for ordinary sequences


def paged_tree_plan(batch, rows_list: list[TreeRows], block_size: int, include_batch: bool = True) -> PagedTreePlan:
    if include_batch:
        tables = list(batch.block_tables_host) if batch.block_tables_host is not None else batch.block_tables.tolist()
        qsl, ctx = batch.query_start_loc.tolist(), list(batch.context_lens_host)
        slots, positions, masks = batch.slot_mapping.tolist(), batch.positions.tolist(), [0] * len(batch.positions)
        bases = [-1] * len(ctx)
    else:
        tables, qsl, ctx, slots, positions, masks, bases = [], [0], [], [], [], [], []
    node_rows = []
    for rows in rows_list:
        m, P = rows.num_nodes, rows.root_pos
        anc = rows.ancestors.tolist()
        tables.append(rows.block_table)
        qsl.append(qsl[-1] + m)
        ctx.append(P + 1 + m)
        bases.append(P + 1)
        slots.extend(node_slots(rows, block_size))
        positions.extend([P + m] * m)
        masks.extend(sum(1 << j for j, a in enumerate(anc[i]) if a) for i in range(m))
        node_rows.extend(range(rows.start, rows.start + m))
    width = max(len(t) for t in tables)
    dev = batch.positions.device
    long = dict(dtype=torch.long, device=dev)
    return PagedTreePlan(
        rows=rows_list, node_rows=torch.tensor(node_rows, **long), include_batch=include_batch,
        slot_mapping=torch.tensor(slots, **long),
        block_tables=torch.tensor([list(t) + [0] * (width - len(t)) for t in tables], dtype=torch.int32, device=dev),
        query_start_loc=torch.tensor(qsl, dtype=torch.int32, device=dev),
        context_lens=torch.tensor(ctx, dtype=torch.int32, device=dev), positions=torch.tensor(positions, **long),
        tree_mask=torch.tensor(masks, **long), tree_base=torch.tensor(bases, **long))


def plan_page_writes(plan: PagedTreePlan, block_size: int) -> list[tuple[int, int]]:
    """(page, first offset) of every page the plan's rows write (InfLLM v2's write rule): each of its sequences
    writes its last query_len positions (a tree: P + 1 .. P + m)."""
    qsl = plan.query_start_loc.tolist()
    return page_writes(plan.block_tables.tolist(), [b - a for a, b in zip(qsl, qsl[1:])],
                       plan.context_lens.tolist(), block_size)


def paged_tree_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_pool: torch.Tensor,
                         v_pool: torch.Tensor, plan: PagedTreePlan) -> torch.Tensor:
    """include_batch: q/k/v [N + M, H, D] (the step's ordinary rows then its tree rows) -> [N + M, Hq, D].
    Else q/k/v are the tree rows [M, H, D] (the ordinary rows went through the InfLLM v2 backend) ->
    [M', Hq, D] for plan.node_rows."""
    from minicpm4.attention.paged_attention import paged_attention

    if not plan.include_batch:
        q, k, v = q[plan.node_rows], k[plan.node_rows], v[plan.node_rows]
    write_kv(k_pool, v_pool, k, v, plan.slot_mapping)
    return paged_attention(q.contiguous(), k_pool, v_pool, plan.block_tables, plan.query_start_loc,
                           plan.context_lens, plan.positions, tree_mask=plan.tree_mask, tree_base=plan.tree_base)

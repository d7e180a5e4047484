"""InfLLM v2 inside tree verification: each draft node attends what plain decoding of its path would.

Node i sits at position p_i = P + depth_i (P: the root, the last committed key). Plain decoding of the path
root → … → i would, at p_i, select blocks from the compressed keys of keys 0 .. p_i: the committed windows
(the layer's paged C1 / C2, brought up to date to P + 1 keys exactly as the root's own decode row does) plus
the windows that end inside the path, P + 1 .. p_i, whose keys are partly the path's draft keys. Those few
path-specific windows (at most ceil(depth / stride)) are computed per node from the committed tail and the
node's ancestors' keys, so no draft key ever enters the shared C1 / C2 (MINICPM4.md §3.7), and the
selection equals plain decoding's. Stage 2: the node attends the keys of its attended blocks (per KV head)
among the committed ones and among its path (ancestors + itself). When every node sits in the root's page,
that runs in place through the paged kernel (_stage2_paged: one-query pseudo-sequences under the tree mask);
otherwise (a tree crossing a page boundary or dense_len) the union of the nodes' attended committed blocks is
gathered once (_stage2_gather). Nodes below dense_len attend densely.
"""

from __future__ import annotations

import torch

from minicpm4.attention.infllmv2.blocksparse import attended_blocks
from minicpm4.attention.infllmv2.compress import compress_keys, num_windows
from minicpm4.attention.infllmv2.paged_cache import PagedKernelEntries, gather_slots
from minicpm4.attention.infllmv2.selection import select_blocks
from minicpm4.attention.paged import PagedKVCache
from minicpm4.attention.paged_attention import write_kv
from minicpm4.speculative.tree_attention import TreeRows, attention_with_mask, node_slots, tree_attention_dense


def path_windows(entries: PagedKernelEntries, pool: torch.Tensor, rows: TreeRows,
                 node_keys: torch.Tensor) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
    """The committed compressed keys [Hkv, n1, D] (fp32; what the root sees) and, for each node with windows
    ending inside its path, those windows [Hkv, c, D] (they follow the committed ones: entries n1 .. n1 + c - 1).
    node_keys [Hkv, m, D]: the nodes' post-RoPE keys of this layer."""
    p, s = entries.kernel_size, entries.kernel_stride
    L = rows.root_pos + 1
    committed = entries.up_to(pool, rows.block_table, L)  # [Hkv, n1, D]
    n1 = committed.shape[1]
    counts = [num_windows(q + 1, p, s) - n1 for q in rows.positions]
    extras: dict[int, torch.Tensor] = {}
    if max(counts) <= 0:
        return committed, extras
    base = n1 * s  # the first path window starts here (it needs committed keys base .. P)
    Hkv, D = committed.shape[0], committed.shape[2]
    tail = gather_slots(pool, rows.block_table, base, L) if base < L else pool.new_zeros(Hkv, 0, D)
    for i, c in enumerate(counts):
        if c > 0:
            path = [j for j in range(rows.num_nodes) if rows.ancestors[i, j]]  # node order = depth order
            keys = torch.cat([tail, node_keys[:, path].to(tail.dtype)], dim=1)  # positions base .. p_i
            extras[i] = compress_keys(keys, p, s)[:, :c]
    return committed, extras


def _with_extras(committed: torch.Tensor, extras: dict[int, torch.Tensor], nodes: list[int]) -> torch.Tensor:
    """Per-query compressed keys [Hkv, len(nodes), n1 + x, D] for the nodes that have path windows (padding past
    a node's own entries is never visible to it: select_blocks masks entries by position)."""
    x = max(extras[i].shape[1] if i in extras else 0 for i in nodes)
    Hkv, n1, D = committed.shape
    out = committed.new_zeros(Hkv, len(nodes), n1 + x, D)
    out[:, :, :n1] = committed[:, None]
    for r, i in enumerate(nodes):
        if i in extras:
            out[:, r, n1:n1 + extras[i].shape[1]] = extras[i]
    return out


def tree_attention_sparse(backend, layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                          cache: PagedKVCache, rows: TreeRows) -> torch.Tensor:
    """q [m, Hq, D], k/v [m, Hkv, D] of one sequence's nodes -> [m, Hq, D] (module docstring). `backend` is the
    engine's PagedInfLLMv2Attention (its settings and the layer's paged compressed keys)."""
    s = backend.settings
    k_pool, v_pool = cache.k[layer_idx], cache.v[layer_idx]
    positions = rows.positions
    if all(p + 1 < s.dense_len for p in positions):
        return tree_attention_dense(q, k, v, k_pool, v_pool, rows)
    dev = q.device
    B, P = s.block_size, rows.root_pos
    m = rows.num_nodes
    layer = backend.state(cache).layer(layer_idx, dev)
    node_keys = k.transpose(0, 1)  # [Hkv, m, D]
    c1, ex1 = path_windows(layer.c1, k_pool, rows, node_keys)
    c2, ex2 = (None, {}) if layer.c2 is None else path_windows(layer.c2, k_pool, rows, node_keys)
    pos = torch.tensor(positions, dtype=torch.long, device=dev)
    num_keys = max(positions) + 1
    qs = q.transpose(0, 1)  # [Hq, m, D]
    # Nodes without path windows (nearly all: one window ends every kernel_stride positions) select together
    # from the shared committed keys, as a prefill chunk does; the others one by one with their own entries.
    special = sorted(set(ex1) | set(ex2))
    shared = [i for i in range(m) if i not in ex1 and i not in ex2]
    parts = {}
    if shared:
        idx = torch.tensor(shared, device=dev)
        parts[tuple(shared)] = select_blocks(qs[:, idx], c1, c2, pos[idx], num_keys, s)
    if special:
        idx = torch.tensor(special, device=dev)
        c1s = _with_extras(c1, ex1, special)
        c2s = None if c2 is None else _with_extras(c2, ex2, special)
        parts[tuple(special)] = select_blocks(qs[:, idx], c1s, c2s, pos[idx], num_keys, s)
    K = max(b.shape[-1] for b in parts.values())
    block_idx = torch.full((c1.shape[0], m, K), -1, dtype=torch.long, device=dev)  # [Hkv, m, K]
    for nodes, b in parts.items():
        block_idx[:, list(nodes), :b.shape[-1]] = b
    lists = attended_blocks(pos, block_idx, s)  # [Hkv, m, NB] logical ids, -1 padded
    dense = pos + 1 < s.dense_len
    if not bool(dense.any()) and (P + m) // B == P // B:
        # Every node in the root's page: that page is each node's own block, which InfLLM v2 always attends.
        return _stage2_paged(q, k, v, k_pool, v_pool, rows, lists, B)
    return _stage2_gather(q, k, v, k_pool, v_pool, rows, lists, pos, dense, B)


def _stage2_paged(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor,
                  rows: TreeRows, lists: torch.Tensor, B: int) -> torch.Tensor:
    """Stage 2 in place through the paged kernel, for trees whose nodes all sit in the root's page (the tail):
    per KV head, node i is a one-query sequence whose block table is its attended committed blocks below the
    tail, then the tail page, where the nodes' K/V sit after the root (slots P + 1 .. P + m, written here; the
    commit rewrites them); the nodes' keys obey the ancestor bits (paged_attention's tree mask). The InfLLM v2
    backend's own stage 2 runs the same kind of pseudo-sequences."""
    from minicpm4.attention.paged_attention import paged_attention

    dev = q.device
    m, Hq, D = q.shape
    Hkv = lists.shape[0]
    G = Hq // Hkv
    P = rows.root_pos
    write_kv(k_pool, v_pool, k, v, torch.tensor(node_slots(rows, B), dtype=torch.long, device=dev))
    tail = P // B
    table = torch.tensor(rows.block_table, dtype=torch.long, device=dev)
    full = (lists >= 0) & (lists < tail)  # a prefix of every row: the lists are ascending, -1 padded
    nf = full.sum(-1)  # [Hkv, m] full committed blocks attended
    NB = lists.shape[-1]
    tables = torch.zeros(Hkv, m, NB + 1, dtype=torch.long, device=dev)
    tables[..., :NB] = torch.where(full, table[lists.clamp(min=0)], 0)
    tables.scatter_(2, nf[..., None], table[tail].expand(Hkv, m, 1).contiguous())  # the tail page, last
    base = nf * B + P % B + 1  # [Hkv, m]: the first node key of each pseudo-sequence
    ctx = base + m
    bits = torch.tensor([sum(1 << j for j, a in enumerate(row) if a) for row in rows.ancestors.tolist()],
                        dtype=torch.long, device=dev)
    qsl = torch.arange(m + 1, dtype=torch.int32, device=dev)
    out = torch.empty_like(q)
    for h in range(Hkv):
        c = ctx[h].to(torch.int32)
        out[:, h * G:(h + 1) * G] = paged_attention(
            q[:, h * G:(h + 1) * G].contiguous(), k_pool[:, h:h + 1], v_pool[:, h:h + 1], tables[h].to(torch.int32),
            qsl, c, (c - 1).long(), tree_mask=bits, tree_base=base[h])
    return out


def _stage2_gather(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor,
                   rows: TreeRows, lists: torch.Tensor, pos: torch.Tensor, dense: torch.Tensor, B: int) -> torch.Tensor:
    """Stage 2 by one gather of the union of the nodes' attended committed blocks and a masked softmax: any mix of
    sparse nodes and nodes below dense_len (which see every committed key)."""
    dev = q.device
    m = rows.num_nodes
    P = rows.root_pos
    positions = rows.positions
    node_keys = k.transpose(0, 1)  # [Hkv, m, D]
    Hkv = lists.shape[0]
    nb = max(positions) // B + 1
    vis = torch.zeros(Hkv, m, nb + 1, dtype=torch.bool, device=dev)  # column nb: the -1 padding's sink
    vis.scatter_(2, torch.where(lists >= 0, lists, nb), True)
    vis = vis[..., :nb]
    vis[:, dense] = True
    # Committed keys: the union of every node's attended committed blocks, gathered once.
    nbc = P // B + 1
    used = vis[..., :nbc].any(dim=1).any(dim=0).nonzero().flatten().tolist()
    pages = torch.tensor([rows.block_table[b] for b in used], dtype=torch.long, device=dev)
    kc = k_pool[pages].transpose(0, 1).reshape(Hkv, len(used) * B, -1)  # [Hkv, U*B, D]
    vc = v_pool[pages].transpose(0, 1).reshape(Hkv, len(used) * B, -1)
    key_pos = (torch.tensor(used, device=dev)[:, None] * B + torch.arange(B, device=dev)).flatten()  # [U*B]
    used_t = torch.tensor(used, dtype=torch.long, device=dev)
    committed = vis[:, :, used_t].repeat_interleave(B, dim=2) & (key_pos <= P)  # [Hkv, m, U*B]
    node_block = pos // B
    path = rows.ancestors.to(dev)[None] & vis[:, :, node_block]  # [Hkv, m, m]: ancestor j's block attended by i
    mask = torch.cat([committed, path], dim=2)
    keys = torch.cat([kc, node_keys.to(kc.dtype)], dim=1).transpose(0, 1)  # [S, Hkv, D]
    values = torch.cat([vc, v.transpose(0, 1).to(vc.dtype)], dim=1).transpose(0, 1)
    return attention_with_mask(q, keys, values, mask)

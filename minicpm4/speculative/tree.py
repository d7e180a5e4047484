"""EAGLE-2 dynamic draft trees (MINICPM4.md §4.3): the shape settings, the candidate history the drafter fills,
the final top-(tree_size - 1) selection, and the accepted-path walk.

Drafting (speculative/eagle.py) records every candidate it tries: depth 0 = the topk_per_iter best children of
the root; each later iteration expands the current frontier (topk_per_iter nodes) by topk_per_iter children
each and keeps the best topk_per_iter of those topk_per_iter² by cumulative log-probability (parent + child)
as the next frontier. topk + topk²·(num_iter − 1) candidates in all (110 for CPM.cu's CLI defaults 2/10/12).
The tree is then the root plus the tree_size − 1 best candidates by cumulative score: since a child's score
is at most its parent's (log-probabilities are ≤ 0), that set contains every selected node's parent; ties are
broken towards shallower, earlier candidates so this holds exactly too.

Node 0 is the root (the last committed token, whose K/V the verification step computes); nodes are ordered
so that a parent precedes its children.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

# CPM.cu's command-line defaults (--spec-num-iter 2 --spec-topk-per-iter 10 --spec-tree-size 12); its Python
# class defaults are 6 / 10 / 60. The verification kernel packs one uint64 ancestor row per node: n <= 64.
DEFAULT_NUM_ITER = 2
DEFAULT_TOPK_PER_ITER = 10
DEFAULT_TREE_SIZE = 12
MAX_TREE_SIZE = 64


@dataclass(frozen=True)
class TreeShape:
    num_iter: int = DEFAULT_NUM_ITER
    topk_per_iter: int = DEFAULT_TOPK_PER_ITER
    tree_size: int = DEFAULT_TREE_SIZE  # nodes verified per step, root included

    def __post_init__(self) -> None:
        for name in ("num_iter", "topk_per_iter", "tree_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"TreeShape.{name} must be a positive integer, got {value!r}")
        if self.tree_size > MAX_TREE_SIZE:
            raise ValueError(f"TreeShape.tree_size must be at most {MAX_TREE_SIZE}, got {self.tree_size}")

    @property
    def max_depth(self) -> int:
        """Deepest node below the root (depth 0 candidates are the root's children, at depth 1)."""
        return min(self.num_iter, self.tree_size - 1)

    @property
    def num_candidates(self) -> int:
        return self.topk_per_iter + self.topk_per_iter ** 2 * (self.num_iter - 1)


@dataclass
class CandidateHistory:
    """Every candidate tried while drafting one tree: token (full-vocabulary id), cumulative score, parent
    (index into this history, -1 = the root) and depth (1 = child of the root)."""

    tokens: list[torch.Tensor] = field(default_factory=list)  # per level [k] or [k*k] int64
    scores: list[torch.Tensor] = field(default_factory=list)  # fp32, same shapes
    parents: list[torch.Tensor] = field(default_factory=list)  # int64 history indices
    size: int = 0

    def add(self, tokens: torch.Tensor, scores: torch.Tensor, parents: torch.Tensor) -> torch.Tensor:
        """Append one level; returns the history indices of its candidates."""
        idx = torch.arange(self.size, self.size + tokens.numel())
        self.tokens.append(tokens.reshape(-1).long().cpu())
        self.scores.append(scores.reshape(-1).float().cpu())
        self.parents.append(parents.reshape(-1).long().cpu())
        self.size += tokens.numel()
        return idx


@dataclass
class DraftTree:
    tokens: list[int]  # [n] node tokens, node 0 = the root
    parents: list[int]  # [n] parent node, -1 for the root
    depths: list[int]  # [n] 0 for the root
    children: list[dict[int, int]]  # per node: child token -> child node

    @property
    def size(self) -> int:
        return len(self.tokens)

    def add(self, parent: int, token: int) -> int:
        """Append a child of `parent` carrying `token`; returns its node index (a parent precedes its children)."""
        node = len(self.tokens)
        self.tokens.append(token)
        self.parents.append(parent)
        self.depths.append(self.depths[parent] + 1)
        self.children.append({})
        self.children[parent].setdefault(token, node)
        return node

    def ancestor_mask(self) -> torch.Tensor:
        """[n, n] bool: mask[i, j] = node j is node i or one of its ancestors (what node i attends to)."""
        n = self.size
        mask = torch.zeros(n, n, dtype=torch.bool)
        for i in range(n):
            j = i
            while j >= 0:
                mask[i, j] = True
                j = self.parents[j]
        return mask

    def path_to(self, node: int) -> list[int]:
        """Nodes from the root to `node`, both included."""
        path = []
        while node >= 0:
            path.append(node)
            node = self.parents[node]
        return path[::-1]


def single_node_tree(root_token: int) -> DraftTree:
    return DraftTree([root_token], [-1], [0], [{}])


def select_tree(root_token: int, history: CandidateHistory, tree_size: int) -> DraftTree:
    """The root plus the tree_size - 1 best candidates by cumulative score (module docstring)."""
    if tree_size <= 1 or history.size == 0:
        return single_node_tree(root_token)
    tokens, scores, parents = (torch.cat(x) for x in (history.tokens, history.scores, history.parents))
    keep = min(tree_size - 1, history.size)
    # Stable descending sort: among equal scores the earlier (shallower) candidate comes first.
    order = torch.sort(scores, descending=True, stable=True).indices[:keep]
    chosen = sorted(order.tolist())  # history order: parents before children
    node_of = {h: i + 1 for i, h in enumerate(chosen)}
    tree = single_node_tree(root_token)
    for h in chosen:
        p = int(parents[h])
        parent = 0 if p < 0 else node_of.get(p)
        assert parent is not None, "a selected candidate's parent is always selected (scores never increase)"
        tree.add(parent, int(tokens[h]))
    return tree


def prune_tree(tree: DraftTree, max_depth: int, max_nodes: int | None = None) -> DraftTree:
    """The nodes of `tree` at depth <= max_depth, at most max_nodes of them below the root, first ones first
    (parents precede children, so one pass keeps a valid tree in order)."""
    out = single_node_tree(tree.tokens[0])
    new_of = {0: 0}
    for i in range(1, tree.size):
        if max_nodes is not None and out.size - 1 >= max_nodes:
            break
        if tree.depths[i] > max_depth or tree.parents[i] not in new_of:
            continue
        new_of[i] = out.add(new_of[tree.parents[i]], tree.tokens[i])
    return out

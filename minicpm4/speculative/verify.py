"""Acceptance of a verified draft tree: the target's own sampler walks it (MINICPM4.md §4.3).

Rule: CPM.cu's "sample the target at each node, then match". At the current node (first the root) the
engine's sampler draws the next token from the target's distribution at that node, exactly as plain decoding
would (same penalties, filters, seeded generator, logprobs); the token is emitted; if a child of the node
carries that token the walk moves there and repeats, else it stops (the last token is the "bonus").

Why this rule and not EAGLE's recursive rejection sampling: the draft's children are deterministic (top-k,
no sampling), and then this walk IS ancestral sampling from the target, stopped when the sample leaves the
tree — lossless for any temperature / top-k / top-p / min-p / penalties, because every emitted token is drawn
from exactly the distribution plain decoding draws it from, in the same order, from the same per-request
generator. So a seeded request gives the same text with and without speculation (up to the floating-point
difference of a verification row versus a decode row), greedy included (the argmax). Rejection sampling
needs the draft's probabilities, changes the number of random draws per token and would break that
seed-for-seed equality; its acceptance rate is higher at T > 0, by sum(min(p, q)) versus sum over children p.
"""

from __future__ import annotations

from typing import Callable

import torch

from minicpm4.engine.sampler import sample, token_logprobs
from minicpm4.engine.sequence import Sequence
from minicpm4.speculative.tree import DraftTree


def accept_path(tree: DraftTree, logits: torch.Tensor, seq: Sequence,
                emit: Callable[[int, object], None]) -> list[int]:
    """logits [n, V] of the tree's rows (root first). emit(token, logprob) appends a token to seq (and may
    finish it). Returns the accepted nodes below the root, in path order (their K/V is to be kept)."""
    path: list[int] = []
    node = 0
    want_lp = seq.params.logprobs is not None
    while True:
        row = logits[node:node + 1]
        token = sample(row, [seq])[0]
        lp = token_logprobs(row, [token], [seq.params.logprobs])[0] if want_lp else None
        emit(token, lp)
        if seq.is_finished:
            return path
        child = tree.children[node].get(token)
        if child is None:
            return path
        path.append(child)
        node = child

"""Shared pieces of the speculative tests: the prompts, a runner that drives an engine to completion, and an
oracle drafter that knows the reference continuation (so long paths are accepted and the KV commit is
exercised), mixed with wrong siblings (so rejection is exercised too)."""

from __future__ import annotations

import torch

from minicpm4.engine import LLMEngine, SamplingParams
from minicpm4.speculative.tree import DraftTree, TreeShape, single_node_tree
from tests.engine.test_engine import prompts_of

GREEDY = SamplingParams(max_new_tokens=20, ignore_eos=True)
PROMPTS = prompts_of([3, 40, 7, 150, 1, 90])


def run_all(engine: LLMEngine, prompts, params, stagger: int = 0) -> list[list[int]]:
    """Add the prompts (one every `stagger` steps, or all at once), step until done; tokens per prompt."""
    out: dict[str, list[int]] = {}
    pending, step = list(enumerate(prompts)), 0
    while pending or engine.has_unfinished():
        while pending and (stagger == 0 or step % stagger == 0):
            i, p = pending.pop(0)
            engine.add_request(p, params if not isinstance(params, list) else params[i], request_id=f"r{i}")
            if stagger:
                break
        for o in engine.step():
            if o.finished:
                out[o.request_id] = o.token_ids
        step += 1
    assert engine.blocks.num_used == 0 and not engine.requests
    return [out[f"r{i}"] for i in range(len(prompts))]


class OracleDrafter:
    """Trees whose one branch follows `continuations` (full token lists: prompt + reference output) for
    `good_depth` levels, with `wrong` random siblings at every level and a random tail below."""

    def __init__(self, continuations: list[list[int]], good_depth: int = 2, depth: int = 3, wrong: int = 1,
                 seed: int = 3, vocab: int = 1000) -> None:
        self.full = continuations
        self.good_depth, self.depth, self.wrong = good_depth, depth, wrong
        self.shape = TreeShape(num_iter=depth, topk_per_iter=wrong + 1, tree_size=min(64, 1 + depth * (wrong + 1)))
        self.rng = torch.Generator().manual_seed(seed)
        self.vocab = vocab
        self.seen: dict[object, int] = {}

    def observe(self, key, hidden, first_pos) -> None:
        self.seen[key] = first_pos + hidden.shape[0]

    def drop(self, key) -> None:
        self.seen.pop(key, None)

    def draft_tree(self, key, token_ids: list[int], shape=None) -> DraftTree:
        full = next((f for f in self.full if f[:len(token_ids)] == token_ids), None)
        tree = single_node_tree(token_ids[-1])
        P = len(token_ids) - 1
        parent = 0
        for d in range(1, self.depth + 1):
            nxt = None
            for _ in range(self.wrong):
                nxt = tree.add(parent, int(torch.randint(3, self.vocab, (1,), generator=self.rng)))
            if full is not None and d <= self.good_depth and P + d < len(full):
                nxt = tree.add(parent, full[P + d])
            parent = nxt
        return tree

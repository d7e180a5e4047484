"""Chain drafting with a separate small MiniCPM model (the second speculative mode).

The draft model (any MiniCPM checkpoint sharing the target's tokenizer, e.g. a 0.5B drafting for an 8B)
keeps its own static KV cache per sequence (kv_cache.py: slot = position) and drafts one greedy chain of
tree_size - 1 tokens after the root, verified like any tree (a chain is a tree with one child per node).
Its cache holds the committed tokens' K/V; the drafted tokens' slots are simply overwritten next time
(a static cache needs no rollback: keys past the committed length are never attended). It reads the token
ids only, so it needs nothing from the target but the tokenizer's vocabulary.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from minicpm4.generate import decode_one_token, prefill
from minicpm4.kv_cache import StaticKVCache
from minicpm4.model import MiniCPMForCausalLM
from minicpm4.speculative.tree import DraftTree, TreeShape, single_node_tree

# Prompt tokens per draft-model forward when it catches up (bounds the [T, L] attention of a long prompt).
CATCH_UP_CHUNK = 512


@dataclass
class _ChainState:
    cache: StaticKVCache
    tokens: list[int]  # the tokens whose K/V the draft cache holds, in position order


class ChainDrafter:
    def __init__(self, target: MiniCPMForCausalLM, draft: MiniCPMForCausalLM, shape: TreeShape | None = None,
                 context_len: int | None = None) -> None:
        if draft.config.vocab_size > target.config.vocab_size:
            raise ValueError(f"draft model vocab_size {draft.config.vocab_size} exceeds the target's "
                             f"{target.config.vocab_size}: the draft must share the target's tokenizer")
        self.draft = draft.eval()
        shape = shape or TreeShape(num_iter=4, topk_per_iter=1, tree_size=5)
        # A chain: one child per node, tree_size - 1 nodes below the root.
        self.shape = TreeShape(num_iter=shape.tree_size - 1, topk_per_iter=1, tree_size=shape.tree_size)
        self.context_len = min(context_len or draft.config.max_position_embeddings, draft.config.max_position_embeddings)
        self.states: dict[object, _ChainState] = {}

    @classmethod
    def from_folder(cls, target: MiniCPMForCausalLM, folder: str, shape: TreeShape | None,
                    context_len: int | None) -> ChainDrafter:
        from minicpm4.checkpoint import load_model

        return cls(target, load_model(folder, dtype=target.dtype, device=target.device), shape, context_len)

    def observe(self, key: object, hidden: torch.Tensor, first_pos: int) -> None:
        """The draft model needs no target hidden states."""

    def drop(self, key: object) -> None:
        self.states.pop(key, None)

    def _catch_up(self, st: _ChainState, token_ids: list[int]) -> torch.Tensor | None:
        """Bring the draft cache to token_ids[:-1] + the root; returns the root's next-token logits [V]."""
        common = 0
        limit = min(len(st.tokens), len(token_ids))
        while common < limit and st.tokens[common] == token_ids[common]:
            common += 1
        new = token_ids[common:]
        dev = self.draft.device
        logits = None
        for s in range(0, len(new), CATCH_UP_CHUNK):
            chunk = torch.tensor([new[s:s + CATCH_UP_CHUNK]], dtype=torch.long, device=dev)
            logits = prefill(self.draft, chunk, torch.tensor([chunk.shape[1]], device=dev), st.cache, start=common + s)
        st.tokens = list(token_ids)
        return None if logits is None else logits[0]

    @torch.inference_mode()
    def draft_tree(self, key: object, token_ids: list[int], shape: TreeShape | None = None) -> DraftTree:
        P = len(token_ids) - 1
        n = (shape or self.shape).tree_size - 1
        n = min(n, self.context_len - 1 - P)
        tree = single_node_tree(token_ids[-1])
        if n < 1:
            return tree
        st = self.states.get(key)
        if st is None:
            st = self.states[key] = _ChainState(StaticKVCache.for_model(self.draft, 1, self.context_len), [])
        if st.tokens == token_ids:  # nothing new (cannot happen in the engine: the root is always new)
            st.tokens = token_ids[:-1]
        logits = self._catch_up(st, token_ids)
        dev = self.draft.device
        for d in range(1, n + 1):
            token = int(logits.argmax())
            tree.add(d - 1, token)
            if d == n:
                break
            logits = decode_one_token(self.draft, torch.tensor([token], device=dev), torch.tensor([P + d], device=dev),
                                      st.cache)[0]
        return tree

"""EAGLE-2 drafting over one sequence: the draft's own sliding-window KV, fed with the target's hidden states,
and the dynamic tree (MINICPM4.md §4.2-4.3; tree selection in speculative/tree.py).

Pairs. The draft input at RoPE position t is (h_t, x_{t+1}): the target's final-normed hidden state at t and
the token after it; its output feature predicts x_{t+2}. The target produces h_t when it computes position t
(prefill chunks, verification); x_{t+1} is known once the token after it is (prompt, accepted draft or
bonus token). Rows wait in `pending` until then and are fed in one draft forward right before drafting.

Window. The draft attends to the keys of the last `window` positions (CPM.cu --spec-window-size 1024). A
one-layer draft's key at t depends on its own input only, so only the last `window` pairs ever matter:
older pending rows are dropped unfed, and the KV is trimmed (a long prompt costs the draft at most `window`
rows).

Tree. With r the root (the last committed token, position P) and f0 the feature of pair (h_{P-1}, r):
depth 0 = the topk best tokens of head(f0); iteration d = 1 .. num_iter-1 feeds the frontier's pairs
(feature of the parent, token) at position P + d - 1 in one batched forward, each node attending to the
committed window, its ancestors' tree keys and itself (a tree mask); the tree keys are discarded after
the step (verification's accepted tokens are fed again with the target's real hidden states, as CPM.cu does).

FR-Spec: with an index (speculative/frspec.py, data/frspec.py) the head is the rows V_high of the target's
head and the top-k ids are mapped back through it before the next embedding lookup and in the tree.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from types import SimpleNamespace

import torch
import torch.nn.functional as F

from minicpm4.engine.fast_forward import FastDecoder
from minicpm4.model import MiniCPMForCausalLM
from minicpm4.speculative.draft_model import EagleDraft
from minicpm4.speculative.tree import CandidateHistory, DraftTree, TreeShape, select_tree, single_node_tree

# CPM.cu --spec-window-size: the draft's sliding attention window (TriForce-style; TR: keeps the first-token
# latency low and improves draft accuracy).
DEFAULT_WINDOW = 1024


@dataclass
class DraftState:
    """One sequence's draft cache: keys/values kv [2, cap, Hkv, D] (post-RoPE) whose entries lo .. hi - 1 are the
    pairs at consecutive positions first_pos .. (a draft key depends on its own pair only, so the cache is a
    contiguous run of positions); entries from hi on are scratch for the current tree's keys. Plus the pending
    target rows (hidden [m, H] for positions pending_start ..) and the feature of the last fed pair."""

    kv: torch.Tensor | None = None
    lo: int = 0
    hi: int = 0
    first_pos: int = 0
    pending: list[torch.Tensor] = field(default_factory=list)
    pending_start: int = 0
    pending_len: int = 0
    feature: torch.Tensor | None = None  # [H]: output of the pair at position feature_pos
    feature_pos: int = -1

    @property
    def pending_end(self) -> int:
        return self.pending_start + self.pending_len

    @property
    def end_pos(self) -> int:
        """The position after the last cached pair."""
        return self.first_pos + self.hi - self.lo


def _draft_decoder(target: MiniCPMForCausalLM, draft: EagleDraft, head: torch.Tensor, context_len: int) -> FastDecoder:
    """The engine's fused forward (FastDecoder: two C++ calls per layer on a CPU) over the draft's one layer: a
    stand-in model whose layer is the draft's, whose residual scale is the draft's (scale_depth / sqrt(1)), whose
    RoPE is the target's and whose head is the draft's vocabulary rows."""
    cfg = target.config.replace(num_hidden_layers=1, scale_depth=draft.layer.residual_scale, sparse_config=None)
    lm_head = torch.nn.Linear(head.shape[1], head.shape[0], bias=False, dtype=head.dtype, device=head.device)
    lm_head.weight = torch.nn.Parameter(head, requires_grad=False)
    shell = SimpleNamespace(config=cfg, lm_head=lm_head, rotary=target.rotary, model=SimpleNamespace(
        embed_tokens=target.model.embed_tokens, norm=draft.norm, layers=[draft.layer]))
    return FastDecoder(shell, context_len)


class EagleDrafter:
    """Drafts trees for many sequences (one DraftState each, keyed by the caller); not thread-safe (the engine
    has one owner thread)."""

    def __init__(self, target: MiniCPMForCausalLM, draft: EagleDraft, shape: TreeShape | None = None,
                 frspec_ids: torch.Tensor | None = None, window: int = DEFAULT_WINDOW,
                 context_len: int | None = None) -> None:
        self.target, self.draft = target, draft.to(device=target.device, dtype=target.dtype).eval()
        # The length LongRoPE picks its factors by: the engine's max_model_len, as for the target's own rows.
        self.context_len = context_len or target.config.max_position_embeddings
        self.shape = shape or TreeShape()
        self.window = window
        self.states: dict[object, DraftState] = {}
        self.draft_dtype = target.dtype
        head = target.output_weight if target.lm_head is None or hasattr(target.lm_head, "weight") else None
        if head is None:  # a packed head (minicpm4.quant): drafting reads a dense copy of the rows it uses
            from minicpm4.quant.linear import dense_weight

            head = dense_weight(target.lm_head)
        self.ids = None if frspec_ids is None else frspec_ids.to(torch.long).to(target.device)
        head = head.detach()
        self.head = (head if self.ids is None else head[self.ids]).to(self.draft_dtype).contiguous()  # [V', H]
        self.fast = _draft_decoder(target, self.draft, self.head, self.context_len)

    # ---- state --------------------------------------------------------------------------------------------
    def drop(self, key: object) -> None:
        self.states.pop(key, None)

    def observe(self, key: object, hidden: torch.Tensor, first_pos: int) -> None:
        """The target computed hidden [m, H] for positions first_pos .. first_pos + m - 1 of sequence `key`."""
        st = self.states.setdefault(key, DraftState())
        if first_pos != st.pending_end:
            if first_pos < st.pending_end or st.pending_len or st.feature_pos != first_pos - 1:
                # A gap or a rewind (prefix-cache hit, preemption): start over from these rows.
                self.states[key] = st = DraftState(pending_start=first_pos)
            else:
                st.pending_start = first_pos
        st.pending.append(hidden.detach())
        st.pending_len += hidden.shape[0]
        self._trim_pending(st)

    def _trim_pending(self, st: DraftState) -> None:
        extra = st.pending_len - self.window
        if extra <= 0:
            return
        rows = torch.cat(st.pending)[extra:]
        st.pending, st.pending_start, st.pending_len = [rows], st.pending_start + extra, rows.shape[0]

    # ---- the draft forward ------------------------------------------------------------------------------
    def _forward(self, st: DraftState, tokens: torch.Tensor, hidden: torch.Tensor, positions: torch.Tensor,
                 start: int, at: int, mask: torch.Tensor) -> torch.Tensor:
        """tokens [N], hidden [N, H], positions [N] -> draft features [N, H]. The rows' keys/values are written
        into st.kv[:, at : at + N]; they attend to entries start .. at + N - 1 under mask [N, at + N - start]."""
        x = self.draft.fuse_inputs(self.target, tokens, hidden.to(self.draft_dtype))
        N = tokens.numel()

        def attend(layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            st.kv[0, at:at + N], st.kv[1, at:at + N] = k, v
            keys, values = st.kv[0, start:at + N].transpose(0, 1), st.kv[1, start:at + N].transpose(0, 1)
            o = F.scaled_dot_product_attention(q.transpose(0, 1)[None], keys[None], values[None],
                                               attn_mask=mask[None, None], enable_gqa=True)
            return o[0].transpose(0, 1)

        return self.fast.layers_forward(x, positions, attend)

    def _reserve(self, st: DraftState, n: int, like: torch.Tensor) -> None:
        """Room for n more entries plus a tree's scratch after hi: allocate, or move the window to the front."""
        cfg = self.target.config
        need = n + self.shape.num_candidates + 1
        cap = 2 * self.window + need
        if st.kv is None or st.kv.shape[1] < need + min(st.hi - st.lo, self.window):
            st.kv = torch.empty(2, cap, cfg.num_key_value_heads, cfg.head_dim, dtype=like.dtype, device=like.device)
            st.first_pos, st.lo, st.hi = st.end_pos, 0, 0  # (only ever when empty: cap covers any later need)
            return
        if st.hi + need > st.kv.shape[1]:
            keep = min(st.hi - st.lo, self.window)
            st.kv[:, :keep] = st.kv[:, st.hi - keep:st.hi].clone()
            st.first_pos += st.hi - keep - st.lo
            st.lo, st.hi = 0, keep

    def _feed(self, st: DraftState, token_ids: list[int]) -> None:
        """Feed every pending pair whose next token is known."""
        n = min(st.pending_len, len(token_ids) - 1 - st.pending_start)
        if n <= 0:
            return
        rows = torch.cat(st.pending) if len(st.pending) > 1 else st.pending[0]
        hidden, rest = rows[:n], rows[n:]
        dev = hidden.device
        p0 = st.pending_start
        if st.kv is None or st.end_pos != p0:  # a new run of positions (first feed, or after a gap)
            st.kv, st.lo, st.hi, st.first_pos = None, 0, 0, p0
        self._reserve(st, n, self.head)
        # Keys the first new row can still see: positions > p0 - window.
        start = st.lo + max(0, p0 - self.window + 1 - st.first_pos)
        positions = torch.arange(p0, p0 + n, device=dev)
        tokens = torch.tensor(token_ids[p0 + 1:p0 + 1 + n], dtype=torch.long, device=dev)
        k_pos = torch.arange(st.first_pos + start - st.lo, p0 + n, device=dev)
        mask = (k_pos[None, :] <= positions[:, None]) & (k_pos[None, :] > positions[:, None] - self.window)
        feats = self._forward(st, tokens, hidden, positions, start, st.hi, mask)
        st.hi += n
        st.feature, st.feature_pos = feats[-1], p0 + n - 1
        st.pending, st.pending_start, st.pending_len = ([rest] if rest.shape[0] else []), p0 + n, rest.shape[0]

    def _logp(self, features: torch.Tensor) -> torch.Tensor:
        """features [N, H] -> log-probabilities over the draft vocabulary [N, V'] (fp32)."""
        return torch.log_softmax(self.fast.logits(self.draft.head_input(features)), dim=-1)

    def _full_ids(self, ids: torch.Tensor) -> torch.Tensor:
        return ids if self.ids is None else self.ids[ids]

    # ---- drafting ---------------------------------------------------------------------------------------
    @torch.inference_mode()
    def draft_tree(self, key: object, token_ids: list[int], shape: TreeShape | None = None) -> DraftTree:
        """The tree rooted at token_ids[-1] (position len - 1). A single-node tree when the draft has not seen
        the pair that ends at the root (then verification is a plain decode step)."""
        shape = shape or self.shape
        root, P = token_ids[-1], len(token_ids) - 1
        st = self.states.get(key)
        if st is None:
            return single_node_tree(root)
        self._feed(st, token_ids)
        if st.feature is None or st.feature_pos != P - 1 or shape.tree_size <= 1:
            return single_node_tree(root)
        k = shape.topk_per_iter
        hist = CandidateHistory()
        lp = self._logp(st.feature[None])[0]
        top = lp.topk(min(k, lp.numel()))
        tokens = self._full_ids(top.indices)
        front_idx = hist.add(tokens, top.values, torch.full_like(top.indices, -1))
        front_tokens, front_scores = tokens, top.values
        front_feat = st.feature[None].expand(tokens.numel(), -1)
        dev = front_feat.device
        anc = torch.zeros(tokens.numel(), 0, dtype=torch.bool, device=dev)  # frontier x tree keys so far
        start = st.lo + max(0, P - self.window - st.first_pos)  # committed keys position P - 1 still sees
        committed = st.hi - start
        at = st.hi  # this tree's keys go after the committed ones (scratch, never committed)
        for d in range(1, shape.num_iter):
            n = front_tokens.numel()
            pos = torch.full((n,), P + d - 1, dtype=torch.long, device=dev)
            mask = torch.cat([torch.ones(n, committed, dtype=torch.bool, device=dev), anc,
                              torch.eye(n, dtype=torch.bool, device=dev)], dim=1)
            feats = self._forward(st, front_tokens, front_feat, pos, start, at, mask)
            at += n
            lp = self._logp(feats)  # [n, V']
            top = lp.topk(min(k, lp.shape[-1]), dim=-1)
            cum = front_scores[:, None] + top.values  # [n, k]
            child_tokens = self._full_ids(top.indices)
            idx = hist.add(child_tokens, cum, front_idx[:, None].expand_as(cum))
            best = cum.reshape(-1).topk(min(k, cum.numel())).indices
            rows = best // cum.shape[1]
            own = torch.zeros(rows.numel(), n, dtype=torch.bool, device=dev)
            own[torch.arange(rows.numel(), device=dev), rows] = True
            anc = torch.cat([anc[rows], own], dim=1)
            front_tokens, front_scores = child_tokens.reshape(-1)[best], cum.reshape(-1)[best]
            front_feat, front_idx = feats[rows], idx.reshape(-1)[best.cpu()]
        return select_tree(root, hist, shape.tree_size)

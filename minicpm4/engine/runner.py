"""The model runner: one batched forward per step over the scheduled (ragged) sequences.

It turns the scheduler's decision into tensors once per step (token ids, positions, slot mapping,
block tables: attention/paged.py's PagedBatch), runs the decoder over all of them packed into one
row, and returns the logits of the rows that need them: each sequence whose prompt is complete
after this step (its next token is sampled) and, for requests that asked for prompt logprobs, every
prompt row. The forward is FastDecoder (fused weights, engine/fast_forward.py) or, with
`fast_forward=False`, the model's own forward with the paged backend swapped in for the call.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from minicpm4.attention.metadata import AttentionMetadata
from minicpm4.attention.paged import PagedAttention, PagedBatch, PagedKVCache
from minicpm4.engine.config import EngineConfig
from minicpm4.engine.scheduler import ScheduledSequence
from minicpm4.model import MiniCPMForCausalLM
from minicpm4.speculative.tree import DraftTree
from minicpm4.speculative.tree_attention import (PagedTreePlan, TreeRows, TreeStep, commit_accepted,
                                                 paged_tree_attention, paged_tree_plan, plan_page_writes,
                                                 tree_attention_dense)


@dataclass
class StepLogits:
    sample_logits: torch.Tensor  # [M, V] fp32, one row per sequence that samples this step (in order)
    sample_seqs: list[ScheduledSequence]
    # Per sequence that asked for prompt logprobs: (its scheduled entry, logits [n, V] of its prompt rows,
    # the prompt position each row predicts the token after).
    prompt_logits: list[tuple[ScheduledSequence, torch.Tensor, list[int]]]
    hidden: torch.Tensor | None = None  # [N + M, H]: every row of the step (the drafter reads them)
    row_starts: list[int] | None = None  # per scheduled entry, its first row
    # Speculative verification: per scheduled entry index with a draft tree, the logits [n, V] and hidden
    # [n, H] of its tree rows (root first) and its node rows; the step's stashed node K/V
    # (speculative/tree_attention.py).
    tree_logits: dict[int, torch.Tensor] | None = None
    tree_hidden: dict[int, torch.Tensor] | None = None
    tree_rows: dict[int, TreeRows] | None = None
    tree_step: TreeStep | None = None


class _ClosureBackend:
    """The model-forward seam ([1, H, N, D] tensors) over the runner's packed attend closure."""

    needs_pre_rope = False

    def __init__(self, attend) -> None:
        self.attend = attend

    def __call__(self, layer_idx, q, k, v, meta, pre_rope=None):
        t = lambda x: x[0].transpose(0, 1).contiguous()  # noqa: E731  [1, H, N, D] -> [N, H, D]
        return self.attend(layer_idx, t(q), t(k), t(v)).transpose(0, 1)[None]


def make_paged_backend(model: MiniCPMForCausalLM, block_size: int):
    """Dense paged attention, or InfLLM v2 over the same pages when the model's config is sparse (it
    checks now, not at the first step, that one sparse block is one page)."""
    if model.config.sparse_config is not None:
        from minicpm4.attention.infllmv2.paged import make_paged_infllmv2_backend  # imported on use

        return make_paged_infllmv2_backend(model.config, block_size=block_size)
    return PagedAttention()


class ModelRunner:
    def __init__(self, model: MiniCPMForCausalLM, config: EngineConfig, max_model_len: int) -> None:
        self.model = model
        self.config = config
        self.max_model_len = max_model_len
        self.device, self.dtype = model.device, model.dtype  # the activation dtype (packed weights are integers)
        cfg = model.config
        self.cache = PagedKVCache(cfg.num_hidden_layers, config.num_blocks(), config.block_size,
                                  cfg.num_key_value_heads, cfg.head_dim, self.dtype, self.device)
        # Tree nodes verify through the paged kernel (one call per layer, speculative/tree_attention.py), but an
        # InfLLM v2 tree with a node at or past dense_len per sequence (speculative/tree_sparse.py).
        self.dense_len = cfg.sparse_config.dense_len if cfg.sparse_config is not None else None
        self.backend = make_paged_backend(model, config.block_size)
        self.fast = None
        if config.fast_forward:
            from minicpm4.engine.fast_forward import FastDecoder

            self.fast = FastDecoder(model, max_model_len)

    def build_batch(self, scheduled: list[ScheduledSequence]) -> tuple[torch.Tensor, PagedBatch]:
        bs = self.config.block_size
        ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        qsl, ctx = [0], []
        for entry in scheduled:
            seq, start = entry.seq, entry.seq.num_computed_tokens
            end = start + entry.num_tokens
            ids.extend(seq.token_ids[start:end])
            table = seq.block_table
            for p in range(start, end):
                positions.append(p)
                slots.append(table[p // bs] * bs + p % bs)
            qsl.append(qsl[-1] + entry.num_tokens)
            ctx.append(end)
        width = max(len(e.seq.block_table) for e in scheduled)
        tables = [e.seq.block_table + [0] * (width - len(e.seq.block_table)) for e in scheduled]
        dev = self.device
        batch = PagedBatch(
            cache=self.cache,
            slot_mapping=torch.tensor(slots, dtype=torch.long, device=dev),
            positions=torch.tensor(positions, dtype=torch.long, device=dev),
            block_tables=torch.tensor(tables, dtype=torch.int32, device=dev),
            query_start_loc=torch.tensor(qsl, dtype=torch.int32, device=dev),
            context_lens=torch.tensor(ctx, dtype=torch.int32, device=dev),
            query_lens_host=[e.num_tokens for e in scheduled], context_lens_host=ctx,
            block_tables_host=[e.seq.block_table for e in scheduled])
        return torch.tensor(ids, dtype=torch.long, device=dev), batch

    def hidden_states(self, input_ids: torch.Tensor, batch: PagedBatch, tree: TreeStep | None = None,
                      plan: PagedTreePlan | None = None) -> torch.Tensor:
        """input_ids [N (+ M tree rows)] -> final-normed hidden [N (+ M), hidden]."""
        N0 = batch.positions.numel()

        def attend(layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            if tree is None:
                return self.backend.attend(layer, q, k, v, batch)
            tree.stash[layer] = (k[N0:], v[N0:])
            if plan is not None and plan.include_batch:
                return paged_tree_attention(q, k, v, self.cache.k[layer], self.cache.v[layer], plan)
            out = torch.empty_like(q)
            out[:N0] = self.backend.attend(layer, q[:N0], k[:N0], v[:N0], batch)
            qt, kt, vt = q[N0:], k[N0:], v[N0:]
            covered = set()
            if plan is not None:
                out[N0 + plan.node_rows] = paged_tree_attention(qt, kt, vt, self.cache.k[layer], self.cache.v[layer],
                                                                plan)
                covered = {id(r) for r in plan.rows}
            for rows in tree.rows:
                if id(rows) in covered:
                    continue
                sl = slice(rows.start, rows.start + rows.num_nodes)
                out[N0 + rows.start:N0 + rows.start + rows.num_nodes] = self.tree_attend(layer, qt[sl], kt[sl], vt[sl], rows)
            return out

        positions = batch.positions if tree is None else torch.cat([batch.positions, tree.positions.to(self.device)])
        if self.fast is not None:
            return self.fast.hidden_states(input_ids, positions, attend)
        meta = AttentionMetadata(positions=positions[None], paged=batch)
        previous = self.model.set_attention_backend(_ClosureBackend(attend))
        try:
            return self.model.hidden_states(input_ids[None], positions[None], meta=meta, context_len=self.max_model_len)[0]
        finally:
            self.model.set_attention_backend(previous)

    def tree_attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rows: TreeRows) -> torch.Tensor:
        """One sequence's draft-tree nodes (speculative/tree_attention.py): dense, or InfLLM v2's selection."""
        if self.dense_len is not None:
            from minicpm4.speculative.tree_sparse import tree_attention_sparse  # imported on use

            return tree_attention_sparse(self.backend, layer, q, k, v, self.cache, rows)
        return tree_attention_dense(q, k, v, self.cache.k[layer], self.cache.v[layer], rows)

    def tree_plan(self, batch: PagedBatch, tree: TreeStep) -> PagedTreePlan | None:
        if self.dense_len is None or (max(batch.context_lens_host) < self.dense_len and
                                      all(max(r.positions) + 1 < self.dense_len for r in tree.rows)):
            # No sparse row in the step (an InfLLM v2 model below dense_len attends densely): one paged call per
            # layer for everything; the compressed keys' write rule is applied once after the forward.
            return paged_tree_plan(batch, tree.rows, self.config.block_size)
        dense = [r for r in tree.rows if max(r.positions) + 1 < self.dense_len]
        if not dense:
            return None
        return paged_tree_plan(batch, dense, self.config.block_size, include_batch=False)

    def tree_rows(self, scheduled: list[ScheduledSequence], trees: dict[int, DraftTree]) -> tuple[list[int], TreeStep]:
        """The node rows (root excluded) of every drafted tree, appended after the step's ordinary rows."""
        ids: list[int] = []
        positions: list[int] = []
        rows = []
        for i, tree in sorted(trees.items()):
            seq = scheduled[i].seq
            P = seq.num_computed_tokens  # the root's position (its K/V is computed by this step)
            node_pos = [P + d for d in tree.depths[1:]]
            rows.append(TreeRows(start=len(ids), positions=node_pos, ancestors=tree.ancestor_mask()[1:, 1:],
                                 root_pos=P, block_table=list(seq.block_table)))
            ids.extend(tree.tokens[1:])
            positions.extend(node_pos)
        return ids, TreeStep(rows, torch.tensor(positions, dtype=torch.long))

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.fast.logits(hidden) if self.fast is not None else self.model.logits(hidden)

    @torch.inference_mode()
    def execute(self, scheduled: list[ScheduledSequence], trees: dict[int, DraftTree] | None = None) -> StepLogits:
        """One forward. trees: scheduled entry index -> the draft tree rooted at that (decode) entry's token;
        those entries are verified (tree_logits) instead of sampled here."""
        input_ids, batch = self.build_batch(scheduled)
        trees = {i: t for i, t in (trees or {}).items() if t.size > 1}
        tree_step = plan = None
        if trees:
            extra, tree_step = self.tree_rows(scheduled, trees)
            input_ids = torch.cat([input_ids, torch.tensor(extra, dtype=torch.long, device=self.device)])
            plan = self.tree_plan(batch, tree_step)
        hidden = self.hidden_states(input_ids, batch, tree_step, plan)
        if plan is not None and plan.include_batch and self.dense_len is not None:
            self.backend.note_external_writes(self.cache, plan_page_writes(plan, self.config.block_size))
        N0 = batch.positions.numel()
        rows, sample_seqs = [], []
        prompt_rows: list[tuple[ScheduledSequence, list[int], list[int]]] = []
        offset = 0
        row_starts = []
        tree_index: dict[int, list[int]] = {}
        tree_rows = dict(zip(sorted(trees), tree_step.rows)) if tree_step is not None else {}
        for i, entry in enumerate(scheduled):
            row_starts.append(offset)
            if i in trees:
                nodes = tree_rows[i]
                tree_index[i] = [offset] + [N0 + nodes.start + j for j in range(nodes.num_nodes)]
                offset += entry.num_tokens
                continue
            seq, start = entry.seq, entry.seq.num_computed_tokens
            if seq.params.prompt_logprobs is not None:
                # Row of position p predicts token p + 1; prompt tokens 1 .. num_prompt - 1 get logprobs.
                ps = [p for p in range(start, start + entry.num_tokens) if p + 1 < seq.num_prompt_tokens]
                if ps:
                    prompt_rows.append((entry, [offset + p - start for p in ps], ps))
            if entry.completes_prompt:
                rows.append(offset + entry.num_tokens - 1)
                sample_seqs.append(entry)
            offset += entry.num_tokens
        index = torch.tensor(rows, dtype=torch.long, device=self.device)
        sample_logits = self.logits(hidden[index]) if rows else hidden.new_zeros(0, self.model.config.vocab_size).float()
        prompt_logits = [(entry, self.logits(hidden[torch.tensor(r, device=self.device)]), ps)
                         for entry, r, ps in prompt_rows]
        tree_logits, tree_hidden = {}, {}
        if tree_index:  # one head call for every tree row of the step
            order = [r for i in sorted(tree_index) for r in tree_index[i]]
            th = hidden[torch.tensor(order, dtype=torch.long, device=self.device)]
            tl = self.logits(th)
            at = 0
            for i in sorted(tree_index):
                n = len(tree_index[i])
                tree_logits[i], tree_hidden[i] = tl[at:at + n], th[at:at + n]
                at += n
        return StepLogits(sample_logits, sample_seqs, prompt_logits, hidden, row_starts, tree_logits, tree_hidden,
                          tree_rows, tree_step)

    def commit_tree(self, result: StepLogits, index: int, path: list[int]) -> None:
        """After the walk: the accepted nodes (tree node indices below the root, in path order) of entry `index`
        get their K/V into the slots after the root; InfLLM v2's compressed keys drop what covered those pages."""
        writes = commit_accepted(self.cache, result.tree_step, result.tree_rows[index], [n - 1 for n in path])
        if writes and self.dense_len is not None:
            self.backend.note_external_writes(self.cache, writes)

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


@dataclass
class StepLogits:
    sample_logits: torch.Tensor  # [M, V] fp32, one row per sequence that samples this step (in order)
    sample_seqs: list[ScheduledSequence]
    # Per sequence that asked for prompt logprobs: (its scheduled entry, logits [n, V] of its prompt rows,
    # the prompt position each row predicts the token after).
    prompt_logits: list[tuple[ScheduledSequence, torch.Tensor, list[int]]]


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

    def hidden_states(self, input_ids: torch.Tensor, batch: PagedBatch) -> torch.Tensor:
        """input_ids [N] -> final-normed hidden [N, hidden]."""
        if self.fast is not None:
            return self.fast.hidden_states(input_ids, batch.positions,
                                           lambda layer, q, k, v: self.backend.attend(layer, q, k, v, batch))
        positions = batch.positions[None]
        meta = AttentionMetadata(positions=positions, paged=batch)
        previous = self.model.set_attention_backend(self.backend)
        try:
            return self.model.hidden_states(input_ids[None], positions, meta=meta, context_len=self.max_model_len)[0]
        finally:
            self.model.set_attention_backend(previous)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.fast.logits(hidden) if self.fast is not None else self.model.logits(hidden)

    @torch.inference_mode()
    def execute(self, scheduled: list[ScheduledSequence]) -> StepLogits:
        input_ids, batch = self.build_batch(scheduled)
        hidden = self.hidden_states(input_ids, batch)
        rows, sample_seqs = [], []
        prompt_rows: list[tuple[ScheduledSequence, list[int], list[int]]] = []
        offset = 0
        for entry in scheduled:
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
        return StepLogits(sample_logits, sample_seqs, prompt_logits)

"""The scheduler: each step, how many tokens each request processes (pure Python, DESIGN §6).

One rule covers prefill, chunked prefill and decode: a running sequence has `num_tokens -
num_computed_tokens` tokens without K/V; a step processes some of them. Decodes (one token) go first,
then running prefills, then waiting requests are admitted, all under a token budget
(`max_num_batched_tokens`) and a cap on running requests. When the page pool runs out, the most
recently admitted running request is preempted by recompute: its pages are freed, it goes back to the
front of the queue and is prefilled again later (its pages may well still be in the prefix cache).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from minicpm4.engine.block_manager import BlockManager
from minicpm4.engine.config import EngineConfig
from minicpm4.engine.sequence import Sequence, SequenceStatus


@dataclass
class ScheduledSequence:
    seq: Sequence
    num_tokens: int  # tokens processed this step, starting at seq.num_computed_tokens

    @property
    def completes_prompt(self) -> bool:
        """After this step every token has K/V, so the step samples the sequence's next token."""
        return self.seq.num_computed_tokens + self.num_tokens == self.seq.num_tokens


@dataclass
class SchedulerOutput:
    scheduled: list[ScheduledSequence]
    preempted: list[Sequence]

    @property
    def num_tokens(self) -> int:
        return sum(s.num_tokens for s in self.scheduled)


class Scheduler:
    def __init__(self, config: EngineConfig, blocks: BlockManager, lookahead: int = 0) -> None:
        self.config = config
        # Speculative decoding: a decode step also reserves pages for this many positions after its token (the
        # accepted draft tokens' K/V is written there after verification); never preempts for them.
        self.lookahead = lookahead
        self.blocks = blocks
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.prefix_hit_tokens = 0  # prompt tokens served from the prefix cache, over the engine's life

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def remove(self, seq: Sequence) -> None:
        """Drop a finished or aborted sequence and release its pages."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.blocks.free_sequence(seq)

    def schedule(self) -> SchedulerOutput:
        budget = self.config.max_num_batched_tokens
        scheduled: list[ScheduledSequence] = []
        preempted: list[Sequence] = []
        # Running sequences, decodes first (their latency is what users feel), oldest first within each kind.
        order = sorted(self.running, key=lambda s: s.in_prefill)
        for seq in order:
            if seq not in self.running:  # preempted earlier in this loop
                continue
            want = seq.num_tokens - seq.num_computed_tokens
            n = min(want, budget) if self.config.enable_chunked_prefill else want
            if n <= 0 or (n > budget and scheduled):
                continue
            while not self.blocks.can_allocate(seq, n):
                victim = self.running[-1]
                self._preempt(victim)
                preempted.append(victim)
                scheduled = [s for s in scheduled if s.seq is not victim]
                if victim is seq:
                    break
            if seq.status is not SequenceStatus.RUNNING:
                continue
            extra = self.lookahead if want == 1 and self.blocks.can_allocate(seq, n + self.lookahead) else 0
            self.blocks.allocate(seq, n + extra)
            scheduled.append(ScheduledSequence(seq, n))
            budget -= n
        budget = self.config.max_num_batched_tokens - sum(s.num_tokens for s in scheduled)
        # Admit waiting requests (never while we are preempting: memory is short).
        while self.waiting and not preempted and budget > 0 and len(self.running) < self.config.max_num_seqs:
            seq = self.waiting[0]
            if seq.params.prompt_logprobs is None:  # prompt logprobs need every prompt row computed
                self.blocks.match_prefix(seq)
            want = seq.num_tokens - seq.num_computed_tokens
            n = min(want, budget) if self.config.enable_chunked_prefill else want
            if (n > budget and scheduled) or not self.blocks.can_allocate(seq, n):
                self.blocks.free_sequence(seq)  # undo the prefix match; retry next step
                break
            self.waiting.popleft()
            self.prefix_hit_tokens += seq.num_cached_tokens
            self.blocks.allocate(seq, n)
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            scheduled.append(ScheduledSequence(seq, n))
            budget -= n
        if not scheduled and self.running and not preempted:
            # Nothing fits although requests run: the pool is smaller than one request needs.
            raise RuntimeError(f"the KV pool ({self.blocks.num_blocks} pages of {self.blocks.block_size}) "
                               f"cannot hold the next step of any running request; raise kv_cache_tokens")
        return SchedulerOutput(scheduled, preempted)

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.blocks.free_sequence(seq)
        seq.status = SequenceStatus.WAITING
        seq.num_preemptions += 1
        self.waiting.appendleft(seq)

"""The engine loop: add requests, step (schedule -> run -> sample -> outputs), abort.

Single-threaded by design: one owner calls these methods (LLM directly, AsyncLLM from its worker
thread). Text comes out detokenized and stop strings end a request, when a tokenizer is given.
"""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass

from minicpm4.engine.block_manager import BlockManager
from minicpm4.engine.config import EngineConfig
from minicpm4.engine.outputs import RequestMetrics, RequestOutput
from minicpm4.engine.runner import ModelRunner
from minicpm4.engine.sampler import make_generator, record_token, sample, token_logprobs
from minicpm4.engine.scheduler import Scheduler
from minicpm4.engine.sequence import Sequence, SequenceStatus
from minicpm4.engine.text import TextState
from minicpm4.model import MiniCPMForCausalLM
from minicpm4.sampling import SamplingParams
from minicpm4.speculative.tree import DraftTree, prune_tree
from minicpm4.speculative.verify import accept_path
from minicpm4.tokenizer import Tokenizer


class QueueFullError(RuntimeError):
    """The waiting queue is at `max_waiting`: the caller should retry later (HTTP 429)."""


@dataclass
class EngineStats:
    running: int
    waiting: int
    kv_blocks_used: int
    kv_blocks_total: int
    prompt_tokens_total: int  # prompt tokens processed (computed, not taken from the prefix cache)
    generated_tokens_total: int
    prefix_cache_hit_tokens_total: int
    preemptions_total: int
    steps_total: int
    # Speculative decoding: verification steps of one request, and the tokens they emitted (accepted draft
    # tokens + the bonus token; mean accepted length = spec_tokens_total / spec_verify_total).
    spec_verify_total: int = 0
    spec_tokens_total: int = 0
    spec_draft_nodes_total: int = 0  # draft nodes verified (tree size - 1 per verification)


class LLMEngine:
    def __init__(self, model: MiniCPMForCausalLM, tokenizer: Tokenizer | None = None,
                 config: EngineConfig | None = None, drafter=None) -> None:
        """drafter: a built drafter (speculative/eagle.py EagleDrafter, speculative/chain.py ChainDrafter) instead
        of the one config.speculative describes."""
        self.model = model.eval()
        self.tokenizer = tokenizer
        sparse = model.config.sparse_config
        self.config = config = (config or EngineConfig()).resolved(sparse.block_size if sparse is not None else None)
        self.max_model_len = config.max_model_len or model.config.max_position_embeddings
        capacity = config.num_blocks() * config.block_size
        if self.max_model_len > capacity:
            if config.max_model_len is not None:
                raise ValueError(f"EngineConfig.max_model_len ({self.max_model_len}) exceeds the KV pool "
                                 f"({capacity} tokens); raise kv_cache_tokens or num_kv_blocks")
            self.max_model_len = capacity  # the model allows more than the pool holds: the pool decides
        self.blocks = BlockManager(config.num_blocks(), config.block_size, config.enable_prefix_caching)
        self.drafter = drafter
        if drafter is None and config.speculative is not None:
            from minicpm4.speculative.build import build_drafter  # imported on use

            self.drafter = build_drafter(model, config.speculative, self.max_model_len)
        # Verification writes a tree's nodes after its root (speculative/tree_attention.py): reserve their pages.
        lookahead = self.drafter.shape.tree_size - 1 if self.drafter is not None else 0
        self.scheduler = Scheduler(config, self.blocks, lookahead=lookahead)
        self.runner = ModelRunner(model, config, self.max_model_len)
        self.requests: dict[str, Sequence] = {}
        self.text: dict[str, TextState] = {}
        self._sent: dict[str, tuple[int, int, int]] = {}  # request -> (tokens, text chars, logprobs) already sent
        self._ids = itertools.count()
        self.stats = EngineStats(0, 0, 0, config.num_blocks(), 0, 0, 0, 0, 0)

    # ---- requests --------------------------------------------------------------------------------------
    def add_request(self, prompt_token_ids: list[int], params: SamplingParams | None = None,
                    request_id: str | None = None) -> str:
        params = params or SamplingParams()
        params.validate()
        if not prompt_token_ids:
            raise ValueError("prompt: needs at least one token")
        vocab = self.model.config.vocab_size
        if any(not isinstance(t, int) or isinstance(t, bool) or not 0 <= t < vocab for t in prompt_token_ids):
            raise ValueError(f"prompt: token ids must be integers in [0, {vocab})")
        if len(prompt_token_ids) >= self.max_model_len:
            raise ValueError(f"prompt: {len(prompt_token_ids)} tokens, but the context holds {self.max_model_len} "
                             f"(prompt + at least one generated token)")
        if params.stop and self.tokenizer is None:
            raise ValueError("stop: stop strings need a tokenizer")
        if len(self.scheduler.waiting) >= self.config.max_waiting:
            raise QueueFullError(f"the waiting queue is full ({self.config.max_waiting} requests)")
        request_id = request_id if request_id is not None else f"req-{next(self._ids)}"
        if request_id in self.requests:
            raise ValueError(f"request_id: {request_id!r} is already running")
        seq = Sequence(request_id, list(prompt_token_ids), len(prompt_token_ids), params,
                       params.stop_token_set(self.model.config.eos_token_ids),
                       arrival_time=time.perf_counter(),
                       generator=make_generator(params.seed, self.runner.device))
        self.requests[request_id] = seq
        if self.tokenizer is not None:
            self.text[request_id] = TextState(self.tokenizer, params.stop)
        self._sent[request_id] = (0, 0, 0)
        if params.max_new_tokens == 0 and params.prompt_logprobs is None:
            self._finish(seq, "length")  # reported by the next step, never scheduled
        else:
            self.scheduler.add(seq)
        return request_id

    def abort(self, request_id: str, notify: bool = True) -> bool:
        """Stop a request now and free its pages; False if it is unknown or already finished. notify: the
        next step reports its final output (finish_reason "abort"); False forgets it at once (nobody listens)."""
        seq = self.requests.get(request_id)
        if seq is None or seq.is_finished:
            return False
        self._finish(seq, "abort")
        if not notify:
            for table in (self.requests, self.text, self._sent):
                table.pop(request_id, None)
        return True

    def has_unfinished(self) -> bool:
        # A finished request stays in `requests` until its last output was handed out.
        return self.scheduler.has_unfinished() or any(s.is_finished for s in self.requests.values())

    # ---- one step ----------------------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """Run one scheduled forward and return an output for every request that changed (or finished)."""
        changed: list[Sequence] = [s for s in self.requests.values() if s.is_finished]  # aborted / 0-token
        plan = self.scheduler.schedule()
        self.stats.preemptions_total += len(plan.preempted)
        for seq in plan.preempted:
            if self.drafter is not None:
                self.drafter.drop(seq.request_id)
        if plan.scheduled:
            trees = self._draft(plan.scheduled) if self.drafter is not None else {}
            result = self.runner.execute(plan.scheduled, trees)
            self.stats.steps_total += 1
            for i, entry in enumerate(plan.scheduled):
                seq = entry.seq
                computed_before = seq.num_computed_tokens
                seq.num_computed_tokens += entry.num_tokens
                self.stats.prompt_tokens_total += max(0, min(seq.num_computed_tokens, seq.num_prompt_tokens) - computed_before)
                self.blocks.commit(seq)
                if self.drafter is not None and i not in result.tree_logits:
                    a = result.row_starts[i]
                    self.drafter.observe(seq.request_id, result.hidden[a:a + entry.num_tokens], computed_before)
            for entry, logits, positions in result.prompt_logits:
                seq = entry.seq
                chosen = [seq.token_ids[p + 1] for p in positions]
                if not seq.prompt_logprobs:
                    seq.prompt_logprobs = [None]
                if len(seq.prompt_logprobs) < seq.num_prompt_tokens:  # not again after a preemption
                    seq.prompt_logprobs.extend(token_logprobs(logits, chosen, [seq.params.prompt_logprobs] * len(chosen)))
            seqs = [e.seq for e in result.sample_seqs]
            if seqs:
                tokens = sample(result.sample_logits, seqs)
                wants = [i for i, s in enumerate(seqs) if s.params.logprobs is not None]
                lps = token_logprobs(result.sample_logits[wants], [tokens[i] for i in wants],
                                     [seqs[i].params.logprobs for i in wants]) if wants else []
                lp_of = dict(zip(wants, lps))
                now = time.perf_counter()
                for i, (seq, token) in enumerate(zip(seqs, tokens)):
                    if seq.params.max_new_tokens == 0:  # ran only for its prompt logprobs
                        self._finish(seq, "length")
                    else:
                        self._append(seq, token, lp_of.get(i), now)
                    changed.append(seq)
            for i, logits in result.tree_logits.items():
                seq = plan.scheduled[i].seq
                self._verify(seq, trees[i], logits, result.tree_hidden[i], result, i)
                changed.append(seq)
            changed.extend(e.seq for e in plan.scheduled if e.seq.params.prompt_logprobs is not None)
        outputs = []
        for seq in dict.fromkeys(changed):
            out = self._output(seq)
            if out is not None:
                outputs.append(out)
        self._refresh_stats()
        return outputs

    # ---- speculative decoding ------------------------------------------------------------------------------
    def _draft(self, scheduled: list) -> dict[int, DraftTree]:
        """A draft tree for every decode entry whose request the drafter has seen up to its last token, pruned
        to the positions its pages, the context and its remaining tokens allow."""
        trees = {}
        bs = self.config.block_size
        for i, entry in enumerate(scheduled):
            seq = entry.seq
            if len(trees) >= self.config.spec_max_seqs:
                break
            if entry.num_tokens != 1 or not entry.completes_prompt or seq.params.max_new_tokens == 0:
                continue
            P = seq.num_computed_tokens  # the root's position
            room = len(seq.block_table) * bs - 1 - P  # node slots P + 1 .. on reserved pages
            depth = min(self.max_model_len - 1 - P, seq.params.max_new_tokens - seq.num_output_tokens - 1)
            if room < 1 or depth < 1:
                continue
            tree = self.drafter.draft_tree(seq.request_id, seq.token_ids)
            if max(tree.depths) > depth or tree.size - 1 > room:
                tree = prune_tree(tree, depth, max_nodes=room)
            if tree.size > 1:
                trees[i] = tree
        return trees

    def _verify(self, seq: Sequence, tree: DraftTree, logits, hidden, result, index: int) -> None:
        """Walk the tree with the target's own sampler (speculative/verify.py), write the accepted nodes' K/V
        after the root, and hand their hidden states to the drafter."""
        now = time.perf_counter()
        emitted = 0

        def emit(token: int, logprob) -> None:
            nonlocal emitted
            emitted += 1
            self._append(seq, token, logprob, now)

        path = accept_path(tree, logits, seq, emit)
        self.stats.spec_verify_total += 1
        self.stats.spec_tokens_total += emitted
        self.stats.spec_draft_nodes_total += tree.size - 1
        if seq.is_finished:
            return
        self.runner.commit_tree(result, index, path)
        P = seq.num_computed_tokens - 1
        seq.num_computed_tokens += len(path)
        self.blocks.commit(seq)
        self.drafter.observe(seq.request_id, hidden[[0] + path], P)

    def _append(self, seq: Sequence, token: int, logprob, now: float) -> None:
        if seq.first_token_time is None:
            seq.first_token_time = now
        if token in seq.stop_token_ids:
            seq.stop_token_id = token
            self._finish(seq, "stop")
            return
        seq.token_ids.append(token)
        record_token(seq, token)
        self.stats.generated_tokens_total += 1
        if logprob is not None:
            seq.logprobs.append(logprob)
        state = self.text.get(seq.request_id)
        if state is not None and state.push(token):
            self._finish(seq, "stop")
        elif seq.num_output_tokens >= seq.params.max_new_tokens or seq.num_tokens >= self.max_model_len:
            self._finish(seq, "length")

    def _finish(self, seq: Sequence, reason: str) -> None:
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason
        seq.finished_time = time.perf_counter()
        self.scheduler.remove(seq)
        if self.drafter is not None:
            self.drafter.drop(seq.request_id)
        state = self.text.get(seq.request_id)
        if state is not None:
            state.finish()

    def _output(self, seq: Sequence) -> RequestOutput | None:
        rid = seq.request_id
        if rid not in self._sent:
            return None
        sent_tokens, sent_chars, sent_lps = self._sent[rid]
        state = self.text.get(rid)
        text = state.text if state is not None else ""
        new_tokens = seq.output_token_ids[sent_tokens:]
        prompt_lp_ready = seq.params.prompt_logprobs is not None and len(seq.prompt_logprobs) >= seq.num_prompt_tokens
        if not new_tokens and len(text) == sent_chars and not seq.is_finished and not (prompt_lp_ready and sent_tokens == 0):
            return None
        want_lp = seq.params.logprobs is not None
        out = RequestOutput(
            request_id=rid, prompt_token_ids=seq.prompt_token_ids, token_ids=list(seq.output_token_ids),
            new_token_ids=new_tokens, text=text, new_text=text[sent_chars:], finished=seq.is_finished,
            finish_reason=seq.finish_reason, stop_token_id=seq.stop_token_id, logprobs=list(seq.logprobs) if want_lp else None,
            new_logprobs=seq.logprobs[sent_lps:] if want_lp else None,
            prompt_logprobs=list(seq.prompt_logprobs) if prompt_lp_ready else None,
            metrics=RequestMetrics(seq.arrival_time, seq.first_token_time, seq.finished_time, seq.num_cached_tokens,
                                   seq.num_preemptions))
        if seq.is_finished:
            del self._sent[rid]
            self.requests.pop(rid, None)
            self.text.pop(rid, None)
        else:
            self._sent[rid] = (len(seq.output_token_ids), len(text), len(seq.logprobs))
        return out

    def _refresh_stats(self) -> None:
        self.stats.running = len(self.scheduler.running)
        self.stats.waiting = len(self.scheduler.waiting)
        self.stats.kv_blocks_used = self.blocks.num_used
        self.stats.prefix_cache_hit_tokens_total = self.scheduler.prefix_hit_tokens

"""Chunk-wise rollout RL (MINICPM4.md §7.2, the report's Algorithm 1) as one loop.

Each step:
1. active = the replay buffer R + G fresh trajectories for each of `prompts_per_step` new prompts;
2. every active trajectory grows by at most one chunk on the engine (rollout.py), sampled by the current policy;
   finished ones (EOS or the length limit) leave, the others go back to R;
3. a prompt whose G trajectories are all finished gets its rewards; dynamic sampling keeps the group (into B)
   only when its rewards differ (buffers.keeps_signal);
4. when |B| >= N: the N oldest groups train. Before the policy changes, every token anywhere that has no
   behaviour log-prob yet (the new chunks of this step, in the batch, in B, in R) is scored under the current
   policy — the version that sampled it. Then μ iterations of (mini-batch) optimizer steps on the objective of
   objective.py, the version counter advances, the engine is rebuilt, and every `ref_refresh` updates the
   reference policy becomes a copy of the policy.

The vanilla synchronous rollout is the same loop with chunk length = max response length: every trajectory
finishes within its first step, R stays empty.

Checkpoints (every `save_every` updates, and at the end) hold the policy and optimizer (train/checkpointing.py),
the reference policy, the buffers with their per-token versions and log-probs, and the counters; rollouts are
seeded per (seed, trajectory, chunk) and prompts drawn from a seeded permutation, so a resumed run continues
bit-identically.
"""

from __future__ import annotations

import copy
import json
import random
import time
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from pathlib import Path

import torch

from minicpm4.train.checkpointing import TrainState, latest_checkpoint, load_checkpoint, save_checkpoint
from minicpm4.train.distributed import DistInfo
from minicpm4.train.losses import all_reduce_sum
from minicpm4.train.metrics import MetricsLog
from minicpm4.train.mup import param_groups
from minicpm4.train.rl.buffers import Buffers, Group, Trajectory, keeps_signal
from minicpm4.train.rl.env import Environment
from minicpm4.train.rl.objective import ClipConfig, GarbleFilter, LossStats, group_advantages, policy_loss
from minicpm4.train.rl.rollout import ChunkRollout, RolloutConfig
from minicpm4.train.rl.scoring import response_logprobs, score_unscored

REF_WEIGHTS = "reference.pt"


def rl_state_name(rank: int) -> str:
    return f"rl_state_rank{rank:05d}.json"


@dataclass
class RLConfig:
    steps: int = 100  # rollout steps
    prompts_per_step: int = 8
    group_size: int = 8  # G
    train_groups: int = 8  # N: groups per update
    mini_batch_groups: int | None = None  # groups per optimizer step (None: all N)
    update_iters: int = 1  # μ: passes over each training batch
    max_response_tokens: int = 256
    chunk_tokens: int | None = None  # None: = max_response_tokens (vanilla synchronous rollout)
    temperature: float = 1.0
    top_p: float = 1.0
    lr: float = 1e-5  # scaled per muP group (train/mup.py param_groups)
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    ref_refresh: int = 50  # updates between reference refreshes; 0 = never
    clip: ClipConfig = field(default_factory=ClipConfig)
    garble: GarbleFilter = field(default_factory=GarbleFilter)
    seed: int = 0
    save_every: int = 10  # updates
    keep_last: int = 2
    score_batch: int = 8  # sequences per scoring / loss forward

    def __post_init__(self) -> None:
        for name in ("steps", "prompts_per_step", "train_groups", "update_iters", "max_response_tokens",
                     "save_every", "score_batch"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.group_size < 2:
            raise ValueError(f"group_size must be >= 2 (advantages are relative within a group), got {self.group_size}")
        if self.chunk_tokens is not None and not 1 <= self.chunk_tokens <= self.max_response_tokens:
            raise ValueError(f"chunk_tokens must be in [1, max_response_tokens={self.max_response_tokens}]")
        if self.mini_batch_groups is not None and not 1 <= self.mini_batch_groups <= self.train_groups:
            raise ValueError("mini_batch_groups must be in [1, train_groups]")

    @property
    def chunk(self) -> int:
        return self.chunk_tokens or self.max_response_tokens

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "RLConfig":
        d = dict(d)
        d["clip"], d["garble"] = ClipConfig(**d["clip"]), GarbleFilter(**d["garble"])
        return cls(**d)


@dataclass
class Counters:
    step: int = 0  # rollout steps done
    version: int = 0  # updates done (the policy version)
    next_uid: int = 0  # trajectories and groups share this counter
    prompt_cursor: int = 0  # position in the prompt order


@lru_cache(maxsize=2)  # drawn once per prompt: shuffle each epoch's order once, not per draw
def _prompt_order(n: int, seed: int, epoch: int) -> tuple[int, ...]:
    order = list(range(n))
    random.Random(seed * 7_654_321 + epoch).shuffle(order)
    return tuple(order)


class RLTrainer:
    def __init__(self, model, env: Environment, cfg: RLConfig, out_dir: str | Path,
                 info: DistInfo | None = None, log: bool = True) -> None:
        self.model, self.env, self.cfg, self.out = model, env, cfg, Path(out_dir)
        self.info = info or DistInfo()
        self.optimizer = torch.optim.AdamW(param_groups(model, model.config, cfg.lr, cfg.weight_decay),
                                           lr=cfg.lr, betas=(0.9, 0.999), eps=1e-8)
        self.reference = self._frozen_copy()
        self.buffers = Buffers()
        self.counters = Counters()
        max_prompt = max(len(env.prompt_ids(i)) for i in range(len(env)))
        self.rollout = ChunkRollout(model, RolloutConfig(cfg.chunk, cfg.max_response_tokens, cfg.temperature,
                                                         cfg.top_p, cfg.seed + 7_919 * self.info.rank), max_prompt)
        self.metrics = MetricsLog(self.out / "metrics.jsonl", enabled=log and self.info.is_main)

    def _frozen_copy(self):
        ref = copy.deepcopy(self.model)
        for p in ref.parameters():
            p.requires_grad_(False)
        return ref.eval()

    def _all_ranks_min(self, value: int) -> int:
        if not self.info.distributed:
            return value
        import torch.distributed as dist

        t = torch.tensor([value], dtype=torch.long)
        dist.all_reduce(t, op=dist.ReduceOp.MIN)
        return int(t.item())

    # ---- prompts ----------------------------------------------------------------------------------------------
    def _next_tasks(self, count: int) -> list[int]:
        n = len(self.env)
        out = []
        for _ in range(count):
            # Ranks draw interleaved positions of one seeded order: different prompts, no coordination needed.
            c = self.counters.prompt_cursor * self.info.world_size + self.info.rank
            out.append(_prompt_order(n, self.cfg.seed, c // n)[c % n])
            self.counters.prompt_cursor += 1
        return out

    def _new_trajectories(self) -> list[Trajectory]:
        fresh = []
        for task in self._next_tasks(self.cfg.prompts_per_step):
            group = self.counters.next_uid
            self.counters.next_uid += 1
            prompt = self.env.prompt_ids(task)
            for _ in range(self.cfg.group_size):
                fresh.append(Trajectory(self.counters.next_uid, group, task, list(prompt)))
                self.counters.next_uid += 1
        return fresh

    # ---- one step -------------------------------------------------------------------------------------------
    def step(self) -> dict:
        cfg, t0 = self.cfg, time.perf_counter()
        active = self.buffers.replay + self._new_trajectories()
        resumed = len(self.buffers.replay)
        self.buffers.replay = []
        tokens_before = self.rollout.generated_tokens
        self.rollout.extend(active, self.counters.version)
        rollout_s = time.perf_counter() - t0
        finished = [t for t in active if t.finished]
        self.buffers.replay = [t for t in active if not t.finished]

        t1 = time.perf_counter()
        for t in finished:
            t.text = self.env.decode(t.response_ids)
            self.buffers.waiting.setdefault(t.group, []).append(t)
        complete = [g for g, ts in self.buffers.waiting.items() if len(ts) == cfg.group_size]
        groups = []
        for g in complete:
            ts = sorted(self.buffers.waiting.pop(g), key=lambda t: t.uid)
            groups.append(Group(g, ts[0].task_index, ts))
        all_done = [t for g in groups for t in g.trajectories]
        for t, r in zip(all_done, self.env.rewards(all_done) if all_done else []):
            t.reward = r
        kept = [g for g in groups if keeps_signal(g.rewards)]
        self.buffers.ready += kept
        reward_s = time.perf_counter() - t1

        record = {"step": self.counters.step + 1, "version": self.counters.version, "active": len(active),
                  "resumed": resumed, "finished": len(finished), "replay": len(self.buffers.replay),
                  "groups_completed": len(groups), "groups_kept": len(kept), "ready": len(self.buffers.ready),
                  "generated_tokens": self.rollout.generated_tokens - tokens_before, "rollout_s": rollout_s,
                  "reward_s": reward_s}
        if all_done:
            rewards = [t.reward for t in all_done]
            record.update(reward=sum(rewards) / len(rewards),
                          accuracy=sum(r >= 1.0 for r in rewards) / len(rewards),
                          response_tokens=sum(len(t.response_ids) for t in all_done) / len(all_done),
                          truncated=sum(t.truncated for t in all_done) / len(all_done))
        # Ranks update together: when every rank holds N ready groups (one process: when this one does).
        if self._all_ranks_min(len(self.buffers.ready)) >= cfg.train_groups:
            record.update(self._update())
        self.counters.step += 1
        record["step_s"] = time.perf_counter() - t0
        self.metrics.write(record)
        if record.get("updated") and self.counters.version % cfg.save_every == 0:
            self.save()  # after the step's bookkeeping: a resume starts at the next step
        return record

    def _update(self) -> dict:
        cfg = self.cfg
        t0 = time.perf_counter()
        batch, self.buffers.ready = self.buffers.ready[:cfg.train_groups], self.buffers.ready[cfg.train_groups:]
        # Everything sampled since the last update was sampled by the current policy: store its log-probs now.
        scored = score_unscored(self.model, [t for g in batch for t in g.trajectories] + self.buffers.live(),
                                cfg.score_batch)
        score_s = time.perf_counter() - t0

        t1 = time.perf_counter()
        advantages = group_advantages(torch.tensor([g.rewards for g in batch], dtype=torch.float32))
        rows = [(t, float(advantages[i, j])) for i, g in enumerate(batch) for j, t in enumerate(g.trajectories)]
        keep = [not (t.truncated or cfg.garble.is_garbled(t.response_ids, t.text)) for t, _ in rows]
        train_rows = [(t, a) for (t, a), k in zip(rows, keep) if k]
        stats: list[LossStats] = []
        mini = (cfg.mini_batch_groups or cfg.train_groups) * cfg.group_size
        self.model.train()
        for _ in range(cfg.update_iters):
            # Mini-batches are cut from the unfiltered rows, so every rank takes the same number of optimizer steps.
            for start in range(0, len(rows), mini):
                part = [r for r, k in zip(rows[start:start + mini], keep[start:start + mini]) if k]
                total = int(all_reduce_sum([float(sum(len(t.response_ids) for t, _ in part))])[0])
                self.optimizer.zero_grad(set_to_none=False)
                for s in range(0, len(part), cfg.score_batch):
                    micro = part[s:s + cfg.score_batch]
                    stats.append(self._loss_backward(micro, max(total, 1)))
                self._sum_gradients()
                torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip)
                self.optimizer.step()
        self.model.eval()
        self.counters.version += 1
        self.rollout.invalidate()
        if cfg.ref_refresh and self.counters.version % cfg.ref_refresh == 0:
            self.reference = self._frozen_copy()
        n = max(sum(s.tokens for s in stats), 1)
        out = {"updated": True, "trained_responses": len(train_rows), "filtered_responses": len(rows) - len(train_rows),
               "scored_tokens": scored, "score_s": score_s, "update_s": time.perf_counter() - t1,
               "kl": sum(s.kl * s.tokens for s in stats) / n,
               "clip_fraction": sum(s.clip_fraction * s.tokens for s in stats) / n,
               "ratio": sum(s.ratio_mean * s.tokens for s in stats) / n}
        return out

    def _sum_gradients(self) -> None:
        """Each rank's loss is already divided by the global token count: summing the gradients gives the
        gradient of the global objective, the same on every rank, so the replicas stay identical."""
        if not self.info.distributed:
            return
        import torch.distributed as dist

        for p in self.model.parameters():
            if p.grad is None:  # nothing trained on this rank this time: it still joins the sum
                p.grad = torch.zeros_like(p)
            dist.all_reduce(p.grad)

    def _loss_backward(self, micro: list[tuple[Trajectory, float]], total_tokens: int) -> LossStats:
        trajs = [t for t, _ in micro]
        logp, mask = response_logprobs(self.model, trajs)
        with torch.no_grad():
            ref_logp, _ = response_logprobs(self.reference, trajs) if self.cfg.clip.kl_beta > 0 else (None, None)
        behaviour = torch.zeros_like(logp)
        for i, t in enumerate(trajs):
            behaviour[i, :len(t.behaviour_logprobs)] = torch.tensor(t.behaviour_logprobs, dtype=torch.float32)
        adv = torch.tensor([a for _, a in micro], dtype=torch.float32)[:, None].expand_as(logp)
        loss, stats = policy_loss(logp, behaviour, ref_logp, adv, mask, self.cfg.clip, total_tokens)
        loss.backward()
        return stats

    # ---- run, save, resume ------------------------------------------------------------------------------------
    def train(self, on_step=None) -> list[dict]:
        records = []
        while self.counters.step < self.cfg.steps:
            rec = self.step()
            records.append(rec)
            if on_step:
                on_step(rec)
        self.save()
        return records

    def save(self) -> Path:
        state = TrainState(step=self.counters.version, samples=self.counters.step, world_size=self.info.world_size,
                           model_config=self.model.config.to_dict(), train_config={"rl": self.cfg.to_dict()},
                           extra={"counters": asdict(self.counters)})

        def write_extra(folder: Path) -> None:
            (folder / rl_state_name(self.info.rank)).write_text(json.dumps(self.buffers.to_dict()), encoding="utf-8")
            if self.info.is_main:  # the reference is the same on every rank
                torch.save(self.reference.state_dict(), folder / REF_WEIGHTS)

        return save_checkpoint(self.out, self.model, self.optimizer, state, self.info, self.cfg.keep_last,
                               write_extra=write_extra)

    def resume(self, path: str | Path | None = None) -> bool:
        """Continue from `path` (default: the latest checkpoint of out_dir). False when there is none."""
        path = Path(path) if path is not None else latest_checkpoint(self.out)
        if path is None:
            return False
        state = load_checkpoint(path, self.model, self.optimizer, self.info)
        if state.world_size != self.info.world_size:
            raise ValueError(f"{path}: written by {state.world_size} processes, resumed on {self.info.world_size}: "
                             "each rank's replay buffer belongs to its rank; resume on the same world size")
        self.counters = Counters(**state.extra["counters"])
        self.buffers = Buffers.from_dict(json.loads((path / rl_state_name(self.info.rank)).read_text(encoding="utf-8")))
        self.reference.load_state_dict(torch.load(path / REF_WEIGHTS, weights_only=True))
        self.rollout.invalidate()
        self.metrics.truncate_after(self.counters.step)
        return True

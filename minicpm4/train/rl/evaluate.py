"""Accuracy of a policy on held-out tasks: one greedy response per task on the engine, scored by the task's
reward; accuracy = share of responses with reward 1 (every test passed, the right answer)."""

from __future__ import annotations

from dataclasses import dataclass

from minicpm4.train.rl.buffers import Trajectory
from minicpm4.train.rl.env import Environment
from minicpm4.train.rl.rollout import ChunkRollout, RolloutConfig


@dataclass
class EvalResult:
    tasks: int
    accuracy: float
    mean_reward: float
    mean_response_tokens: float
    truncated: float
    examples: list[dict]


def evaluate(model, env: Environment, max_response_tokens: int, limit: int | None = None,
             examples: int = 3) -> EvalResult:
    n = len(env) if limit is None else min(limit, len(env))
    trajs = [Trajectory(i, i, i, env.prompt_ids(i)) for i in range(n)]
    max_prompt = max(len(t.prompt_ids) for t in trajs)
    rollout = ChunkRollout(model, RolloutConfig(max_response_tokens, max_response_tokens, temperature=0.0),
                           max_prompt)
    rollout.extend(trajs, version=0)
    for t in trajs:
        t.text = env.decode(t.response_ids)
    rewards = env.rewards(trajs)
    return EvalResult(n, sum(r >= 1.0 for r in rewards) / n, sum(rewards) / n,
                      sum(len(t.response_ids) for t in trajs) / n, sum(t.truncated for t in trajs) / n,
                      [{"task": t.task_index, "response": t.text, "reward": r} for t, r in zip(trajs[:examples], rewards)])

"""Per-token log-probabilities of responses under a model (the training forward, not the engine's).

Behaviour log-probs, the reference policy's and the policy's own all come from this one function, so the
importance ratio compares like with like: at the start of the first update iteration it is exactly 1 for tokens
of the current version. Rows are right-padded; the model is causal, so padding never changes a real token.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from minicpm4.train.rl.buffers import Trajectory


def response_logprobs(model, trajectories: Sequence[Trajectory], pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (logp [B, T], mask [B, T]): log π(response token t | prompt, response[:t]); T = longest response.
    Differentiable when grad is enabled."""
    device = next(model.parameters()).device
    rows = [t.prompt_ids + t.response_ids for t in trajectories]
    width = max(len(r) for r in rows)
    longest = max(len(t.response_ids) for t in trajectories)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long, device=device)
    for i, r in enumerate(rows):
        ids[i, :len(r)] = torch.tensor(r, device=device)
    logits = model(ids[:, :-1])  # position j predicts token j + 1
    logp_all = F.log_softmax(logits.float(), dim=-1).gather(-1, ids[:, 1:, None]).squeeze(-1)
    logp = torch.zeros(len(rows), longest, dtype=torch.float32, device=device)
    mask = torch.zeros(len(rows), longest, dtype=torch.float32, device=device)
    for i, t in enumerate(trajectories):
        start, n = len(t.prompt_ids) - 1, len(t.response_ids)
        logp[i, :n] = logp_all[i, start:start + n]
        mask[i, :n] = 1
    return logp, mask


@torch.no_grad()
def score_unscored(model, trajectories: Sequence[Trajectory], batch_size: int = 8) -> int:
    """Fill every missing behaviour log-prob with the model's (the version that generated those tokens: call this
    before the policy changes). Returns the number of tokens scored."""
    todo = [t for t in trajectories if t.unscored()]
    scored = 0
    for start in range(0, len(todo), batch_size):
        part = todo[start:start + batch_size]
        logp, _ = response_logprobs(model, part)
        for i, t in enumerate(part):
            for j in t.unscored():
                t.behaviour_logprobs[j] = float(logp[i, j])
                scored += 1
    return scored

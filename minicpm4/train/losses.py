"""Token-level cross-entropy with one normalisation rule for every stage (DESIGN.md principle 12).

The rule: the loss of an optimizer step is

    sum of per-token CE over every target token of every micro-batch on every rank
    --------------------------------------------------------------------------------
    number of target tokens (labels != ignore_index) over the same micro-batches and ranks

so each target token has the same weight whatever the micro-batch split, the padding, the loss mask
(SFT) or the world size. The classic bug is averaging per-micro-batch means (or per-rank means): a
micro-batch with 10 assistant tokens then weighs as much as one with 1000. Here each micro-batch's
backward gets `loss_sum * world_size / global_targets`; DDP and FSDP average gradients over ranks
(divide by world_size), which turns the sum of those into exactly the rule above.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F

IGNORE_INDEX = -100


def cross_entropy_sum(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """logits [B, T, V] (fp32), labels [B, T] -> scalar: the SUM of CE over targets != ignore_index."""
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1),
                           ignore_index=ignore_index, reduction="sum")


def count_targets(labels: torch.Tensor, ignore_index: int = IGNORE_INDEX) -> int:
    return int((labels != ignore_index).sum())


def all_reduce_sum(values: list[float], device: torch.device | str = "cpu") -> list[float]:
    """Sum a few numbers over data-parallel ranks (float64, so token counts stay exact); identity alone."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.tolist()


@dataclass(frozen=True)
class LossNormalizer:
    """Turns a micro-batch's loss SUM into its share of the step loss (module docstring)."""

    num_targets: int  # over all micro-batches of the step and all ranks
    world_size: int = 1

    def __call__(self, loss_sum: torch.Tensor) -> torch.Tensor:
        return loss_sum * (self.world_size / max(self.num_targets, 1))

"""BitCPM4 ternary quantization-aware training (MINICPM4.md §5) as one more stage of the shared loop.

    stage 1  any high-precision run (pretrain / long / sft) -> an HF folder
    stage 2  `minicpm4 train qat --init THAT`: the same trainer.train() with TrainConfig.qat_group_size > 0

What QAT changes, and where:
  build_train_module  prepare(): every decoder linear becomes a FakeTernaryLinear holding the *same* float
                      Parameter, so names stay `...q_proj.weight`: muP groups (mup.param_groups), DCP checkpoints,
                      resume and `train export` see the model they always saw. Its forward ternarises per group
                      (s = max(mean|W_g|, eps), W_q = clamp(round(W/s), -1, 1) * s) with the straight-through
                      gradient, so the loss, the validation loss and the gradients are the ternary model's.
  stages.qat          the schedule: fresh WSD warmup (the report: re-warmup is critical), LR 5e-3 = half the
                      pretraining LR as in the pilot, length default_tokens() = 2x the source run's decay tokens.
  export_final        convert(): the packed TernaryLinear model (2-bit codes + scales), loadable by load_model.
Embeddings, norms and the (tied) head stay high precision, as quantize_'s default; BitCPM4's choice is unpublished.
"""

from __future__ import annotations

from pathlib import Path

import torch.nn as nn

from minicpm4.quant import FakeTernaryLinear, TernaryQATConfig, quantize_

# The pilot: once QAT tokens exceed 2x the decay-phase tokens of stage 1, the final loss approaches that of
# ternary training from scratch (5M and 150M models); BitCPM4 used that ratio (MINICPM4.md §5).
TOKENS_PER_DECAY_TOKEN = 2


def prepare(model: nn.Module, group_size: int) -> None:
    """Fake-quantize `model`'s decoder linears in place; parameter names and objects do not change."""
    before = {name: id(p) for name, p in model.named_parameters()}
    quantize_(model, TernaryQATConfig(step="prepare", group_size=group_size))
    assert {name: id(p) for name, p in model.named_parameters()} == before, "prepare must keep the parameters"


def group_size_of(model: nn.Module) -> int | None:
    """The QAT group size of a prepared model, None for a float (or packed) one."""
    sizes = {m.group_size for m in model.modules() if isinstance(m, FakeTernaryLinear)}
    assert len(sizes) <= 1, f"mixed QAT group sizes {sorted(sizes)}"
    return sizes.pop() if sizes else None


def convert(model: nn.Module, group_size: int) -> None:
    """Pack the float (or fake-quantized) decoder linears as TernaryLinear, exactly the values the QAT forward used
    (the same ternarize(); detect=False: a trained shadow weight is never mistaken for a fake-quantized release)."""
    quantize_(model, TernaryQATConfig(step="convert", group_size=group_size, detect=False))


def source_decay_tokens(model_dir: str | Path) -> int | None:
    """Tokens of the decay phase of the training run that wrote `model_dir` (RUN/final of a `minicpm4 train` run:
    its last checkpoint's schedule and batch), None when the folder is not a run's final model."""
    from minicpm4.train.checkpointing import latest_checkpoint, read_train_state

    model_dir = Path(model_dir)
    if model_dir.name != "final":
        return None
    latest = latest_checkpoint(model_dir.parent)
    if latest is None:
        return None
    state = read_train_state(latest)
    c = state.train_config
    tokens_per_step = int(c["micro_batch_size"]) * int(c["grad_accum"]) * state.world_size * int(c["seq_len"])
    return int(c["decay_steps"]) * tokens_per_step


def default_tokens(model_dir: str | Path) -> int | None:
    """The QAT token budget for a model: 2x its run's decay tokens, None when those are unknown (or zero)."""
    decay = source_decay_tokens(model_dir)
    return TOKENS_PER_DECAY_TOKEN * decay if decay else None

"""The training loop shared by every stage (pretrain, long-context, SFT): one readable `train()`.

Per optimizer step:  LR from the WSD schedule (a pure function of the step) -> the step's micro-batches
(data.py: a pure function of the sample counter) -> forward/backward of each under bf16 autocast with the
loss normalised over all target tokens of the step (losses.py) -> clip -> AdamW with muP groups (mup.py)
-> log, evaluate, checkpoint. Everything that differs between stages is data or configuration.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn as nn

from minicpm4.config import MiniCPMConfig
from minicpm4.model import MiniCPMForCausalLM
from minicpm4.train import mup
from minicpm4.train.checkpointing import TrainState, load_checkpoint, resolve_resume, save_checkpoint
from minicpm4.train.data import Batch, EpochSampler, PackedDataset, micro_batch_indices
from minicpm4.train.distributed import DistInfo, init_distributed, resolve_mode, unwrap, wrap
from minicpm4.attention.document_mask import document_metadata, enable_document_mask
from minicpm4.train.losses import LossNormalizer, all_reduce_sum, count_targets, cross_entropy_sum
from minicpm4.train.metrics import MetricsLog, Progress, flops_per_token, measure_peak_flops, plot_loss
from minicpm4.mtp import MTPHead
from minicpm4.train.schedule import WSD

# Test hook: SIGKILL this process right after the given optimizer step (a real, unclean kill).
KILL_ENV = "MINICPM4_TRAIN_KILL_AT_STEP"


@dataclass
class TrainConfig:
    stage: str = "pretrain"
    out_dir: str = "runs/pretrain"
    steps: int = 1000
    micro_batch_size: int = 8
    grad_accum: int = 1  # micro-batches per optimizer step on each rank
    seq_len: int = 512
    # optimizer: AdamW; `lr` is the muP base LR (hidden matrices get lr / width_mult)
    lr: float = 1e-2
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    grad_clip: float = 1.0  # max global grad norm; 0 = off
    # WSD schedule (schedule.py)
    warmup_steps: int = 0
    decay_steps: int = 0
    decay_shape: str = "exp"
    min_lr_ratio: float = 0.1
    # model-side options
    parametrization: str = "mup"  # "mup" | "standard" (applied when the model is freshly initialised)
    mtp_weight: float = 0.0  # λ of L = L_NTP + λ L_MTP; 0 = no MTP head
    mtp_embed_first: bool = False
    document_mask: bool = True  # attention stays within each packed document / conversation
    # BitCPM4 ternary QAT (qat.py): > 0 fake-quantizes every decoder linear in groups of this many input
    # channels before the optimizer is built, and the exported model is the packed ternary one; 0 = float
    qat_group_size: int = 0
    # numerics and parallelism
    # autocast dtype: "auto" | "bfloat16" | "float32" (no autocast); weights and optimizer state stay fp32.
    # auto = bf16 on CUDA and AVX-512 CPUs, else fp32: an AVX2-only CPU has no bf16 matmul (measured on this
    # project's AVX2 EPYC: 0.4 GFLOP/s bf16 vs 13 GFLOP/s fp32), so autocast would slow training ~30x there.
    dtype: str = "auto"
    compile: bool = False
    parallel: str = "auto"  # "auto" (DDP under torchrun) | "none" | "ddp" | "fsdp"
    device: str | None = None  # default: cuda if available, else cpu
    seed: int = 0  # init and data order
    # evaluation, logging, checkpoints
    eval_every: int = 0  # steps; 0 = only at the end (when there is validation data)
    eval_batches: int = 4  # micro-batches per rank per evaluation
    log_every: int = 1
    save_every: int = 0  # steps; 0 = only at the end
    keep_last: int = 3
    peak_flops: float | None = None  # per device, for MFU; None = measured once at start
    progress: bool = True

    def validate(self) -> None:
        for key in ("steps", "micro_batch_size", "grad_accum", "seq_len", "log_every"):
            if getattr(self, key) < 1:
                raise ValueError(f"{key} must be >= 1, got {getattr(self, key)}")
        if self.dtype not in ("auto", "bfloat16", "float32"):
            raise ValueError(f"dtype: expected 'auto', 'bfloat16' or 'float32', got {self.dtype!r}")
        if self.parametrization not in mup.PARAMETRIZATIONS:
            raise ValueError(f"parametrization: expected one of {mup.PARAMETRIZATIONS}, got {self.parametrization!r}")
        if self.qat_group_size < 0:
            raise ValueError(f"qat_group_size must be >= 0 (0 = no QAT), got {self.qat_group_size}")
        if self.lr <= 0 or self.mtp_weight < 0:
            raise ValueError("lr must be > 0 and mtp_weight >= 0")
        WSD(self.steps, self.warmup_steps, self.decay_steps, self.decay_shape, self.min_lr_ratio)

    def autocast_dtype(self, device: torch.device) -> torch.dtype | None:
        """The autocast dtype on `device`, None for plain fp32."""
        if self.dtype == "auto":
            native = device.type == "cuda" or torch.backends.cpu.get_cpu_capability().startswith("AVX512")
            return torch.bfloat16 if native else None
        return torch.bfloat16 if self.dtype == "bfloat16" else None

    def schedule(self) -> WSD:
        return WSD(self.steps, self.warmup_steps, self.decay_steps, self.decay_shape, self.min_lr_ratio)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        d = {k: (tuple(v) if k == "betas" else v) for k, v in d.items() if k in known}
        return cls(**d)


class TrainModule(nn.Module):
    """The model plus the optional MTP head; forward returns the step's loss SUMS, so DDP/FSDP wrap one
    module whose forward is the whole training computation."""

    def __init__(self, model: MiniCPMForCausalLM, mtp: MTPHead | None = None) -> None:
        super().__init__()
        self.model, self.mtp = model, mtp

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor, segment_ids: torch.Tensor | None = None) -> torch.Tensor:
        """-> [2]: (sum of next-token CE, sum of MTP CE) over targets != IGNORE_INDEX."""
        B, T = input_ids.shape
        positions = torch.arange(T, device=input_ids.device).expand(B, T)
        hidden = self.model.hidden_states(input_ids, positions, meta=document_metadata(positions, segment_ids))
        ntp = cross_entropy_sum(self.model.logits(hidden), labels)
        if self.mtp is None:
            return torch.stack([ntp, torch.zeros_like(ntp)])
        mtp_segments = None if segment_ids is None else segment_ids[:, 1:]
        h_mtp = self.mtp(self.model, hidden, input_ids, positions, mtp_segments)  # row i predicts labels[:, i+1]
        return torch.stack([ntp, cross_entropy_sum(self.model.logits(h_mtp), labels[:, 1:])])


def build_train_module(config: MiniCPMConfig, cfg: TrainConfig, init_model: MiniCPMForCausalLM | None = None,
                       device: torch.device | str = "cpu") -> TrainModule:
    """A fresh muP/SP-initialised model (or `init_model`'s weights) plus the MTP head, fp32 on `device`."""
    if init_model is None:
        config = mup.apply_parametrization(config, cfg.parametrization)
    with torch.device("meta"):
        model = MiniCPMForCausalLM(config)
        mtp = MTPHead(config, cfg.mtp_embed_first) if cfg.mtp_weight > 0 else None
    module = TrainModule(model, mtp).to_empty(device=device)
    generator = torch.Generator(device=device).manual_seed(cfg.seed)
    mup.init_weights([model] + ([mtp] if mtp is not None else []), config, generator)
    if init_model is not None:  # continue from trained weights (long-context, SFT, QAT); the MTP head stays fresh
        model.load_state_dict(init_model.state_dict())
    if cfg.qat_group_size:  # after the weights, before any optimizer or checkpoint sees the parameters
        from minicpm4.train import qat

        qat.prepare(model, cfg.qat_group_size)
    return module.float()


def grad_sync(module: nn.Module, mode: str, sync: bool):
    """Skip the gradient all-reduce on all but the last micro-batch (DDP no_sync / FSDP2 flag)."""
    if mode == "ddp" and not sync:
        return module.no_sync()
    if mode == "fsdp":
        module.set_requires_gradient_sync(sync)
    return contextlib.nullcontext()


def forward_backward(module: nn.Module, micro_batches: Sequence[Batch], cfg: TrainConfig, info: DistInfo,
                     mode: str, forward=None) -> tuple[torch.Tensor, LossNormalizer, LossNormalizer]:
    """Accumulate one optimizer step's gradients; returns the local loss sums [2] and the normalisers."""
    forward = module if forward is None else forward
    # the step's target counts over all micro-batches and ranks, known before any forward (one all-reduce)
    ntp_count, mtp_count = all_reduce_sum([sum(count_targets(b.labels) for b in micro_batches),
                                           sum(count_targets(b.labels[:, 1:]) for b in micro_batches)], info.device)
    ntp_norm, mtp_norm = LossNormalizer(int(ntp_count), info.world_size), LossNormalizer(int(mtp_count), info.world_size)
    sums = torch.zeros(2, dtype=torch.float64)
    amp = cfg.autocast_dtype(info.device)
    autocast = torch.autocast(info.device.type, dtype=amp or torch.bfloat16, enabled=amp is not None)
    for m, batch in enumerate(micro_batches):
        batch = batch.to(info.device)
        with grad_sync(module, mode, sync=m == len(micro_batches) - 1):
            with autocast:
                out = forward(batch.input_ids, batch.labels, batch.segment_ids)
            loss = ntp_norm(out[0])
            if cfg.mtp_weight > 0:
                loss = loss + cfg.mtp_weight * mtp_norm(out[1])
            loss.backward()
        sums += out.detach().double().cpu()
    return sums, ntp_norm, mtp_norm


@torch.no_grad()
def evaluate(forward, data: PackedDataset, cfg: TrainConfig, info: DistInfo) -> dict[str, float]:
    """Mean next-token (and MTP) loss over the first eval_batches x B x world samples of `data`, in order."""
    sums, counts = [0.0, 0.0], [0, 0]
    B, W = cfg.micro_batch_size, info.world_size
    amp = cfg.autocast_dtype(info.device)
    autocast = torch.autocast(info.device.type, dtype=amp or torch.bfloat16, enabled=amp is not None)
    for m in range(cfg.eval_batches):
        idx = [i % len(data) for i in micro_batch_indices(0, m, info.rank, W, B)]
        batch = data.batch(idx).to(info.device)
        with autocast:
            out = forward(batch.input_ids, batch.labels, batch.segment_ids).double().cpu().tolist()
        sums = [sums[0] + out[0], sums[1] + out[1]]
        counts = [counts[0] + count_targets(batch.labels), counts[1] + count_targets(batch.labels[:, 1:])]
    s0, s1, c0, c1 = all_reduce_sum(sums + counts, info.device)
    result = {"val_loss": s0 / max(c0, 1)}
    if cfg.mtp_weight > 0:
        result["val_mtp_loss"] = s1 / max(c1, 1)
    return result


def clip_gradients(module: nn.Module, max_norm: float) -> float:
    params = [p for p in module.parameters() if p.grad is not None]
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm > 0 else math.inf)
    if hasattr(norm, "full_tensor"):  # FSDP2: a DTensor
        norm = norm.full_tensor()
    return float(norm)


def export_state(module: nn.Module) -> dict[str, dict[str, torch.Tensor]]:
    """Collective: full (unsharded) CPU state dicts {"model": ..., "mtp": ...} of the training module."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    full = get_model_state_dict(module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    out: dict[str, dict[str, torch.Tensor]] = {"model": {}, "mtp": {}}
    for name, t in full.items():
        part, _, rest = name.partition(".")
        out[part][rest] = t
    return out


@dataclass
class TrainResult:
    step: int
    losses: list[float] = field(default_factory=list)  # train loss of each step run in this call
    val: dict[str, float] = field(default_factory=dict)
    tokens_per_s: float = 0.0  # mean over the steps of this call after the first
    mfu: float = 0.0
    module: nn.Module | None = None  # the (wrapped) training module
    info: DistInfo | None = None


def train(model_config: MiniCPMConfig, cfg: TrainConfig, train_data: PackedDataset,
          val_data: PackedDataset | None = None, init_model: MiniCPMForCausalLM | None = None,
          resume: bool | str = True) -> TrainResult:
    """Train (or resume) to cfg.steps. Single process, or every rank of a torchrun job calls it."""
    cfg.validate()
    if train_data.seq_len != cfg.seq_len:
        raise ValueError(f"seq_len: the data is packed at {train_data.seq_len}, the config says {cfg.seq_len}")
    info = init_distributed(cfg.device)
    mode = resolve_mode(cfg.parallel, info)
    out = Path(cfg.out_dir)
    torch.manual_seed(cfg.seed + info.rank)

    # -- model, parallelism, optimizer --------------------------------------------------------------
    module = build_train_module(model_config, cfg, init_model, info.device)
    model_config = module.model.config  # after the parametrisation
    masked = cfg.document_mask and enable_document_mask(module.model)
    units = list(module.model.model.layers) + ([module.mtp.layer] if module.mtp is not None else [])
    wrapped = wrap(module, mode, info, shard_units=units)
    groups = mup.param_groups(wrapped, model_config, cfg.lr, cfg.weight_decay)
    optimizer = torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, weight_decay=cfg.weight_decay)
    schedule = cfg.schedule()

    # -- resume --------------------------------------------------------------------------------------
    step, samples = 0, 0
    metrics = MetricsLog(out / "metrics.jsonl", enabled=info.is_main)
    resume_path = resolve_resume(out, resume, info)
    if resume_path is not None:
        state = load_checkpoint(resume_path, wrapped, optimizer, info)
        step, samples = state.step, state.samples
        metrics.truncate_after(step)
        saved = state.train_config
        global_batch = saved["micro_batch_size"] * saved["grad_accum"] * state.world_size
        if state.world_size != info.world_size and global_batch % (cfg.micro_batch_size * info.world_size) == 0:
            # another world size: keep the global batch (and so the data order and the loss) by re-splitting it
            cfg = dataclasses.replace(cfg, grad_accum=global_batch // (cfg.micro_batch_size * info.world_size))
    else:
        metrics.reset()
    forward = torch.compile(wrapped) if cfg.compile else wrapped

    # -- loop ------------------------------------------------------------------------------------------
    B, A, W, T = cfg.micro_batch_size, cfg.grad_accum, info.world_size, cfg.seq_len
    sampler = EpochSampler(len(train_data), cfg.seed)
    amp = cfg.autocast_dtype(info.device)
    peak = cfg.peak_flops or measure_peak_flops(amp or torch.float32, info.device)
    flops_tok = flops_per_token(model_config, T, module.mtp is not None)
    tokens_per_step = B * A * W * T
    kill_at = int(os.environ.get(KILL_ENV, "-1"))
    result = TrainResult(step, module=wrapped, info=info)
    progress = Progress(cfg.steps, step, cfg.progress and info.is_main, cfg.stage)
    progress.note(f"{cfg.stage}: {sum(p.numel() for p in module.parameters()) / 1e6:.2f}M parameters, {mode} x{W}, "
                  f"{tokens_per_step:,} tokens/step, {'bf16 autocast' if amp else 'fp32'}, out {out}")
    if cfg.document_mask and not masked:
        progress.note(f"note: the {type(module.model.attention_backend).__name__} backend takes no document mask; "
                      "attention crosses the packed documents")
    timed_s, timed_steps = 0.0, 0

    def save() -> None:
        state = TrainState(step, samples, W, model_config.to_dict(), dataclasses.asdict(cfg), {"stage": cfg.stage})
        save_checkpoint(out, wrapped, optimizer, state, info, cfg.keep_last)
        if info.is_main:
            plot_loss(metrics.path, out / "loss.png", f"{cfg.stage}")

    while step < cfg.steps:
        t0 = time.perf_counter()
        lr_ratio = schedule(step)
        for group in optimizer.param_groups:
            group["lr"] = cfg.lr * lr_ratio * group["lr_scale"]
        micro = [train_data.batch([sampler(g) for g in micro_batch_indices(samples, m, info.rank, W, B)])
                 for m in range(A)]
        sums, ntp_norm, mtp_norm = forward_backward(wrapped, micro, cfg, info, mode, forward)
        grad_norm = clip_gradients(wrapped, cfg.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step, samples = step + 1, samples + B * A * W
        ntp_sum, mtp_sum = all_reduce_sum(sums.tolist(), info.device)
        if info.device.type == "cuda":
            torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        if step > result.step + 1 or cfg.steps - result.step == 1:  # the first step pays for warm-up/compile
            timed_s, timed_steps = timed_s + dt, timed_steps + 1
        loss = ntp_sum / max(ntp_norm.num_targets, 1)
        result.losses.append(loss)
        tok_s = tokens_per_step / dt
        record = {"step": step, "loss": loss, "lr": cfg.lr * lr_ratio, "grad_norm": grad_norm,
                  "tokens": samples * T, "tokens_per_s": tok_s, "mfu": flops_tok * tok_s / (peak * W)}
        if cfg.mtp_weight > 0:
            record["mtp_loss"] = mtp_sum / max(mtp_norm.num_targets, 1)
        metrics.write(record)
        if step % cfg.log_every == 0 or step == cfg.steps:
            progress.update(step, {"loss": f"{loss:.4f}", "lr": f"{record['lr']:.2e}", "tok/s": f"{tok_s:,.0f}",
                                   "mfu": f"{100 * record['mfu']:.1f}%"})
        if val_data is not None and ((cfg.eval_every and step % cfg.eval_every == 0) or step == cfg.steps):
            result.val = evaluate(forward, val_data, cfg, info)
            metrics.write({"step": step, **result.val})
            progress.note(f"step {step}: " + ", ".join(f"{k} {v:.4f}" for k, v in result.val.items()))
        if (cfg.save_every and step % cfg.save_every == 0) or step == cfg.steps:
            save()
        if step == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
    progress.close()
    result.step = step
    if timed_steps:
        result.tokens_per_s = tokens_per_step * timed_steps / timed_s
        result.mfu = flops_tok * result.tokens_per_s / (peak * W)
    return result


from minicpm4.checkpoint import TOKENIZER_FILES, copy_tokenizer_files  # noqa: E402 (re-exported for train/cli.py)


def export_final(result: TrainResult, path: str | Path, tokenizer_dir: str | Path | None = None) -> Path | None:
    """Collective: write the trained model as a Hugging Face folder (config.json + safetensors, via
    checkpoint.save_model) on rank 0, plus the tokenizer files of `tokenizer_dir` and, when trained, the MTP
    head as mtp_head.safetensors (names relative to the head; order flag in its metadata). A QAT run's model is
    written packed (qat.convert): the ternary model its forward computed, not the float shadow weights."""
    from safetensors.torch import save_file

    from minicpm4.checkpoint import save_model
    from minicpm4.train import qat

    state = export_state(result.module)
    info = result.info or DistInfo()
    if not info.is_main:
        return None
    inner = unwrap(result.module)
    config = inner.model.config
    with torch.device("meta"):
        model = MiniCPMForCausalLM(config)
    model.load_state_dict(state["model"], assign=True)
    group_size = qat.group_size_of(inner.model)
    if group_size is not None:
        qat.convert(model, group_size)
    path = save_model(model, path)
    if state["mtp"]:
        save_file({k: v.contiguous() for k, v in state["mtp"].items()}, path / "mtp_head.safetensors",
                  metadata={"format": "pt", "embed_first": str(inner.mtp.embed_first)})
    if tokenizer_dir is not None:
        copy_tokenizer_files(tokenizer_dir, path)
    return path

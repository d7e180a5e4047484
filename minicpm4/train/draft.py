"""Draft training, `minicpm4 train draft` (MINICPM4.md §4.2, §6.1 step 7): fit the EAGLE-2 draft head
(speculative/draft_model.py) to a frozen target so that its guesses are accepted more often.

Per batch of token rows x [B, T] the frozen target gives h [B, T, H] (model.hidden_states, final-normed) and
its log-distribution log p_{t+1} = log softmax(target.logits(h_{t+1})) [B, T-1, V]. The draft sees the pairs
(h_t, x_{t+1}) at RoPE positions t = 0 .. T-2 (the pairing of speculative/eagle.py and mtp.py), causal over
the pairs, and its feature f_t [B, T-1, H] should predict x_{t+2}:

    loss = kl_weight      * mean_t KL(p_{t+1} || q_t),      q_t = softmax(target.logits(head_input(f_t)))
         + feature_weight * mean_t smoothL1(head_input(f_t), h_{t+1})
         + unroll_weight  * (the same two terms for the unrolled step below)

Why these two terms (EAGLE, Li et al. 2024): greedy verification accepts a draft token iff it is the target's
argmax, so the draft's distribution is distilled from the target's own (a KL to p, not CE to the data token:
p is what decides acceptance and carries the target's whole ranking, which tree drafting uses); and the
draft's feature is regressed onto the target's next hidden state, because that feature is what the next
tree level reads in place of h (inference feeds f_t back as the `hidden` of the next pair). head_input(f)
is the vector the head multiplies, in the same space as h: equal vectors give equal logits. Weights: EAGLE
uses 1.0 (feature) + 0.1 (CE); we keep feature 1.0 and give the KL 1.0 too, because it is the term that
moves top-1 agreement (default model, 100 steps of 16 x 256 tokens at lr 3e-3: held-out agreement 0.620 with
kl_weight 1.0, 0.591 with 0.1). Both terms, top-1 agreement (draft argmax == target argmax, the acceptance
proxy) and the unrolled ones are logged.

Unrolled step (EAGLE-3's "training-time test", on by default): depth-2 tree nodes read the draft's own
feature, not a target hidden state. The pairs (f_{s-1}, x_{s+1}) at positions s = 1 .. T-2 go through the
layer again; each attends to the first step's keys at positions <= s-1 (what the committed window holds at
inference) and to its own key (its tree ancestors are the first step's pair at s-1, already among those),
and is trained against p_{s+1} and h_{s+1} as above, with the gradient flowing back through f_{s-1}.
Measured as above: depth-2 agreement 0.615 with the step, 0.549 without (depth 1: 0.620 vs 0.629).

Pairs count when x_{t+2} is a training target (SFT: assistant tokens) and h_t, x_{t+1} belong to the same
document; a pair that straddles two packed documents attends only to itself (no such pair exists at
inference, where a sequence starts at its BOS). Rows are at most 1024 tokens: the draft's attention window
at inference (CPM.cu --spec-window-size), so training never shows it more keys than it will see.

Everything else is the shared training plumbing: WSD schedule, muP AdamW groups (mup.py: the draft's
matrices are hidden matrices), deterministic resumable sampling (data.py), the DCP checkpoint layout with
atomic writes (checkpointing.py), metrics.jsonl + loss.png (metrics.py). Single process; the target stays in
eval mode with no gradients. The exported draft (save_draft) goes to RUN/final in the target's dtype.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F

from minicpm4.attention.dense import DenseAttention
from minicpm4.attention.document_mask import DocumentMaskedAttention, document_metadata, enable_document_mask
from minicpm4.attention.metadata import AttentionMetadata
from minicpm4.model import MiniCPMForCausalLM
from minicpm4.speculative.draft_model import (RESIDUAL_SCALES, DraftOptions, EagleDraft, build_draft,
                                              draft_from_mtp, save_draft)
from minicpm4.speculative.eagle import DEFAULT_WINDOW
from minicpm4.train import mup
from minicpm4.train.checkpointing import (TrainState, latest_checkpoint, load_checkpoint, read_train_state,
                                          save_checkpoint)
from minicpm4.train.data import Batch, EpochSampler, PackedDataset, TokenWindows, micro_batch_indices
from minicpm4.train.distributed import DistInfo
from minicpm4.train.losses import IGNORE_INDEX, LossNormalizer
from minicpm4.train.metrics import MetricsLog, Progress, plot_loss
from minicpm4.train.schedule import WSD
from minicpm4.train.trainer import KILL_ENV, TrainConfig

STAGE = "draft"
EVAL_TOPK = 10  # CPM.cu's topk_per_iter: a target argmax inside the draft's top-10 can still be in the tree
TERMS = ("kl", "feature", "agree")  # the per-pair sums of one draft step, in this order
SHAPE_KEYS = ("vocab_size", "hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads")


@dataclass
class DraftTrainConfig:
    model: str = ""  # the target: a Hugging Face model folder (frozen)
    out_dir: str = "runs/draft"
    data: str | None = None  # token-shard folder (train.bin; val.bin is the validation split), as pretrain
    chat_data: str | None = None  # chat JSONL ({"messages": [...]}, pairs predicting assistant tokens), as SFT
    val_chat_data: str | None = None  # validation conversations
    init: str = "random"  # "random" | "mtp:PATH" (a pretraining run's MTP head: a run, checkpoint or model folder)
    residual_scale: str = "cpmcu"  # a random draft's DraftOptions.residual_scale (an MTP init keeps its own)
    steps: int = 1000
    micro_batch_size: int = 8
    grad_accum: int = 1
    seq_len: int = 512  # <= DEFAULT_WINDOW (module docstring)
    # AdamW over mup.param_groups; lr is the muP base LR (the draft's matrices get lr / width_mult)
    lr: float = 1e-2  # best of 3e-3 / 1e-2 / 2e-2 after 100 steps on the default model (README of its draft)
    weight_decay: float = 0.0  # a few thousand steps of distillation: nothing to regularise against
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    grad_clip: float = 1.0
    warmup_steps: int = 0
    decay_steps: int = 0
    decay_shape: str = "linear"
    min_lr_ratio: float = 0.1
    # loss weights (module docstring)
    kl_weight: float = 1.0
    feature_weight: float = 1.0
    unroll_weight: float = 1.0  # the depth-2 step's weight; 0 = no unrolled step
    dtype: str = "auto"  # autocast dtype, as TrainConfig.dtype; weights and optimizer state stay fp32
    device: str | None = None
    seed: int = 0  # random init and data order
    eval_every: int = 0  # steps (and before the first step); 0 = only at the end (when there is validation data)
    eval_batches: int = 8  # micro-batches per evaluation; 0 = the whole validation split
    log_every: int = 1
    save_every: int = 0  # steps; 0 = only at the end
    keep_last: int = 3
    progress: bool = True

    def validate(self) -> None:
        if not self.model:
            raise ValueError("model: the target model folder is required")
        if self.data is None and self.chat_data is None:
            raise ValueError("data: give token shards (data) and/or chat JSONL (chat_data)")
        for key in ("steps", "micro_batch_size", "grad_accum", "seq_len", "log_every"):
            if getattr(self, key) < 1:
                raise ValueError(f"{key} must be >= 1, got {getattr(self, key)}")
        if self.eval_batches < 0:
            raise ValueError(f"eval_batches must be >= 0 (0 = the whole split), got {self.eval_batches}")
        if not 3 <= self.seq_len <= DEFAULT_WINDOW:
            raise ValueError(f"seq_len must be in [3, {DEFAULT_WINDOW}] (the draft's attention window at "
                             f"inference), got {self.seq_len}")
        if self.lr <= 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        for key in ("kl_weight", "feature_weight", "unroll_weight", "weight_decay", "grad_clip"):
            if getattr(self, key) < 0:
                raise ValueError(f"{key} must be >= 0, got {getattr(self, key)}")
        if self.kl_weight == 0 and self.feature_weight == 0:
            raise ValueError("kl_weight and feature_weight are both 0: nothing to train")
        if self.residual_scale not in RESIDUAL_SCALES:
            raise ValueError(f"residual_scale must be one of {RESIDUAL_SCALES}, got {self.residual_scale!r}")
        if self.init != "random" and not (self.init.startswith("mtp:") and len(self.init) > 4):
            raise ValueError(f"init must be 'random' or 'mtp:PATH', got {self.init!r}")
        self.schedule()
        self.autocast_dtype(torch.device("cpu"))

    def schedule(self) -> WSD:
        return WSD(self.steps, self.warmup_steps, self.decay_steps, self.decay_shape, self.min_lr_ratio)

    def autocast_dtype(self, device: torch.device) -> torch.dtype | None:
        return TrainConfig(dtype=self.dtype).autocast_dtype(device)  # one rule for every stage (trainer.py)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> DraftTrainConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: (tuple(v) if k == "betas" else v) for k, v in d.items() if k in known})


# ---- target, data, initial draft ------------------------------------------------------------------------

def load_target(path: str | Path, device: torch.device | str = "cpu") -> MiniCPMForCausalLM:
    """The frozen target in fp32 (autocast does the low-precision math), eval mode, no gradients; with a dense
    backend, attention stays within each packed document as in its own training."""
    from minicpm4.checkpoint import load_model

    target = load_model(path, dtype=torch.float32, device=device).eval()
    target.requires_grad_(False)
    enable_document_mask(target)
    return target


class MixedRows:
    """Several packed datasets of one seq_len as one index space (shards first, then chat rows)."""

    def __init__(self, parts: Sequence[PackedDataset]) -> None:
        self.parts = list(parts)
        self.seq_len = self.parts[0].seq_len
        assert all(p.seq_len == self.seq_len for p in self.parts), "parts packed at different lengths"

    def __len__(self) -> int:
        return sum(len(p) for p in self.parts)

    def batch(self, indices: Sequence[int]) -> Batch:
        rows = []
        for i in indices:
            for part in self.parts:
                if i < len(part):
                    rows.append(part.batch([i]))
                    break
                i -= len(part)
        # one document per row where a part has no segment ids; offsets keep segments distinct within a row
        segs = [b.segment_ids if b.segment_ids is not None else torch.zeros_like(b.input_ids) for b in rows]
        seg = None if all(b.segment_ids is None for b in rows) else torch.cat(segs)
        return Batch(torch.cat([b.input_ids for b in rows]), torch.cat([b.labels for b in rows]), seg)


def load_data(cfg: DraftTrainConfig) -> tuple[PackedDataset, PackedDataset | None]:
    """(train, validation or None) rows of seq_len + 1 tokens from the shard folder and/or the chat JSONL."""
    train, val = [], []
    if cfg.data is not None:
        train.append(TokenWindows.from_folder(cfg.data, "train", cfg.seq_len))
        if (Path(cfg.data) / "val.bin").is_file():
            v = TokenWindows.from_folder(cfg.data, "val", cfg.seq_len)
            if len(v):
                val.append(v)
    if cfg.chat_data is not None or cfg.val_chat_data is not None:
        from minicpm4.tokenizer import Tokenizer
        from minicpm4.train.sft_data import load_sft

        tokenizer = Tokenizer.from_pretrained(cfg.model)
        if cfg.chat_data is not None:
            train.append(load_sft(cfg.chat_data, tokenizer, cfg.seq_len))
        if cfg.val_chat_data is not None:
            val.append(load_sft(cfg.val_chat_data, tokenizer, cfg.seq_len))
    return MixedRows(train), (MixedRows(val) if val else None)


def load_mtp_head(path: str | Path, target: MiniCPMForCausalLM):
    """The MTP head (minicpm4/mtp.py) of a pretraining run for `target`: RUN/final/mtp_head.safetensors or
    MODEL/mtp_head.safetensors (written by trainer.export_final), else the latest checkpoint of RUN or the
    checkpoint folder itself (the module state of `mtp.*`)."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    from minicpm4.mtp import MTPHead

    path = Path(path)
    for f in (path / "mtp_head.safetensors", path / "final" / "mtp_head.safetensors"):
        if f.is_file():
            with safe_open(str(f), "pt") as sf:
                embed_first = (sf.metadata() or {}).get("embed_first") == "True"
            head = MTPHead(target.config, embed_first)
            try:
                head.load_state_dict(load_file(str(f)))
            except RuntimeError as e:  # shapes of another model
                raise ValueError(f"--init mtp:{path}: {f.name} does not fit the target ({e})") from None
            return head
    ckpt = path if (path / "train_state.json").is_file() else latest_checkpoint(path)
    if ckpt is None:
        raise FileNotFoundError(f"--init mtp:{path}: no mtp_head.safetensors there (or in final/) and no training "
                                "checkpoint")
    from minicpm4.config import MiniCPMConfig
    from minicpm4.train.trainer import build_train_module

    state = read_train_state(ckpt)
    for key in SHAPE_KEYS:
        if state.model_config.get(key) != getattr(target.config, key):
            raise ValueError(f"--init mtp:{path}: the run's {key} {state.model_config.get(key)} differs from the "
                             f"target's {getattr(target.config, key)}")
    run_cfg = TrainConfig.from_dict(state.train_config)
    if run_cfg.mtp_weight <= 0:
        raise ValueError(f"--init mtp:{path}: the run of {ckpt} trained no MTP head (mtp_weight 0)")
    module = build_train_module(MiniCPMConfig.from_dict(state.model_config), run_cfg)
    load_checkpoint(ckpt, module, None, DistInfo())
    return module.mtp


def initial_draft(cfg: DraftTrainConfig, target: MiniCPMForCausalLM) -> EagleDraft:
    if cfg.init == "random":
        return build_draft(target.config, DraftOptions(residual_scale=cfg.residual_scale), seed=cfg.seed)
    mtp = load_mtp_head(cfg.init.removeprefix("mtp:"), target)
    return draft_from_mtp(mtp.float(), target.config).float()


# ---- the forward ----------------------------------------------------------------------------------------

class _RecordKV:
    """The first step's backend: the dense (document-masked) backend, keeping the call's k/v for the unrolled step."""

    needs_pre_rope = False

    def __init__(self) -> None:
        self.inner = DocumentMaskedAttention(DenseAttention())
        self.k = self.v = None

    def __call__(self, layer_idx, q, k, v, meta, pre_rope=None):
        self.k, self.v = k, v  # [B, Hkv, T-1, D], post-RoPE
        return self.inner(layer_idx, q, k, v, meta, pre_rope)


class _UnrolledAttention:
    """The unrolled step's backend: queries over [first step's keys; own keys] under mask [B, 1, N, T1 + N]."""

    needs_pre_rope = False

    def __init__(self, k1: torch.Tensor, v1: torch.Tensor, mask: torch.Tensor) -> None:
        self.k1, self.v1, self.mask = k1, v1, mask

    def __call__(self, layer_idx, q, k, v, meta, pre_rope=None):
        keys, values = torch.cat([self.k1, k], dim=2), torch.cat([self.v1, v], dim=2)
        return F.scaled_dot_product_attention(q, keys, values, attn_mask=self.mask, enable_gqa=True)


def pair_segments(batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """(valid [B, T-1] bool, segment [B, T-1]) of the pairs (h_t, x_{t+1}): valid iff x_{t+2} is a target and
    h_t, x_{t+1} share a document; a straddling pair gets a segment of its own (negative ids)."""
    B, T = batch.input_ids.shape
    seg = batch.segment_ids if batch.segment_ids is not None else torch.zeros_like(batch.input_ids)
    same = seg[:, :-1] == seg[:, 1:]
    alone = -1 - torch.arange(T - 1, device=seg.device).expand(B, T - 1)
    return same & (batch.labels[:, 1:] != IGNORE_INDEX), torch.where(same, seg[:, 1:], alone)


def count_pairs(batch: Batch, unroll: bool) -> tuple[int, int]:
    valid, _ = pair_segments(batch)
    return int(valid.sum()), int((valid[:, :-1] & valid[:, 1:]).sum()) if unroll else 0


@dataclass
class TargetRows:
    """The frozen target's view of the valid pairs (rows of pair_segments' mask, flattened): its hidden state at
    t+1 (the feature target) and its next-token distribution there (what pair t predicts)."""

    h_next: torch.Tensor  # [N, H]
    p: torch.Tensor  # [N, V] fp32 softmax
    neg_entropy: torch.Tensor  # [N]: sum_v p log p, the constant part of KL(p || q)
    best: torch.Tensor  # [N]: the target's argmax, what greedy verification accepts

    @classmethod
    @torch.no_grad()
    def of(cls, target: MiniCPMForCausalLM, h_next: torch.Tensor) -> TargetRows:
        z = target.logits(h_next)
        logp = F.log_softmax(z, dim=-1)
        p = logp.exp()
        return cls(h_next, p, (p * logp).sum(-1), z.argmax(-1))

    def __getitem__(self, index: torch.Tensor) -> TargetRows:
        return TargetRows(self.h_next[index], self.p[index], self.neg_entropy[index], self.best[index])


def _step_terms(target: MiniCPMForCausalLM, draft: EagleDraft, features: torch.Tensor, rows: TargetRows,
                topk: int = 0) -> torch.Tensor:
    """features [N, H] of valid pairs and the target's rows -> sums [kl, feature, agree(, topk hits)].
    KL(p || q) = sum p log p - sum p z + logsumexp(z) for draft logits z: no [N, V] log-softmax is kept, and
    its gradient is softmax(z) - p (the V-sized work dominates the step: 8K vocab vs a 192-wide layer)."""
    x = draft.head_input(features)
    z = target.logits(x)  # [N, V] fp32: the target's muP divisor and head
    kl = rows.neg_entropy - (rows.p * z).sum(-1) + z.logsumexp(-1)
    feat = F.smooth_l1_loss(x.float(), rows.h_next.float(), reduction="none").mean(-1)
    out = [kl.sum(), feat.sum(), (z.detach().argmax(-1) == rows.best).sum().to(kl.dtype)]
    if topk:
        out.append((z.detach().topk(topk, dim=-1).indices == rows.best[:, None]).any(-1).sum().to(kl.dtype))
    return torch.stack(out)


@dataclass
class DraftSteps:
    """The draft's features of one batch: the first step over the pairs (h_t, x_{t+1}) and the unrolled one
    over (f_{s-1}, x_{s+1}), with the masks of the pairs that count and the target's rows they are scored on."""

    f1: torch.Tensor  # [B, T-1, H]: pair t at position t
    valid: torch.Tensor  # [B, T-1]
    rows: TargetRows  # the valid pairs of the first step, in row-major order
    f2: torch.Tensor | None = None  # [B, T-2, H]: row i = pair (f_i, x_{i+2}) at position i + 1
    valid2: torch.Tensor | None = None  # [B, T-2]
    rows2: TargetRows | None = None


def draft_steps(target: MiniCPMForCausalLM, draft: EagleDraft, batch: Batch, unroll: bool) -> DraftSteps:
    """Run the frozen target and the draft's (one or two) steps over a batch (module docstring)."""
    ids = batch.input_ids
    B, T = ids.shape
    positions = torch.arange(T, device=ids.device).expand(B, T)
    valid, seg = pair_segments(batch)
    with torch.no_grad():
        h = target.hidden_states(ids, positions, meta=document_metadata(positions, batch.segment_ids))  # [B, T, H]
        rows = TargetRows.of(target, h[:, 1:][valid])  # pair t predicts what the target predicts at t+1
    pos = positions[:, :-1]
    cos, sin = target.rotary(pos, T)  # the target's LongRoPE table
    x = draft.fuse_inputs(target, ids[:, 1:], h[:, :-1])  # pairs (h_t, x_{t+1}) [B, T-1, H]
    attn = _RecordKV()
    f1 = draft.layer(x, cos, sin, document_metadata(pos, None if batch.segment_ids is None else seg), attn)
    out = DraftSteps(f1, valid, rows)
    if not unroll:
        return out
    # pairs (f_{s-1}, x_{s+1}) at s = 1 .. T-2 (row i <-> s = i + 1); keys: first step's j <= i, then own
    x2 = draft.fuse_inputs(target, ids[:, 2:], f1[:, :-1])  # [B, T-2, H]
    n = T - 2
    seen = torch.ones(n, T - 1, dtype=torch.bool, device=ids.device).tril()  # first-step key j visible iff j <= i
    seen = seen & (seg[:, None, :] == seg[:, 1:, None])  # [B, n, T-1]: same document as the query's pair
    own = torch.eye(n, dtype=torch.bool, device=ids.device).expand(B, n, n)
    mask = torch.cat([seen, own], dim=-1)[:, None]  # [B, 1, n, T-1 + n]
    out.f2 = draft.layer(x2, cos[:, 1:], sin[:, 1:], AttentionMetadata(positions=positions[:, 1:-1]),
                         _UnrolledAttention(attn.k, attn.v, mask))
    out.valid2 = valid[:, :-1] & valid[:, 1:]  # its own pair and the one whose feature it reads
    index = (valid.flatten().cumsum(0) - 1).view(B, T - 1)  # pair (b, t) -> its row in `rows`
    out.rows2 = rows[index[:, 1:][out.valid2]]  # row i predicts what pair i + 1 predicts
    return out


def draft_forward(target: MiniCPMForCausalLM, draft: EagleDraft, batch: Batch, unroll: bool,
                  topk: int = 0) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One batch -> (first-step sums [kl, feature, agree(, topk)], the unrolled step's or None)."""
    st = draft_steps(target, draft, batch, unroll)
    first = _step_terms(target, draft, st.f1[st.valid], st.rows, topk)
    if not unroll:
        return first, None
    return first, _step_terms(target, draft, st.f2[st.valid2], st.rows2, topk)


def objective(cfg: DraftTrainConfig, kl, feature, kl_2=None, feature_2=None):
    """The weighted loss from per-pair means (tensors or floats); the unrolled terms when given."""
    loss = cfg.kl_weight * kl + cfg.feature_weight * feature
    if kl_2 is not None:
        loss = loss + cfg.unroll_weight * (cfg.kl_weight * kl_2 + cfg.feature_weight * feature_2)
    return loss


def _record(prefix: str, first: list[float], n1: int, second: list[float] | None, n2: int) -> dict[str, float]:
    names = list(TERMS) + ([f"top{EVAL_TOPK}"] if len(first) > len(TERMS) else [])
    out = {f"{prefix}{k}": v / max(n1, 1) for k, v in zip(names, first)}
    if second is not None:
        out.update({f"{prefix}{k}_2": v / max(n2, 1) for k, v in zip(names, second)})
    return out


# ---- evaluation -----------------------------------------------------------------------------------------

@torch.no_grad()
def evaluate_draft(target: MiniCPMForCausalLM, draft: EagleDraft, data: PackedDataset, cfg: DraftTrainConfig,
                   batches: int | None = None, device: torch.device | str = "cpu") -> dict[str, float]:
    """Mean per-pair terms over the first `batches` (default cfg.eval_batches; 0 = all) micro-batches of
    `data` in order: val_kl, val_feature, val_agree (top-1 agreement), val_top10, and the _2 (unrolled) ones."""
    device = torch.device(device)
    draft.eval()
    batches = cfg.eval_batches if batches is None else batches
    B = cfg.micro_batch_size
    count = -(-len(data) // B) if batches == 0 else batches
    unroll = cfg.unroll_weight > 0
    s1 = s2 = None
    n1 = n2 = 0
    amp = cfg.autocast_dtype(device)
    for m in range(count):
        batch = data.batch([i % len(data) for i in range(m * B, (m + 1) * B)]).to(device)
        c1, c2 = count_pairs(batch, unroll)
        with torch.autocast(device.type, dtype=amp or torch.bfloat16, enabled=amp is not None):
            first, second = draft_forward(target, draft, batch, unroll, topk=EVAL_TOPK)
        s1 = first.double() if s1 is None else s1 + first.double()
        s2 = None if second is None else (second.double() if s2 is None else s2 + second.double())
        n1, n2 = n1 + c1, n2 + c2
    draft.train()
    out = _record("val_", s1.tolist(), n1, None if s2 is None else s2.tolist(), n2)
    loss = objective(cfg, out["val_kl"], out["val_feature"], out.get("val_kl_2"), out.get("val_feature_2"))
    return {"val_loss": loss, **out, "val_pairs": n1}


# ---- the loop -------------------------------------------------------------------------------------------

@dataclass
class DraftResult:
    step: int
    draft: EagleDraft
    target: MiniCPMForCausalLM
    losses: list[float] = field(default_factory=list)  # training objective of each step run in this call
    agree: list[float] = field(default_factory=list)  # top-1 agreement of each step run in this call
    val: dict[str, float] = field(default_factory=dict)
    tokens_per_s: float = 0.0


def train_draft(cfg: DraftTrainConfig, resume: bool = True, target: MiniCPMForCausalLM | None = None,
                data: tuple[PackedDataset, PackedDataset | None] | None = None) -> DraftResult:
    """Train (or resume from the latest checkpoint in cfg.out_dir) to cfg.steps; `finish` exports RUN/final.
    `target` and `data` default to cfg.model and cfg's data (tests and sweeps pass them to load once)."""
    cfg.validate()
    device = torch.device(cfg.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    info = DistInfo(device=device)
    out = Path(cfg.out_dir)
    torch.manual_seed(cfg.seed)
    target = (target or load_target(cfg.model, device)).to(device)
    train_data, val_data = data if data is not None else load_data(cfg)
    if train_data.seq_len != cfg.seq_len:
        raise ValueError(f"seq_len: the data is packed at {train_data.seq_len}, the config says {cfg.seq_len}")

    ckpt = latest_checkpoint(out) if resume else None
    if ckpt is not None:  # the options it was trained with (an MTP-initialised draft has its own)
        draft = EagleDraft(target.config, DraftOptions(**read_train_state(ckpt).extra["draft_options"])).float()
    else:
        draft = initial_draft(cfg, target)
    draft = draft.to(device)
    draft.train()
    draft.norm.requires_grad_(draft.options.final_norm)  # unused otherwise: no gradient, no optimizer state
    optimizer = torch.optim.AdamW(mup.param_groups(draft, target.config, cfg.lr, cfg.weight_decay), lr=cfg.lr,
                                  betas=cfg.betas, eps=cfg.eps, weight_decay=cfg.weight_decay)
    schedule = cfg.schedule()
    metrics = MetricsLog(out / "metrics.jsonl")
    step = samples = 0
    if ckpt is not None:
        state = load_checkpoint(ckpt, draft, optimizer, info)
        step, samples = state.step, state.samples
        metrics.truncate_after(step)
    else:
        metrics.reset()

    B, A, T = cfg.micro_batch_size, cfg.grad_accum, cfg.seq_len
    unroll = cfg.unroll_weight > 0
    sampler = EpochSampler(len(train_data), cfg.seed)
    amp = cfg.autocast_dtype(device)
    kill_at = int(os.environ.get(KILL_ENV, "-1"))
    result = DraftResult(step, draft, target)
    progress = Progress(cfg.steps, step, cfg.progress, STAGE)
    progress.note(f"draft: {sum(p.numel() for p in draft.parameters()) / 1e6:.2f}M parameters on a "
                  f"{target.num_parameters() / 1e6:.2f}M target, {B * A * T:,} tokens/step, "
                  f"{'bf16 autocast' if amp else 'fp32'}, init {cfg.init if ckpt is None else 'resumed ' + ckpt.name}")
    timed_s = timed_steps = 0
    if val_data is not None and cfg.eval_every and step == 0:  # where the agreement starts
        metrics.write({"step": 0, **evaluate_draft(target, draft, val_data, cfg, device=device)})

    def save() -> None:
        state = TrainState(step, samples, 1, target.config.to_dict(), dataclasses.asdict(cfg),
                           {"stage": STAGE, "draft_options": dataclasses.asdict(draft.options)})
        save_checkpoint(out, draft, optimizer, state, info, cfg.keep_last)
        plot_loss(metrics.path, out / "loss.png", "draft")

    while step < cfg.steps:
        t0 = time.perf_counter()
        lr_ratio = schedule(step)
        for group in optimizer.param_groups:
            group["lr"] = cfg.lr * lr_ratio * group["lr_scale"]
        micro = [train_data.batch([sampler(g) for g in micro_batch_indices(samples, m, 0, 1, B)]) for m in range(A)]
        counts = [count_pairs(b, unroll) for b in micro]
        norm1 = LossNormalizer(sum(c[0] for c in counts))  # every valid pair of the step weighs the same
        norm2 = LossNormalizer(sum(c[1] for c in counts))
        s1 = torch.zeros(len(TERMS), dtype=torch.float64)
        s2 = torch.zeros(len(TERMS), dtype=torch.float64)
        for batch in micro:
            batch = batch.to(device)
            with torch.autocast(device.type, dtype=amp or torch.bfloat16, enabled=amp is not None):
                first, second = draft_forward(target, draft, batch, unroll)
            loss = objective(cfg, *norm1(first)[:2], *(() if second is None else norm2(second)[:2]))
            loss.backward()
            if second is not None:
                s2 += second.detach().double().cpu()
            s1 += first.detach().double().cpu()
        grad_norm = float(torch.nn.utils.clip_grad_norm_(draft.parameters(), cfg.grad_clip or float("inf")))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step, samples = step + 1, samples + B * A
        dt = time.perf_counter() - t0
        if step > result.step + 1:  # the first step of a call pays for warm-up
            timed_s, timed_steps = timed_s + dt, timed_steps + 1
        terms = _record("", s1.tolist(), norm1.num_targets, s2.tolist() if unroll else None, norm2.num_targets)
        loss_value = objective(cfg, terms["kl"], terms["feature"], terms.get("kl_2"), terms.get("feature_2"))
        result.losses.append(loss_value)
        result.agree.append(terms["agree"])
        record = {"step": step, "loss": loss_value, **terms, "lr": cfg.lr * lr_ratio, "grad_norm": grad_norm,
                  "tokens": samples * T, "tokens_per_s": B * A * T / dt}
        metrics.write(record)
        if step % cfg.log_every == 0 or step == cfg.steps:
            progress.update(step, {"loss": f"{loss_value:.4f}", "agree": f"{terms['agree']:.3f}",
                                   "lr": f"{record['lr']:.2e}", "tok/s": f"{record['tokens_per_s']:,.0f}"})
        if val_data is not None and ((cfg.eval_every and step % cfg.eval_every == 0) or step == cfg.steps):
            result.val = evaluate_draft(target, draft, val_data, cfg, device=device)
            metrics.write({"step": step, **result.val})
            progress.note(f"step {step}: val_loss {result.val['val_loss']:.4f}, top-1 agreement "
                          f"{result.val['val_agree']:.3f}" + (f" (depth 2: {result.val['val_agree_2']:.3f})"
                                                               if unroll else ""))
        if (cfg.save_every and step % cfg.save_every == 0) or step == cfg.steps:
            save()
        if step == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
    progress.close()
    result.step = step
    if timed_steps:
        result.tokens_per_s = B * A * T * timed_steps / timed_s
    return result


# ---- export ---------------------------------------------------------------------------------------------

def export_draft(draft: EagleDraft, folder: str | Path, target_dir: str | Path, extra: dict | None = None) -> Path:
    """save_draft in the target checkpoint's dtype (a bf16 target gets a bf16 draft: ~1/L of its size)."""
    from minicpm4.checkpoint import checkpoint_dtype

    dtype = checkpoint_dtype(target_dir)
    copy = EagleDraft(draft.target_config, draft.options)
    copy.load_state_dict(draft.state_dict())
    return save_draft(copy.to(dtype), folder, extra)


def export_checkpoint(path: str | Path, folder: str | Path) -> tuple[int, Path]:
    """A draft-stage checkpoint -> a draft folder (`minicpm4 train export` of a draft run)."""
    state = read_train_state(path)
    cfg = DraftTrainConfig.from_dict(state.train_config)
    from minicpm4.config import MiniCPMConfig

    draft = EagleDraft(MiniCPMConfig.from_dict(state.model_config), DraftOptions(**state.extra["draft_options"]))
    load_checkpoint(path, draft.float(), None, DistInfo())
    return state.step, export_draft(draft, folder, cfg.model, {"draft_train": {"step": state.step, "init": cfg.init}})


def convert_mtp(cfg: DraftTrainConfig) -> Path:
    """`--convert-mtp-only`: the MTP head of cfg.init as a draft folder RUN/final, no training."""
    if not cfg.init.startswith("mtp:"):
        raise ValueError(f"--convert-mtp-only needs --init mtp:PATH, got {cfg.init!r}")
    target = load_target(cfg.model)
    draft = initial_draft(cfg, target)
    return export_draft(draft, Path(cfg.out_dir) / "final", cfg.model, {"draft_train": {"step": 0, "init": cfg.init}})


def finish(result: DraftResult, cfg: DraftTrainConfig) -> Path:
    """Export RUN/final with a summary of the run in config.json (draft_train)."""
    summary = {"step": result.step, "init": cfg.init, "seq_len": cfg.seq_len,
               "tokens": result.step * cfg.micro_batch_size * cfg.grad_accum * cfg.seq_len,
               "weights": {"kl": cfg.kl_weight, "feature": cfg.feature_weight, "unroll": cfg.unroll_weight},
               **({k: result.val[k] for k in ("val_agree", "val_agree_2") if k in result.val})}
    return export_draft(result.draft, Path(cfg.out_dir) / "final", cfg.model, {"draft_train": summary})

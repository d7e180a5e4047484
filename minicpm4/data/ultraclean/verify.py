"""UltraClean efficient verification (MINICPM4.md §8.1): is a candidate data set worth training on?

Instead of pretraining from scratch on the candidate, start from a WSD *stable-phase* checkpoint and run only
the decay phase twice: once on 30% candidate + 70% default mix, once on the default mix alone, with the same
steps, batch, LR schedule and seeds; compare the two on held-out evaluations. The report does this with a 1B
model over 10B tokens (~110 GPU-h instead of ~1,200); here the same protocol runs on any checkpoint our trainer
wrote, down to the bundled 3M model on a CPU.

An arm is one annealing run = `train()` resumed from the stable checkpoint (weights, AdamW state, data position)
with `steps` extended by the anneal length and the whole extension as the WSD decay, so the LR falls from the
stable value exactly as a real decay phase would. Both arms see the same number of tokens; each seed changes
the data order (and the mixture's draw of candidate windows); the gain of a metric is the mean over seeds of
(default arm - candidate arm) for losses (positive = the candidate helps), with the standard error of those
paired differences as its seed noise. Arms are cached as result.json in their folders, so an interrupted
verification resumes, and the default arm is run once per seed for every candidate compared against it.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import math
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from minicpm4.config import MiniCPMConfig
from minicpm4.errors import UserError
from minicpm4.io import write_text_atomic
from minicpm4.train.chat_eval import QARow
from minicpm4.train.checkpointing import TrainState, latest_checkpoint, read_train_state, STATE_FILE
from minicpm4.train.data import EpochSampler, MixtureWindows, PackedDataset, TokenWindows, micro_batch_indices

RESULT_FILE = "result.json"


@dataclass(frozen=True)
class AnnealConfig:
    steps: int = 60  # optimizer steps of the decay phase
    candidate_fraction: float = 0.3
    seeds: tuple[int, ...] = (0, 1, 2)
    decay_shape: str = "exp"
    min_lr_ratio: float = 0.1
    eval_tokens: int = 65_536  # per held-out loss set
    answer_rows: int = 200  # held-out QA rows for the answer NLL
    significance: float = 2.0  # a gain counts when it exceeds this many standard errors (and there are >= 2 seeds)
    min_gain: float = 0.01  # ... and this much (nats): paired seeds can make a negligible gain "significant"
    keep_checkpoints: bool = False

    def __post_init__(self) -> None:
        if self.steps < 1:
            raise UserError(f"anneal steps must be >= 1, got {self.steps}")
        if not 0.0 < self.candidate_fraction < 1.0:
            raise UserError(f"candidate fraction must be in (0, 1), got {self.candidate_fraction}")
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise UserError(f"seeds must be distinct and at least one, got {list(self.seeds)}")


@dataclass
class StableCheckpoint:
    path: Path
    state: TrainState

    @classmethod
    def open(cls, path: str | Path) -> StableCheckpoint:
        """A trainer checkpoint folder, or a run folder (its latest checkpoint), that is still in the stable phase."""
        path = Path(path)
        if not (path / STATE_FILE).is_file():
            found = latest_checkpoint(path)
            if found is None:
                raise UserError(f"{path}: not a training checkpoint or run folder (no {STATE_FILE}, no checkpoints/)")
            path = found
        state = read_train_state(path)
        saved = state.train_config
        decay_start = saved["steps"] - saved.get("decay_steps", 0)
        if state.step > decay_start:
            raise UserError(f"{path}: step {state.step} is inside its run's decay phase (from step {decay_start}); "
                            "verification anneals from a stable-phase checkpoint")
        if state.step < saved.get("warmup_steps", 0):
            raise UserError(f"{path}: step {state.step} is still in warm-up")
        return cls(path, state)

    @property
    def model_config(self) -> MiniCPMConfig:
        return MiniCPMConfig.from_dict(self.state.model_config)

    @property
    def seq_len(self) -> int:
        return int(self.state.train_config["seq_len"])


@dataclass
class EvalSets:
    """Held-out evaluations: next-token loss on token streams (knowledge-dense text, the default mix's
    validation split) and the answer NLL on held-out QA rows (the definitions task of the SFT set)."""
    losses: dict[str, np.ndarray]
    answers: list[QARow] = field(default_factory=list)
    tokenizer: object | None = None  # needed when answers are given
    primary: str = ""  # the metric significance is decided on (default: the first loss set)

    def __post_init__(self) -> None:
        if not self.losses and not self.answers:
            raise UserError("verification needs at least one held-out evaluation")
        if self.answers and self.tokenizer is None:
            raise UserError("the answer NLL needs the tokenizer")
        names = self.metric_names
        self.primary = self.primary or names[0]
        if self.primary not in names:
            raise UserError(f"primary metric {self.primary!r}: not one of {', '.join(names)}")

    @property
    def metric_names(self) -> list[str]:
        return [f"loss/{n}" for n in self.losses] + (["answer_nll"] if self.answers else [])


@torch.no_grad()
def evaluate_model(model, evals: EvalSets, seq_len: int, cfg: AnnealConfig) -> dict[str, float]:
    from minicpm4.train.default_model import answer_nll, validation_loss

    model.eval()
    out = {f"loss/{name}": validation_loss(model, tokens[: cfg.eval_tokens], seq_len)
           for name, tokens in evals.losses.items()}
    if evals.answers:
        out["answer_nll"] = answer_nll(model, evals.tokenizer, evals.answers, cfg.answer_rows)
    return out


@functools.cache
def _peak_flops(dtype: torch.dtype | None) -> float:
    """Measured once per process: every arm would otherwise spend a second re-measuring it for its MFU log."""
    from minicpm4.train.metrics import measure_peak_flops

    return measure_peak_flops(dtype or torch.float32)


def anneal_train_config(stable: StableCheckpoint, cfg: AnnealConfig, seed: int, out_dir: Path):
    from minicpm4.train.trainer import TrainConfig

    saved = TrainConfig.from_dict(stable.state.train_config)
    peak = saved.peak_flops or _peak_flops(saved.autocast_dtype(torch.device(saved.device or "cpu")))
    return dataclasses.replace(
        saved, stage="anneal", out_dir=str(out_dir), steps=stable.state.step + cfg.steps, decay_steps=cfg.steps,
        decay_shape=cfg.decay_shape, min_lr_ratio=cfg.min_lr_ratio, seed=seed, eval_every=0, save_every=0,
        keep_last=1, progress=False, compile=False, peak_flops=peak)


def consumed_items(stable: StableCheckpoint, data: PackedDataset, tcfg, seed: int) -> list[int]:
    """The dataset items the anneal reads, in order (replays the trainer's sampler)."""
    sampler = EpochSampler(len(data), seed)
    B, A, W = tcfg.micro_batch_size, tcfg.grad_accum, stable.state.world_size
    samples, items = stable.state.samples, []
    for _ in range(tcfg.steps - stable.state.step):
        for m in range(A):
            for r in range(W):
                items += [sampler(g) for g in micro_batch_indices(samples, m, r, W, B)]
        samples += B * A * W
    return items


def fingerprint(*parts) -> str:
    """What an arm's result depends on: token streams (by content), settings, the stable checkpoint."""
    h = hashlib.sha256()
    for part in parts:
        h.update(np.ascontiguousarray(part).tobytes() if isinstance(part, np.ndarray) else repr(part).encode())
    return h.hexdigest()[:16]


def run_arm(stable: StableCheckpoint, data: PackedDataset, evals: EvalSets, cfg: AnnealConfig, seed: int,
            out_dir: Path, candidate_share: float = 0.0, key: str = "") -> dict:
    """One annealing run from the stable checkpoint, evaluated; cached in out_dir/result.json under `key` (an arm
    folder whose key differs, e.g. the same name for another candidate set, is run again from scratch)."""
    from minicpm4.train.distributed import unwrap
    from minicpm4.train.trainer import train

    done = out_dir / RESULT_FILE
    if done.is_file():
        cached = json.loads(done.read_text(encoding="utf-8"))
        if cached.get("key") == key:
            return cached
    if done.is_file() or (out_dir / "key").is_file() and (out_dir / "key").read_text() != key:
        shutil.rmtree(out_dir)  # another candidate (or setting) under this name: its checkpoints must not resume
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "key").write_text(key)
    tcfg = anneal_train_config(stable, cfg, seed, out_dir)
    own = latest_checkpoint(out_dir)  # a killed arm continues from its own checkpoint
    result = train(stable.model_config, tcfg, data, resume=str(own or stable.path))
    metrics = evaluate_model(unwrap(result.module).model, evals, stable.seq_len, cfg)
    records = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text(encoding="utf-8").splitlines()
               if line.strip()]
    lrs = [r["lr"] for r in records if "lr" in r and r["step"] > stable.state.step]
    tokens = cfg.steps * tcfg.micro_batch_size * tcfg.grad_accum * stable.state.world_size * tcfg.seq_len
    record = {"key": key, "seed": seed, "metrics": metrics, "tokens": tokens, "steps": cfg.steps, "lr": lrs,
              "candidate_share": candidate_share, "final_train_loss": result.losses[-1] if result.losses else None}
    write_text_atomic(done, json.dumps(record, indent=1) + "\n")
    if not cfg.keep_checkpoints:
        shutil.rmtree(out_dir / "checkpoints", ignore_errors=True)
    return record


@dataclass
class MetricGain:
    default: list[float]  # per seed
    candidate: list[float]
    gain: float  # mean of (default - candidate): > 0 means the candidate data lowered the loss
    stderr: float  # of that mean, over seeds (nan with one seed)
    significant: bool


@dataclass
class Comparison:
    name: str
    metrics: dict[str, MetricGain]
    primary: str
    tokens: int
    candidate_share: float  # of the anneal's samples, measured by replaying the sampler (mean over seeds)
    candidate_documents: int
    candidate_tokens: int

    @property
    def verified(self) -> bool:
        return self.metrics[self.primary].significant

    def to_dict(self) -> dict:
        return {**dataclasses.asdict(self), "verified": self.verified}


def metric_gain(default: Sequence[float], candidate: Sequence[float], significance: float,
                min_gain: float = 0.0) -> MetricGain:
    diffs = [d - c for d, c in zip(default, candidate)]
    mean = sum(diffs) / len(diffs)
    if len(diffs) < 2:
        return MetricGain(list(default), list(candidate), mean, math.nan, False)
    sd = math.sqrt(sum((x - mean) ** 2 for x in diffs) / (len(diffs) - 1))
    stderr = sd / math.sqrt(len(diffs))
    return MetricGain(list(default), list(candidate), mean, stderr, mean > max(significance * stderr, min_gain))


class Verifier:
    """Compares candidate sets against the default mix from one stable checkpoint; caches every arm."""

    def __init__(self, stable: StableCheckpoint, default_mix: np.ndarray, evals: EvalSets, cfg: AnnealConfig,
                 work_dir: str | Path, bos_token_id: int | None = None) -> None:
        self.stable, self.evals, self.cfg, self.work = stable, evals, cfg, Path(work_dir)
        self.bos = bos_token_id
        self.default = TokenWindows(default_mix, stable.seq_len, bos_token_id)
        if len(self.default) == 0:
            raise UserError(f"the default mix has no window of {stable.seq_len + 1} tokens")

    def _arm_dir(self, name: str, seed: int) -> Path:
        return self.work / "arms" / f"{name}-seed{seed}"

    def _key(self, seed: int, *candidate) -> str:
        settings = dataclasses.replace(self.cfg, seeds=(seed,), keep_checkpoints=False, significance=0, min_gain=0)
        evals = [self.evals.losses[n] for n in sorted(self.evals.losses)]
        answers = [(r.question, r.answer) for r in self.evals.answers]
        return fingerprint(str(self.stable.path), self.stable.state.step, settings, self.default.tokens, *evals,
                           answers, self.evals.primary, *candidate)

    def default_arm(self, seed: int) -> dict:
        return run_arm(self.stable, self.default, self.evals, self.cfg, seed, self._arm_dir("default", seed),
                       key=self._key(seed))

    def compare(self, name: str, candidate_tokens: np.ndarray, documents: int = 0) -> Comparison:
        if name == "default" or not name.replace("-", "").replace("_", "").isalnum():
            raise UserError(f"candidate name {name!r}: use letters, digits, '-' and '_' (not 'default')")
        candidate = TokenWindows(candidate_tokens, self.stable.seq_len, self.bos)
        if len(candidate) == 0:
            raise UserError(f"candidate {name!r}: fewer than {self.stable.seq_len + 1} tokens")
        f = self.cfg.candidate_fraction
        defaults, arms, shares = [], [], []
        for seed in self.cfg.seeds:
            mix = MixtureWindows([candidate, self.default], [f, 1 - f], seed=seed)
            tcfg = anneal_train_config(self.stable, self.cfg, seed, self._arm_dir(name, seed))
            share = mix.fraction_of(0, consumed_items(self.stable, mix, tcfg, seed))
            defaults.append(self.default_arm(seed))
            arms.append(run_arm(self.stable, mix, self.evals, self.cfg, seed, self._arm_dir(name, seed), share,
                                key=self._key(seed, candidate_tokens)))
            shares.append(share)
        gains = {m: metric_gain([d["metrics"][m] for d in defaults], [a["metrics"][m] for a in arms],
                                self.cfg.significance, self.cfg.min_gain) for m in self.evals.metric_names}
        tokens = {a["tokens"] for a in arms} | {d["tokens"] for d in defaults}
        assert len(tokens) == 1, f"arms saw different token counts: {tokens}"
        return Comparison(name, gains, self.evals.primary, tokens.pop(), sum(shares) / len(shares), documents,
                          int(len(candidate_tokens)))


def markdown_table(comparisons: Sequence[Comparison], metric_names: Sequence[str]) -> str:
    """One row per arm: each metric's mean over seeds, and for candidates the gain ± its standard error."""
    if not comparisons:
        return ""
    head = "| data | " + " | ".join(metric_names) + " | verified |\n|---|" + "---|" * (len(metric_names) + 1) + "\n"
    first = comparisons[0].metrics
    rows = ["| default mix | " + " | ".join(f"{np.mean(first[m].default):.4f}" for m in metric_names) + " | — |"]
    for c in comparisons:
        cells = [f"{np.mean(c.metrics[m].candidate):.4f} ({c.metrics[m].gain:+.4f} ± {c.metrics[m].stderr:.4f})"
                 for m in metric_names]
        rows.append(f"| +{c.name} | " + " | ".join(cells) + f" | {'yes' if c.verified else 'no'} |")
    return head + "\n".join(rows) + "\n"

"""ModelTunnel v2 (MINICPM4.md §6.5): the muP learning-rate search on small proxies, muP vs standard.

    sweep   parametrisation (muP / standard) x width x learning rate, optionally x init std x batch size x seed
    train   every point in-process with trainer.train and the pretrain stage preset (stages.pretrain: WSD,
            AdamW betas / weight decay / clip, muP parameter groups), MTP off, fp32
    score   two numbers per run, each a token-weighted mean next-token NLL over a fixed evaluation set:
              val_loss  plain LM loss on evenly spaced windows of the shards' val split
              sb_loss   a ScalingBench-style indicator: NLL of the assistant answer given the user prompt on
                        held-out instruction data, ChatML-rendered and masked by sft_data.encode_conversation
    report  per (parametrisation, width) the LR optimum: the argmin on the grid and the vertex of a parabola in
            log2 LR through the argmin and its two neighbours; per parametrisation, how far the optimum moves
            across widths (spread in octaves, least-squares slope of log2 LR* on log2 width: muP aims at 0).
            Writes runs.jsonl (one line per finished run; a re-run reuses them), results.json, tunnel.md, tunnel.png.

"LR" is the muP base LR (TrainConfig.lr). Under muP the hidden matrices train at lr / width_mult and start at
std init / sqrt(width_mult) (mup.py); under standard parametrisation every group trains at lr from std init,
and the forward muP factors are 1. Both get the same grid. At the base width (width_mult 1) the two still
differ by scale_emb, the residual factor and the logit divisor, so their optima need not coincide there.

ScalingBench proper scores GPT-4o-written reasoning + answer on downstream validation sets; we have no such
data, so the indicator is the conditional answer loss on the project's held-out SFT split (whose facts occur in
the pretraining corpus). The closing <|im_end|> is not scored by default (sb_score_im_end): base-model proxies
never see ChatML tokens in pretraining, so its loss would only measure how an unused embedding drifts.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import platform
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.nn as nn

from minicpm4.config import MiniCPMConfig
from minicpm4.io import atomic_path, write_text_atomic
from minicpm4.train import mup
from minicpm4.train.data import PackedDataset
from minicpm4.train.losses import count_targets
from minicpm4.train.sft_data import IM_END, PackedConversations, encode_conversation

METRICS = {"val_loss": "validation LM loss", "sb_loss": "ScalingBench-style answer NLL"}
PARAM_LABELS = {"mup": "muP", "standard": "standard (SP)"}


def log2_grid(lo: float, hi: float, step: float = 1.0) -> tuple[float, ...]:
    """2^lo, 2^(lo+step), ..., 2^hi."""
    n = round((hi - lo) / step)
    return tuple(2.0 ** (lo + i * step) for i in range(n + 1))


# ---- the sweep ---------------------------------------------------------------------------------------

@dataclass(frozen=True, order=True)
class SweepPoint:
    parametrization: str
    width: int
    init_scale: float
    batch_size: int
    seed: int
    lr: float

    @property
    def curve(self) -> tuple[str, int, float, int]:
        """The loss-vs-LR curve this point belongs to (seeds are averaged)."""
        return self.parametrization, self.width, self.init_scale, self.batch_size

    def label(self) -> str:
        return (f"{self.parametrization} w={self.width} lr=2^{math.log2(self.lr):g} init={self.init_scale:g} "
                f"bs={self.batch_size} seed={self.seed}")


@dataclass(frozen=True)
class SweepConfig:
    """One ModelTunnel sweep. The tuples are the grid axes; every other field is fixed across the sweep."""

    widths: tuple[int, ...] = (64, 128, 256)
    lrs: tuple[float, ...] = log2_grid(-10, -3)
    parametrizations: tuple[str, ...] = ("mup", "standard")
    init_scales: tuple[float, ...] = (0.1,)  # initializer_range (MiniCPM's 0.1): muP embedding std, SP every std
    batch_sizes: tuple[int, ...] = (8,)  # sequences per optimizer step
    seeds: tuple[int, ...] = (0,)  # init and data order; a seed gives every LR the same data (less noise)
    # proxy shape: MiniCPM4-shaped; only the width changes (heads = width / head_dim, so attention's 1/sqrt(d)
    # needs no muP correction), MHA, tied embeddings, the 0.5B's scale_emb 12 / scale_depth 1.4
    depth: int = 2
    head_dim: int = 32
    dim_model_base: int = 64
    mlp_ratio: int = 4
    # training; the rest is stages.pretrain's recipe
    steps: int = 200
    seq_len: int = 128
    warmup_fraction: float = 0.1  # short proxies need more warmup than the preset's 1%
    decay_fraction: float = 0.2
    # evaluation
    val_windows: int = 64
    sb_conversations: int = 256  # a seeded random subset of the held-out file, the same for every run
    sb_seq_len: int = 256  # packing length of the indicator rows (positions do not matter: RoPE + document mask)
    sb_score_im_end: bool = False
    eval_batch_size: int = 16
    device: str | None = None  # None: cuda when available

    AXES = ("parametrizations", "widths", "init_scales", "batch_sizes", "seeds", "lrs")

    def validate(self) -> None:
        for axis in self.AXES:
            values = getattr(self, axis)
            if not values:
                raise ValueError(f"{axis}: needs at least one value")
            if len(set(values)) != len(values):
                raise ValueError(f"{axis}: repeated value in {values}")
        for p in self.parametrizations:
            if p not in mup.PARAMETRIZATIONS:
                raise ValueError(f"parametrizations: unknown {p!r}; choose from {', '.join(mup.PARAMETRIZATIONS)}")
        for w in self.widths:
            if w < self.head_dim or w % self.head_dim:
                raise ValueError(f"widths: {w} is not a positive multiple of head_dim {self.head_dim}")
        for axis in ("lrs", "init_scales"):
            if any(not (v > 0 and math.isfinite(v)) for v in getattr(self, axis)):
                raise ValueError(f"{axis}: every value must be a positive number")
        for key in ("depth", "head_dim", "dim_model_base", "mlp_ratio", "steps", "seq_len", "val_windows",
                    "sb_conversations", "sb_seq_len", "eval_batch_size"):
            if getattr(self, key) < 1:
                raise ValueError(f"{key} must be >= 1, got {getattr(self, key)}")
        if min(self.batch_sizes) < 1:
            raise ValueError("batch_sizes: every value must be >= 1")
        if not (0 <= self.warmup_fraction and 0 <= self.decay_fraction and self.warmup_fraction + self.decay_fraction <= 1):
            raise ValueError("warmup_fraction and decay_fraction must be >= 0 and sum to at most 1")

    def points(self) -> list[SweepPoint]:
        """Small widths first, each width's whole LR curve for both parametrisations before the next width,
        so a sweep stopped early still has complete curves."""
        return [SweepPoint(p, w, i, b, s, lr) for s in self.seeds for i in self.init_scales for b in self.batch_sizes
                for w in sorted(self.widths) for p in self.parametrizations for lr in sorted(self.lrs)]

    def settings(self) -> dict[str, Any]:
        """Everything but the grid axes: runs with equal settings are interchangeable."""
        return {k: v for k, v in dataclasses.asdict(self).items() if k not in self.AXES}

    def proxy_config(self, width: int, vocab_size: int, init_scale: float, bos_token_id: int = 1,
                     eos_token_id: int | list[int] = 2) -> MiniCPMConfig:
        """The muP model config of a proxy (train() applies the parametrisation)."""
        heads = width // self.head_dim
        return MiniCPMConfig(
            vocab_size=vocab_size, hidden_size=width, intermediate_size=self.mlp_ratio * width,
            num_hidden_layers=self.depth, num_attention_heads=heads, num_key_value_heads=heads,
            max_position_embeddings=max(self.seq_len, self.sb_seq_len), scale_emb=12, scale_depth=1.4,
            dim_model_base=self.dim_model_base, initializer_range=init_scale, tie_word_embeddings=True,
            bos_token_id=bos_token_id, eos_token_id=eos_token_id)


# ---- data and metrics --------------------------------------------------------------------------------

@dataclass
class TunnelData:
    """What every run trains and is scored on. `source` identifies it in runs.jsonl (reuse check)."""

    train: PackedDataset
    val: PackedDataset
    sb: PackedConversations
    vocab_size: int
    bos_token_id: int = 1
    eos_token_id: int | list[int] = 2
    source: dict[str, Any] = field(default_factory=dict)


def scalingbench_set(conversations: Sequence[list[dict]], tokenizer, seq_len: int, limit: int | None = None,
                     seed: int = 0, score_im_end: bool = False) -> PackedConversations:
    """Held-out chat conversations -> packed rows whose targets are exactly the assistant answers (the SFT
    loss mask of sft_data.encode_conversation, minus the closing <|im_end|> unless score_im_end), each
    conversation its own segment. `limit`: a seeded random subset, in file order."""
    index = np.arange(len(conversations))
    if limit is not None and limit < len(index):
        index = np.sort(np.random.default_rng(seed).choice(len(index), size=limit, replace=False))
    im_end = tokenizer.token_to_id(IM_END)
    examples = []
    for i in index:
        ids, trained = encode_conversation(tokenizer, conversations[i])
        if not score_im_end:
            trained = [t and tok != im_end for tok, t in zip(ids, trained)]
        examples.append((ids, trained))
    packed = PackedConversations.build(examples, seq_len, pad_id=im_end)
    if len(packed) == 0:
        raise ValueError("the held-out instruction data has no assistant answer to score")
    return packed


def evenly_spaced(n: int, k: int) -> list[int]:
    """k indices spread over range(n) (all of them when k >= n)."""
    if k >= n:
        return list(range(n))
    return sorted({int(i) for i in np.linspace(0, n - 1, k).round()})


@torch.no_grad()
def mean_nll(module: nn.Module, data: PackedDataset, indices: Sequence[int], batch_size: int,
             device: torch.device | str = "cpu") -> float:
    """Token-weighted mean next-token NLL of a trainer.TrainModule over rows `indices` of `data`: the sum of
    the per-token CE over every target (labels != IGNORE_INDEX) / their count, as in losses.py. Packed rows
    keep their segment ids, so with the document mask on each conversation sees only itself."""
    total, count = 0.0, 0
    was_training = module.training
    module.eval()
    for s in range(0, len(indices), batch_size):
        batch = data.batch(list(indices[s:s + batch_size])).to(device)
        total += float(module(batch.input_ids, batch.labels, batch.segment_ids)[0])
        count += count_targets(batch.labels)
    module.train(was_training)
    return total / max(count, 1)


# ---- one run -----------------------------------------------------------------------------------------

def _finite(x: float | None) -> float | None:
    return x if x is not None and math.isfinite(x) else None


@dataclass
class RunResult:
    point: SweepPoint
    val_loss: float  # nan when the run diverged
    sb_loss: float
    train_loss: float  # mean train loss over the last 10% of steps
    parameters: int
    seconds: float
    losses: list[float] = field(default_factory=list)  # train loss of every step

    def to_dict(self) -> dict[str, Any]:
        return {"point": dataclasses.asdict(self.point), "val_loss": _finite(self.val_loss),
                "sb_loss": _finite(self.sb_loss), "train_loss": _finite(self.train_loss),
                "parameters": self.parameters, "seconds": round(self.seconds, 2),
                "losses": [_finite(round(x, 4) if math.isfinite(x) else x) for x in self.losses]}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RunResult:
        nan = float("nan")
        return cls(SweepPoint(**d["point"]), *(nan if d[k] is None else d[k] for k in ("val_loss", "sb_loss", "train_loss")),
                   d["parameters"], d["seconds"], [nan if x is None else x for x in d.get("losses", [])])


def run_point(point: SweepPoint, sweep: SweepConfig, data: TunnelData, work_dir: str | Path | None = None) -> RunResult:
    """Train one proxy with trainer.train and score it. The run folder train() needs (metrics.jsonl, the final
    checkpoint) is a temporary directory under `work_dir` (default: the system temp dir), deleted on return."""
    from minicpm4.train import stages
    from minicpm4.train.distributed import unwrap
    from minicpm4.train.trainer import train

    config = sweep.proxy_config(point.width, data.vocab_size, point.init_scale, data.bos_token_id, data.eos_token_id)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(dir=work_dir, prefix=".run-") as tmp:
        _, cfg = stages.pretrain(config, steps=sweep.steps, warmup_fraction=sweep.warmup_fraction,
                                 decay_fraction=sweep.decay_fraction, out_dir=tmp, lr=point.lr,
                                 micro_batch_size=point.batch_size, grad_accum=1, seq_len=sweep.seq_len,
                                 parametrization=point.parametrization, seed=point.seed, mtp_weight=0.0,
                                 dtype="float32", parallel="none", device=sweep.device, progress=False,
                                 peak_flops=1e12, keep_last=1)  # peak_flops: any value; skips the FLOP/s probe
        result = train(config, cfg, data.train, None, resume=False)
    module = unwrap(result.module)
    device = result.info.device
    val = mean_nll(module, data.val, evenly_spaced(len(data.val), sweep.val_windows), sweep.eval_batch_size, device)
    sb = mean_nll(module, data.sb, evenly_spaced(len(data.sb), len(data.sb)), sweep.eval_batch_size, device)
    tail = result.losses[-max(1, len(result.losses) // 10):]
    return RunResult(point, val, sb, float(np.mean(tail)), sum(p.numel() for p in module.model.parameters()),
                     time.perf_counter() - start, list(result.losses))


# ---- optima ------------------------------------------------------------------------------------------

def parabola_vertex(x: Sequence[float], y: Sequence[float]) -> float | None:
    """Vertex of the parabola through three points (x increasing), clamped to [x0, x2]; None if not convex."""
    a, b, _ = np.polyfit(np.asarray(x, float), np.asarray(y, float), 2)
    if not a > 0:
        return None
    return float(min(max(-b / (2 * a), x[0]), x[-1]))


def lr_optimum(lrs: Sequence[float], losses: Sequence[float]) -> tuple[int | None, float | None]:
    """(argmin index, parabola-fit LR) of a loss-vs-LR curve (lrs increasing). Non-finite losses (diverged
    runs) never win; the fit uses log2 LR and needs an interior argmin with finite neighbours."""
    y = np.array([v if math.isfinite(v) else np.inf for v in losses])
    if not np.isfinite(y).any():
        return None, None
    i = int(np.argmin(y))
    if 0 < i < len(y) - 1 and np.isfinite(y[i - 1:i + 2]).all():
        vertex = parabola_vertex([math.log2(v) for v in lrs[i - 1:i + 2]], y[i - 1:i + 2])
        return i, None if vertex is None else 2.0 ** vertex
    return i, None


@dataclass(frozen=True)
class Optimum:
    parametrization: str
    width: int
    init_scale: float
    batch_size: int
    metric: str
    lr: float | None  # argmin on the grid (seed-averaged losses); None when every run diverged
    loss: float | None  # the curve's value there
    lr_fit: float | None  # parabola vertex in log2 LR; None when the argmin is at the grid's edge (or not convex)
    edge: str = ""  # "low" / "high" when the argmin is the smallest / largest LR: the true optimum may lie beyond

    @property
    def log2_lr(self) -> float | None:
        """Best estimate: the fit when there is one, else the argmin."""
        lr = self.lr_fit if self.lr_fit is not None else self.lr
        return None if lr is None else math.log2(lr)


def curves(results: Sequence[RunResult], metric: str) -> dict[tuple, tuple[list[float], list[float]]]:
    """curve key -> (LRs ascending, seed-mean metric; nan when any seed diverged)."""
    by: dict[tuple, dict[float, list[float]]] = {}
    for r in results:
        by.setdefault(r.point.curve, {}).setdefault(r.point.lr, []).append(getattr(r, metric))
    out = {}
    for key, per_lr in by.items():
        lrs = sorted(per_lr)
        out[key] = (lrs, [float(np.mean(per_lr[lr])) for lr in lrs])
    return out


def find_optima(results: Sequence[RunResult], metric: str) -> list[Optimum]:
    out = []
    for key, (lrs, ys) in sorted(curves(results, metric).items()):
        i, fit = lr_optimum(lrs, ys)
        edge = "" if i is None or len(lrs) == 1 else ("low" if i == 0 else "high" if i == len(lrs) - 1 else "")
        out.append(Optimum(*key, metric, None if i is None else lrs[i], None if i is None else ys[i], fit, edge))
    return out


def transfer(optima: Sequence[Optimum]) -> list[dict[str, Any]]:
    """Per (parametrisation, init, batch size, metric): log2 LR* by width, its spread (octaves) and the slope of
    log2 LR* on log2 width (0 = the optimum transfers; -1 = it halves with every doubling of width)."""
    groups: dict[tuple, list[Optimum]] = {}
    for o in optima:
        groups.setdefault((o.parametrization, o.init_scale, o.batch_size, o.metric), []).append(o)
    rows = []
    for (p, init, bs, metric), os_ in groups.items():
        pts = sorted((o.width, o.log2_lr) for o in os_ if o.log2_lr is not None)
        row = {"parametrization": p, "init_scale": init, "batch_size": bs, "metric": metric,
               "log2_lr_by_width": {str(w): round(v, 3) for w, v in pts}, "spread_octaves": None, "slope": None,
               "edges": sorted({f"{o.width}:{o.edge}" for o in os_ if o.edge})}
        if len(pts) >= 2:
            w, v = np.log2([p_[0] for p_ in pts]), np.array([p_[1] for p_ in pts])
            row["spread_octaves"] = round(float(v.max() - v.min()), 3)
            row["slope"] = round(float(np.polyfit(w, v, 1)[0]), 3)
        rows.append(row)
    return rows


# ---- the sweep ---------------------------------------------------------------------------------------

@dataclass
class SweepReport:
    sweep: SweepConfig
    results: list[RunResult]
    command: str = ""
    machine: dict[str, Any] = field(default_factory=dict)
    wall_seconds: float = 0.0
    source: dict[str, Any] = field(default_factory=dict)

    def optima(self, metric: str = "val_loss") -> list[Optimum]:
        return find_optima(self.results, metric)

    def to_dict(self) -> dict[str, Any]:
        optima = [o for m in METRICS for o in self.optima(m)]
        return {"command": self.command, "machine": self.machine,
                "run_seconds_total": round(sum(r.seconds for r in self.results), 1),
                "wall_seconds_this_invocation": round(self.wall_seconds, 1),
                "sweep": dataclasses.asdict(self.sweep), "data": self.source,
                "optima": [{**dataclasses.asdict(o), "log2_lr": o.log2_lr} for o in optima],
                "transfer": transfer(optima), "runs": [r.to_dict() for r in self.results]}


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info() -> dict[str, Any]:
    return {"platform": platform.platform(), "processor": _cpu_name(), "cpus": os.cpu_count(),
            "cpu_capability": torch.backends.cpu.get_cpu_capability(), "torch": torch.__version__,
            "threads": torch.get_num_threads(), "niceness": os.nice(0),
            "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None}


def _load_runs(path: Path, settings: dict[str, Any]) -> dict[SweepPoint, RunResult]:
    done: dict[SweepPoint, RunResult] = {}
    if not path.is_file():
        return done
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:  # a line cut short by a kill
            continue
        if record.get("settings") == settings:
            r = RunResult.from_dict(record["result"])
            done[r.point] = r
    return done


def run_sweep(sweep: SweepConfig, data: TunnelData, out: str | Path, command: str = "", reuse: bool = True,
              log: Callable[[str], None] = print) -> SweepReport:
    """Run every point not already in OUT/runs.jsonl with the same settings, then write the report files."""
    sweep.validate()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    settings = json.loads(json.dumps({**sweep.settings(), "data": data.source}))  # JSON-normalised, to compare
    runs_path = out / "runs.jsonl"
    done = _load_runs(runs_path, settings) if reuse else {}
    points = sweep.points()
    todo = [p for p in points if p not in done]
    if len(todo) < len(points):
        log(f"tunnel: reusing {len(points) - len(todo)} finished runs from {runs_path}")
    start = time.perf_counter()
    for n, point in enumerate(todo, 1):
        r = run_point(point, sweep, data)  # its run folder lives in the system temp dir, never in OUT
        done[point] = r
        with runs_path.open("a", encoding="utf-8") as f:
            f.write(json.dumps({"settings": settings, "result": r.to_dict()}) + "\n")
        log(f"[{n}/{len(todo)}] {point.label()}: val {r.val_loss:.4f}  sb {r.sb_loss:.4f}  "
            f"({r.seconds:.1f} s, {(time.perf_counter() - start) / 60:.1f} min)")
    report = SweepReport(sweep, [done[p] for p in points], command, machine_info(), time.perf_counter() - start,
                         data.source)
    write_report(report, out)
    return report


# ---- outputs -----------------------------------------------------------------------------------------

def _lr2(lr: float | None, edge: str = "") -> str:
    if lr is None:
        return "–"
    return {"low": "≤ ", "high": "≥ "}.get(edge, "") + f"{math.log2(lr):.2f}"


def _num(x: float | None) -> str:
    return "div." if x is None or not math.isfinite(x) else f"{x:.4f}"


def markdown_table(report: SweepReport) -> str:
    sw = report.sweep
    params = {r.point.width: r.parameters for r in report.results}
    opt = {(o.metric, o.parametrization, o.width, o.init_scale, o.batch_size): o for m in METRICS for o in report.optima(m)}
    lines = [
        "# ModelTunnel: learning-rate optimum per width, muP vs standard parametrisation", "",
        f"command: `{report.command}`" if report.command else "", "",
        f"machine: {report.machine.get('processor', '?')} ({report.machine.get('cpu_capability', '?')}), torch "
        f"{report.machine.get('torch', '?')}, {report.machine.get('threads', '?')} thread(s) of {report.machine.get('cpus', '?')} "
        f"CPUs, niceness {report.machine.get('niceness', '?')}; {len(report.results)} runs, "
        f"{sum(r.seconds for r in report.results) / 60:.1f} min of training + evaluation in total", "",
        f"proxies: depth {sw.depth}, head_dim {sw.head_dim}, MLP {sw.mlp_ratio}x, MHA, tied embeddings, "
        f"dim_model_base {sw.dim_model_base}; {sw.steps} steps x batch {'/'.join(map(str, sw.batch_sizes))} x seq "
        f"{sw.seq_len} (fp32, stages.pretrain recipe: AdamW (0.9, 0.95), wd 0.1, clip 1.0, WSD warmup "
        f"{sw.warmup_fraction:g} / exp decay {sw.decay_fraction:g} of the steps to 0.1x; no MTP); init std "
        f"{'/'.join(f'{v:g}' for v in sw.init_scales)}; seeds {'/'.join(map(str, sw.seeds))}", "",
        f"metrics: val = {METRICS['val_loss']} on {sw.val_windows} windows of the val split; sb = "
        f"{METRICS['sb_loss']} ({sw.sb_conversations} held-out conversations, answer tokens only"
        f"{'' if not sw.sb_score_im_end else ' + <|im_end|>'}). LR* in log2 (LR = muP base LR; SP: every group). "
        "grid = argmin on the grid (≤ / ≥: at the grid's edge), fit = parabola vertex in log2 LR through the "
        "argmin and its neighbours.", "",
        "## LR optimum per width", "",
        "| parametrisation | width | width_mult | params | init | batch | val LR* grid | val LR* fit | val loss at LR* "
        "| sb LR* grid | sb LR* fit | sb loss at LR* |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for o in report.optima("val_loss"):
        s = opt[("sb_loss", o.parametrization, o.width, o.init_scale, o.batch_size)]
        lines.append(f"| {PARAM_LABELS[o.parametrization]} | {o.width} | {o.width / sw.dim_model_base:g} | "
                     f"{params[o.width] / 1e6:.2f}M | {o.init_scale:g} | {o.batch_size} | {_lr2(o.lr, o.edge)} | "
                     f"{_lr2(o.lr_fit)} | {_num(o.loss)} | {_lr2(s.lr, s.edge)} | {_lr2(s.lr_fit)} | {_num(s.loss)} |")
    lines += ["", "## Does the optimum transfer across widths?", "",
              "slope = least-squares d log2 LR* / d log2 width (0: transfers; -1: halves per doubling); spread = "
              "max - min of log2 LR* over widths (fit where there is one, else grid argmin).", "",
              "| parametrisation | metric | init | batch | log2 LR* by width | spread (octaves) | slope | optimum at grid edge |",
              "|---|---|---|---|---|---|---|---|"]
    for t in transfer([o for m in METRICS for o in report.optima(m)]):
        by = ", ".join(f"{w}: {v:.2f}" for w, v in t["log2_lr_by_width"].items())
        lines.append(f"| {PARAM_LABELS[t['parametrization']]} | {t['metric'].split('_')[0]} | {t['init_scale']:g} | "
                     f"{t['batch_size']} | {by} | {t['spread_octaves'] if t['spread_octaves'] is not None else '–'} | "
                     f"{t['slope'] if t['slope'] is not None else '–'} | {', '.join(t['edges']) or 'no'} |")
    for metric, title in METRICS.items():
        lrs = sorted(sw.lrs)
        lines += ["", f"## Full grid: {title} (seed mean; div. = diverged / non-finite)", "",
                  "| parametrisation | width | init | batch | " + " | ".join(f"2^{math.log2(v):g}" for v in lrs) + " |",
                  "|---|---|---|---|" + "---|" * len(lrs)]
        for (p, w, init, bs), (xs, ys) in sorted(curves(report.results, metric).items()):
            row = dict(zip(xs, ys))
            best = opt[(metric, p, w, init, bs)].lr
            cells = [("**" + _num(row[v]) + "**") if v == best else _num(row[v]) if v in row else "" for v in lrs]
            lines.append(f"| {PARAM_LABELS[p]} | {w} | {init:g} | {bs} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(report: SweepReport, path: str | Path, init_scale: float | None = None, batch_size: int | None = None) -> Path | None:
    """Loss vs log2 LR, one curve per width: columns = parametrisations, rows = val LM loss / sb indicator.
    The star marks each curve's argmin, the dashed line the parabola fit. None without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    sw = report.sweep
    init_scale = sw.init_scales[0] if init_scale is None else init_scale
    batch_size = sw.batch_sizes[0] if batch_size is None else batch_size
    params, widths = sw.parametrizations, sorted(sw.widths)
    colors = plt.get_cmap("viridis")(np.linspace(0.0, 0.85, len(widths)))
    fig, axes = plt.subplots(len(METRICS), len(params), figsize=(5.2 * len(params), 3.8 * len(METRICS)),
                             squeeze=False, sharex=True)
    for row, metric in enumerate(METRICS):
        cs = curves(report.results, metric)
        optima = {(o.parametrization, o.width): o for o in report.optima(metric)
                  if o.init_scale == init_scale and o.batch_size == batch_size}
        finite = [y for (p, w, i, b), (_, ys) in cs.items() if i == init_scale and b == batch_size
                  for y in ys if math.isfinite(y)]
        for col, p in enumerate(params):
            ax = axes[row][col]
            for color, w in zip(colors, widths):
                if (p, w, init_scale, batch_size) not in cs:
                    continue
                xs, ys = cs[(p, w, init_scale, batch_size)]
                lx = np.log2(xs)
                ax.plot(lx, ys, "o-", color=color, ms=3.5, lw=1.3, label=f"width {w} (x{w / sw.dim_model_base:g})")
                o = optima.get((p, w))
                if o is not None and o.lr is not None:
                    ax.plot(math.log2(o.lr), o.loss, "*", color=color, ms=13, mec="black", mew=0.6, zorder=5)
                    if o.lr_fit is not None:
                        ax.axvline(math.log2(o.lr_fit), color=color, ls="--", lw=0.9, alpha=0.8)
            if finite:  # zoom on the interesting part: diverged / far-off runs leave the frame
                lo = min(finite)
                ax.set_ylim(lo - 0.05 * max(0.2, min(max(finite), lo + 2.5) - lo), min(max(finite), lo + 2.5) + 0.05)
            ax.set_title(f"{PARAM_LABELS[p]}: {METRICS[metric]}", fontsize=10)
            ax.grid(alpha=0.3)
            if row == len(METRICS) - 1:
                ax.set_xlabel("log2 learning rate" + (" (muP base LR)" if p == "mup" else ""))
            if col == 0:
                ax.set_ylabel("nats / token")
            if row == 0:
                ax.legend(fontsize=8)
    fig.suptitle(f"ModelTunnel: {sw.steps} steps x {batch_size} x {sw.seq_len} tokens, depth {sw.depth}, "
                 f"init {init_scale:g}  (star: argmin, dashed: parabola fit)", fontsize=10)
    fig.tight_layout()
    path = Path(path)
    with atomic_path(path) as tmp:  # the temp name ends in .png: savefig takes the format from it
        fig.savefig(tmp, dpi=110)
    plt.close(fig)
    return path


def write_report(report: SweepReport, out: str | Path) -> dict[str, Path]:
    """results.json, tunnel.md and tunnel.png (plus tunnel_init{X}_bs{B}.png per extra init/batch combination)."""
    out = Path(out)
    files = {"json": out / "results.json", "table": out / "tunnel.md"}
    write_text_atomic(files["json"], json.dumps(report.to_dict(), indent=1) + "\n")
    write_text_atomic(files["table"], markdown_table(report))
    combos = [(i, b) for i in report.sweep.init_scales for b in report.sweep.batch_sizes]
    for k, (i, b) in enumerate(combos):
        name = "tunnel.png" if k == 0 else f"tunnel_init{i:g}_bs{b}.png"
        png = plot(report, out / name, i, b)
        if png is not None:
            files.setdefault("plot", png)
    return files

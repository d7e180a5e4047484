"""Training metrics: FLOPs per token, MFU, a metrics JSONL that survives resumes, a loss-curve PNG, and a
progress display (tqdm when installed, plain lines otherwise). Shared by every stage."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

from minicpm4.config import MiniCPMConfig
from minicpm4.io import atomic_path, write_text_atomic


def matmul_params(config: MiniCPMConfig) -> tuple[int, int]:
    """(parameters of one decoder layer's matmuls, parameters of the output head matmul)."""
    h, q, kv = config.hidden_size, config.num_attention_heads * config.head_dim, config.num_key_value_heads * config.head_dim
    layer = 2 * h * q + 2 * h * kv + 3 * h * config.intermediate_size
    return layer, config.vocab_size * h


def flops_per_token(config: MiniCPMConfig, seq_len: int, mtp: bool = False) -> float:
    """Training FLOPs per token (forward + backward), PaLM appendix B convention:
    6 x (matmul parameters, the output head included, the embedding lookup excluded)
    + 12 x layers x seq_len x (heads x head_dim) for attention scores and values (counts the full T x T
    matrix, as PaLM/nanoGPT/torchtitan do; causal masking makes the true work about half of that term).
    The MTP head adds its projection, one layer and a second output-head pass."""
    layer, head = matmul_params(config)
    attn_dim = config.num_attention_heads * config.head_dim
    n = config.num_hidden_layers * layer + head
    layers = config.num_hidden_layers
    if mtp:
        n += 2 * config.hidden_size**2 + layer + head
        layers += 1
    return 6.0 * n + 12.0 * layers * seq_len * attn_dim


def measure_peak_flops(dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu", max_n: int = 2048,
                       seconds: float = 1.0) -> float:
    """Achievable matmul FLOP/s on this device: the best of repeated n x n x n matmuls (our 'peak' for MFU).
    n doubles from 256 while a matmul takes under 50 ms, so a slow dtype (bf16 without hardware support)
    does not take minutes to measure."""
    def timed(a: torch.Tensor, b: torch.Tensor) -> float:
        if torch.device(device).type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        a @ b
        if torch.device(device).type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t

    n = 256
    while True:
        a = torch.randn(n, n, device=device).to(dtype)
        b = torch.randn(n, n, device=device).to(dtype)
        timed(a, b)  # warm-up
        dt = timed(a, b)
        if dt > 0.05 or n >= max_n:
            break
        n *= 2
    best = 2 * n**3 / dt
    deadline = time.perf_counter() + seconds
    for _ in range(50):
        if time.perf_counter() > deadline:
            break
        best = max(best, 2 * n**3 / timed(a, b))
    return best


class MetricsLog:
    """metrics.jsonl: one JSON object per line ({"step": ..., ...}). On resume, lines past the resumed
    step (written by the killed run after its last checkpoint) are dropped, so the file reads as one run."""

    def __init__(self, path: str | Path, enabled: bool = True) -> None:
        self.path, self.enabled = Path(path), enabled

    def truncate_after(self, step: int) -> None:
        if not self.enabled or not self.path.is_file():
            return
        keep = [line for line in self.path.read_text(encoding="utf-8").splitlines()
                if line.strip() and json.loads(line).get("step", 0) <= step]
        write_text_atomic(self.path, "".join(line + "\n" for line in keep))

    def reset(self) -> None:
        if self.enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            write_text_atomic(self.path, "")

    def write(self, record: dict[str, Any]) -> None:
        if self.enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with self.path.open("a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    path = Path(path)
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def pyplot():
    """matplotlib.pyplot on the Agg backend (no display needed), or None when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def save_png(fig, png_path: str | Path) -> Path:
    """Write the figure atomically and release it."""
    plt = pyplot()
    png_path = Path(png_path)
    with atomic_path(png_path) as tmp:  # the temp name ends in .png: savefig takes the format from it
        fig.savefig(tmp, dpi=100, bbox_inches="tight")
    plt.close(fig)
    return png_path


def plot_loss(metrics_path: str | Path, png_path: str | Path, title: str = "") -> Path | None:
    """Loss curve (train loss per step, validation loss where evaluated) as a PNG; None without matplotlib."""
    plt = pyplot()
    if plt is None:
        return None
    records = read_metrics(metrics_path)
    train = [(r["step"], r["loss"]) for r in records if "loss" in r]
    val = [(r["step"], r["val_loss"]) for r in records if "val_loss" in r]
    if not train and not val:
        return None
    fig, ax = plt.subplots(figsize=(7, 4))
    if train:
        ax.plot(*zip(*train), label="train loss", linewidth=1)
    if val:
        ax.plot(*zip(*val), "o-", label="validation loss")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    return save_png(fig, png_path)


class Progress:
    """tqdm bar when tqdm is importable and enabled, else one plain line per logged step (stderr)."""

    def __init__(self, total: int, initial: int, enabled: bool, desc: str) -> None:
        self.enabled, self.total, self.bar = enabled, total, None
        if enabled:
            try:
                from tqdm.auto import tqdm

                self.bar = tqdm(total=total, initial=initial, desc=desc, dynamic_ncols=True, file=sys.stderr)
            except ImportError:
                pass

    def update(self, step: int, fields: dict[str, str]) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.set_postfix(fields, refresh=False)
            self.bar.update(step - self.bar.n)
        else:
            print(f"step {step}/{self.total} " + " ".join(f"{k} {v}" for k, v in fields.items()), file=sys.stderr, flush=True)

    def note(self, text: str) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(text, file=sys.stderr)
        else:
            print(text, file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()

"""The RL run's curves from metrics.jsonl: reward and accuracy, response length, clip fraction and KL, and
rollout vs update seconds per step (matplotlib, Agg; skipped when matplotlib is missing)."""

from __future__ import annotations

from pathlib import Path

from minicpm4.train.metrics import pyplot, read_metrics, save_png

PANELS = (("reward", "accuracy"), ("response_tokens",), ("clip_fraction", "kl"), ("rollout_s", "update_s"))


def plot_run(metrics_path: str | Path, png_path: str | Path, title: str = "") -> Path | None:
    plt = pyplot()
    records = read_metrics(metrics_path)
    if plt is None or not records:
        return None
    fig, axes = plt.subplots(1, len(PANELS), figsize=(4 * len(PANELS), 3.2))
    for ax, keys in zip(axes, PANELS):
        for key in keys:
            pts = [(r["step"], r[key]) for r in records if r.get(key) is not None]
            if pts:
                ax.plot(*zip(*pts), label=key, marker=".", linewidth=1)
        ax.set_xlabel("step")
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.suptitle(title or str(metrics_path))
    fig.tight_layout()
    return save_png(fig, png_path)

"""Shared helpers for the benchmarks: machine facts, medians/percentiles, results JSON.

    from common import machine_info, median, percentile, write_results   # scripts run as benchmarks/X.py

Every benchmark records the same machine facts (DESIGN "Measuring": report on which machine, with
the command that reproduces it), so a number read later can be matched to the hardware it ran on.
"""

from __future__ import annotations

import json
import math
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

RESULTS_DIR = Path(__file__).resolve().parent / "results"
CPU_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16")


def _lscpu() -> dict[str, str]:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return {}
    info = {}
    for line in out.splitlines():
        key, sep, value = line.partition(":")
        if sep:
            info[key.strip()] = value.strip()
    return info


def cpu_flags() -> set[str]:
    """The CPU's feature flags (lscpu, else /proc/cpuinfo); empty where neither is readable."""
    flags = _lscpu().get("Flags")
    if flags is None:
        try:
            text = Path("/proc/cpuinfo").read_text()
        except OSError:
            return set()
        flags = next((line.partition(":")[2] for line in text.splitlines() if line.startswith("flags")), "")
    return set(flags.split())


def machine_info(threads: int | None = None) -> dict:
    """CPU model and the flags that decide fp32/bf16 speed, core count, torch version and threads."""
    import torch

    lscpu = _lscpu()
    flags = cpu_flags()
    return {
        "cpu": lscpu.get("Model name") or platform.processor() or platform.machine(),
        "flags": {f: f in flags for f in CPU_FLAGS},
        "cpu_count": os.cpu_count(),
        "threads": threads if threads is not None else torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
    }


def command_line(argv: Sequence[str] | None = None) -> str:
    """The command that reproduces this run (as typed from the repository root)."""
    args = list(sys.argv[1:] if argv is None else argv)
    return shlex.join([".venv/bin/python", os.path.relpath(sys.argv[0]) if sys.argv[0] else "?", *args])


def median(values: Iterable[float]) -> float:
    """Median, ignoring None/NaN; NaN when nothing is left (a system that did not run)."""
    vals = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    return statistics.median(vals) if vals else float("nan")


def percentile(values: Iterable[float], q: float) -> float:
    """q-th percentile (0..100), linear interpolation between order statistics (numpy's default)."""
    vals = sorted(v for v in values if v is not None and not math.isnan(v))
    if not vals:
        return float("nan")
    pos = (len(vals) - 1) * q / 100.0
    lo, hi = math.floor(pos), math.ceil(pos)
    return vals[lo] + (vals[hi] - vals[lo]) * (pos - lo)


def _jsonable(obj):
    if isinstance(obj, float) and not math.isfinite(obj):
        return None  # strict JSON has no NaN/inf
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    return obj


def write_results(path: str | Path, payload: dict) -> Path:
    """Write payload as indented JSON (NaN -> null), creating the folder; atomically replaces the file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(_jsonable(payload), indent=2) + "\n")
    os.replace(tmp, path)
    return path


def fmt(value: float | None, digits: int = 1) -> str:
    """A table cell: 'n/a' for a missing or NaN number."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return f"{value:,.{digits}f}"


@contextmanager
def workdir_or_temp(workdir: str | None, prefix: str) -> Iterator[Path]:
    """--workdir if given (created, kept: checkpoints and GGUF files are reused by the next run), else a
    temporary folder removed afterwards."""
    if workdir is not None:
        path = Path(workdir)
        path.mkdir(parents=True, exist_ok=True)
        yield path
        return
    with tempfile.TemporaryDirectory(prefix=prefix) as tmp:
        yield Path(tmp)


def publish(result: dict, out: str | Path, draw=None, plot_path: str | Path | None = None) -> Path:
    """Print result["table"], write the JSON to `out`, and draw(png_path) -> written path or None when given
    (png_path: plot_path, else `out` with .png)."""
    print()
    print(result["table"])
    path = write_results(out, result)
    png = draw(Path(plot_path) if plot_path else path.with_suffix(".png")) if draw is not None else None
    print(f"wrote {path}" + (f" and {png}" if png else ""))
    return path


@dataclass
class TimedRequest:
    """One request's clock (time.perf_counter() seconds): when it was submitted, its first and last token."""

    tokens: int
    arrival: float
    first_token: float
    finished: float

    @property
    def ttft(self) -> float:
        return self.first_token - self.arrival

    @property
    def per_token(self) -> float:
        return (self.finished - self.first_token) / (self.tokens - 1) if self.tokens > 1 else float("nan")


def pyplot():
    """matplotlib.pyplot on the Agg backend, or None (with a note) when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot", file=sys.stderr)
        return None
    return plt


def save_figure(fig, path: Path, title: str) -> Path:
    """Title, tighten, write `fig` to path (folders made) and release it."""
    import matplotlib.pyplot as plt

    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path

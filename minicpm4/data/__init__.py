"""The data side of training: an offline English corpus from Debian text packages (sources, corpus),
a byte-level BPE tokenizer trained on it (tokenizer_train), token shards for pretraining (shards) and a
chat instruction set with held-out keys for SFT (sft_synth). `minicpm4 data ...` drives them (cli).

This file also holds the one progress-bar helper the builders share.
"""

from __future__ import annotations

import sys
import time
from typing import Any, Iterable, Iterator


class _TextProgress:
    """A minimal stand-in for tqdm (not a dependency): one stderr line at most every 2 seconds."""

    def __init__(self, iterable: Iterable | None, total: int | None, desc: str, unit: str, disable: bool) -> None:
        self.iterable, self.total, self.desc, self.unit, self.disable = iterable, total, desc, unit, disable
        self.n = 0
        self._start = self._last = time.monotonic()

    def __iter__(self) -> Iterator:
        assert self.iterable is not None, "iterate only over a progress bar made with an iterable"
        for item in self.iterable:
            yield item
            self.update(1)
        self.close()

    def update(self, n: int = 1) -> None:
        self.n += n
        if not self.disable and time.monotonic() - self._last >= 2.0:
            self._print()

    def _print(self) -> None:
        self._last = time.monotonic()
        of = f"/{self.total}" if self.total else ""
        rate = self.n / max(self._last - self._start, 1e-9)
        print(f"{self.desc}: {self.n}{of} {self.unit} ({rate:,.0f} {self.unit}/s)", file=sys.stderr, flush=True)

    def close(self) -> None:
        if not self.disable and self.n:
            self._print()
        self.disable = True  # print the final line once

    def __enter__(self) -> _TextProgress:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def progress(iterable: Iterable | None = None, *, total: int | None = None, desc: str = "", unit: str = "it",
             disable: bool = False) -> Any:
    """tqdm when it is installed, else a plain-text fallback with the same update/close/iterate API."""
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return _TextProgress(iterable, total, desc, unit, disable)
    # Redrawn every 0.1 s on a terminal; in a log file each redraw is a new chunk, so far fewer.
    interval = 0.1 if sys.stderr.isatty() else 5.0
    return tqdm(iterable, total=total, desc=desc, unit=unit, disable=disable, mininterval=interval,
                unit_scale=unit in ("B", "tok"))

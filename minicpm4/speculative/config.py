"""Speculative decoding settings: one typed value the engine, `generate`, `chat` and `serve` share."""

from __future__ import annotations

from dataclasses import dataclass

from minicpm4.speculative.tree import TreeShape

MODES = ("eagle", "chain")


@dataclass(frozen=True)
class SpeculativeConfig:
    # "eagle": an EAGLE-2 draft head folder (MiniCPM4 Eagle format) drafting dynamic trees;
    # "chain": a separate small MiniCPM model folder drafting one greedy chain of tree_size - 1 tokens.
    draft: str
    mode: str = "eagle"
    shape: TreeShape = TreeShape()
    # FR-Spec: a `freq_{N}.pt` file, a folder of them, or our frspec.json (data/frspec.py); frspec_size picks N
    # in a folder. None: the draft's head is the full vocabulary.
    frspec: str | None = None
    frspec_size: int | None = None
    window: int = 1024  # the EAGLE draft's sliding attention window (CPM.cu --spec-window-size)

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"SpeculativeConfig.mode must be one of {MODES}, got {self.mode!r}")
        if isinstance(self.window, bool) or not isinstance(self.window, int) or self.window < 1:
            raise ValueError(f"SpeculativeConfig.window must be a positive integer, got {self.window!r}")
        if self.frspec_size is not None and self.frspec_size < 1:
            raise ValueError(f"SpeculativeConfig.frspec_size must be positive, got {self.frspec_size!r}")

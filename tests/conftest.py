"""Fixtures shared across test files."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch


@pytest.fixture(scope="module")
def one_thread():
    """One torch CPU thread for a module (request it with `pytestmark = pytest.mark.usefixtures("one_thread")`):
    these shapes are tiny, and a second OpenMP thread only adds barrier waits (10x slower on a busy 2-core box)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _save_hub_folder(path: Path, cfg, seed: int = 5) -> Path:
    import minicpm4
    from minicpm4.api import BUNDLED_TOKENIZER_DIR
    from minicpm4.model import build_model

    minicpm4.save_model(build_model(cfg, seed=seed), path)
    for f in BUNDLED_TOKENIZER_DIR.iterdir():
        if f.name.startswith("tokenizer") or f.name in ("special_tokens_map.json", "added_tokens.json"):
            shutil.copy(f, path / f.name)
    return path


@pytest.fixture(scope="session")
def hub_folder():
    """`hub_folder(path, cfg, seed=5)` writes a MiniCPM4 folder laid out as on the Hub (config, safetensors,
    the bundled tokenizer files) from a randomly initialised model of cfg; returns path."""
    return _save_hub_folder


@pytest.fixture(scope="module")
def bwrap():
    """The bubblewrap sandbox (RL code rewards, synthesis code checks): skips, saying why, where it cannot run."""
    from minicpm4.train.rl.sandbox import SandboxUnavailable, check_sandbox

    try:
        check_sandbox()
    except SandboxUnavailable as e:
        pytest.skip(str(e))

"""Shared by the RL tests: the sandbox fixture (skips, saying why, where bubblewrap cannot run)."""

from __future__ import annotations

import pytest

from minicpm4.train.rl.sandbox import SandboxUnavailable, check_sandbox


@pytest.fixture(scope="module")
def bwrap():
    try:
        check_sandbox()
    except SandboxUnavailable as e:
        pytest.skip(str(e))

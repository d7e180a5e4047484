"""Training checkpoints: atomic, resumable bit-identically, and reshardable to another world size.

A checkpoint is a folder RUN/checkpoints/step_00000100/ holding
  model + optimizer   torch.distributed.checkpoint (DCP) files, written by every rank (each its own shard
                      under FSDP2); the state dicts come from get_state_dict(), whose keys do not depend on
                      DDP/FSDP wrapping, so a checkpoint written by N FSDP ranks loads on M ranks, under DDP,
                      or in a single process (DCP reshards on load)
  rng_rank00000.pt    torch (+cuda), numpy and python RNG states of each rank
  train_state.json    step, data position (samples consumed), world size, model and train configs
It is written into a hidden sibling `.step_00000100.partial`, fsynced, then renamed into place by rank 0,
after which RUN/checkpoints/latest names it (temp file + rename). A kill at any moment leaves the
previous checkpoint intact and `latest` pointing at a complete folder. The newest `keep_last` are kept.
All ranks must see the same filesystem (as DCP requires).
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.distributed.checkpoint as dcp
import torch.nn as nn
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from minicpm4.io import fsync_files, write_text_atomic
from minicpm4.train.distributed import DistInfo, barrier, broadcast_object

STEP_DIR = re.compile(r"step_(\d{8})")
STATE_FILE = "train_state.json"
LATEST = "latest"


@dataclass
class TrainState:
    step: int  # optimizer steps done
    samples: int  # data position: global samples consumed
    world_size: int
    model_config: dict[str, Any]
    train_config: dict[str, Any]
    extra: dict[str, Any]


def checkpoint_root(out_dir: str | Path) -> Path:
    return Path(out_dir) / "checkpoints"


def step_dir(out_dir: str | Path, step: int) -> Path:
    return checkpoint_root(out_dir) / f"step_{step:08d}"


def list_checkpoints(out_dir: str | Path) -> list[Path]:
    """Complete checkpoints (train_state.json present), oldest first."""
    root = checkpoint_root(out_dir)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if STEP_DIR.fullmatch(p.name) and (p / STATE_FILE).is_file()]
    return sorted(found, key=lambda p: p.name)


def latest_checkpoint(out_dir: str | Path) -> Path | None:
    root = checkpoint_root(out_dir)
    pointer = root / LATEST
    if pointer.is_file():
        path = root / pointer.read_text(encoding="utf-8").strip()
        if (path / STATE_FILE).is_file():
            return path
    found = list_checkpoints(out_dir)
    return found[-1] if found else None


def read_train_state(path: str | Path) -> TrainState:
    return TrainState(**json.loads((Path(path) / STATE_FILE).read_text(encoding="utf-8")))


def _rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


@contextmanager
def _quiet_single_process():
    """DCP warns that it assumes a single process when no process group exists: that is the intent here."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def save_checkpoint(out_dir: str | Path, module: nn.Module, optimizer: torch.optim.Optimizer, state: TrainState,
                    info: DistInfo, keep_last: int = 3, write_extra: Callable[[Path], None] | None = None) -> Path:
    """Collective: every rank calls it. Returns the checkpoint folder. write_extra(folder): more files of this
    rank's state (e.g. RL buffers), written into the folder before it is made visible, so they land with it."""
    final = step_dir(out_dir, state.step)
    partial = final.with_name(f".{final.name}.partial")
    if info.is_main:
        shutil.rmtree(partial, ignore_errors=True)  # debris of a save that was killed
        partial.mkdir(parents=True)
    barrier(info)
    model_sd, optim_sd = get_state_dict(module, optimizer)
    with _quiet_single_process():
        dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=partial)
    torch.save(_rng_state(), partial / f"rng_rank{info.rank:05d}.pt")
    if write_extra is not None:
        write_extra(partial)
    barrier(info)
    if info.is_main:
        (partial / STATE_FILE).write_text(json.dumps(state.__dict__, indent=1) + "\n", encoding="utf-8")
        fsync_files(partial)
        if final.exists():  # the same step saved again (e.g. after a resume): replace it
            old = final.with_name(f".{final.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
            shutil.rmtree(old)
        os.replace(partial, final)
        write_text_atomic(checkpoint_root(out_dir) / LATEST, final.name + "\n")
        for stale in list_checkpoints(out_dir)[:-keep_last] if keep_last > 0 else []:
            shutil.rmtree(stale, ignore_errors=True)
    barrier(info)
    return final


def load_checkpoint(path: str | Path, module: nn.Module, optimizer: torch.optim.Optimizer | None,
                    info: DistInfo) -> TrainState:
    """Collective: restore model (+ optimizer) in place, and this rank's RNG when the world size matches."""
    path = Path(path)
    state = read_train_state(path)
    if optimizer is None:
        model_sd = get_state_dict(module, [])[0]
        with _quiet_single_process():
            dcp.load({"model": model_sd}, checkpoint_id=path)
        set_state_dict(module, [], model_state_dict=model_sd, optim_state_dict={})
    else:
        model_sd, optim_sd = get_state_dict(module, optimizer)
        sd = {"model": model_sd, "optim": optim_sd}
        with _quiet_single_process():
            dcp.load(sd, checkpoint_id=path)
        set_state_dict(module, optimizer, model_state_dict=sd["model"], optim_state_dict=sd["optim"])
    rng = path / f"rng_rank{info.rank:05d}.pt"
    if state.world_size == info.world_size and rng.is_file():
        _set_rng_state(torch.load(rng, weights_only=False))  # our own file: numpy/python states are tuples
    barrier(info)
    return state


def resolve_resume(out_dir: str | Path, resume: bool | str, info: DistInfo) -> Path | None:
    """resume=True: the latest checkpoint under out_dir (None if there is none); a path: that checkpoint."""
    if not resume:
        return None
    if isinstance(resume, (str, Path)) and not isinstance(resume, bool):
        path = Path(resume)
        if not (path / STATE_FILE).is_file():
            raise FileNotFoundError(f"{path}: not a training checkpoint (no {STATE_FILE})")
        return path
    path = latest_checkpoint(out_dir) if info.is_main else None
    return broadcast_object(path, info)

"""Atomic checkpoints and exact resume: every piece of state a run needs to continue bit for bit.

A checkpoint is a directory `step_XXXXXXXX/` holding `state.pt`. It is written under a temporary
name in the same folder, flushed to disk, then renamed: a crash leaves either the previous
checkpoints or the new one, never a half-written one.
"""
from __future__ import annotations

import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch

from common.data import UserError

STATE_FILE = "state.pt"


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_checkpoint(ckpt_dir: str | Path, step: int, state: dict, keep_last: int) -> Path:
    """Write `state` (tensors and plain Python) as checkpoint `step`, atomically; keep the last `keep_last`."""
    ckpt_dir = Path(ckpt_dir)
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    final = ckpt_dir / f"step_{step:08d}"
    tmp = ckpt_dir / f".tmp_step_{step:08d}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    with open(tmp / STATE_FILE, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    if final.exists():  # a re-run of the same step after a resume: replace it, still atomically per file
        shutil.rmtree(final)
    os.rename(tmp, final)
    _fsync_dir(ckpt_dir)
    for old in list_checkpoints(ckpt_dir)[:-keep_last] if keep_last > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(ckpt_dir: str | Path) -> list[Path]:
    ckpt_dir = Path(ckpt_dir)
    if not ckpt_dir.is_dir():
        return []
    return sorted(p for p in ckpt_dir.glob("step_*") if (p / STATE_FILE).is_file())


def load_checkpoint(path: str | Path) -> tuple[dict, Path]:
    """Load the newest checkpoint under a run directory, its checkpoints/ folder, or one step_ folder."""
    path = Path(path)
    candidates = [path] if (path / STATE_FILE).is_file() else list_checkpoints(path / "checkpoints") or list_checkpoints(path)
    if not candidates:
        raise UserError(f"--resume {str(path)!r} is not a checkpoint: expected a run directory with "
                        f"checkpoints/step_*/{STATE_FILE}, a checkpoints/ folder, or one step_* folder. "
                        f"Runs write checkpoints only with --save-every N.")
    ckpt = candidates[-1]
    try:
        state = torch.load(ckpt / STATE_FILE, map_location="cpu", weights_only=False)
    except Exception as e:  # a corrupt file is a user-facing problem, name it
        raise UserError(f"checkpoint {str(ckpt)!r} could not be read ({type(e).__name__}: {e}).") from None
    return state, ckpt

"""Atomic checkpoints and exact resume: every piece of state a run needs to continue bit for bit.

A checkpoint is a directory `step_XXXXXXXX/` holding `state.pt`. It is written under a temporary
name in the same folder, flushed to disk, then renamed: a crash leaves either the previous
checkpoints or the new one, never a half-written one.

Under torchrun (common/dist.py) the FSDP2-sharded model and its optimizer are written by every rank with
torch.distributed.checkpoint (DCP) into `step_XXXXXXXX/sharded/`, each rank's RNG states into `rng_<rank>.pt`, and
rank 0 writes `state.pt` (everything else) last, into the same temporary folder, which rank 0 renames once every
rank is done. DCP stores each tensor with its global shape, so such a checkpoint loads on any number of ranks
(resharded); it is bit-exact on the same number (on another, each rank's sampling stream differs).
"""
from __future__ import annotations

import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch

from common import dist
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


def _leaves(tree: dict, prefix: str = ""):
    """(path, object) for every object of a nested dict of objects (paths joined with '/')."""
    for key, value in tree.items():
        if type(value) is dict:
            yield from _leaves(value, f"{prefix}{key}/")
        else:
            yield f"{prefix}{key}", value


def _sharded_states(objects: dict, paths: list[str] | None = None) -> dict:
    """path -> DCP state dict of each FSDP2 module and of each optimizer of one that has a state (keyed by parameter
    names); `paths`: exactly these (a checkpoint's list, when loading).

    An optimizer that has not stepped yet is left to the plain states: torch's `get_optimizer_state_dict` would give
    it a state first by a step with zero gradients and lr 0, which leaves the weights but counts a step, so AdamW's
    bias correction would shrink the next real update."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    leaves = dict(_leaves(objects))
    modules = {path: obj for path, obj in leaves.items() if dist.is_sharded(obj)}
    states = {path: get_model_state_dict(module) for path, module in modules.items()}
    for path, obj in leaves.items():
        if isinstance(obj, torch.optim.Optimizer) and (obj.state if paths is None else path in paths):
            owner = _owner(obj, modules.values())
            if owner is not None:
                states[path] = get_optimizer_state_dict(owner, obj)
    return states


def _owner(optimizer, modules):
    """The sharded module whose parameters `optimizer` steps, or None."""
    ids = {id(p) for group in optimizer.param_groups for p in group["params"]}
    return next((m for m in modules if ids <= {id(p) for p in m.parameters()}), None)


def _plain_states(objects: dict, skip=()) -> dict:
    return {key: _plain_states(value, skip) if type(value) is dict else value.state_dict()
            for key, value in objects.items() if key not in skip}


def save_objects(ckpt_dir: str | Path, step: int, objects: dict, meta: dict, keep_last: int) -> Path:
    """Checkpoint `step` of `objects` (a nested dict of objects with state_dict()) plus `meta` and the RNG states."""
    if not dist.ON:
        state = {**_plain_states(objects), **meta, "rng": rng_state()}
        return save_checkpoint(ckpt_dir, step, state, keep_last)
    import torch.distributed.checkpoint as dcp

    ckpt_dir = Path(ckpt_dir)
    final, tmp = ckpt_dir / f"step_{step:08d}", ckpt_dir / f".tmp_step_{step:08d}"
    if dist.is_main():
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    dist.barrier()
    sharded = _sharded_states(objects)
    dcp.save(sharded, checkpoint_id=tmp / "sharded")
    torch.save(rng_state(), tmp / f"rng_{dist.RANK}.pt")
    dist.barrier()
    if dist.is_main():
        plain = {path: obj.state_dict() for path, obj in _leaves(objects) if path not in sharded}
        with open(tmp / STATE_FILE, "wb") as f:  # last: a folder with state.pt is a complete checkpoint
            torch.save({"plain": plain, "sharded": sorted(sharded), "world": dist.WORLD, **meta,
                        "rng": rng_state()}, f)
            f.flush()
            os.fsync(f.fileno())
        if final.exists():
            shutil.rmtree(final)
        os.rename(tmp, final)
        _fsync_dir(ckpt_dir)
        for old in list_checkpoints(ckpt_dir)[:-keep_last] if keep_last > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    dist.barrier()
    return final


def load_objects(ckpt: Path, state: dict, objects: dict) -> None:
    """Each object's state from checkpoint `ckpt` (its state.pt already read as `state`), in place; under torchrun
    `state["rng"]` becomes this rank's RNG states."""
    if "world" in state and not dist.ON:
        raise UserError(f"checkpoint {str(ckpt)!r} was written under torchrun ({state['world']} ranks): resume it "
                        f"under torchrun, on any number of ranks (`torchrun --nproc-per-node N <script>.py --resume "
                        f"...`).")
    if "world" not in state and dist.ON:
        raise UserError(f"checkpoint {str(ckpt)!r} was written by one process: resume it with `python <script>.py "
                        f"--resume ...` (a torchrun run writes its own, sharded, checkpoints).")
    if not dist.ON:
        def load(tree, saved):
            for key, value in tree.items():
                load(value, saved[key]) if type(value) is dict else value.load_state_dict(saved[key])
        load(objects, state)
        return
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

    leaves = dict(_leaves(objects))
    sharded = _sharded_states(objects, state["sharded"])
    if sorted(sharded) != state["sharded"]:
        raise UserError(f"checkpoint {str(ckpt)!r} holds sharded states {state['sharded']}, this run has "
                        f"{sorted(sharded)}")
    dcp.load(sharded, checkpoint_id=ckpt / "sharded")
    modules = [obj for obj in leaves.values() if dist.is_sharded(obj)]
    for path, sd in sharded.items():
        obj = leaves[path]
        if dist.is_sharded(obj):
            set_model_state_dict(obj, sd)
        else:
            set_optimizer_state_dict(_owner(obj, modules), obj, sd)
    for path, obj in leaves.items():
        if path not in sharded:
            obj.load_state_dict(state["plain"][path])
    mine = ckpt / f"rng_{dist.RANK}.pt"
    if mine.is_file() and state["world"] == dist.WORLD:
        state["rng"] = torch.load(mine, weights_only=False)
    elif dist.is_main():
        print(f"resuming a {state['world']}-rank checkpoint on {dist.WORLD} ranks: the weights and optimizer are "
              f"resharded; the sampling streams are not the uninterrupted run's")

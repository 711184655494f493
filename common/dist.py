"""Data-parallel training under torchrun; in one process (`python grpo.py`) every function here does nothing.

    torchrun --nproc-per-node 8 grpo.py --model Qwen2.5-7B                    # one node, 8 GPUs
    torchrun --nnodes 2 --nproc-per-node 8 --rdzv-backend c10d --rdzv-endpoint HOST:29500 grpo.py ...

Under torchrun each rank (one process per GPU, or per CPU slot with gloo):
- trains the policy sharded with FSDP2 (`shard`: `fully_shard` on every decoder layer, then on the whole model;
  fp32 master weights, bf16 compute and fp32 gradient reduction on CUDA), so each rank holds 1/N of the weights,
  gradients and AdamW states;
- takes whole groups of the step's prompts (`common.data.step_prompts` gives each rank its contiguous share), rolls
  them out with its own engine, scores them and computes their advantages (a group never straddles two ranks);
- runs its share of each mini-batch. FSDP averages gradients over ranks, so the loss normalisers (sequences, tokens,
  groups of a mini-batch) are the MEAN over ranks of each rank's counts (`mean`): the N-rank gradient is then the
  gradient of the one-process loss on the same batch;
- runs as many forwards as every other rank: FSDP gathers each layer's weights in every forward, a collective all
  ranks must join, so a rank with fewer micro-batches adds padding ones whose loss the loop zeroes
  (`micro_batches`); HF `generate` runs with `synced_gpus`.
Small modules that are not sharded (CLIPO's contrastive head, R2PO's rollout head) are replicated: the same seed
builds the same weights on every rank, and their gradients are averaged (`sync_grads`) before their optimizer step.
Rank 0 logs (the metrics of all ranks, reduced: `reduce_metrics`), prints, and writes the final model; checkpoints
save the sharded states with torch.distributed.checkpoint (common/checkpoint.py). docs/distributed.md has the details.
"""
from __future__ import annotations

import functools
import os
import sys
import types

import numpy as np
import torch

RANK = int(os.environ.get("RANK", 0))
WORLD = int(os.environ.get("WORLD_SIZE", 1))
LOCAL_RANK = int(os.environ.get("LOCAL_RANK", 0))
ON = "RANK" in os.environ and "WORLD_SIZE" in os.environ  # launched by torchrun (also with one rank)


def init() -> None:
    """Join the torchrun job (NCCL on CUDA, gloo on CPU); ranks > 0 print nothing (warnings and errors still show)."""
    if not ON:
        return
    import torch.distributed as td

    if not td.is_initialized():
        if torch.cuda.is_available():
            torch.cuda.set_device(LOCAL_RANK)
        td.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    if RANK > 0:
        sys.stdout = open(os.devnull, "w")
        import tqdm

        tqdm.tqdm.__init__ = functools.partialmethod(tqdm.tqdm.__init__, disable=True)


BEFORE_CLOSE = []  # what must shut down while the process group lives (a vLLM engine of the job)


def close() -> None:
    """Leave the job at the end of a run: shut down what needs the process group, then destroy it."""
    if ON:
        import torch.distributed as td

        while BEFORE_CLOSE:
            BEFORE_CLOSE.pop()()
        if td.is_initialized():
            td.destroy_process_group()


def device() -> torch.device:
    return torch.device(f"cuda:{LOCAL_RANK}" if ON else "cuda") if torch.cuda.is_available() else torch.device("cpu")


def is_main() -> bool:
    return RANK == 0


def barrier() -> None:
    if ON:
        torch.distributed.barrier()


def _reduce(values, op: str) -> list[float]:
    import torch.distributed as td

    t = torch.tensor([float(v) for v in values], dtype=torch.float64)
    if torch.distributed.get_backend() == "nccl":
        t = t.cuda()
    td.all_reduce(t, op=td.ReduceOp.MAX if op == "max" else td.ReduceOp.SUM)
    return (t / WORLD if op == "mean" else t).tolist()


def mean(*values):
    """The mean over ranks of each value (the values themselves in one process); one value or a tuple."""
    out = _reduce(values, "mean") if ON else list(values)
    return out[0] if len(values) == 1 else tuple(out)


def total(*values):
    """The sum over ranks of each value (the values themselves in one process)."""
    out = _reduce(values, "sum") if ON else list(values)
    return out[0] if len(values) == 1 else tuple(out)


def share(items: list) -> list:
    """This rank's contiguous share of `items` (all of them in one process); len(items) must divide evenly."""
    if WORLD == 1:
        return items
    if len(items) % WORLD:
        raise ValueError(f"{len(items)} items do not split evenly over {WORLD} ranks")
    k = len(items) // WORLD
    return items[RANK * k : (RANK + 1) * k]


def micro_batches(rows: torch.Tensor, size: int, pad: torch.Tensor) -> list[tuple[torch.Tensor, bool]]:
    """(micro-batch rows, is padding) pairs: `rows` in chunks of at most `size`. Under torchrun every rank gets as many
    as the rank with the most: the others add padding micro-batches (their first row, or `pad` when they have none),
    whose loss the caller zeroes (FSDP's forward and backward are collectives that every rank must join)."""
    micros = [(m, False) for m in rows.split(size)] if len(rows) else []
    n = int(_reduce([len(micros)], "max")[0]) if ON else len(micros)
    return micros + [(rows[:1] if len(rows) else pad, True)] * (n - len(micros))


def rank_seed(seed: int, group_size: int = 1) -> int:
    """The seed of this rank's samples: `seed` itself in one process; under torchrun one stream per (seed, rank), or
    per (seed, group) for groups of `group_size` consecutive ranks that sample together (one tensor-parallel engine)."""
    return seed if WORLD == 1 else int(np.random.SeedSequence([seed, RANK // group_size]).generate_state(1)[0])


def is_sharded(module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(module, FSDPModule)


def shard(model: torch.nn.Module) -> torch.nn.Module:
    """FSDP2: `fully_shard` each decoder layer, then the whole model (its embeddings, final norm and LM head).
    On CUDA, bf16 compute and fp32 gradient reduction; the sharded master weights stay fp32. One process: `model`."""
    if not ON:
        return model
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) \
        if torch.cuda.is_available() else MixedPrecisionPolicy()
    for layer in model.get_decoder().layers:
        fully_shard(layer, mp_policy=mp)
    fully_shard(model, mp_policy=mp)
    return model


def fsdp_forward(fn):
    """Decorate `fn(model, ...)` that runs parts of `model` (its decoder, its LM head's weight) instead of calling
    `model(...)`: under FSDP2 it runs as a forward of `model`, so the root's weights (embeddings, final norm, LM
    head) are gathered first and their gradients reduced in the backward. Otherwise `fn` itself."""
    name = f"_fsdp_{fn.__name__}"

    @functools.wraps(fn)
    def call(model, *args, **kwargs):
        if not ON or not is_sharded(model):
            return fn(model, *args, **kwargs)
        if name not in model.__dict__:
            from torch.distributed.fsdp import register_fsdp_forward_method

            setattr(model, name, types.MethodType(fn, model))
            register_fsdp_forward_method(model, name)
        return getattr(model, name)(*args, **kwargs)

    return call


def sync_grads(module: torch.nn.Module) -> None:
    """Average the gradients of a replicated (not sharded) module over ranks, before its optimizer step. Every rank
    must hold a gradient for the same parameters (the padding micro-batches see to that)."""
    if not ON or is_sharded(module):
        return
    import torch.distributed as td

    for p in module.parameters():
        if p.grad is not None:
            td.all_reduce(p.grad, op=td.ReduceOp.SUM)
            p.grad /= WORLD


def clip_grad_norm_(module: torch.nn.Module, max_norm: float) -> torch.Tensor:
    """`torch.nn.utils.clip_grad_norm_` over every rank's gradients: a replicated module's are averaged first; a
    sharded module's norm is reduced over the shards. Returns the total norm, a plain tensor."""
    sync_grads(module)
    norm = torch.nn.utils.clip_grad_norm_(module.parameters(), max_norm)
    return norm.full_tensor() if hasattr(norm, "full_tensor") else norm


# How a metric of every rank becomes the logged one: times the slowest rank's, maxima the largest, counts the sum,
# everything else (means over a rank's rows or tokens, or values all ranks share) the mean over ranks.
def _reduction(key: str) -> str:
    if key.startswith("time/") or key.endswith("/max"):
        return "max"
    if key in ("reward/timeouts", "reward/errors"):
        return "sum"
    return "mean"


def reduce_metrics(metrics: dict) -> dict:
    """One step's metrics from every rank, reduced (see `_reduction`); every rank gets the same dict."""
    if not ON:
        return metrics
    gathered = [None] * WORLD
    torch.distributed.all_gather_object(gathered, {k: float(v) for k, v in metrics.items()})
    out = {}
    for key in dict.fromkeys(k for m in gathered for k in m):
        values = [m[key] for m in gathered if key in m]
        how = _reduction(key)
        out[key] = max(values) if how == "max" else sum(values) if how == "sum" else sum(values) / len(values)
    return out


def broadcast(obj):
    """Rank 0's `obj` on every rank."""
    if not ON:
        return obj
    box = [obj]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]


def any_rank(flag: bool) -> bool:
    return bool(_reduce([float(flag)], "max")[0]) if ON else bool(flag)

"""Peak memory of the weight push under FSDP2: the sharded policy gathered one tensor at a time for the vLLM engine.

    torchrun --nproc-per-node 2 benchmarks/bench_push.py                      # CPU (gloo): Qwen2.5-0.5B's shape
    torchrun --nproc-per-node 8 benchmarks/bench_push.py --shape 7b           # 8 GPUs: Qwen2.5-7B's shape

Builds a model of a Qwen2.5 shape with random weights (nothing is downloaded), shards it as the scripts do
(`common.dist.shard`), then consumes `common.vllm_engine.checkpoint_tensors(model, dtype)` as the engine's reload
does (it copies each tensor into its own storage, then drops it) and measures the memory the push adds on each rank:
on CUDA `torch.cuda.max_memory_allocated`, on CPU the process's resident high-water mark (VmHWM, reset through
/proc/self/clear_refs). Rank 0 prints one table: the model's full size, its largest tensor, the shard each rank holds,
and the measured peak the push added (max over ranks); a push that gathered the whole model first would add the full
size. Timing is the push's, gather and cast included, without the engine's own copy.
"""
from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass
from typing import Literal

import torch
import tyro

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from common import dist  # noqa: E402
from common.vllm_engine import checkpoint_tensors  # noqa: E402

SHAPES = {  # Qwen2.5 configs: hidden, intermediate, layers, heads, kv heads, tied embeddings
    "0.5b": (896, 4864, 24, 14, 2, True),
    "1.5b": (1536, 8960, 28, 12, 2, True),
    "7b": (3584, 18944, 28, 28, 4, False),
}


@dataclass
class Args:
    shape: Literal["0.5b", "1.5b", "7b"] = "0.5b"
    """the Qwen2.5 shape of the random model"""
    layers: int = 0
    """decoder layers (0: the shape's own; fewer keep a CPU run small, the largest tensor is the embedding anyway)"""
    dtype: Literal["float32", "bfloat16"] = "float32"
    """the engine's dtype (bf16 on CUDA, fp32 on CPU in the scripts)"""


def rss_peak() -> int:
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


def main(args: Args) -> None:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    dist.init()
    device = dist.device()
    hidden, inter, layers, heads, kv, tied = SHAPES[args.shape]
    config = Qwen2Config(vocab_size=151936, hidden_size=hidden, intermediate_size=inter,
                         num_hidden_layers=args.layers or layers, num_attention_heads=heads, num_key_value_heads=kv,
                         tie_word_embeddings=tied)
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(config).to(device)
    full = sum(t.numel() * t.element_size() for t in model.state_dict().values())  # tied counted twice, as sent
    largest = max(t.numel() * t.element_size() for t in model.state_dict().values())
    model = dist.shard(model)
    shard = sum(p.to_local().numel() * p.element_size() if hasattr(p, "to_local") else p.numel() * p.element_size()
                for p in model.parameters())
    dtype = getattr(torch, args.dtype)
    dist.barrier()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset VmHWM to the current resident size
        base = rss_peak()
    start = time.perf_counter()
    for name, tensor in checkpoint_tensors(model, dtype):
        tensor.sum()  # touch it, as the engine's copy would
        del tensor
    if device.type == "cuda":
        torch.cuda.synchronize()
        added = torch.cuda.max_memory_allocated() - base
    else:
        added = rss_peak() - base
    seconds = time.perf_counter() - start
    added = max(dist.reduce_metrics({"time/added": added})["time/added"], 0)  # "time/": the max over ranks
    seconds = dist.reduce_metrics({"time/s": seconds})["time/s"]
    if dist.is_main():
        gib = lambda b: f"{b / 2**30:.3f} GiB"  # noqa: E731
        print(f"shape {args.shape}, {config.num_hidden_layers} layers, {dist.WORLD} ranks, {device.type}, "
              f"engine dtype {args.dtype}")
        print("| model (all tensors, as sent) | largest tensor | shard per rank (fp32) | peak added by the push "
              "(max over ranks) | push time |")
        print("|---|---|---|---|---|")
        print(f"| {gib(full)} | {gib(largest)} | {gib(shard)} | {gib(added)} | {seconds:.2f} s |")
    dist.close()


if __name__ == "__main__":
    main(tyro.cli(Args))

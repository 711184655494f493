"""Rollout throughput and weight-push time: the colocated vLLM engine against HF `generate`.

Set up as grpo.py does it: an fp32 HF "trainer" model, an engine in fp32 on CPU and bf16 on CUDA
(HF generate under bf16 autocast there), random prompt ids of one length (no padding, so HF is
not penalised), n samples per prompt, temperature 1, no top-k/top-p. Models:
- `--model-dir` (default: the embedded tiny model, tiny/model), on any device;
- on CUDA only, also a Qwen2.5-1.5B-shaped model with random weights (tied embeddings); the goal
  on one H100 is a push of its weights in <= 0.2 s.

    python benchmarks/bench_rollout.py                           # CPU: the tiny model, ~1 min
    python benchmarks/bench_rollout.py --model-dir /tmp/model --prompts 8

Prints a table and writes a CSV (default benchmarks/out/bench_rollout.csv).
"""
from __future__ import annotations

import csv
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import tyro
from transformers import AutoModelForCausalLM, Qwen2Config, Qwen2ForCausalLM

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from common.vllm_engine import VLLMEngine  # noqa: E402


@dataclass
class Args:
    model_dir: str = "tiny/model"
    """a saved HF causal LM (config + safetensors; no tokenizer needed)"""
    qwen_1_5b: bool = True
    """on CUDA, also benchmark a Qwen2.5-1.5B-shaped model with random weights"""
    prompts: int = 32
    """prompts per rollout batch"""
    group_size: int = 8
    """completions per prompt"""
    prompt_len: int = 32
    """tokens per prompt"""
    max_tokens: int = 64
    """longest completion"""
    repeats: int = 3
    """timed rollouts and pushes, after one untimed warm-up each (the first vLLM generate compiles)"""
    seed: int = 0
    """seeds the prompts, the engine and the sampling"""
    csv: str = "benchmarks/out/bench_rollout.csv"
    """where the results go"""


def qwen2_5_1_5b_shaped(model_dir: str, device: torch.device) -> None:
    """Save a random-weight model with Qwen2.5-1.5B's shapes (bf16 on disk, 3 GB) to `model_dir`."""
    config = Qwen2Config(vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                         num_attention_heads=12, num_key_value_heads=2, max_position_embeddings=32768,
                         rope_theta=1_000_000.0, tie_word_embeddings=True, bos_token_id=151643, eos_token_id=151643)
    with torch.device(device):
        Qwen2ForCausalLM(config).to(torch.bfloat16).save_pretrained(model_dir)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def completion_tokens(sequences: torch.Tensor, stop_ids: list[int]) -> int:
    """Tokens generated per row up to and including its first stop id (HF pads finished rows)."""
    stopped = torch.isin(sequences, torch.tensor(stop_ids, device=sequences.device))  # (B, T)
    first = torch.where(stopped.any(1), stopped.int().argmax(1) + 1, sequences.shape[1])  # (B,)
    return int(first.sum())


def hf_rollout(model, prompt_ids: torch.Tensor, args: Args, stop_ids: list[int], device) -> tuple[int, float]:
    """(generated tokens, seconds) of one batched HF sample()."""
    with torch.no_grad(), torch.autocast(device.type, torch.bfloat16, enabled=device.type == "cuda"):
        sync(device)
        start = time.perf_counter()
        out = model.generate(prompt_ids, attention_mask=torch.ones_like(prompt_ids), do_sample=True,
                             temperature=1.0, top_k=0, top_p=1.0, num_return_sequences=args.group_size,
                             max_new_tokens=args.max_tokens, eos_token_id=stop_ids, pad_token_id=stop_ids[0])
        sync(device)
    return completion_tokens(out[:, prompt_ids.shape[1]:], stop_ids), time.perf_counter() - start


def bench_model(name: str, model_dir: str, args: Args, device: torch.device) -> list[dict]:
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).to(device).eval()
    n_params = sum(p.numel() for p in model.parameters())
    start = time.perf_counter()
    engine = VLLMEngine(model_dir, dtype=torch.bfloat16 if device.type == "cuda" else torch.float32, seed=args.seed,
                        max_model_len=args.prompt_len + args.max_tokens)
    build_s = time.perf_counter() - start
    stop_ids = engine.stop_token_ids
    g = torch.Generator().manual_seed(args.seed)
    # Prompt ids from the vocabulary minus the low ids (special tokens sit there in the tiny vocab).
    prompt_ids = torch.randint(3, model.config.vocab_size, (args.prompts, args.prompt_len), generator=g)
    prompts = prompt_ids.tolist()

    def rollout(i: int):
        return engine.generate(prompts, n=args.group_size, temperature=1.0, top_p=1.0, max_tokens=args.max_tokens,
                               seed=args.seed + i)

    first_s = rollout(0).seconds  # CPU: inductor compiles the sampler here; CUDA graphs were captured at build
    pushes, vllm_runs = [], []
    for i in range(args.repeats):
        pushes.append(engine.push_weights(model))
        batch = rollout(i + 1)
        vllm_runs.append((sum(map(len, batch.completion_ids)), batch.seconds))
    timings = {"push_s": round(sorted(pushes)[len(pushes) // 2], 4), "build_s": round(build_s, 1),
               "first_rollout_s": round(first_s, 1), "sleep_s": "", "wake_s": ""}
    if engine.sleep_mode:
        for step in ("sleep", "wake_up"):
            start = time.perf_counter()
            getattr(engine, step)()
            timings[step.split("_")[0] + "_s"] = round(time.perf_counter() - start, 3)
    engine.close()

    hf_rollout(model, prompt_ids[:2].to(device), args, stop_ids, device)  # warm-up
    hf_runs = [hf_rollout(model, prompt_ids.to(device), args, stop_ids, device) for _ in range(args.repeats)]
    del model
    if device.type == "cuda":
        torch.cuda.empty_cache()

    def row(backend: str, runs: list[tuple[int, float]], extra: dict) -> dict:
        tokens, seconds = sum(t for t, _ in runs), sum(s for _, s in runs)
        return {"model": name, "params_M": round(n_params / 1e6, 1), "device": device.type, "backend": backend,
                "rollouts": args.prompts * args.group_size, "tokens_per_batch": tokens // len(runs),
                "rollout_s": round(seconds / len(runs), 3), "tokens_per_s": round(tokens / seconds), **extra}

    return [row("vllm", vllm_runs, timings), row("hf", hf_runs, dict.fromkeys(timings, ""))]


if __name__ == "__main__":
    args = tyro.cli(Args)
    if not Path(args.model_dir).is_dir():  # a missing local dir would otherwise be looked up on the hub
        raise SystemExit(f"{args.model_dir} not found: build it with `python tiny/make_tiny.py` or pass --model-dir")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    rows = bench_model(Path(args.model_dir).name, args.model_dir, args, device)
    if device.type == "cuda" and args.qwen_1_5b:
        with tempfile.TemporaryDirectory() as tmp:
            qwen2_5_1_5b_shaped(tmp, device)
            rows += bench_model("qwen2.5-1.5b-shaped", tmp, args, device)
            push = rows[-2]["push_s"]
            print(f"1.5B push: {push} s (goal <= 0.2 s on one H100: {'met' if push <= 0.2 else 'NOT met'})")

    columns = list(rows[0])
    widths = [max(len(c), *(len(str(r[c])) for r in rows)) for c in columns]
    for line in [columns] + [[r[c] for c in columns] for r in rows]:
        print("  ".join(str(v).rjust(w) for v, w in zip(line, widths)))
    os.makedirs(os.path.dirname(args.csv) or ".", exist_ok=True)
    with open(args.csv, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    print(f"wrote {args.csv}")

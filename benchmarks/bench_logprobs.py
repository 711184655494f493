"""Benchmark of the log-prob kernels against the torch paths (docs/kernels.md).

Two tasks, each with forward (no grad, as for old/ref log-probs) and forward+backward timings
(median, p20, p80) and peak memory above the inputs:
- logits: logits [N, V] -> log p(y) (kernel 1); the limit is memory bandwidth, since the
  minimum traffic is one read of the logits forward and a read plus a grad write backward.
- head: hidden [N, d] and weight [V, d] -> log p(y) (kernel 2); the limit is matmul FLOPs,
  2 N V d forward and 6 N V d forward+backward (without the recomputation a kernel needs).
Every method is first checked against the chunked torch reference; a mismatch is reported and
not timed. Writes <out>.csv and <out>.png and prints a table.

GPU:  python benchmarks/bench_logprobs.py                  (N in {4096, 16384}, Qwen2.5-1.5B head)
CPU:  python benchmarks/bench_logprobs.py --small          (automatic without CUDA; Triton skipped)
"""
from __future__ import annotations

import csv
import ctypes
import os
import statistics
import sys
import time
from dataclasses import dataclass

import torch
import tyro

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from common.logprobs import hidden_logprobs, token_logprobs  # noqa: E402


@dataclass
class Args:
    ns: tuple[int, ...] = (4096, 16384)
    """numbers of tokens N (rows)"""
    vocab: int = 151936
    """vocabulary size V (Qwen2.5 LM head)"""
    d: int = 1536
    """hidden size d (Qwen2.5-1.5B)"""
    dtype: str = "bfloat16"
    """logits / hidden / weight dtype"""
    entropy: bool = False
    """also compute the entropy (and back-propagate through it)"""
    temperature: float = 1.0
    """sampling temperature (Liger has none, so it is skipped unless 1.0)"""
    seq_len: int = 1024
    """rows per sequence for the row-looped baseline (it loops over sequences, as TRL does)"""
    small: bool = False
    """small sizes for CPU (set automatically without CUDA)"""
    compile: bool = True
    """include torch.compile of the plain path (slow to compile on CPU)"""
    warmup: int = 2
    """untimed runs per method (torch.compile compiles here)"""
    iters: int = 10
    """timed runs per method"""
    bandwidth_tbs: float = 3.35
    """memory bandwidth limit in TB/s (H100 SXM)"""
    matmul_tflops: float = 989.0
    """dense matmul limit in TFLOP/s for the dtype (H100 SXM bf16)"""
    out: str = "benchmarks/results/bench_logprobs"
    """output prefix for .csv and .png"""


# ------------------------------------------------------------------ memory and time measurement
class PeakMemory:
    """Peak bytes allocated above the starting point: CUDA allocator stats, or on CPU the process
    resident high-water mark, reset through /proc/self/clear_refs (needs `cpu_malloc_setup`)."""

    def __init__(self, device: str):
        self.cuda = device == "cuda"

    @staticmethod
    def _status(key: str) -> int:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key))

    def __enter__(self):
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.start = torch.cuda.memory_allocated()
        else:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # resets VmHWM to the current resident size
            self.start = self._status("VmRSS:")
        return self

    def __exit__(self, *exc):
        if self.cuda:
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated() - self.start
        else:
            self.peak = self._status("VmHWM:") - self.start


def cpu_malloc_setup():
    """Make glibc mmap every block over 1 MiB (M_MMAP_THRESHOLD, fixed instead of growing to 32 MiB
    after the first free), so a freed tensor leaves the resident set and the high-water mark of
    each measurement sees its own allocations. Must run before the first tensor is allocated."""
    if ctypes.CDLL("libc.so.6").mallopt(-3, 1 << 20) != 1:
        print("mallopt failed: CPU peak memory may read low")


def timeit(fn, device: str, warmup: int, iters: int) -> list[float]:
    """Seconds per call of fn()."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        if device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return times


def quantile(xs: list[float], q: float) -> float:
    return statistics.quantiles(xs, n=100, method="inclusive")[round(q * 100) - 1] if len(xs) > 1 else xs[0]


# ------------------------------------------------------------------ methods
def row_looped(logits, index, temperature, with_entropy):
    """Selective log-softmax one sequence at a time (the loop TRL uses for bf16): the fp32 copy
    is one sequence's [T, V], at the cost of a Python loop. logits (S, T, V)."""
    logps, ents = [], []
    for row, idx in zip(logits, index):
        lsm = torch.log_softmax(row.float() / temperature, dim=-1)
        logps.append(lsm.gather(-1, idx.unsqueeze(-1)).squeeze(-1))
        if with_entropy:
            ents.append(-(lsm.exp() * lsm).sum(-1))
    return torch.stack(logps), (torch.stack(ents) if with_entropy else None)


def logits_methods(args, device):
    T, ent = args.temperature, args.entropy

    def backend(name):
        return lambda x, i: token_logprobs(x, i, T, ent, name)

    methods = {"plain (eager)": backend("plain")}
    if args.compile:
        methods["torch.compile"] = torch.compile(backend("plain"))
    def looped(x, i):
        logp, entropy = row_looped(x.view(-1, args.seq_len, x.shape[-1]), i.view(-1, args.seq_len), T, ent)
        return logp.view(-1), (entropy.view(-1) if ent else None)

    methods["row-looped"] = looped
    methods["torch (chunked)"] = backend("torch")
    if device == "cuda":
        methods["triton"] = backend("triton")
    return methods


def head_methods(args, device):
    T, ent = args.temperature, args.entropy

    def backend(name):
        return lambda h, w, i: hidden_logprobs(h, w, i, T, ent, name)

    methods = {"plain (eager)": backend("plain")}
    if args.compile:
        methods["torch.compile"] = torch.compile(backend("plain"))
    methods["torch (chunked)"] = backend("torch")
    if device == "cuda":
        methods["triton"] = backend("triton")
        liger = liger_flce(args)
        if liger is not None:
            methods["liger FLCE"] = liger
    return methods


def liger_flce(args):
    """Liger's fused linear cross entropy, when installed: it returns only sum(-log p), so its
    check compares that sum, and the entropy and temperature are not available."""
    try:
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss
    except ImportError:
        print("liger-kernel not importable: its fused linear cross entropy is skipped")
        return None
    if args.entropy or args.temperature != 1.0:
        print("liger FLCE skipped: it has no entropy output or temperature")
        return None
    loss_fn = LigerFusedLinearCrossEntropyLoss(reduction="sum")

    def run(h, w, i):
        loss = loss_fn(w, h, i)
        loss = loss[0] if isinstance(loss, tuple) else loss
        return -loss, None  # sum of log-probs

    return run


# ------------------------------------------------------------------ one task
def make_inputs(task, n, args, device, dtype):
    g = torch.Generator(device=device).manual_seed(0)
    index = torch.randint(0, args.vocab, (n,), device=device, generator=g)
    if task == "logits":
        # Peaked like a trained model's logits (most mass on a few tokens), not uniform noise.
        return (torch.randn(n, args.vocab, device=device, generator=g) * 4).to(dtype), index
    hidden = torch.randn(n, args.d, device=device, generator=g).to(dtype)
    weight = (torch.randn(args.vocab, args.d, device=device, generator=g) * 4 * args.d**-0.5).to(dtype)
    return hidden, weight, index


def forward_backward(fn, tensors, index, upstream):
    """One training-style call: forward, a loss linear in log p (and H), backward to the inputs."""
    leaves = [t.detach().requires_grad_() for t in tensors]
    logp, ent = fn(*leaves, index)
    loss = (logp * upstream).sum() if logp.dim() else logp
    if ent is not None:
        loss = loss + (ent * upstream).sum()
    loss.backward()
    return logp.detach(), [t.grad for t in leaves]


def check(got, ref, n):
    """Compare log-probs (or their sum) and input grads to the reference; returns 'ok' or why not."""
    (logp, grads), (ref_logp, ref_grads) = got, ref
    if logp.dim() == 0:  # Liger gives sum(log p) only (its grads are then those of upstream ones)
        want = ref_logp.float().sum().item()
        if abs(logp.item() - want) > 1e-3 * abs(want) + 1e-2 * n**0.5:
            return f"sum of log p off: {logp.item():.6g} vs {want:.6g}"
    else:
        err = (logp.float() - ref_logp.float()).abs().max().item()
        if err > 2e-2:
            return f"log p off by {err:.3g}"
    for g, r in zip(grads, ref_grads):
        rel = ((g.float() - r.float()).norm() / r.float().norm().clamp_min(1e-30)).item()
        if rel > 2e-2:
            return f"grad off, relative error {rel:.3g}"
    return "ok"


def run_task(task, args, device, dtype, rows):
    methods = logits_methods(args, device) if task == "logits" else head_methods(args, device)
    for n in args.ns:
        inputs = make_inputs(task, n, args, device, dtype)
        tensors, index = list(inputs[:-1]), inputs[-1]
        upstreams = {"random": torch.randn(n, device=device, generator=torch.Generator(device=device).manual_seed(1)),
                     "ones": torch.ones(n, device=device)}  # Liger can only back-propagate sum(log p)
        refs = {}  # upstream kind -> output of the chunked torch reference
        for name, fn in methods.items():
            kind = "ones" if name == "liger FLCE" else "random"
            try:
                if kind not in refs:
                    refs[kind] = forward_backward(methods["torch (chunked)"], tensors, index, upstreams[kind])
                status = check(forward_backward(fn, tensors, index, upstreams[kind]), refs[kind], n)
                if status != "ok":
                    raise ValueError(f"MISMATCH ({status}); not timed")
                for mode in ("fwd", "fwd+bwd"):
                    rows.append(dict(task=task, n=n, method=name, mode=mode, check="ok",
                                     **measure(task, mode, fn, tensors, index, upstreams[kind], args, device, dtype)))
            except (RuntimeError, ValueError) as e:  # an OOM or a mismatch costs one row, not the run
                print(f"[{task} N={n}] {name}: {str(e).splitlines()[0]}")
                rows.append(dict(task=task, n=n, method=name, check=str(e).splitlines()[0][:80]))
        del inputs, tensors, refs
        if device == "cuda":
            torch.cuda.empty_cache()


def measure(task, mode, fn, tensors, index, upstream, args, device, dtype):
    if mode == "fwd":
        def call():
            with torch.no_grad():
                fn(*tensors, index)
    else:
        def call():
            forward_backward(fn, tensors, index, upstream)
    times = timeit(call, device, args.warmup, args.iters)
    with PeakMemory(device) as mem:
        call()
    median = statistics.median(times)
    return dict(median_ms=1e3 * median, p20_ms=1e3 * quantile(times, 0.2), p80_ms=1e3 * quantile(times, 0.8),
                peak_mib=mem.peak / 2**20, **limit(task, mode, index.numel(), args, dtype, median))


def limit(task, mode, n, args, dtype, seconds):
    """Achieved rate and its percentage of the hardware limit (bandwidth or matmul FLOPs)."""
    passes = 1 if mode == "fwd" else 3  # logits: read | read, read, write grad; head: 1 | 3 matmuls
    if task == "logits":
        rate = passes * n * args.vocab * dtype.itemsize / seconds / 1e12
        return dict(achieved=f"{rate:.3g} TB/s", pct_limit=100 * rate / args.bandwidth_tbs)
    rate = passes * 2 * n * args.vocab * args.d / seconds / 1e12
    return dict(achieved=f"{rate:.3g} TFLOP/s", pct_limit=100 * rate / args.matmul_tflops)


# ------------------------------------------------------------------ output
FIELDS = ["task", "n", "method", "mode", "check", "median_ms", "p20_ms", "p80_ms", "peak_mib", "achieved", "pct_limit"]


def print_table(rows):
    print(f"{'task':7} {'N':>6} {'method':16} {'mode':8} {'median ms':>10} {'p20':>9} {'p80':>9} "
          f"{'peak MiB':>9} {'achieved':>15} {'% limit':>8}")
    for r in rows:
        if r["check"] != "ok":
            print(f"{r['task']:7} {r['n']:>6} {r['method']:16} {r['check']}")
            continue
        print(f"{r['task']:7} {r['n']:>6} {r['method']:16} {r['mode']:8} {r['median_ms']:>10.2f} "
              f"{r['p20_ms']:>9.2f} {r['p80_ms']:>9.2f} {r['peak_mib']:>9.0f} {r['achieved']:>15} "
              f"{r['pct_limit']:>7.2f}%")


def write_csv(rows, path):
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=FIELDS)
        w.writeheader()
        for r in rows:
            w.writerow({k: (f"{v:.4g}" if isinstance(v, float) else v) for k, v in r.items()})


def plot(rows, path, title):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed (pip install matplotlib): no PNG written")
        return
    ok = [r for r in rows if r["check"] == "ok" and r["mode"] == "fwd+bwd"]
    tasks = sorted({r["task"] for r in ok})
    panels = [("median_ms", "fwd+bwd time (ms)"), ("peak_mib", "fwd+bwd peak memory (MiB)"),
              ("pct_limit", "fwd+bwd % of hardware limit")]
    fig, axes = plt.subplots(len(tasks), 3, figsize=(15, 4 * len(tasks)), squeeze=False)
    for ti, task in enumerate(tasks):
        sub = [r for r in ok if r["task"] == task]
        ns = sorted({r["n"] for r in sub})
        names = list(dict.fromkeys(r["method"] for r in sub))
        width = 0.8 / len(names)
        for pi, (key, label) in enumerate(panels):
            ax = axes[ti][pi]
            for mi, name in enumerate(names):
                vals = [next((r[key] for r in sub if r["n"] == n and r["method"] == name), 0) for n in ns]
                ax.bar([i + mi * width for i in range(len(ns))], vals, width, label=name)
            ax.set_xticks([i + 0.4 - width / 2 for i in range(len(ns))], [f"N={n}" for n in ns])
            ax.set_title(f"{task}: {label}")
            if key != "pct_limit":
                ax.set_yscale("log")
        axes[ti][0].legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    print(f"wrote {path}")


def main(args: Args):
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu" and not args.small:
        print("no CUDA: running the torch paths at small sizes (--small)")
        args.small = True
    if args.small and args.ns == Args.ns:  # fp32: bf16 matmuls have no fast CPU path here (~20x slower)
        # N = 2048 > CHUNK_ROWS, so the chunked reference shows its memory saving
        args.ns, args.vocab, args.d, args.seq_len, args.dtype = (256, 2048), 8192, 128, 128, "float32"
        args.warmup, args.iters = 1, 5
    if device == "cpu":
        cpu_malloc_setup()
        print("Triton skipped: no GPU (the kernels are tested on CPU under TRITON_INTERPRET=1 instead)")
    dtype = getattr(torch, args.dtype)
    torch.manual_seed(0)
    rows: list[dict] = []
    for task in ("logits", "head"):
        run_task(task, args, device, dtype, rows)
    hw = torch.cuda.get_device_name() if device == "cuda" else f"CPU ({os.cpu_count()} cores)"
    title = (f"{hw}, {args.dtype}, V={args.vocab}, d={args.d}, entropy={args.entropy}; limits "
             f"{args.bandwidth_tbs} TB/s, {args.matmul_tflops} TFLOP/s")
    print(title)
    print_table(rows)
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    write_csv(rows, args.out + ".csv")
    print(f"wrote {args.out}.csv")
    plot(rows, args.out + ".png", title)


if __name__ == "__main__":
    main(tyro.cli(Args))

"""Peak memory of `hidden_logprobs` forward+backward (what the scripts call): the chunked torch path and the
fused Triton LM head never hold the [N, V] fp32 logits, the plain path does (docs/kernels.md).

How it is measured: one fresh Python process (no earlier test's heap shapes the numbers) runs every case in
turn with benchmarks/bench_logprobs.py's CPU meter: glibc mmaps every block over 1 MiB, so a freed tensor
leaves the resident set, and the peak is the resident high-water mark (reset through /proc/self/clear_refs)
above the resident size just before the call. Each path first runs once at 8 rows, so one-time allocations
(thread pools, the interpreter's first pass) are not counted. torch.profiler(profile_memory=True) gives no
CPU timeline to take a peak from: it books allocations to the ops that made them and logs only the frees
outside ops as events (a plain run read peak 0 and net -192 MiB).

Shapes: the torch path at its own CHUNK_ROWS = 1024 with N = 8192 rows (8 chunks) and d = 16, so the plain
path's N x V copies dwarf one chunk. The Triton kernels run under TRITON_INTERPRET=1, whose cost grows with
N x V / block, so there N = 8 rows and V = 2^18 with d = 1 (the weight and its grad, V x d, stay small next to
N x V); the child sets the module's CHUNK_ELEMS for vocab chunks of V / 8 (at the default 2^26 one chunk would
hold all of these logits) and MAX_BLOCK_V to one chunk (what the kernel computes does not depend on it; the
interpreter's numpy temporaries, a few block-sized arrays, are allowed for below).
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # one child process: ~12 s of CPU, 34 s of wall time on the shared 2-core machine
ROOT = Path(__file__).resolve().parent.parent
MiB = 2**20
TORCH_CASE = dict(n=8192, vocab=1024, d=16)  # CHUNK_ROWS = 1024 (the default): 8 row chunks
TRITON_CASE = dict(n=8, vocab=2**18, d=1, chunk_v=2**15)  # 8 vocab chunks of 1 MiB in fp32


def measure(cases):
    """Runs in the child: peak bytes of forward+backward of each (backend, case), fp32, with entropy."""
    import torch

    sys.path.insert(0, str(ROOT))
    from benchmarks.bench_logprobs import PeakMemory, cpu_malloc_setup
    from common.logprobs import hidden_logprobs

    cpu_malloc_setup()
    out = []
    for backend, case in cases:
        n, vocab, d = case["n"], case["vocab"], case["d"]
        if "chunk_v" in case:
            import common.triton_logprobs as tk  # only here: importing triton costs ~1 s

            tk.CHUNK_ELEMS = n * case["chunk_v"]
            tk.MAX_BLOCK_V = case["chunk_v"]
        g = torch.Generator().manual_seed(0)
        hidden = torch.randn(n, d, generator=g).requires_grad_()
        weight = (torch.randn(vocab, d, generator=g) / d**0.5).requires_grad_()
        index = torch.randint(0, vocab, (n,), generator=g)

        def step(rows):
            logp, ent = hidden_logprobs(hidden[:rows], weight, index[:rows], 1.0, True, backend)
            (logp.sum() + ent.sum()).backward()
            hidden.grad = weight.grad = None

        step(8)  # warm-up
        with PeakMemory("cpu") as mem:
            step(n)
        out.append(mem.peak)
    return out


def peaks(cases):
    env = dict(os.environ, TRITON_INTERPRET="1")  # CPU tensors: the kernels run in the interpreter
    code = f"import json, sys; sys.path.insert(0, {str(ROOT / 'tests')!r}); import test_logprobs_memory as t; " \
           f"print(json.dumps(t.measure(json.loads(sys.argv[1]))))"
    res = subprocess.run([sys.executable, "-c", code, json.dumps(cases)], capture_output=True, text=True,
                         env=env, cwd=ROOT, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    return json.loads(res.stdout.strip().splitlines()[-1])


def report(n, vocab, d, **peak):
    return f"N={n} V={vocab} d={d}: N*V*4 = {n * vocab * 4 / MiB:.1f} MiB; peaks " + ", ".join(
        f"{k} {v / MiB:.1f} MiB" for k, v in peak.items())


@pytest.fixture(scope="module")
def measured():
    """Peak bytes per (backend, case), all from one child process (one torch import for both tests)."""
    if not os.access("/proc/self/clear_refs", os.W_OK):
        pytest.skip("the CPU meter resets the resident high-water mark through /proc/self/clear_refs (Linux)")
    cases = [["plain", TORCH_CASE], ["torch", TORCH_CASE], ["plain", TRITON_CASE], ["triton", TRITON_CASE]]
    return dict(zip(["plain", "torch", "plain-small", "triton"], peaks(cases)))


def test_chunked_torch_path_peak_is_a_few_chunks(measured):
    n, vocab, d = TORCH_CASE["n"], TORCH_CASE["vocab"], TORCH_CASE["d"]
    plain, chunked = measured["plain"], measured["torch"]
    msg = report(n, vocab, d, plain=plain, torch=chunked)
    chunk = 1024 * vocab * 4  # one chunk of fp32 logits at CHUNK_ROWS = 1024: a larger default is a regression
    # A chunk's forward holds ~5 [rows, V] fp32 temporaries at once (logits, x / T, softmax, masked x,
    # their product) and its recomputing backward about as many: 8 chunks, plus the inputs' grads and 2 MiB
    # of allocator slack. Without the per-chunk checkpoint autograd keeps every chunk's softmax and logits.
    bound = 8 * chunk + 2 * (n + vocab) * d * 4 + 2 * MiB
    assert plain > 3 * n * vocab * 4, f"the plain path must hold several [N, V] fp32 copies: {msg}"
    assert chunked < plain / 3, f"chunked torch path not < plain / 3: {msg}"
    assert chunked < bound, f"chunked torch path not < 8 chunks of {chunk / MiB:.0f} MiB + grads = " \
                            f"{bound / MiB:.1f} MiB: {msg}"


def test_fused_triton_head_peak_is_a_few_vocab_chunks(measured):
    n, vocab, d, chunk_v = (TRITON_CASE[k] for k in ("n", "vocab", "d", "chunk_v"))
    plain, fused = measured["plain-small"], measured["triton"]
    msg = report(n, vocab, d, plain=plain, triton=fused)
    chunk = n * chunk_v * 4
    # Two chunks of logits (the next one is made before the last is freed), the weight's grad (V x d, allowed
    # twice), and 2 MiB for the interpreter's block-sized numpy temporaries and slack. Chunks of the whole
    # vocabulary put the N x V logits (8 chunks) back in; plain / 3 alone would not see that at this size.
    bound = 2 * chunk + 2 * vocab * d * 4 + 2 * MiB
    assert plain > 3 * n * vocab * 4, f"the plain path must hold several [N, V] fp32 copies: {msg}"
    assert fused < plain / 3, f"fused Triton head not < plain / 3: {msg}"
    assert fused < bound, f"fused Triton head not < 2 chunks of {chunk / MiB:.0f} MiB + weight grad = " \
                          f"{bound / MiB:.1f} MiB: {msg}"

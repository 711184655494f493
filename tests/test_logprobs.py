"""Log-prob / entropy kernels against a float64 autograd reference.

Without CUDA the Triton kernels run under TRITON_INTERPRET=1 on CPU (set below, before anything
imports triton: triton reads it when the kernels are decorated). With CUDA the same tests run
the compiled kernels, and the tests marked `gpu` add realistic sizes.
The interpreter costs ~0.6 ms per program step, so shapes stay tiny; `block_v` and `chunk_v`
are forced small so that rows span several blocks and vocab chunks, with ragged tails.
"""
import importlib
import math
import os
import sys

import torch

ON_GPU = torch.cuda.is_available()
if not ON_GPU:
    os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402

from common.logprobs import hidden_logprobs, hidden_logprobs_torch, token_logprobs  # noqa: E402

pytest.importorskip("triton", reason="triton is not installed: the Triton kernels cannot be tested")
tk = pytest.importorskip("common.triton_logprobs")

DEV = "cuda" if ON_GPU else "cpu"
V = 1000  # not a multiple of BLOCK_V below
BLOCK_V = 256  # 4 blocks per row, the last one ragged
CHUNK_V = 384  # kernel 2: 3 vocab chunks, the last one ragged
IGNORE = -100
# Tolerances per input dtype: (values, gradients relative to their largest entry).
TOL = {torch.float32: (2e-5, 2e-5), torch.bfloat16: (2e-5, 1e-2), torch.float16: (2e-5, 2e-3)}
HEAD_TOL = {torch.float32: (2e-5, 2e-5), torch.bfloat16: (6e-2, 3e-2)}  # bf16 rounds the logits too


def reference(x64, index, temperature):
    """float64 log_softmax path; x64 (N, V) float64 leaf. Returns (logp, entropy)."""
    lsm = torch.log_softmax(x64 / temperature, dim=-1)
    logp = lsm.gather(-1, index.clamp_min(0).unsqueeze(-1)).squeeze(-1)
    p = lsm.exp()
    ent = -(p * lsm.masked_fill(p == 0, 0.0)).sum(-1)  # 0 log 0 = 0 for -inf logits
    valid = index != IGNORE
    return logp.masked_fill(~valid, 0.0), ent.masked_fill(~valid, 0.0)


def upstream(n, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, generator=g, dtype=torch.float64), torch.randn(n, generator=g, dtype=torch.float64)


def leaf(t):
    """A fresh leaf on DEV that requires grad (never an alias of t, whose grad is separate)."""
    return t.detach().clone().to(DEV).requires_grad_()


def check_close(got, want, tol, what):
    err = (got.double().cpu() - want).abs().max().item()
    scale = max(want.abs().max().item(), 1.0)
    assert err <= tol * scale, f"{what}: max error {err:.3g} > {tol:.1g} * {scale:.3g}"


def run_logits(x64, index, temperature, dtype, *, backend="triton", strided=False):
    """Kernel-1 values and grad wrt logits; x64 is rounded to `dtype` first, and the reference
    sees the same rounded values, so only the kernel's own error is measured."""
    x = x64.to(dtype)
    x_ref = x.double().clone().requires_grad_()
    a, b = upstream(index.numel())
    lp_ref, ent_ref = reference(x_ref, index, temperature)
    (lp_ref * a + ent_ref * b).sum().backward()

    x_dev = leaf(x)
    if strided:  # (B, T+1, V) sliced to (B, T, V): a non-contiguous view read through its strides
        big = torch.zeros(2, index.numel() // 2 + 1, V, dtype=dtype, device=DEV)
        big[:, :-1] = x_dev.detach().view(2, -1, V)
        big.requires_grad_()
        lp, ent = tk.logits_logprobs(big[:, :-1], index.view(2, -1).to(DEV), temperature, True, IGNORE, BLOCK_V)
        lp, ent = lp.reshape(-1), ent.reshape(-1)
        (lp.double().cpu() * a + ent.double().cpu() * b).sum().backward()
        grad = big.grad[:, :-1].reshape(-1, V)
        assert big.grad[:, -1].abs().max() == 0
    else:
        if backend == "triton":
            lp, ent = tk.logits_logprobs(x_dev, index.to(DEV), temperature, True, IGNORE, BLOCK_V)
        else:
            lp, ent = token_logprobs(x_dev, index.to(DEV), temperature, True, backend, IGNORE)
        (lp.double().cpu() * a + ent.double().cpu() * b).sum().backward()
        grad = x_dev.grad
    assert lp.dtype == ent.dtype == torch.float32
    return (lp, ent, grad), (lp_ref.detach(), ent_ref.detach(), x_ref.grad)


def assert_matches(got, want, dtype, tol=TOL):
    vtol, gtol = tol[dtype]
    check_close(got[0], want[0], vtol, "logp")
    check_close(got[1], want[1], vtol, "entropy")
    check_close(got[2], want[2], gtol, "grad")


def random_case(n=6, seed=0, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, V, generator=g, dtype=torch.float64) * scale
    index = torch.randint(0, V, (n,), generator=g)
    index[0] = V - 1  # a target in the ragged last block
    return x, index


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("temperature", [1.0, 0.6])
def test_logits_kernel_matches_float64(dtype, temperature):
    x, index = random_case()
    got, want = run_logits(x, index, temperature, dtype)
    assert_matches(got, want, dtype)


def test_logits_kernel_reads_strided_3d_views():
    x, index = random_case()
    got, want = run_logits(x, index, 0.8, torch.bfloat16, strided=True)
    assert_matches(got, want, torch.bfloat16)


@pytest.mark.parametrize("backend", ["triton", "torch", "plain"])
def test_ignored_rows_give_zero_and_no_gradient(backend, monkeypatch):
    monkeypatch.setattr("common.logprobs.CHUNK_ROWS", 4)  # the torch reference: two checkpointed chunks
    x, index = random_case()
    index[[1, 4]] = IGNORE
    got, want = run_logits(x, index, 1.0, torch.float32, backend=backend)
    assert_matches(got, want, torch.float32)
    assert got[0][[1, 4]].abs().max() == 0 and got[1][[1, 4]].abs().max() == 0
    assert got[2][[1, 4]].abs().max() == 0
    assert got[2][[0, 2, 3, 5]].abs().min(dim=-1).values.max() > 0  # the other rows do get grads


def test_rows_with_zero_upstream_grad_get_exactly_zero_grad():
    # The RL loss masks padding by multiplying with 0: with extreme logits no 0 * inf = nan may leak.
    x, index = random_case()
    x[1] = -1e4 + x[1]
    x[2, 7] = 1e4
    xl = leaf(x.float())
    lp, ent = tk.logits_logprobs(xl, index.to(DEV), 0.5, True, IGNORE, BLOCK_V)
    mask = torch.tensor([1.0, 0, 0, 1, 0, 1], device=DEV)
    ((lp + ent) * mask).sum().backward()
    assert torch.isfinite(xl.grad).all()
    assert xl.grad[[1, 2, 4]].abs().max() == 0
    assert xl.grad[[0, 3, 5]].abs().max() > 0


def extreme_case():
    x, index = random_case(n=6)
    x[0] = x[0] - 1e4  # all very negative
    x[1] = x[1] + 1e4  # all very large: lse - E[x] must not cancel away the entropy
    x[2, :] = -30.0
    x[2, 123] = 60.0  # a one-hot distribution: entropy 0, log p(argmax) = 0
    index[2] = 123
    x[3] = 0.0  # uniform: entropy log V
    x[4, :300] = -float("inf")  # masked vocabulary entries (p = 0), a whole first block among them
    x[4, ::3] = -float("inf")
    index[4] = 301
    x[5] = x[5] * 30  # wide spread
    return x, index


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_extreme_logits(backend):
    x, index = extreme_case()
    got, want = run_logits(x, index, 1.0, torch.float32, backend=backend)
    lp, ent, grad = (t.detach().cpu() for t in got)
    assert torch.isfinite(lp).all() and torch.isfinite(ent).all() and torch.isfinite(grad).all()
    assert (lp <= 0).all(), "log-probs must never be positive"
    assert (ent >= 0).all()
    check_close(ent[3], torch.tensor(torch.log(torch.tensor(float(V))).item()), 1e-6, "uniform entropy")
    assert ent[2].abs() < 1e-6 and lp[2].abs() < 1e-6
    assert grad[4, :300].abs().max() == 0 and grad[4, ::3].abs().max() == 0  # -inf logits: no gradient
    # Rows 0 and 1 are random rows shifted by -+1e4: the same distribution, known to the fp32
    # ulp at 1e4 (~1e-3), which also bounds their error against the reference; the rest is tight.
    shifted = random_case(n=6)[0][:2]
    _, plain = run_logits(shifted, index[:2], 1.0, torch.float64)
    check_close(ent[:2], plain[1], 2e-3, "entropy of shifted rows")
    for g, w, what in zip(got, want, ["logp", "entropy", "grad"]):
        check_close(g[:2].detach(), w[:2], 2e-3, what + " of shifted rows")
    assert_matches([g[2:] for g in got], [w[2:] for w in want], torch.float32)


def test_logprobs_never_positive_and_entropy_bounds():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(8, V, generator=g, dtype=torch.float64) * 20
    index = x.argmax(-1)  # the most likely token: log p closest to 0, where rounding could overshoot
    lp, ent = tk.logits_logprobs(x.float().to(DEV), index.to(DEV), 1.0, True, IGNORE, BLOCK_V)
    assert (lp <= 0).all()
    assert ((ent >= 0) & (ent <= torch.log(torch.tensor(float(V))) + 1e-5)).all()


@pytest.mark.parametrize("n_vocab", [1, 37])
def test_tiny_vocabularies(n_vocab):
    g = torch.Generator().manual_seed(4)
    x = torch.randn(3, n_vocab, generator=g, dtype=torch.float64).requires_grad_()
    index = torch.randint(0, n_vocab, (3,), generator=g)
    xl = leaf(x.float())
    lp, ent = tk.logits_logprobs(xl, index.to(DEV), 1.3, True)  # default block: one ragged block
    (lp + 2 * ent).sum().backward()
    lp_ref, ent_ref = reference(x, index, 1.3)
    (lp_ref + 2 * ent_ref).sum().backward()
    for got, want, what in [(lp, lp_ref, "logp"), (ent, ent_ref, "entropy"), (xl.grad, x.grad, "grad")]:
        check_close(got.detach(), want.detach(), 2e-5, what)


def test_without_entropy_and_only_entropy_grad():
    x, index = random_case()
    xl = leaf(x.float())
    lp, ent = tk.logits_logprobs(xl, index.to(DEV), 1.0, False, IGNORE, BLOCK_V)
    assert ent is None
    lp.sum().backward()
    x_ref = x.clone().requires_grad_()
    reference(x_ref, index, 1.0)[0].sum().backward()
    check_close(xl.grad, x_ref.grad, 2e-5, "grad of logp alone")

    xl.grad = None
    _, ent = tk.logits_logprobs(xl, index.to(DEV), 1.0, True, IGNORE, BLOCK_V)
    ent.sum().backward()  # logp unused: its grad is absent, not zeros
    x_ref.grad = None
    reference(x_ref, index, 1.0)[1].sum().backward()
    check_close(xl.grad, x_ref.grad, 2e-5, "grad of entropy alone")


@pytest.mark.parametrize("backend", ["triton", "torch", "plain"])
def test_empty_inputs(backend):
    empty = torch.zeros(0, dtype=torch.long, device=DEV)
    x = torch.zeros(0, 7, device=DEV, requires_grad=True)
    lp, ent = token_logprobs(x, empty, 1.0, True, backend)
    (lp.sum() + ent.sum()).backward()
    assert lp.shape == ent.shape == (0,) and x.grad.shape == (0, 7)
    h, w = torch.zeros(0, 3, device=DEV), torch.ones(7, 3, device=DEV)
    lp, ent = hidden_logprobs(h, w, empty, 1.0, True, backend)
    assert lp.shape == ent.shape == (0,)


# ---------------------------------------------------------------- kernel 2: fused LM head
D = 24


def head_case(dtype, seed=5):
    g = torch.Generator().manual_seed(seed)
    hidden = (torch.randn(2, 3, D, generator=g, dtype=torch.float64)).to(dtype)  # (B, T, d)
    weight = (torch.randn(V, D, generator=g, dtype=torch.float64) * 0.5).to(dtype)
    index = torch.randint(0, V, (2, 3), generator=g)
    index[0, 0] = V - 1
    index[1, 2] = IGNORE
    return hidden, weight, index


def run_head(hidden, weight, index, temperature, fn):
    h, w = leaf(hidden), leaf(weight)
    lp, ent = fn(h, w, index.to(DEV), temperature)
    a, b = upstream(index.numel())
    (lp.double().cpu().reshape(-1) * a + ent.double().cpu().reshape(-1) * b).sum().backward()
    return lp, ent, h.grad, w.grad


def head_reference(hidden, weight, index, temperature):
    h = hidden.double().clone().requires_grad_()
    w = weight.double().clone().requires_grad_()
    lp, ent = reference(h.reshape(-1, D) @ w.T, index.reshape(-1), temperature)
    a, b = upstream(index.numel())
    (lp * a + ent * b).sum().backward()
    return lp.detach().view(index.shape), ent.detach().view(index.shape), h.grad, w.grad


def check_head(got, want, dtype):
    vtol, gtol = HEAD_TOL[dtype]
    for i, what in enumerate(["logp", "entropy", "grad hidden", "grad weight"]):
        check_close(got[i].detach(), want[i], vtol if i < 2 else gtol, what)
    assert got[2].dtype == got[3].dtype == dtype
    assert got[0].view(-1)[5] == 0 and got[2][1, 2].abs().max() == 0  # the ignored position


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_head_kernel_matches_float64(dtype, temperature):
    hidden, weight, index = head_case(dtype)

    def kernel(h, w, i, t):
        return tk.head_logprobs(h, w, i, t, True, IGNORE, chunk_v=CHUNK_V, block_v=128)

    want = head_reference(hidden, weight, index, temperature)
    check_head(run_head(hidden, weight, index, temperature, kernel), want, dtype)


@pytest.mark.parametrize("backend", ["torch", "plain"])
def test_head_torch_paths_match_float64(backend, monkeypatch):
    monkeypatch.setattr("common.logprobs.CHUNK_ROWS", 4)  # two row chunks, under checkpoint
    hidden, weight, index = head_case(torch.float32)

    def torch_path(h, w, i, t):
        return hidden_logprobs(h, w, i, t, True, backend, IGNORE)

    want = head_reference(hidden, weight, index, 0.7)
    check_head(run_head(hidden, weight, index, 0.7, torch_path), want, torch.float32)


def test_head_kernel_frozen_weight_and_no_entropy():
    hidden, weight, index = head_case(torch.float32)
    h = leaf(hidden)
    lp, ent = tk.head_logprobs(h, weight.to(DEV), index.to(DEV), 1.0, False, IGNORE, chunk_v=CHUNK_V)
    assert ent is None
    lp.sum().backward()
    h_ref = hidden.double().clone().requires_grad_()
    reference(h_ref.reshape(-1, D) @ weight.double().T, index.reshape(-1), 1.0)[0].sum().backward()
    check_close(h.grad, h_ref.grad, 2e-5, "grad hidden")


# ---------------------------------------------------------------- dispatch
def test_auto_uses_torch_on_cpu_and_rejects_unknown_backends(monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("auto picked Triton for CPU tensors")

    monkeypatch.setattr(tk, "logits_logprobs", fail)
    monkeypatch.setattr(tk, "head_logprobs", fail)
    hidden, weight, index = head_case(torch.float32)
    lp, _ = token_logprobs(hidden @ weight.T, index)
    lp2, _ = hidden_logprobs(hidden, weight, index)
    torch.testing.assert_close(lp, lp2)
    with pytest.raises(ValueError, match="backend"):
        token_logprobs(hidden @ weight.T, index, backend="cuda")


def test_triton_on_cpu_without_interpreter_says_why(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    x, index = random_case()
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        token_logprobs(x.float(), index, backend="triton")


def test_module_imports_and_runs_without_triton(monkeypatch):
    monkeypatch.setitem(sys.modules, "triton", None)  # `import triton` now fails
    monkeypatch.delitem(sys.modules, "common.logprobs")  # a fresh import; the old module comes back after
    fresh = importlib.import_module("common.logprobs")
    for device in ["cpu"] + (["cuda"] if ON_GPU else []):  # "auto" falls back to torch even on CUDA
        lp, _ = fresh.token_logprobs(torch.zeros(2, 4, device=device), torch.tensor([0, 3], device=device))
        torch.testing.assert_close(lp.cpu(), torch.full((2,), -math.log(4.0)))


# ---------------------------------------------------------------- GPU, realistic sizes
gpu = pytest.mark.skipif(not ON_GPU, reason="needs CUDA: compiled kernels at Qwen2.5 vocabulary size")


@gpu
def test_gpu_logits_kernel_matches_torch_reference():
    torch.manual_seed(0)
    n, v = 2048, 151936
    x = (torch.randn(n, v, device="cuda") * 4).bfloat16()
    index = torch.randint(0, v, (n,), device="cuda")
    a, b = torch.randn(n, device="cuda"), torch.randn(n, device="cuda")
    out = {}
    for backend in ["triton", "torch"]:
        leaf = x.clone().requires_grad_()
        lp, ent = token_logprobs(leaf, index, 0.9, True, backend)
        (lp * a + ent * b).sum().backward()
        out[backend] = (lp, ent, leaf.grad.float())
    for got, want in zip(out["triton"], out["torch"]):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-2)


@gpu
def test_gpu_head_kernel_matches_torch_reference():
    torch.manual_seed(0)
    n, v, d = 1024, 151936, 1536
    hidden = torch.randn(n, d, device="cuda").bfloat16()
    weight = (torch.randn(v, d, device="cuda") * d**-0.5).bfloat16()
    index = torch.randint(0, v, (n,), device="cuda")
    a, b = torch.randn(n, device="cuda"), torch.randn(n, device="cuda")
    out = {}
    for backend in ["triton", "torch"]:
        h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        lp, ent = hidden_logprobs(h, w, index, 1.0, True, backend)
        (lp * a + ent * b).sum().backward()
        out[backend] = (lp, ent, h.grad.float(), w.grad.float())
    for got, want in zip(out["triton"], out["torch"]):
        torch.testing.assert_close(got, want, atol=2e-3, rtol=2e-2)


# ---------------------------------------------------------------- bf16 autocast, as the scripts run on CUDA
# fp32 master weights, `torch.autocast(dtype=bfloat16)` around the forward, backward outside it (grpo.py).
# The bounds below are worst-case bf16 error bounds computed from the float64 reference, not fitted
# constants: U = 2^-8 is bf16's unit roundoff (8 significant bits, round to nearest), products accumulate
# in fp32 (2^-24 per add) and the matmul output is rounded once to bf16.
U = 2.0**-8
EPS32 = 2.0**-24


def bf16_exact(t):
    return t.to(torch.bfloat16).double()


def peaked_head_case(seed=11, n=6, d=32):
    """bf16-exact hidden and weight (autocast's input casts are then exact, so the only roundings are the
    paths' own), with logits of a trained LM's size (max |x| 11-29): targets 7, 9 and 11 above the rest
    (p_y 0.997-0.99994, as for most tokens a trained model samples: where 1 - p_y is tiny, a backward
    whose probabilities do not sum to 1 is most wrong), 3 above, tied with the max, and 2 below."""
    g = torch.Generator().manual_seed(seed)
    weight = torch.randn(V, d, generator=g, dtype=torch.float64) / d**0.5
    index = torch.randint(0, V, (n,), generator=g)
    hidden = torch.randn(n, d, generator=g, dtype=torch.float64) * 2.5
    margin = torch.tensor([7.0, 9.0, 11.0, 3.0, 0.0, -2.0])[:n]
    wy = weight[index]
    for _ in range(4):  # moving hidden along w_y moves the other logits too: a few fixed-point steps
        others = (hidden @ weight.T).scatter(-1, index[:, None], -float("inf")).amax(-1)
        x_y = (hidden * wy).sum(-1)
        hidden = hidden + ((others + margin - x_y) / (wy * wy).sum(-1))[:, None] * wy
    return bf16_exact(hidden), bf16_exact(weight), index


def bf16_bounds(hidden, weight, index, a):
    """Float64 reference values and grads, and worst-case bounds on a bf16-autocast path's errors.

    delta bounds each logit's error: fp32 accumulation of d exact products, then one bf16 rounding.
    logp = x_y - lse moves by at most 2 delta (lse is 1-Lipschitz in the max norm). Each p_j moves by a
    factor within exp(+-2 delta), and, as p sums to 1, so does 1 - p_y; hence every component of the
    logit gradient a (1[j = y] - p_j) is within a relative expm1(2 delta) (plus fp32 rounding), is then
    rounded to bf16 (U), and the grad matmuls add U (bf16 output) and V * 2^-24 (fp32 accumulation of at
    most V terms) of the sum of absolute terms. The entropy, whose logit gradient has l1 norm <= 2 H, moves by at most
    H expm1(2 delta) (Gronwall). A backward whose softmax probabilities do not sum to 1 breaks the
    1 - p_y step: its error is then absolute (~ delta), not relative to 1 - p_y, and the bound fails."""
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    x = h @ w.T
    lsm = torch.log_softmax(x, -1)
    logp = lsm.gather(-1, index[:, None]).squeeze(-1)
    ent = -(lsm.exp() * lsm).sum(-1)
    (logp * a).sum().backward()
    x, n_vocab, d = x.detach(), weight.shape[0], weight.shape[1]
    xmax = x.abs().amax(-1)
    fp32 = 16 * EPS32 * (1 + xmax)  # absolute fp32 error of lse, exp, 1 - p_y: a few ulps at |x|
    delta = U * xmax + (1 + U) * d * EPS32 * (hidden.abs() @ weight.abs().T).amax(-1)
    k = torch.expm1(2 * delta) + fp32  # relative error of the fp32 logit gradient, per row
    k = k + U * (1 + k)  # ... rounded to bf16
    k = k + (U + n_vocab * EPS32) * (1 + k)  # ... through a bf16 matmul with fp32 accumulation
    g_abs = (torch.nn.functional.one_hot(index, n_vocab) - lsm.detach().exp()).abs() * a.abs()[:, None]
    slack = (fp32 * a.abs())[:, None] * (1 + k[:, None])  # the absolute fp32 term, per logit
    bounds = (2 * delta + fp32, ent.detach() * torch.expm1(2 * delta) + fp32,
              (k[:, None] * g_abs + slack) @ weight.abs(), (k[:, None] * g_abs + slack).T @ hidden.abs())
    return (logp.detach(), ent.detach(), h.grad, w.grad), bounds


def bf16_autocast_path(path):
    """fn(hidden, weight, index) -> (logp, entropy) under bf16 autocast, fp32 master tensors."""
    def fn(h, w, i):
        with torch.autocast(DEV, dtype=torch.bfloat16):
            if path == "triton-logits":  # kernel 1 on the bf16 logits of an autocast LM head
                return tk.logits_logprobs(h @ w.T, i, 1.0, True, IGNORE, BLOCK_V)
            if path == "triton-head":
                return tk.head_logprobs(h, w, i, 1.0, True, IGNORE, chunk_v=CHUNK_V, block_v=128)
            return hidden_logprobs(h, w, i, 1.0, True, path, IGNORE)
    return fn


BF16_PATHS = ["triton-logits", "triton-head", "torch", "plain"]


@pytest.mark.parametrize("path", BF16_PATHS)
def test_bf16_autocast_within_bf16_error_bounds(path):
    hidden, weight, index = peaked_head_case()
    a = upstream(len(index))[0].float().double()  # fp32-exact upstream grads
    want, bounds = bf16_bounds(hidden, weight, index, a)
    h, w = leaf(hidden.float()), leaf(weight.float())
    lp, ent = bf16_autocast_path(path)(h, w, index.to(DEV))
    (lp.double().cpu() * a).sum().backward()
    assert h.grad.dtype == w.grad.dtype == torch.float32
    names = ["logp", "entropy", "grad hidden", "grad weight"]
    for got, ref, bound, what in zip((lp, ent, h.grad, w.grad), want, bounds, names):
        err = (got.detach().double().cpu() - ref).abs()
        worst = (err / bound).max().item()
        assert worst <= 1, f"{path} {what}: error {err.max().item():.3g}, {worst:.3g} x its bf16 bound"


@pytest.mark.parametrize("path", BF16_PATHS)
def test_bf16_autocast_backward_probabilities_sum_to_one(path):
    """sum_j dlogp_y/dx_j = 1 - sum_j p_j must be 0: log-softmax is invariant to a shift of all logits.
    Read through the weight grad of a one-row call, dL/dW_j = g_j h, so g_j = (dL/dW_j . h) / |h|^2."""
    hidden, weight, index = peaked_head_case()
    for r in range(len(index)):
        h, w = leaf(hidden[r : r + 1].float()), leaf(weight.float())
        lp, _ = bf16_autocast_path(path)(h, w, index[r : r + 1].to(DEV))
        lp.sum().backward()
        hr = hidden[r]
        g = (w.grad.double().cpu() @ hr) / (hr @ hr)  # dL/dlogits after two bf16 roundings (g_j, g_j h_k)
        p_sum = 1 - g.sum().item()
        tol = 2 * U * g.abs().sum().item() + 16 * EPS32 * (1 + (hr @ weight.T).abs().max().item())  # + fp32 ulps
        assert abs(p_sum - 1) <= tol, f"{path} row {r}: probabilities in the backward sum to {p_sum:.6f}"

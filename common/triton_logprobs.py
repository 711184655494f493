"""Triton kernels for per-token log-probs and entropy (imported lazily by `common.logprobs`).

Kernel 1 (`logits_logprobs`): logits [N, V] -> log p(y) and entropy in one pass over V,
with an online logsumexp in fp32; the backward writes d(loss)/d(logits) in one more pass.
Kernel 2 (`head_logprobs`): hidden [N, d] and LM-head weight [V, d] -> the same outputs,
vocab chunk by vocab chunk, so [N, V] logits never exist: each chunk's logits come from one
cuBLAS matmul and are folded into per-row running statistics by the kernel of kernel 1; the
backward recomputes each chunk (the same matmul in the forward's dtype, bf16 under autocast, so that
the saved logsumexp belongs to it), turns it into d(loss)/d(logits) in place, and multiplies out
the grads of hidden (accumulated over chunks in fp32) and of the weight (one matmul per chunk).

Notation (docs/kernels.md derives it): x = logits / T, lse = logsumexp(x), logp_y = x_y - lse,
p = softmax(x), H = lse - sum_j p_j x_j. Per row the kernels keep, relative to the running max m,
    s = sum_j exp(x_j - m),   t = sum_j exp(x_j - m) (x_j - m),
so lse = m + log s and H = log s - t / s; keeping t relative to m avoids the cancellation of
lse - E[x] when logits are large. Gradients, with upstream grads a = dL/dlogp, b = dL/dH:
    dL/dx_j = a (1[j = y] - p_j) - b p_j (log p_j + H),   dL/dlogits = dL/dx / T.

On CPU the kernels run only under TRITON_INTERPRET=1, which must be set before this module
is imported (triton reads it when `@triton.jit` decorates a kernel).
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

MAX_BLOCK_V = 4096  # columns per program step (a guess at what streams at full bandwidth: unmeasured on a GPU)
CHUNK_ELEMS = 2**26  # kernel 2: N * chunk_v logits per chunk (128 MiB in bf16), whatever V is


@triton.jit
def _stats_kernel(
    x_ptr, T, stride_b, stride_t,  # logits (chunk); row r starts at (r // T) * stride_b + (r % T) * stride_t
    idx_ptr, m_ptr, s_ptr, t_ptr, xy_ptr,  # target ids; running per-row stats, updated in place
    col0, n_cols, inv_temp, ignore_index,  # the chunk holds vocab columns [col0, col0 + n_cols)
    WITH_ENTROPY: tl.constexpr, BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0)
    y = tl.load(idx_ptr + row)
    if y != ignore_index:  # ignored rows are never read
        row64 = row.to(tl.int64)  # N * V exceeds 2**31 at realistic sizes
        base = x_ptr + (row64 // T) * stride_b + (row64 % T) * stride_t
        # The target's scaled logit, when it lies in this chunk: one scalar load.
        in_chunk = (y >= col0) & (y < col0 + n_cols)
        x_y = tl.load(base + (y - col0), mask=in_chunk, other=0.0).to(tl.float32) * inv_temp
        tl.store(xy_ptr + row, x_y, mask=in_chunk)

        m = tl.load(m_ptr + row)
        s = tl.load(s_ptr + row)
        t = tl.load(t_ptr + row)
        offs = tl.arange(0, BLOCK_V)
        for start in range(0, n_cols, BLOCK_V):
            cols = start + offs
            x = tl.load(base + cols, mask=cols < n_cols, other=-float("inf")).to(tl.float32) * inv_temp
            m_new = tl.maximum(m, tl.max(x, axis=0))
            # Shift by 0 while everything seen is -inf, so no -inf - -inf = nan appears.
            m_ref = tl.where(m_new == -float("inf"), 0.0, m_new)
            alpha = tl.exp(m - m_ref)  # rescales the old sums to the new max (0 on the first step)
            e = tl.exp(x - m_ref)
            if WITH_ENTROPY:
                # t is relative to m: moving the reference to m_ref adds s * (m - m_ref).
                # The where()s drop terms that are 0 * -inf (empty history, -inf or masked logits).
                shift = s * tl.where(s > 0, m - m_ref, 0.0)
                t = alpha * (t + shift) + tl.sum(e * tl.where(e > 0, x - m_ref, 0.0), axis=0)
            s = s * alpha + tl.sum(e, axis=0)
            m = m_new
        tl.store(m_ptr + row, m)
        tl.store(s_ptr + row, s)
        if WITH_ENTROPY:
            tl.store(t_ptr + row, t)


@triton.jit
def _grad_kernel(
    x_ptr, T, stride_b, stride_t,  # logits (chunk), addressed as in _stats_kernel
    g_ptr, stride_g,  # output dL/dlogits, row-major [N, n_cols]; may alias x (in place)
    idx_ptr, lse_ptr, ent_ptr, glp_ptr, gent_ptr,
    col0, n_cols, inv_temp, ignore_index,
    HAS_GLP: tl.constexpr, HAS_GENT: tl.constexpr, BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)
    mask = cols < n_cols
    y = tl.load(idx_ptr + row)
    valid = y != ignore_index
    row64 = row.to(tl.int64)
    base = x_ptr + (row64 // T) * stride_b + (row64 % T) * stride_t
    x = tl.load(base + cols, mask=mask & valid, other=-float("inf")).to(tl.float32) * inv_temp
    logp = x - tl.load(lse_ptr + row)
    p = tl.exp(logp)
    g = tl.zeros([BLOCK_V], dtype=tl.float32)
    if HAS_GLP:  # d logp_y / dx_j = 1[j = y] - p_j
        g += tl.load(glp_ptr + row) * (tl.where(cols + col0 == y, 1.0, 0.0) - p)
    if HAS_GENT:  # dH/dx_j = -p_j (log p_j + H); 0 where p_j = 0 (limit of p log p)
        h = tl.load(ent_ptr + row)
        g -= tl.load(gent_ptr + row) * p * tl.where(p > 0, logp + h, 0.0)
    g = tl.where(valid, g * inv_temp, 0.0)  # zero even if the upstream grad of an ignored row is nan
    tl.store(g_ptr + row64 * stride_g + cols, g.to(g_ptr.dtype.element_ty), mask=mask)


def _check_device(t: torch.Tensor):
    if not t.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError(
            "Triton kernels need CUDA tensors, or TRITON_INTERPRET=1 set before triton is imported "
            "to run them on CPU; use backend='torch' otherwise."
        )


def _block(n_cols: int, block_v: int | None) -> tuple[int, int]:
    """(BLOCK_V, num_warps): a power of two covering the row, capped; tests force small blocks."""
    b = block_v or min(MAX_BLOCK_V, triton.next_power_of_2(max(n_cols, 16)))
    return b, (8 if b >= 2048 else 4)


def _rows(logits: torch.Tensor):
    """(x, T, stride_b, stride_t) with row r of x at (r // T) * stride_b + (r % T) * stride_t.

    A 3-D tensor keeps its strides, so a slice such as logits[:, :-1] is read without a copy.
    """
    if logits.stride(-1) != 1:
        logits = logits.contiguous()
    if logits.dim() == 3:
        return logits, max(logits.shape[1], 1), logits.stride(0), logits.stride(1)
    x = logits.reshape(-1, logits.shape[-1])
    return x, max(x.shape[0], 1), 0, x.stride(0)


class _Stats:
    """Per-row running (m, s, t, x_y) of the online logsumexp, accumulated over vocab chunks."""

    def __init__(self, n: int, device):
        self.m = torch.full((n,), -float("inf"), device=device)
        self.s = torch.zeros(n, device=device)
        self.t = torch.zeros(n, device=device)
        self.xy = torch.zeros(n, device=device)

    def update(self, x, T, sb, st, idx, col0, n_cols, inv_temp, ignore_index, with_entropy, block_v):
        bv, warps = _block(n_cols, block_v)
        _stats_kernel[(idx.numel(),)](
            x, T, sb, st, idx, self.m, self.s, self.t, self.xy, col0, n_cols, inv_temp, ignore_index,
            WITH_ENTROPY=with_entropy, BLOCK_V=bv, num_warps=warps,
        )

    def finalize(self, valid, with_entropy):
        """(logp, entropy or None, lse); ignored rows give 0 (lse 0 keeps nan out of the backward)."""
        log_s = self.s.log()
        lse = torch.where(valid, self.m + log_s, 0.0)
        logp = torch.where(valid, self.xy - lse, 0.0)
        ent = torch.where(valid, log_s - self.t / self.s, 0.0) if with_entropy else None
        return logp, ent, lse


def _launch_grad(x, T, sb, st, g, idx, lse, ent, g_logp, g_ent, col0, n_cols, inv_temp, ignore_index, block_v):
    bv, warps = _block(n_cols, block_v)
    dummy = lse  # stands in for an absent tensor; never read (HAS_* is False)
    _grad_kernel[(idx.numel(), triton.cdiv(n_cols, bv))](
        x, T, sb, st, g, g.stride(0), idx, lse, ent if ent is not None else dummy,
        g_logp if g_logp is not None else dummy, g_ent if g_ent is not None else dummy,
        col0, n_cols, inv_temp, ignore_index,
        HAS_GLP=g_logp is not None, HAS_GENT=g_ent is not None, BLOCK_V=bv, num_warps=warps,
    )


def _flat_grad(g: torch.Tensor | None):
    # Upstream grads may be expanded (stride 0) or another dtype: the kernel wants contiguous fp32.
    return None if g is None else g.reshape(-1).float().contiguous()


class _LogitsLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, index, temperature, with_entropy, ignore_index, block_v):
        x, T, sb, st = _rows(logits)
        idx = index.reshape(-1).contiguous()
        n, V = idx.numel(), logits.shape[-1]
        stats = _Stats(n, logits.device)
        if n:
            stats.update(x, T, sb, st, idx, 0, V, 1.0 / temperature, ignore_index, with_entropy, block_v)
        logp, ent, lse = stats.finalize(idx != ignore_index, with_entropy)
        ctx.save_for_backward(x, idx, lse, ent)
        ctx.args = (T, sb, st, logits.shape, 1.0 / temperature, ignore_index, block_v)
        ctx.set_materialize_grads(False)  # an unused output (often the entropy) costs nothing
        return logp, ent

    @staticmethod
    def backward(ctx, g_logp, g_ent):
        x, idx, lse, ent = ctx.saved_tensors
        T, sb, st, shape, inv_temp, ignore_index, block_v = ctx.args
        V = shape[-1]
        g = torch.empty((idx.numel(), V), dtype=x.dtype, device=x.device)
        if idx.numel():  # the kernel writes every element, zeros where there is no gradient
            _launch_grad(x, T, sb, st, g, idx, lse, ent, _flat_grad(g_logp), _flat_grad(g_ent),
                         0, V, inv_temp, ignore_index, block_v)
        return g.view(shape), None, None, None, None, None


class _HeadLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, index, temperature, with_entropy, ignore_index, chunk_v, block_v):
        n, V = hidden.shape[0], weight.shape[0]
        stats = _Stats(n, hidden.device)
        logits_dtype = hidden.dtype
        for c0 in range(0, V if n else 0, chunk_v):
            # (n, chunk) in the model's dtype, as lm_head would make them: bf16 under autocast
            logits = hidden @ weight[c0 : c0 + chunk_v].T
            logits_dtype = logits.dtype
            stats.update(logits, n, 0, logits.stride(0), index, c0, logits.shape[1], 1.0 / temperature,
                         ignore_index, with_entropy, block_v)
        logp, ent, lse = stats.finalize(index != ignore_index, with_entropy)
        ctx.save_for_backward(hidden, weight, index, lse, ent)
        ctx.args = (1.0 / temperature, ignore_index, chunk_v, block_v, logits_dtype)
        ctx.set_materialize_grads(False)
        return logp, ent

    @staticmethod
    def backward(ctx, g_logp, g_ent):
        hidden, weight, index, lse, ent = ctx.saved_tensors
        inv_temp, ignore_index, chunk_v, block_v, dt = ctx.args
        need_h, need_w = ctx.needs_input_grad[:2]
        n, V = hidden.shape[0], weight.shape[0]
        g_hidden = torch.zeros(hidden.shape, dtype=torch.float32, device=hidden.device) if need_h else None
        g_weight = torch.zeros_like(weight) if need_w else None  # zeros if returned untouched below
        g_logp, g_ent = _flat_grad(g_logp), _flat_grad(g_ent)
        if n == 0 or (g_logp is None and g_ent is None):
            return _cast(g_hidden, hidden), g_weight, None, None, None, None, None, None
        # The recomputed logits must be the forward's: the same matmul in the same dtype. Under autocast the
        # forward's are bf16; recomputed in fp32 (backward runs outside autocast) against the bf16 lse, the
        # p_j = exp(x_j - lse) sum to exp(lse32 - lse16) != 1, off by up to ~2^-8 |x|, and where 1 - p_y is
        # smaller than that (most sampled tokens) d log p_y / dx_y = 1 - p_y flips sign. So the backward
        # casts explicitly to the forward's dtype with autocast off, whatever autocast state it runs under.
        h = hidden.to(dt)
        with torch.autocast(hidden.device.type, enabled=False):
            for c0 in range(0, V, chunk_v):
                w = weight[c0 : c0 + chunk_v].to(dt)
                g = h @ w.T  # recompute this chunk's logits, then overwrite them with dL/dlogits
                _launch_grad(g, n, 0, g.stride(0), g, index, lse, ent, g_logp, g_ent,
                             c0, g.shape[1], inv_temp, ignore_index, block_v)
                if need_h:
                    g_hidden += g @ w  # fp32 sum over vocab chunks; each product is one cuBLAS matmul
                if need_w:  # complete: sums over all rows
                    if g_weight.dtype == dt:
                        torch.mm(g.T, h, out=g_weight[c0 : c0 + chunk_v])
                    else:  # fp32 master weight under autocast: a bf16 product, stored in fp32 as autograd would
                        g_weight[c0 : c0 + chunk_v] = g.T @ h
        return _cast(g_hidden, hidden), g_weight, None, None, None, None, None, None


def _cast(g, like):
    return None if g is None else g.to(like.dtype)


def logits_logprobs(logits, index, temperature=1.0, with_entropy=False, ignore_index=-100, block_v=None):
    """Kernel 1. logits (B, T, V) or (N, V) fp32/bf16/fp16 (strided slices welcome); index int64
    with the leading shape. Returns (logp, entropy or None), fp32 with index's shape; rows whose
    index is `ignore_index` give 0 and no gradient."""
    _check_device(logits)
    logp, ent = _LogitsLogprobs.apply(logits, index, float(temperature), with_entropy, ignore_index, block_v)
    return logp.view(index.shape), (ent.view(index.shape) if ent is not None else None)


def head_logprobs(hidden, weight, index, temperature=1.0, with_entropy=False, ignore_index=-100,
                  chunk_v=None, block_v=None):
    """Kernel 2. hidden (B, T, d) or (N, d), weight (V, d) of the same dtype; logits = hidden @ weight.T
    are made `chunk_v` vocab columns at a time (default: CHUNK_ELEMS / N, so memory does not grow
    with V). Same outputs as `logits_logprobs`; grads flow to hidden and weight."""
    _check_device(hidden)
    if hidden.dtype != weight.dtype:
        raise TypeError(f"hidden ({hidden.dtype}) and weight ({weight.dtype}) must share a dtype")
    h = hidden.reshape(-1, hidden.shape[-1])
    n, V = h.shape[0], weight.shape[0]
    if chunk_v is None:  # multiple of 128 keeps cuBLAS tiles and row starts aligned
        chunk_v = min(V, max(128, CHUNK_ELEMS // max(n, 1) // 128 * 128))
    idx = index.reshape(-1).contiguous()
    logp, ent = _HeadLogprobs.apply(h, weight, idx, float(temperature), with_entropy, ignore_index,
                                    chunk_v, block_v)
    return logp.view(index.shape), (ent.view(index.shape) if ent is not None else None)

"""Per-token log-probs and entropy of the sampled tokens, without a full fp32 [N, V] copy.

Two entry points, one return contract `(logps fp32, entropy fp32 or None)` with index's shape:
- `token_logprobs(logits, index, ...)`: from logits the model already produced.
- `hidden_logprobs(hidden, weight, index, ...)`: from the last hidden states and the LM-head
  weight, so that [N, V] logits never exist (the memory peak of RL training at V = 152k).
Backends: "auto" (Triton on CUDA tensors when triton is installed, the torch reference
otherwise), "triton" (`common.triton_logprobs`; on CPU only under TRITON_INTERPRET=1), "torch"
(chunked reference below), "plain" (the textbook full-fp32 path, for comparison).
"""
from __future__ import annotations

import importlib.util

import torch
from torch.utils.checkpoint import checkpoint

CHUNK_ROWS = 1024  # rows of logits turned into fp32 at a time by the torch reference
BACKENDS = ("auto", "triton", "torch", "plain")


def _chunk_stats(logits: torch.Tensor, index: torch.Tensor, temperature: float, with_entropy: bool):
    # logits (n, V) any float dtype -> fp32 per chunk only
    x = logits.float() / temperature
    lse = torch.logsumexp(x, dim=-1)  # (n,)
    logp = x.gather(-1, index.unsqueeze(-1)).squeeze(-1) - lse  # (n,)
    ent = None
    if with_entropy:
        p = torch.softmax(x, dim=-1)
        # H = logsumexp(x) - E_p[x]; -inf logits (p = 0) add 0, and masking x, not the product,
        # keeps the backward free of 0 * inf
        ent = lse - (p * x.masked_fill(x.isneginf(), 0.0)).sum(-1)
    return logp, ent


def _row_chunked(fn, rows: torch.Tensor, index: torch.Tensor, *args):
    """fn(rows_chunk, index_chunk, *args) -> (logp, ent or None) over CHUNK_ROWS rows at a time.

    Each chunk runs under checkpoint, so autograd keeps no per-chunk fp32 tensors: the backward
    recomputes one chunk at a time. split (not slicing) makes the backward one cat of the chunk
    grads instead of a full-size zeros tensor per chunk."""
    logps, ents = [], []
    for r, i in zip(rows.split(CHUNK_ROWS), index.split(CHUNK_ROWS)):
        lp, en = checkpoint(fn, r, i, *args, use_reentrant=False)
        logps.append(lp)
        ents.append(en)  # split gives one empty chunk for zero rows, so the lists are never empty
    return torch.cat(logps), (torch.cat(ents) if ents[0] is not None else None)


def _reshaped(logp, ent, shape):
    return logp.reshape(shape), (ent.reshape(shape) if ent is not None else None)


def selective_log_softmax_torch(logits, index, temperature=1.0, with_entropy=False):
    """Reference: log_softmax(logits / T).gather(index), row-chunked. logits (..., V), index (...)."""
    flat, idx = logits.reshape(-1, logits.shape[-1]), index.reshape(-1)
    logp, ent = _row_chunked(_chunk_stats, flat, idx, temperature, with_entropy)
    return _reshaped(logp, ent, index.shape)


def _head_chunk(hidden, index, weight, temperature, with_entropy):
    return _chunk_stats(hidden @ weight.T, index, temperature, with_entropy)  # (n, V) for n rows only


def hidden_logprobs_torch(hidden, weight, index, temperature=1.0, with_entropy=False):
    """Reference for the fused LM head: row chunks of hidden @ weight.T; as every chunk runs under
    checkpoint, the backward recomputes a chunk's logits instead of keeping all of them."""
    h, idx = hidden.reshape(-1, hidden.shape[-1]), index.reshape(-1)
    logp, ent = _row_chunked(_head_chunk, h, idx, weight, temperature, with_entropy)
    return _reshaped(logp, ent, index.shape)


def _plain(logits, index, temperature, with_entropy):
    lsm = torch.log_softmax(logits.float() / temperature, dim=-1)
    logp = lsm.gather(-1, index.unsqueeze(-1)).squeeze(-1)
    ent = -(lsm.exp() * lsm).sum(-1) if with_entropy else None
    return logp, ent


def _use_triton(backend: str, tensor: torch.Tensor) -> bool:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":  # triton imported lazily: this module works without it or without a GPU
        return tensor.is_cuda and importlib.util.find_spec("triton") is not None
    return backend == "triton"


def _without_ignored(fn, index, ignore_index):
    """Run a torch path with ignored ids replaced by 0 (so gather is valid), then zero those rows:
    the zeroed outputs carry no gradient back, as the Triton kernels skip the rows."""
    valid = index != ignore_index
    logp, ent = fn(index.masked_fill(~valid, 0))
    logp = logp.masked_fill(~valid, 0.0)
    return logp, (ent.masked_fill(~valid, 0.0) if ent is not None else None)


def token_logprobs(logits, index, temperature=1.0, with_entropy=False, backend="auto", ignore_index=-100):
    """Log-prob of `index` under softmax(logits / temperature), fp32, and optionally the entropy.

    logits (B, T, V) or (N, V) in fp32/bf16/fp16; index (B, T) or (N,) int64.
    Returns (logps, entropy or None), both fp32 with index's shape. Positions whose index is
    `ignore_index` (padding) give 0 for both and no gradient.
    backend: "auto" (Triton on CUDA, torch reference otherwise), "torch", "triton",
    "plain" (log_softmax(logits.float()).gather: the textbook path, full fp32 copy).
    """
    if _use_triton(backend, logits):
        from common.triton_logprobs import logits_logprobs

        return logits_logprobs(logits, index, temperature, with_entropy, ignore_index)
    if backend == "plain":
        return _without_ignored(lambda i: _plain(logits, i, temperature, with_entropy), index, ignore_index)
    return _without_ignored(
        lambda i: selective_log_softmax_torch(logits, i, temperature, with_entropy), index, ignore_index
    )


def hidden_logprobs(hidden, weight, index, temperature=1.0, with_entropy=False, backend="auto", ignore_index=-100):
    """`token_logprobs` of logits = hidden @ weight.T, without materialising the [N, V] logits.

    hidden (B, T, d) or (N, d) and weight (V, d) (the LM head, possibly tied to the embedding)
    in the same dtype; index (B, T) or (N,). Same return contract and `ignore_index` as
    `token_logprobs`; gradients flow to hidden and weight. "plain" does materialise the logits.
    """
    if _use_triton(backend, hidden):
        from common.triton_logprobs import head_logprobs

        return head_logprobs(hidden, weight, index, temperature, with_entropy, ignore_index)
    if backend == "plain":
        return token_logprobs(hidden @ weight.T, index, temperature, with_entropy, "plain", ignore_index)
    return _without_ignored(
        lambda i: hidden_logprobs_torch(hidden, weight, i, temperature, with_entropy), index, ignore_index
    )

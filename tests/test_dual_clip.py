"""grpo_loss's corners, in every script that defines it: the dual clip (`--dual-clip`, on in cepo.py), the log-ratio
clamp before exp, per-token (b, T) advantages, and the `clip_ratio/dual_mean` statistic.

The reference is EasyR1's `compute_policy_loss` (verl/trainer/core_algos.py of the CEPO repository) and verl's
`compute_policy_loss_vanilla`: r = exp(clamp(logp - old, -20, 20)), l = max(-A r, -A clip(r, 1 - eps_low,
1 + eps_high)), and where A < 0, l = min(l, -c A); the logged share counts tokens with A < 0 where the cap binds;
truncated importance weights multiply the loss after the cap. Every expected value below is worked out by hand
from those lines (eps_low 0.2, eps_high 0.28, c = 3), in float64 so the checks are exact to 1e-12.
"""
import importlib
import math

import pytest
import torch
from losses import scripts_loss

SCRIPTS = [m for m in ("grpo", "clipo", "conspo", "cepo", "r2po") if hasattr(importlib.import_module(m), "grpo_loss")]
EPS = dict(eps_low=0.2, eps_high=0.28)

# three rows of five tokens: the importance ratio of each token, its completion mask (row 0's last token is padding
# with A < 0 and ratio > 3, so a statistic that forgets the mask counts it)
RATIO = [[4.0, 0.5, 1.1, 2.0, 5.0],
         [4.0, 0.5, 1.1, 1.0, 1.0],
         [10.0, 3.5, 2.9, 1.0, 1.0]]
MASK = [[1, 1, 1, 1, 0],
        [1, 1, 1, 0, 0],
        [1, 1, 1, 0, 0]]

# case "row": one advantage per sequence, A = -2, +1.5, -1.
#   row 0, A = -2: r 4 -> max(8, 2.56) = 8, capped at -c A = 6 (dual); r 0.5 -> max(1, 1.6) = 1.6 (low clip);
#                  r 1.1 -> 2.2; r 2.0 -> max(4, 2.56) = 4, under the cap
#   row 1, A = +1.5: r 4 -> -min(6, 1.92) = -1.92 (high clip; never capped, A > 0); r 0.5 -> -min(0.75, 1.2) = -0.75;
#                  r 1.1 -> -1.65
#   row 2, A = -1: r 10 -> 10, capped at 3 (dual); r 3.5 -> 3.5, capped at 3 (dual); r 2.9 -> 2.9, under the cap
# d l / d logp = d l / d r * r: -A r on a token whose unclipped, uncapped branch is active, else 0.
ROW = dict(adv=[-2.0, 1.5, -1.0],
           loss=[[6.0, 1.6, 2.2, 4.0], [-1.92, -0.75, -1.65], [3.0, 3.0, 2.9]],
           uncapped=[[8.0, 1.6, 2.2, 4.0], [-1.92, -0.75, -1.65], [10.0, 3.5, 2.9]],
           grad=[[0.0, 0.0, 2.2, 4.0], [0.0, -0.75, -1.65], [0.0, 0.0, 2.9]],
           low=1, high=1, dual=3)
# case "token": one advantage per token, signs varying within a row (padding holds 7.0 and 0.0)
#   row 0: (r 4, A -2) -> 6 capped (dual); (r 0.5, A -2) -> 1.6 (low); (r 1.1, A +1) -> -1.1; (r 2, A -1) -> 2
#   row 1: (r 4, A +1.5) -> -1.92 (high); (r 0.5, A -1) -> max(0.5, 0.8) = 0.8 (low); (r 1.1, A +1.5) -> -1.65
#   row 2: (r 10, A -1) -> 3 capped (dual); (r 3.5, A +2) -> -min(7, 2.56) = -2.56 (high; never capped, A > 0);
#          (r 2.9, A -1) -> 2.9
TOKEN = dict(adv=[[-2.0, -2.0, 1.0, -1.0, 7.0], [1.5, -1.0, 1.5, 0.0, 0.0], [-1.0, 2.0, -1.0, 0.0, 0.0]],
             loss=[[6.0, 1.6, -1.1, 2.0], [-1.92, 0.8, -1.65], [3.0, -2.56, 2.9]],
             uncapped=[[8.0, 1.6, -1.1, 2.0], [-1.92, 0.8, -1.65], [10.0, -2.56, 2.9]],
             grad=[[0.0, 0.0, -1.1, 2.0], [0.0, 0.0, -1.65], [0.0, 0.0, 2.9]],
             low=2, high=2, dual=2)


def aggregate_by_hand(per_row: list[list[float]], agg: str) -> float:
    """The two aggregations on lists of the masked tokens' values, without the scripts' `aggregate`."""
    if agg == "seq-mean-token-mean":
        return sum(sum(r) / len(r) for r in per_row) / len(per_row)
    return sum(sum(r) for r in per_row) / sum(len(r) for r in per_row)  # token-mean


def grad_by_hand(per_row: list[list[float]], agg: str) -> torch.Tensor:
    """d loss / d logps laid out like MASK: each masked token's d l / d logp times its aggregation weight."""
    n_tokens = sum(len(r) for r in per_row)
    out = torch.zeros(3, 5, dtype=torch.float64)
    for i, r in enumerate(per_row):
        for t, g in enumerate(r):
            out[i, t] = g / (len(r) * len(per_row)) if agg == "seq-mean-token-mean" else g / n_tokens
    return out


def call(module, adv, *, agg, dual_clip, log_ratio=None, is_weights=None):
    """module.grpo_loss on the RATIO/MASK batch; returns (loss, stats as floats, d loss / d logps)."""
    old = -torch.rand(3, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    log_ratio = torch.tensor(RATIO, dtype=torch.float64).log() if log_ratio is None else log_ratio
    logps = (old + log_ratio).requires_grad_()
    mask = torch.tensor(MASK, dtype=torch.float64)
    loss, stats = scripts_loss(module, logps, old, torch.tensor(adv, dtype=torch.float64), mask, **EPS, beta=0.0,
                               ref_logps=torch.zeros(3, 5, dtype=torch.float64), agg=agg, n_seqs=3,
                               n_tokens=int(mask.sum()), max_new_tokens=5, is_weights=is_weights,
                               dual_clip=dual_clip)
    (grad,) = torch.autograd.grad(loss, logps)
    return float(loss.detach()), {k: float(v) for k, v in stats.items()}, grad


@pytest.mark.parametrize("script", SCRIPTS)
@pytest.mark.parametrize("agg", ["seq-mean-token-mean", "token-mean"])
@pytest.mark.parametrize("case", ["row", "token"])
def test_dual_clip_by_hand(script, agg, case):
    want = ROW if case == "row" else TOKEN
    loss, stats, grad = call(importlib.import_module(script), want["adv"], agg=agg, dual_clip=3.0)
    assert loss == pytest.approx(aggregate_by_hand(want["loss"], agg), abs=1e-12)
    torch.testing.assert_close(grad, grad_by_hand(want["grad"], agg), rtol=0, atol=1e-12)
    assert stats["clip_ratio/dual_mean"] == want["dual"]  # a sum over tokens; the script divides by token-updates
    assert (stats["clip_ratio/low_mean"], stats["clip_ratio/high_mean"]) == (want["low"], want["high"])
    assert stats["clip_ratio/region_mean"] == want["low"] + want["high"]  # the dual clip is its own statistic


@pytest.mark.parametrize("script", SCRIPTS)
@pytest.mark.parametrize("agg", ["seq-mean-token-mean", "token-mean"])
def test_dual_clip_off_is_the_plain_surrogate(script, agg):
    loss, stats, grad = call(importlib.import_module(script), ROW["adv"], agg=agg, dual_clip=None)
    assert loss == pytest.approx(aggregate_by_hand(ROW["uncapped"], agg), abs=1e-12)
    # uncapped, the A < 0 tokens with ratio > 3 follow the unclipped branch: gradient -A r
    want_grad = [[8.0, 0.0, 2.2, 4.0], [0.0, -0.75, -1.65], [10.0, 3.5, 2.9]]
    torch.testing.assert_close(grad, grad_by_hand(want_grad, agg), rtol=0, atol=1e-12)
    assert "clip_ratio/dual_mean" not in stats


@pytest.mark.parametrize("script", SCRIPTS)
def test_row_advantages_equal_their_per_token_copy(script):
    """(b,) advantages and the same values repeated over T give the same loss, gradient and statistics."""
    module = importlib.import_module(script)
    for agg in ("seq-mean-token-mean", "token-mean"):
        a = call(module, ROW["adv"], agg=agg, dual_clip=3.0)
        b = call(module, [[x] * 5 for x in ROW["adv"]], agg=agg, dual_clip=3.0)
        assert a[0] == b[0] and a[1] == b[1] and torch.equal(a[2], b[2])


@pytest.mark.parametrize("script", SCRIPTS)
def test_log_ratio_is_clamped_before_exp(script):
    """r = exp(clamp(logp - old, -20, 20)): a log-ratio of 25 weighs e^20, and a log-ratio of 100 (exp overflows to
    inf in fp32) leaves a finite loss and gradient (pytorch issue 10729: 0 * inf in the backward of exp)."""
    module = importlib.import_module(script)
    log_ratio = torch.zeros(3, 5, dtype=torch.float64)
    log_ratio[0, 0] = 25.0  # A = -2 there: uncapped loss -A e^20
    loss, _, grad = call(module, ROW["adv"], agg="token-mean", dual_clip=None, log_ratio=log_ratio)
    # the other 9 tokens have r = 1: -A each; row 0: 2 x 3, row 1: -1.5 x 3, row 2: 1 x 3
    assert loss == pytest.approx((2 * math.exp(20) + 2 * 3 - 1.5 * 3 + 1 * 3) / 10, rel=1e-12)
    assert grad[0, 0] == 0  # clamped: no gradient through the clamp, as EasyR1 and verl

    log_ratio = torch.zeros(3, 5, dtype=torch.float32)
    log_ratio[1, 0] = 100.0  # A = +1.5 there: the upper clip is active, loss -1.28 A
    old = torch.zeros(3, 5)
    logps = (old + log_ratio).requires_grad_()
    loss, _ = scripts_loss(module, logps, old, torch.tensor(ROW["adv"]), torch.tensor(MASK, dtype=torch.float32),
                           **EPS, beta=0.0, ref_logps=old, agg="token-mean", n_seqs=3, n_tokens=10, max_new_tokens=5)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(logps.grad).all()
    assert float(loss.detach()) == pytest.approx((2 * 4 - 1.5 * 1.28 - 1.5 * 2 + 1 * 3) / 10, rel=1e-6)


@pytest.mark.parametrize("script", SCRIPTS)
def test_importance_weights_multiply_the_capped_loss(script):
    """verl: the dual clip first, then pg_losses * rollout_is_weights (a weight of 0.5 on a capped token: 3, not
    min(8 x 0.5, 6) = 4)."""
    weights = torch.ones(3, 5, dtype=torch.float64)
    weights[0, 0] = 0.5
    loss, stats, _ = call(importlib.import_module(script), ROW["adv"], agg="token-mean", dual_clip=3.0,
                          is_weights=weights)
    per_row = [list(r) for r in ROW["loss"]]
    per_row[0][0] = 6.0 * 0.5
    assert loss == pytest.approx(aggregate_by_hand(per_row, "token-mean"), abs=1e-12)
    assert stats["clip_ratio/dual_mean"] == 3  # the weight does not change where the cap binds


@pytest.mark.parametrize("script", SCRIPTS)
def test_dual_clip_must_exceed_one(script):
    with pytest.raises(ValueError, match="dual_clip"):
        call(importlib.import_module(script), ROW["adv"], agg="token-mean", dual_clip=1.0)


def test_the_flag_defaults():
    """Off in every script (as TRL); cepo.py lists EasyR1's clip_ratio_dual 3.0 in its official command line."""
    for script in SCRIPTS:
        args = importlib.import_module(script).Args
        assert args.dual_clip is None, script
    assert "--dual-clip 3" in importlib.import_module("cepo").__doc__
    assert set(SCRIPTS) == {"grpo", "clipo", "cepo", "r2po"}  # conspo has no ratio, so no grpo_loss

"""GRPO's advantages, loss aggregation, clipping and KL against values worked out by hand."""
import math

import pytest
import torch

from grpo import aggregate, compute_advantages, grpo_loss, k3_kl


def test_advantages_by_hand():
    rewards = torch.tensor([1.0, 0.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0])  # two groups of 4
    # group 1: mean 0.25, unbiased std sqrt((0.75^2 + 3 * 0.25^2) / 3) = 0.5; group 2: all equal
    adv = compute_advantages(rewards, 4, scale_rewards=True, eps=0.0)
    assert torch.allclose(adv[:4], torch.tensor([1.5, -0.5, -0.5, -0.5]))
    adv = compute_advantages(rewards, 4, scale_rewards=True, eps=1e-4)
    assert torch.allclose(adv[:4], torch.tensor([0.75, -0.25, -0.25, -0.25]) / 0.5001)
    assert torch.all(adv[4:] == 0)  # an all-equal group: 0 / (0 + eps)
    adv = compute_advantages(rewards, 4, scale_rewards=False, eps=1e-4)  # Dr. GRPO
    assert torch.allclose(adv[:4], torch.tensor([0.75, -0.25, -0.25, -0.25]))


PER_TOKEN = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
MASK = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])


@pytest.mark.parametrize("agg, expected", [
    ("seq-mean-token-mean", (1.5 + 4.0) / 2),  # mean of each sequence's token mean
    ("token-mean", (1 + 2 + 4) / 3),  # mean over the 3 response tokens
    ("seq-mean-token-sum-norm", (1 + 2 + 4) / (4 * 2)),  # sum / (max_new_tokens=4 * 2 sequences)
])
def test_aggregation_by_hand_and_micro_batches_sum_to_the_whole(agg, expected):
    whole = aggregate(PER_TOKEN, MASK, agg, n_seqs=2, n_tokens=3, max_new_tokens=4)
    assert whole.item() == pytest.approx(expected)
    parts = sum(aggregate(PER_TOKEN[i : i + 1], MASK[i : i + 1], agg, n_seqs=2, n_tokens=3, max_new_tokens=4)
                for i in range(2))
    assert parts.item() == pytest.approx(expected)


def _loss(logps, old, adv, agg="seq-mean-token-mean", beta=0.0, ref=None, eps_high=0.2):
    return grpo_loss(logps, old, adv, MASK, eps_low=0.2, eps_high=eps_high, beta=beta,
                     ref_logps=ref if ref is not None else torch.zeros_like(logps), agg=agg, n_seqs=2, n_tokens=3,
                     max_new_tokens=4)


@pytest.mark.parametrize("agg", ["seq-mean-token-mean", "token-mean", "seq-mean-token-sum-norm"])
def test_clipped_surrogate_gradient_is_policy_gradient_at_ratio_one(agg):
    torch.manual_seed(0)
    logps = (-torch.rand(2, 3)).requires_grad_()
    adv = torch.tensor([1.3, -0.7])
    loss, _ = _loss(logps, logps.detach(), adv, agg)
    (g,) = torch.autograd.grad(loss, logps)
    pg = aggregate(-adv[:, None] * logps, MASK, agg, n_seqs=2, n_tokens=3, max_new_tokens=4)  # REINFORCE
    (g_pg,) = torch.autograd.grad(pg, logps)
    assert torch.allclose(g, g_pg)
    assert loss.item() == pytest.approx(float(aggregate(-adv[:, None].expand(2, 3), MASK, agg, 2, 3, 4)))


def test_clip_stops_the_gradient_only_where_it_should():
    old = torch.zeros(2, 3)
    # sequence 0: ratio e^0.4 = 1.49 > 1.2 with A > 0 -> clipped; sequence 1: ratio e^-0.7 = 0.50 < 0.8 with A < 0
    logps = torch.tensor([[0.4, 0.4, 0.0], [-0.7, 0.0, 0.0]], requires_grad=True)
    loss, stats = _loss(logps, old, torch.tensor([1.0, -1.0]))
    (g,) = torch.autograd.grad(loss, logps)
    assert torch.all(g == 0)  # both clipped: no gradient
    assert stats["clip_ratio/high_mean"].item() == 2 and stats["clip_ratio/low_mean"].item() == 1
    assert loss.item() == pytest.approx(-((1.2 + 1.2) / 2 + (-0.8)) / 2)
    # the same ratios with the advantages' signs swapped are not clipped: min() keeps the unclipped term
    loss, stats = _loss(logps, old, torch.tensor([-1.0, 1.0]))
    (g,) = torch.autograd.grad(loss, logps)
    assert torch.all(g[MASK.bool()] != 0) and stats["clip_ratio/region_mean"].item() == 0
    # DAPO clip-higher: eps_high 0.5 leaves ratio 1.49 unclipped
    _, stats = _loss(logps, old, torch.tensor([1.0, -1.0]), eps_high=0.5)
    assert stats["clip_ratio/high_mean"].item() == 0


def test_k3_kl_by_hand_and_in_the_loss():
    logps = torch.tensor([[-1.0, -2.0]])
    assert torch.allclose(k3_kl(logps, logps), torch.zeros(1, 2))
    ref = logps + math.log(2.0)  # pi_ref / pi = 2: 2 - ln 2 - 1
    assert torch.allclose(k3_kl(logps, ref), torch.full((1, 2), 1 - math.log(2.0)))
    ref = logps - math.log(2.0)  # ratio 1/2: 0.5 + ln 2 - 1
    assert torch.allclose(k3_kl(logps, ref), torch.full((1, 2), math.log(2.0) - 0.5))
    # with A = 0 the loss is beta * aggregated KL
    lp = torch.tensor([[-1.0, -1.0, -1.0], [-1.0, -1.0, -1.0]])
    loss, stats = _loss(lp, lp, torch.zeros(2), beta=0.1, ref=lp + math.log(2.0))
    assert loss.item() == pytest.approx(0.1 * (1 - math.log(2.0)))
    assert stats["kl"].item() == pytest.approx(3 * (1 - math.log(2.0)))

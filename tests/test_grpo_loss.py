"""GRPO's advantages, loss aggregation, clipping and KL against values worked out by hand.

Every script carries its own copy of compute_advantages / aggregate / grpo_loss in an ALGO LOGIC block: the knob
tests below run on every copy, so one that drifts is caught.
"""
import importlib
import math

import pytest
import torch

import grpo
from grpo import aggregate, compute_advantages, k3_kl
from losses import scripts_loss

SCRIPTS = [importlib.import_module(name) for name in ("grpo", "clipo", "conspo", "cepo", "r2po")]
AGGS = ["seq-mean-token-mean", "token-mean", "seq-mean-token-sum-norm"]


def _copies(name):
    """One pytest param per script that defines `name` (conspo.py has no GRPO loss)."""
    return [pytest.param(m, id=m.__name__) for m in SCRIPTS if getattr(m, name, None) is not None]


def test_advantages_by_hand():
    rewards = torch.tensor([1.0, 0.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0])  # two groups of 4
    # group 1: mean 0.25, unbiased std sqrt((0.75^2 + 3 * 0.25^2) / 3) = 0.5; group 2: all equal
    adv, std = compute_advantages(rewards, 4, scale_rewards=True, eps=0.0)
    assert torch.allclose(adv[:4], torch.tensor([1.5, -0.5, -0.5, -0.5]))
    assert torch.allclose(std, torch.tensor([0.5, 0.0])) and torch.all(adv[4:] == 0)  # eps 0: 0, not 0/0
    adv, _ = compute_advantages(rewards, 4, scale_rewards=True, eps=1e-4)
    assert torch.allclose(adv[:4], torch.tensor([0.75, -0.25, -0.25, -0.25]) / 0.5001)
    assert torch.all(adv[4:] == 0)  # an all-equal group: 0 / (0 + eps)
    adv, _ = compute_advantages(rewards, 4, scale_rewards=False, eps=1e-4)  # Dr. GRPO
    assert torch.allclose(adv[:4], torch.tensor([0.75, -0.25, -0.25, -0.25]))


PER_TOKEN = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
MASK = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])


@pytest.mark.parametrize("agg, expected", [
    ("seq-mean-token-mean", (1.5 + 4.0) / 2),  # mean of each sequence's token mean
    ("token-mean", (1 + 2 + 4) / 3),  # mean over the 3 response tokens
    ("seq-mean-token-sum-norm", (1 + 2 + 4) / (4 * 2)),  # sum / (max_new_tokens=4 * 2 sequences)
])
@pytest.mark.parametrize("module", _copies("aggregate"))
def test_aggregation_by_hand_and_micro_batches_sum_to_the_whole(module, agg, expected):
    whole = module.aggregate(PER_TOKEN, MASK, agg, n_seqs=2, n_tokens=3, max_new_tokens=4)
    assert whole.item() == pytest.approx(expected)
    parts = sum(module.aggregate(PER_TOKEN[i : i + 1], MASK[i : i + 1], agg, n_seqs=2, n_tokens=3, max_new_tokens=4)
                for i in range(2))
    assert parts.item() == pytest.approx(expected)


def _loss(logps, old, adv, agg="seq-mean-token-mean", beta=0.0, ref=None, eps_high=0.2):
    return scripts_loss(grpo, logps, old, adv, MASK, eps_low=0.2, eps_high=eps_high, beta=beta,
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


# ---------------------------------------------------------------- every knob, on every script's copy
# float64 throughout, so the hand values hold to ~1e-15. Each loss test runs on every script's grpo_loss, with the
# advantages given per sequence (b,) as grpo.py passes them and per token (b, T) as cepo.py does (here each row's
# advantage on every token, which must give the same values).

LOSSES = _copies("grpo_loss")
ADV_SHAPES = ["(b,)", "(b,T)"]
F64 = dict(dtype=torch.float64)
LN2, LN3 = math.log(2.0), math.log(3.0)
K = 1 - LN2  # k3 where pi_ref = 2 pi_theta: 2 - ln 2 - 1


def test_every_copy_is_tested():
    # a copy that is renamed or moved would silently drop out of the parametrisations
    for name in ("grpo_loss", "aggregate", "compute_advantages"):
        assert [p.id for p in _copies(name)] == ["grpo", "clipo", "cepo", "r2po"], name


def _grpo_loss(module, shape, logps, old, adv, mask, *, agg, n_seqs, n_tokens, eps_low=0.2, eps_high=0.2,
               beta=0.0, ref=None, is_weights=None, max_new_tokens=4):
    if shape == "(b,T)":
        adv = adv.unsqueeze(1).expand_as(logps)
    return scripts_loss(module, logps, old, adv, mask, eps_low=eps_low, eps_high=eps_high, beta=beta,
                        ref_logps=torch.zeros_like(logps) if ref is None else ref, agg=agg, n_seqs=n_seqs,
                        n_tokens=n_tokens, max_new_tokens=max_new_tokens, is_weights=is_weights)


def _per_token(loss_of_mask, logps, mask):
    """Each response token's own loss and d loss / d logp: the loss under a mask holding that token alone, with
    token-mean over n_tokens=1. The other tokens, padding included, must get no gradient."""
    losses, grads = torch.zeros_like(mask), torch.zeros_like(mask)
    for i, t in mask.nonzero().tolist():
        one = torch.zeros_like(mask)
        one[i, t] = 1
        loss = loss_of_mask(one)
        (g,) = torch.autograd.grad(loss, logps)
        assert torch.count_nonzero(g * (1 - one)) == 0
        losses[i, t], grads[i, t] = loss.detach(), g[i, t]
    return losses, grads


# eps_low 0.1, eps_high 0.3: the band is [0.9, 1.3]. Each row holds a token below it (ratio 0.8), one inside (1.25),
# one above (1.4) and a padding token (3.0). Swapping the bounds (band [0.7, 1.2]) moves 0.8 inside and 1.25 above:
# the values, gradients and counts below all change.
RATIOS = torch.tensor([[0.8, 1.25, 1.4, 3.0], [0.8, 1.25, 1.4, 3.0]], **F64)
MASK4 = torch.tensor([[1.0, 1, 1, 0], [1, 1, 1, 0]], **F64)
OLD4 = torch.tensor([[-1.0, -2.0, -0.5, -1.5], [-0.3, -1.2, -2.5, -0.7]], **F64)
ADV2 = torch.tensor([2.0, -1.0], **F64)
# per-token loss -min(r A, clip(r, 0.9, 1.3) A):
#   A = +2: r 0.8 -> -min(1.6, 1.8) = -1.6 (unclipped); 1.25 -> -2.5 (inside); 1.4 -> -min(2.8, 2.6) = -2.6 (clipped)
#   A = -1: r 0.8 -> -min(-0.8, -0.9) = 0.9 (clipped); 1.25 -> 1.25 (inside); 1.4 -> -min(-1.4, -1.3) = 1.4 (unclipped)
CLIP_LOSS = torch.tensor([[-1.6, -2.5, -2.6, 0], [0.9, 1.25, 1.4, 0]], **F64)
# d(-r A)/d logp = -r A (dr/dlogp = r) where the unclipped term is the min; 0 where the clipped one is
CLIP_GRAD = torch.tensor([[-1.6, -2.5, 0, 0], [0, 1.25, 1.4, 0]], **F64)


@pytest.mark.parametrize("shape", ADV_SHAPES)
@pytest.mark.parametrize("module", LOSSES)
def test_asymmetric_clip_by_hand(module, shape):
    logps = (OLD4 + RATIOS.log()).requires_grad_()

    def loss(mask, agg="token-mean", n_seqs=1, n_tokens=1):
        return _grpo_loss(module, shape, logps, OLD4, ADV2, mask, eps_low=0.1, eps_high=0.3, agg=agg, n_seqs=n_seqs,
                          n_tokens=n_tokens)

    losses, grads = _per_token(lambda m: loss(m)[0], logps, MASK4)
    assert torch.allclose(losses, CLIP_LOSS) and torch.allclose(grads, CLIP_GRAD)
    whole, stats = loss(MASK4, "seq-mean-token-mean", n_seqs=2, n_tokens=6)
    assert whole.item() == pytest.approx((-6.7 / 3 + 3.55 / 3) / 2)  # -0.525
    (g,) = torch.autograd.grad(whole, logps)
    assert torch.allclose(g, CLIP_GRAD / 6)  # 3 tokens per sequence, 2 sequences
    # TRL's counts: 0.8 < 0.9 with A < 0 is low, 1.4 > 1.3 with A > 0 is high; the padding's 3.0 counts nowhere
    counts = [stats[f"clip_ratio/{k}_mean"].item() for k in ("low", "high", "region")]
    assert counts == [1, 1, 2]


# truncated importance weights per token (the padding's 9 must not matter)
TIS_W = torch.tensor([[0.5, 2.0, 3.0, 9.0], [2.0, 0.5, 0.25, 9.0]], **F64)
# weight x CLIP_LOSS and weight x CLIP_GRAD, the same clipped surrogate as above:
TIS_LOSS = torch.tensor([[-0.8, -5.0, -7.8, 0], [1.8, 0.625, 0.35, 0]], **F64)
TIS_GRAD = torch.tensor([[-0.8, -5.0, 0, 0], [0, 0.625, 0.35, 0]], **F64)


@pytest.mark.parametrize("beta", [0.0, 0.1])
@pytest.mark.parametrize("shape", ADV_SHAPES)
@pytest.mark.parametrize("module", LOSSES)
def test_tis_weights_scale_the_surrogate_and_not_the_kl(module, shape, beta):
    """With beta > 0 and pi_ref = 2 pi_theta on every token (x = ref - logp = ln 2), each token adds beta k3 =
    beta (1 - ln 2) to its loss and beta (1 - e^x) = -beta to its gradient, NOT multiplied by the weight: TRL
    (`per_token_loss * importance_sampling_ratio`, then `+ beta * per_token_kl`) and verl (the weights scale
    pg_losses; the KL loss is separate) correct only the policy-gradient term for the sampler mismatch."""
    logps = (OLD4 + RATIOS.log()).requires_grad_()
    ref = logps.detach() + LN2

    def loss(mask, agg="token-mean", n_seqs=1, n_tokens=1):
        return _grpo_loss(module, shape, logps, OLD4, ADV2, mask, eps_low=0.1, eps_high=0.3, beta=beta, ref=ref,
                          is_weights=TIS_W, agg=agg, n_seqs=n_seqs, n_tokens=n_tokens)

    losses, grads = _per_token(lambda m: loss(m)[0], logps, MASK4)
    assert torch.allclose(losses, TIS_LOSS + beta * K * MASK4)
    assert torch.allclose(grads, TIS_GRAD - beta * MASK4)
    whole, stats = loss(MASK4, n_tokens=6)
    assert whole.item() == pytest.approx((-13.6 + 2.775) / 6 + beta * K)  # token-mean over 6 tokens
    (g,) = torch.autograd.grad(whole, logps)
    assert torch.allclose(g, (TIS_GRAD - beta * MASK4) / 6)
    counts = [stats[f"clip_ratio/{k}_mean"].item() for k in ("low", "high", "region")]
    assert counts == [1, 1, 2]  # the weights do not change which tokens are clipped
    if beta > 0:
        assert stats["kl"].item() == pytest.approx(6 * K)  # unweighted, as the loss


# beta 0.2 at ratio 1 (the surrogate's part of a token: loss -A, gradient -A), x = ref - logp per token:
#   k3(x) = e^x - x - 1:            x = ln 2 -> 1 - ln 2; -ln 2 -> ln 2 - 1/2; ln 3 -> 2 - ln 3; 0 -> 0
#   d k3 / d logp = -(e^x - 1) = 1 - e^x: ln 2 -> -1;      -ln 2 -> 1/2;        ln 3 -> -2;       0 -> 0
# The padding's x = 5 (k3 ~ 142) must not count.
KL_X = torch.tensor([[LN2, -LN2, LN3, 5.0], [0.0, LN2, -LN2, 5.0]], **F64)
KL_ADV = torch.tensor([0.5, -1.5], **F64)
KL_LOSS = torch.tensor([[-0.5 + 0.2 * (1 - LN2), -0.5 + 0.2 * (LN2 - 0.5), -0.5 + 0.2 * (2 - LN3), 0],
                        [1.5, 1.5 + 0.2 * (1 - LN2), 1.5 + 0.2 * (LN2 - 0.5), 0]], **F64)
KL_GRAD = torch.tensor([[-0.5 - 0.2, -0.5 + 0.1, -0.5 - 0.4, 0], [1.5, 1.5 - 0.2, 1.5 + 0.1, 0]], **F64)


@pytest.mark.parametrize("shape", ADV_SHAPES)
@pytest.mark.parametrize("module", LOSSES)
def test_k3_kl_value_and_gradient_with_an_advantage(module, shape):
    logps = OLD4.clone().requires_grad_()  # ratio 1

    def loss(mask, agg="token-mean", n_seqs=1, n_tokens=1):
        return _grpo_loss(module, shape, logps, OLD4, KL_ADV, mask, beta=0.2, ref=OLD4 + KL_X, agg=agg,
                          n_seqs=n_seqs, n_tokens=n_tokens)

    losses, grads = _per_token(lambda m: loss(m)[0], logps, MASK4)
    assert torch.allclose(losses, KL_LOSS) and torch.allclose(grads, KL_GRAD)
    whole, stats = loss(MASK4, n_tokens=6)
    assert whole.item() == pytest.approx(float(KL_LOSS.sum()) / 6)
    (g,) = torch.autograd.grad(whole, logps)
    assert torch.allclose(g, KL_GRAD / 6)
    # the logged KL: sum of k3 over the response tokens, 2 (1 - ln 2) + 2 (ln 2 - 1/2) + (2 - ln 3) = 3 - ln 3
    assert stats["kl"].item() == pytest.approx(3 - LN3)


# Each agg with weights and beta together. MASK (above): sequence 0 has 2 response tokens, sequence 1 has 1.
# Ratio 1, A = (1, -2), weights [[0.5, 2, 9], [3, 9, 9]] (9 on padding), beta 0.1 with x = ln 2 (k3 = K = 1 - ln 2).
# Per token: -w A + 0.1 K -> sequence 0: -0.5 + 0.1 K, -2 + 0.1 K; sequence 1: 6 + 0.1 K (sum 3.5 + 0.3 K).
# Gradient per token: -w A + 0.1 (1 - e^x) = -w A - 0.1 -> sequence 0: -0.6, -2.1; sequence 1: 5.9; each scaled by
# the agg's normaliser of that token.
AGG_GRAD = torch.tensor([[-0.6, -2.1, 0], [5.9, 0, 0]], **F64)


@pytest.mark.parametrize("agg, expected, scale", [
    # mean of the sequence means over 2 sequences: ((-2.5 + 0.2 K) / 2 + (6 + 0.1 K)) / 2; a token of a sequence of
    # length n weighs 1 / (2 n)
    ("seq-mean-token-mean", 2.375 + 0.1 * K, [[1 / 4, 1 / 4, 0], [1 / 2, 0, 0]]),
    ("token-mean", (3.5 + 0.3 * K) / 3, 1 / 3),  # 3 response tokens
    ("seq-mean-token-sum-norm", (3.5 + 0.3 * K) / 8, 1 / 8),  # max_new_tokens 4 x 2 sequences
], ids=AGGS)
@pytest.mark.parametrize("shape", ADV_SHAPES)
@pytest.mark.parametrize("module", LOSSES)
def test_each_agg_with_is_weights_and_kl_by_hand(module, shape, agg, expected, scale):
    lp = torch.tensor([[-1.0, -2.0, -3.0], [-0.5, -1.5, -2.5]], **F64)
    logps = lp.clone().requires_grad_()
    w = torch.tensor([[0.5, 2.0, 9.0], [3.0, 9.0, 9.0]], **F64)
    loss, stats = _grpo_loss(module, shape, logps, lp, torch.tensor([1.0, -2.0], **F64), MASK.double(), agg=agg,
                             n_seqs=2, n_tokens=3, beta=0.1, ref=lp + LN2, is_weights=w)
    assert loss.item() == pytest.approx(expected)
    (g,) = torch.autograd.grad(loss, logps)
    assert torch.allclose(g, AGG_GRAD * torch.tensor(scale, **F64))
    assert stats["kl"].item() == pytest.approx(3 * K)


@pytest.mark.parametrize("agg", AGGS)
@pytest.mark.parametrize("shape", ADV_SHAPES)
@pytest.mark.parametrize("module", LOSSES)
def test_uneven_micro_batches_sum_to_the_mini_batch_loss(module, shape, agg):
    """The scripts call grpo_loss once per micro-batch, each cut to its own longest response, with n_seqs and n_tokens
    of the whole mini-batch: the shares (loss, gradient, logged sums) add up to one call on the mini-batch."""
    g = torch.Generator().manual_seed(0)
    lengths = torch.tensor([5, 1, 3, 2, 4])
    mask = (torch.arange(5) < lengths.unsqueeze(1)).double()  # (5, 5)
    lp = -torch.rand(5, 5, generator=g, **F64)
    old = lp + 0.4 * torch.randn(5, 5, generator=g, **F64)  # ratios on both sides of the band
    ref = lp + 0.5 * torch.randn(5, 5, generator=g, **F64)
    adv = torch.randn(5, generator=g, **F64)
    w = 0.5 + 1.5 * torch.rand(5, 5, generator=g, **F64)
    logps = lp.clone().requires_grad_()
    kw = dict(agg=agg, n_seqs=5, n_tokens=int(mask.sum()), eps_low=0.1, eps_high=0.3, beta=0.05, max_new_tokens=5)
    whole, whole_stats = _grpo_loss(module, shape, logps, old, adv, mask, ref=ref, is_weights=w, **kw)
    (whole_grad,) = torch.autograd.grad(whole, logps)
    parts, part_stats = 0.0, {}
    for mb in (slice(0, 1), slice(1, 4), slice(4, 5)):  # 1, 3 and 1 sequences; the middle one cut to 3 columns
        L = int(lengths[mb].max())
        loss, stats = _grpo_loss(module, shape, logps[mb, :L], old[mb, :L], adv[mb], mask[mb, :L], ref=ref[mb, :L],
                                 is_weights=w[mb, :L], **kw)
        parts = parts + loss
        for k, v in stats.items():
            part_stats[k] = part_stats.get(k, 0.0) + v.item()
    (parts_grad,) = torch.autograd.grad(parts, logps)
    assert parts.item() == pytest.approx(whole.item()) and whole.item() != 0
    assert torch.allclose(parts_grad, whole_grad)
    assert part_stats == pytest.approx({k: v.item() for k, v in whole_stats.items()})
    assert whole_stats["clip_ratio/low_mean"] > 0 and whole_stats["clip_ratio/high_mean"] > 0  # both clips active


# Three groups of G = 4 with partial credit; group g is rows 4g..4g+3 (prompt 0's completions first):
#   [0, 0.5, 1, 0.5]: mean 0.5,   deviations (-0.5, 0, 0.5, 0),            unbiased std sqrt(0.5 / 3) = 1 / sqrt(6)
#   [1, 1, 1, 0.5]:   mean 0.875, deviations (0.125, 0.125, 0.125, -0.375), unbiased std sqrt(0.1875 / 3) = 0.25
#   [0.5] * 4:        deviations 0, std 0
PARTIAL = torch.tensor([0, 0.5, 1, 0.5, 1, 1, 1, 0.5, 0.5, 0.5, 0.5, 0.5], **F64)
DEVIATIONS = torch.tensor([-0.5, 0, 0.5, 0, 0.125, 0.125, 0.125, -0.375, 0, 0, 0, 0], **F64)


@pytest.mark.parametrize("module", _copies("compute_advantages"))
def test_advantages_partial_credit_many_groups(module):
    s6 = math.sqrt(6)
    adv, std = module.compute_advantages(PARTIAL[:8], 4, scale_rewards=True, eps=0.0)  # the first two groups: std > 0
    assert torch.allclose(std, torch.tensor([1 / s6, 0.25], **F64))
    assert torch.allclose(adv, torch.tensor([-s6 / 2, 0, s6 / 2, 0, 0.5, 0.5, 0.5, -1.5], **F64))
    adv, std = module.compute_advantages(PARTIAL, 4, scale_rewards=True, eps=0.25)  # divided by std + 0.25
    assert torch.allclose(adv, DEVIATIONS / torch.tensor([1 / s6 + 0.25] * 4 + [0.5] * 4 + [0.25] * 4, **F64))
    assert torch.all(adv[8:] == 0) and std[2] == 0  # the all-equal group: exactly 0
    for eps in (0.25, 100.0):  # Dr. GRPO: deviations only; eps is unused
        adv, _ = module.compute_advantages(PARTIAL, 4, scale_rewards=False, eps=eps)
        assert adv.shape == (12,) and torch.allclose(adv, DEVIATIONS)

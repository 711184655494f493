"""ConSPO (conspo.py): the group InfoNCE against its formula, its gradient against Lemma 2, the margin curriculum,
micro-batching against one full graph on a real model, and the script end to end on the embedded tiny model."""
import math

import pytest
import torch
from test_grpo_run import TINY, read_metrics, run  # tests/ is on sys.path: pytest's rootdir-relative import
from transformers import Qwen2Config, Qwen2ForCausalLM

from conspo import (build_batch, conspo_loss, get_logps, group_infonce, margin_schedule, mixed_groups,
                    sequence_scores)

G = 4
# five groups of 4: mixed 2+/2-, mixed 1+/3-, all correct, all wrong, mixed 3+/1-
REWARDS = torch.tensor([1, 0, 0, 1, 1, 0, 0, 0, 1, 1, 1, 1, 0, 0, 0, 0, 0, 1, 1, 1], dtype=torch.float64)
MIXED = [True, True, False, False, True]


def random_scores(seed=0):
    g = torch.Generator().manual_seed(seed)
    return -3 * torch.rand(len(REWARDS), generator=g, dtype=torch.float64)  # length-normalised log-probs are < 0


def softmax_weights(s, r, tau, m):
    """Written out with exp/sum, group by group: {q: (N+, {i: P_i+}, {(i, j): P_ij-})} for the mixed groups."""
    out = {}
    for q in range(len(r) // G):
        idx = range(q * G, (q + 1) * G)
        pos, neg = [i for i in idx if r[i] > 0], [j for j in idx if r[j] <= 0]
        if not pos or not neg:
            continue
        p_pos, p_neg = {}, {}
        for i in pos:
            z = math.exp((s[i] - m) / tau) + sum(math.exp(s[j] / tau) for j in neg)
            p_pos[i] = math.exp((s[i] - m) / tau) / z
            p_neg.update({(i, j): math.exp(s[j] / tau) / z for j in neg})
        out[q] = (len(pos), p_pos, p_neg)
    return out


def test_mixed_groups():
    assert mixed_groups(REWARDS, G).tolist() == MIXED


def test_infonce_by_hand():
    # one positive at s = -1 against one negative at s = -2, tau 1, no margin: J = log(e^-1 / (e^-1 + e^-2))
    terms, coefs = group_infonce(torch.tensor([-1.0, -2.0], dtype=torch.float64), torch.tensor([1.0, 0.0]), 2, 1.0,
                                 0.0)
    assert terms.sum().item() == pytest.approx(-math.log(1 + math.exp(-1)), abs=1e-12)
    p = 1 / (1 + math.exp(-1))  # P_+
    assert coefs.tolist() == pytest.approx([1 - p, -(1 - p)], abs=1e-12)


@pytest.mark.parametrize("tau, m", [(10.0, 0.0), (10.0, 0.01), (1.0, 0.3), (0.5, 1.0)])
def test_objective_equals_the_formula(tau, m):
    s, r = random_scores(1), REWARDS
    terms, _ = group_infonce(s, r, G, tau, m)
    J = terms.view(-1, G).sum(1)
    weights = softmax_weights(s.tolist(), r.tolist(), tau, m)
    for q in range(len(r) // G):
        if q not in weights:
            assert J[q] == 0
            continue
        n_pos, p_pos, _ = weights[q]
        assert J[q].item() == pytest.approx(sum(tau * math.log(p) for p in p_pos.values()) / n_pos, rel=1e-12)
    assert terms[r <= 0].abs().max() == 0  # a negative carries no term of its own


@pytest.mark.parametrize("tau, m", [(10.0, 0.0), (10.0, 0.01), (1.0, 0.3), (0.5, 1.0)])
def test_coefficients_are_lemma_2_and_the_autograd_gradient(tau, m):
    s, r = random_scores(2).requires_grad_(), REWARDS
    terms, coefs = group_infonce(s, r, G, tau, m)
    assert not coefs.requires_grad  # computed without grad: the micro-batches back-propagate them as constants
    (autograd,) = torch.autograd.grad(terms.sum(), s)  # sum over groups of dJ(q)/ds_i: each s_i is in one group
    closed = torch.zeros_like(autograd)  # Lemma 2, from the weights written out by hand
    for n_pos, p_pos, p_neg in softmax_weights(s.tolist(), r.tolist(), tau, m).values():
        for i, p in p_pos.items():
            closed[i] += (1 - p) / n_pos
        for (_, j), p in p_neg.items():
            closed[j] -= p / n_pos
    assert torch.allclose(autograd, closed, rtol=0, atol=1e-12)
    assert torch.allclose(coefs, closed, rtol=0, atol=1e-12)
    mixed = torch.tensor(MIXED).repeat_interleave(G)
    assert bool((coefs[mixed & (r > 0)] > 0).all() and (coefs[mixed & (r <= 0)] < 0).all())


def test_coefficients_of_a_group_sum_to_zero():
    _, coefs = group_infonce(random_scores(3), REWARDS, G, 10.0, 0.01)
    sums = coefs.view(-1, G).sum(1)
    assert sums.abs().max() < 1e-15
    assert coefs.abs().view(-1, G).sum(1)[torch.tensor(MIXED)].min() > 0.1  # not zero because all are zero


def test_groups_without_positives_or_without_negatives_contribute_nothing():
    s = random_scores(4).requires_grad_()
    terms, coefs = group_infonce(s, REWARDS, G, 10.0, 0.01)
    (grad,) = torch.autograd.grad(terms.sum(), s)
    dropped = ~torch.tensor(MIXED).repeat_interleave(G)
    for t in (terms, coefs, grad):
        assert t[dropped].abs().max() == 0 and t[~dropped].abs().max() > 0


def test_margin_acts_on_each_positive_only():
    # J(s; m) equals J with every positive's score lowered by m and no margin: the negatives are never shifted
    s, r, m = random_scores(5), REWARDS, 0.7
    shifted = torch.where(r > 0, s - m, s)
    for a, b in zip(group_infonce(s, r, G, 1.0, m), group_infonce(shifted, r, G, 1.0, 0.0)):
        assert torch.allclose(a, b, rtol=0, atol=1e-12)
    assert (group_infonce(s, r, G, 1.0, m)[0].sum() < group_infonce(s, r, G, 1.0, 0.0)[0].sum())  # harder with m


def test_large_tau_gives_uniform_weights():
    # as tau -> inf every e^{x/tau} -> 1: P_i+ = P_ij- = 1/(1 + N-), so dJ/ds_i+ -> (1/N+) N-/(1 + N-) and
    # dJ/ds_j- -> -(1/N+) N+ /(1 + N-) = -1/(1 + N-), whatever the scores
    s, r = random_scores(6), REWARDS
    _, coefs = group_infonce(s, r, G, 1e7, 0.01)
    expected = torch.zeros_like(coefs)
    for q, mixed in enumerate(MIXED):
        if mixed:
            grp = slice(q * G, (q + 1) * G)
            n_pos = int((r[grp] > 0).sum())
            n_neg = G - n_pos
            expected[grp] = torch.where(r[grp] > 0, n_neg / (1 + n_neg) / n_pos, -1 / (1 + n_neg))
    assert torch.allclose(coefs, expected, rtol=0, atol=1e-6)
    _, coefs_tau10 = group_infonce(s, r, G, 10.0, 0.01)  # tau 10 (the default) is already close to uniform ...
    assert (coefs_tau10 - expected).abs().max() < 0.05
    assert (coefs_tau10 - expected).abs().max() > 1e-4  # ... but still follows the score gaps


@pytest.mark.parametrize("progress, expected", [(0.0, 0.0), (0.15, 0.005), (0.3, 0.01), (1.0, 0.01),
                                                (0.075, 0.005 * (1 - math.cos(math.pi / 4)))])
def test_margin_curriculum(progress, expected):
    # M = 0.01, alpha = 0.3: 0 at the start, M/2 at alpha/2, M at alpha and after
    assert margin_schedule(progress, 0.01, 0.3) == pytest.approx(expected, abs=1e-15)


def test_micro_batch_shares_sum_to_the_loss_with_its_gradient():
    s = random_scores(7).requires_grad_()
    terms, coefs = group_infonce(s.detach(), REWARDS, G, 10.0, 0.01)
    K = sum(MIXED)
    whole = -group_infonce(s, REWARDS, G, 10.0, 0.01)[0].sum() / K  # -mean over kept groups of J(q)
    (g_whole,) = torch.autograd.grad(whole, s)
    parts = [conspo_loss(s[idx], s.detach()[idx], coefs[idx], terms[idx], K) for idx in torch.randperm(20).split(3)]
    (g_parts,) = torch.autograd.grad(sum(parts), s)
    assert sum(parts).item() == pytest.approx(whole.item(), rel=1e-12)
    assert torch.allclose(g_parts, g_whole, rtol=0, atol=1e-15) and g_whole.abs().max() > 1e-3


def test_micro_batched_gradient_equals_the_full_graph_on_a_real_model():
    """The script's path: a no-grad pass for every s_i, then micro-batches that cut through the groups."""
    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, head_dim=32, max_position_embeddings=64,
                         tie_word_embeddings=True)
    model = Qwen2ForCausalLM(config)
    gen = torch.Generator().manual_seed(0)
    n = 12  # three groups of 4: mixed, mixed, all correct (dropped)
    rewards = torch.tensor([1, 0, 0, 1, 0, 1, 0, 0, 1, 1, 1, 1], dtype=torch.float32)
    prompts = [torch.randint(1, 64, (int(torch.randint(2, 6, (1,), generator=gen)),), generator=gen).tolist()
               for _ in range(n)]
    comps = [torch.randint(1, 64, (int(torch.randint(1, 9, (1,), generator=gen)),), generator=gen).tolist()
             for _ in range(n)]
    input_ids, attention_mask, mask, _ = build_batch(prompts, comps, 0, torch.device("cpu"))
    T, tau, m = 0.7, 2.0, 0.05  # a small tau makes the softmax couple the group strongly
    kept = mixed_groups(rewards, G).repeat_interleave(G)
    K = int(mixed_groups(rewards, G).sum())

    def logps_of(rows):
        L = int(attention_mask[rows].sum(1).max())
        return get_logps(model, input_ids[rows, :L], attention_mask[rows, :L], T, "torch")[0], mask[rows, : L - 1]

    model.zero_grad()  # one graph over every sequence
    s = sequence_scores(*logps_of(torch.arange(n)))
    full = -group_infonce(s, rewards, G, tau, m)[0].sum() / K
    full.backward()
    g_full = [p.grad.clone() for p in model.parameters()]

    model.zero_grad()  # as conspo.py: scores without grad in chunks of 5, then micro-batches of 3 in random order
    with torch.no_grad():
        old = torch.cat([sequence_scores(*logps_of(torch.arange(i, min(i + 5, n)))) for i in range(0, n, 5)])
    terms, coefs = group_infonce(old, rewards, G, tau, m)
    total = 0.0
    perm = torch.randperm(n)
    for mb in perm[kept[perm]].split(3):  # the dropped group gets no forward/backward
        loss = conspo_loss(sequence_scores(*logps_of(mb)), old[mb], coefs[mb], terms[mb], K)
        loss.backward()
        total += loss.item()
    assert total == pytest.approx(full.item(), rel=1e-5)
    scale = max(g.abs().max().item() for g in g_full)
    assert scale > 1e-4
    for p, g in zip(model.parameters(), g_full):
        assert torch.allclose(p.grad, g, rtol=0, atol=1e-5 * scale)


@pytest.mark.slow
def test_conspo_end_to_end(tmp_path):
    # 16 prompts x 8: the tiny model's sampled accuracy starts low, and ConSPO trains only on mixed groups
    flags = [*TINY, "--prompts-per-step", "16", "--group-size", "8", "--no-vllm"]
    p = run("conspo.py", "--total-steps", "2", *flags, "--output-dir", str(tmp_path / "a"))
    assert p.returncode == 0, p.stderr[-3000:]
    (run_dir,) = (tmp_path / "a").iterdir()
    rows = read_metrics(run_dir)
    assert [r["step"] for r in rows] == [0, 1, 2]
    assert all(math.isfinite(v) for r in rows for v in r.values())
    for key in ["reward", "entropy", "loss", "grad_norm", "conspo/loss", "conspo/margin", "conspo/frac_groups_kept",
                "conspo/score_pos", "conspo/score_neg", "time/train"]:
        assert key in rows[1], key
    assert "eval/accuracy" in rows[0] and "eval/accuracy" in rows[2]
    assert "clip_ratio/region_mean" not in rows[1]  # no ratio, no clipping
    # the curriculum counts the steps done: progress 0 then 1/2 (past alpha = 0.3, so M)
    assert rows[1]["conspo/margin"] == 0 and rows[2]["conspo/margin"] == pytest.approx(0.01)
    for r in rows[1:]:
        assert 0 < r["conspo/frac_groups_kept"] <= 1 and r["grad_norm"] > 0
        assert r["loss"] == pytest.approx(r["conspo/loss"], rel=1e-4)  # the micro-batch shares sum to -mean J
        assert r["conspo/score_pos"] < 0 and r["conspo/score_neg"] < 0
    assert (run_dir / "final" / "model.safetensors").exists()

    # the same first step with micro-batches of 3 sequences, which cut through every group: same gradient
    p = run("conspo.py", "--total-steps", "1", *flags, "--micro-batch-size", "3", "--output-dir", str(tmp_path / "b"))
    assert p.returncode == 0, p.stderr[-3000:]
    (small,) = read_metrics(next((tmp_path / "b").iterdir()))[1:]
    assert small["reward"] == rows[1]["reward"] and small["conspo/loss"] == pytest.approx(rows[1]["conspo/loss"])
    assert small["grad_norm"] == pytest.approx(rows[1]["grad_norm"], rel=1e-4)
    assert small["loss"] == pytest.approx(rows[1]["loss"], rel=1e-4)


@pytest.mark.parametrize("flags", [["--num-minibatches", "2"], ["--update-epochs", "2"], ["--tis-cap", "2"]])
def test_more_than_one_update_per_batch_is_refused(tmp_path, flags):
    p = run("conspo.py", *flags, "--no-vllm", "--output-dir", str(tmp_path))
    assert p.returncode == 1 and "Traceback" not in p.stderr
    assert "ConSPO takes one optimizer step per rollout batch" in p.stderr
    assert not any(tmp_path.iterdir())  # refused while parsing the flags, before any run directory

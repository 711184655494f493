"""clipo.py: the group InfoNCE against hand-worked values, anchors and positives, the clamped bonus, the head's
step (and none for the policy), the head's warm-up, seeded positives, and short end-to-end runs."""
import math

import pytest
import torch
from safetensors.torch import load_file
from transformers import Qwen2Config, Qwen2ForCausalLM

from clipo import ContrastiveHead, build_batch, contrastive_bonus, group_infonce, pooled_hidden, sample_positives
from test_grpo_run import ROOT, TINY, read_metrics, run


def unit(*rows):
    return torch.nn.functional.normalize(torch.tensor(rows, dtype=torch.float32), dim=-1)


def gen(seed):
    return torch.Generator().manual_seed(seed)


# --- the InfoNCE ---------------------------------------------------------------------------------------------------

def test_infonce_by_hand():
    # one group of 4: z0 = z1, z2 orthogonal, z3 opposite; 0 and 1 are correct, each the other's positive.
    # tau = 0.5, so s_01 = 2, s_02 = 0, s_03 = -2 and L_0 = -2 + log(e^2 + e^0 + e^-2); by symmetry L_1 is the same
    # (s_10 = 2, s_12 = 0, s_13 = -2)
    z = unit([1, 0], [1, 0], [0, 1], [-1, 0])
    L = group_infonce(z, torch.tensor([1, 0, -1, -1]), group_size=4, tau=0.5)
    expected = -2 + math.log(math.e ** 2 + 1 + math.e ** -2)  # 0.1464
    assert L.tolist() == pytest.approx([expected, expected, 0.0, 0.0], abs=1e-6)
    # two groups: indices are within a group, and a group never sees the other one
    z2 = torch.cat([z, unit([0, 1], [1, 0], [0, 1], [1, 0])])
    L2 = group_infonce(z2, torch.tensor([1, 0, -1, -1, 2, -1, 0, -1]), group_size=4, tau=0.5)
    # rollout 4 (second group): positive 6 is identical (s = 2), 5 and 7 orthogonal (s = 0): -2 + log(e^2 + 2)
    assert L2[:4].tolist() == pytest.approx(L.tolist(), abs=1e-6)
    assert L2[4].item() == pytest.approx(-2 + math.log(math.e ** 2 + 2), abs=1e-6)
    assert L2[6].item() == pytest.approx(-2 + math.log(math.e ** 2 + 2), abs=1e-6)
    assert L2[5].item() == L2[7].item() == 0.0


def test_official_supcon_eps_adds_eps_e_to_the_1_over_tau():
    # 4 orthogonal embeddings, tau = 0.05: every s_ia = 0, so the exact L = log(3); the official 1e-8 after the
    # row-max shift (m = 1/tau = 20) adds 1e-8 e^20 = 4.85 to the denominator: L = log(3 + 4.85)
    z = torch.eye(4)
    positives = torch.tensor([1, 0, -1, -1])
    exact = group_infonce(z, positives, 4, tau=0.05)
    official = group_infonce(z, positives, 4, tau=0.05, eps=1e-8)
    assert exact[0].item() == pytest.approx(math.log(3), abs=1e-5)
    assert official[0].item() == pytest.approx(math.log(3 + 1e-8 * math.exp(20)), abs=1e-5)


def test_infonce_matches_the_official_formula_on_random_embeddings():
    # the official supcon_loss written out: -(s_ip - m) + log(sum_{a != i} exp(s_ia - m) + eps), m = max_a s_ia
    torch.manual_seed(0)
    G, tau = 8, 0.05
    z = torch.nn.functional.normalize(torch.randn(3 * G, 16), dim=-1)
    correct = torch.tensor([1, 1, 1, 0, 0, 1, 0, 0] + [1, 0] * 4 + [1] * 8, dtype=torch.bool)
    positives = sample_positives(correct, G, gen(0))
    for eps in (0.0, 1e-8):
        L = group_infonce(z, positives, G, tau, eps)
        for i in range(3 * G):
            b, j = divmod(i, G)
            if positives[i] < 0:
                assert L[i] == 0
                continue
            s = z[b * G : (b + 1) * G] @ z[i] / tau
            m = s.max()
            others = torch.cat([s[:j], s[j + 1 :]])
            ref = -(s[positives[i]] - m) + torch.log(torch.exp(others - m).sum() + eps)
            assert L[i].item() == pytest.approx(ref.item(), abs=1e-4)


# --- anchors and positives -----------------------------------------------------------------------------------------

def test_anchors_only_in_groups_with_another_correct_and_an_incorrect():
    correct = torch.tensor([1, 1, 0, 0,   # two correct, two incorrect: both correct ones are anchors
                            1, 0, 0, 0,   # a lone correct rollout has no positive
                            1, 1, 1, 1,   # no incorrect rollout: no anchor
                            0, 0, 0, 0,   # nothing correct
                            0, 1, 1, 1],  # three correct: anchors 17, 18, 19
                           dtype=torch.bool)
    positives = sample_positives(correct, 4, gen(0))
    assert (positives >= 0).nonzero().flatten().tolist() == [0, 1, 17, 18, 19]
    assert positives[:2].tolist() == [1, 0]  # the only other correct one
    for i in (17, 18, 19):
        p = positives[i].item()
        assert p in (1, 2, 3) and p != i - 16  # another correct member of the same group, never itself


def test_positive_is_uniform_over_the_other_correct_rollouts():
    correct = torch.tensor([1, 1, 1, 0], dtype=torch.bool)
    counts = torch.bincount(torch.stack([sample_positives(correct, 4, gen(s))[0] for s in range(400)]), minlength=4)
    assert counts[0] == counts[3] == 0
    assert 140 < counts[1] < 260 and 140 < counts[2] < 260  # 200 each in expectation (binomial sd 10)


def test_same_seed_same_positives():
    torch.manual_seed(1)
    correct = torch.rand(64 * 8) < 0.5
    a, b = sample_positives(correct, 8, gen(7)), sample_positives(correct, 8, gen(7))
    assert torch.equal(a, b) and (a >= 0).sum() > 50
    assert not torch.equal(a, sample_positives(correct, 8, gen(8)))


# --- the bonus and the head's step -----------------------------------------------------------------------------------

def make_head(d=16, dim=32, kind="linear", seed=0):
    torch.manual_seed(seed)
    head = ContrastiveHead(d, dim, kind)
    return head, torch.optim.AdamW(head.parameters(), lr=1e-3, weight_decay=0.01)


REWARDS = torch.tensor([1, 1, 0, 0,  1, 0, 0, 0,  1, 1, 1, 1,  0, 1, 1, 1], dtype=torch.float32)
ANCHORS = [0, 1, 13, 14, 15]


@pytest.mark.parametrize("kind", ["linear", "mlp"])
def test_bonus_is_clamped_touches_only_anchors_and_uses_the_head_before_its_step(kind):
    torch.manual_seed(0)
    hidden = torch.randn(16, 16)
    head, opt = make_head(kind=kind)
    before = ContrastiveHead(16, 32, kind)
    before.load_state_dict(head.state_dict())
    bonus, stats = contrastive_bonus(head, opt, hidden, REWARDS, 4, gen(3), tau=0.05, coef=0.2, floor=-0.5)
    assert (bonus != 0).nonzero().flatten().tolist() == ANCHORS
    assert bool(((bonus >= -0.5) & (bonus < 0))[ANCHORS].all())
    # the same positives and the head as it was before this step give the bonus: max(-lambda L_i, -0.5)
    L = group_infonce(before(hidden), sample_positives(REWARDS > 0, 4, gen(3)), 4, 0.05)
    assert torch.allclose(bonus, (-0.2 * L).clamp(min=-0.5) * (L != 0), atol=1e-6)
    assert stats["clipo/frac_anchors"] == 5 / 16
    assert stats["clipo/contrastive_loss"] == pytest.approx(L[ANCHORS].mean().item(), rel=1e-5)
    assert stats["clipo/mean_bonus"] == pytest.approx(bonus[ANCHORS].mean().item(), rel=1e-5)
    # a large lambda hits the floor on every anchor and nowhere else
    head2, opt2 = make_head(kind=kind)
    bonus2, _ = contrastive_bonus(head2, opt2, hidden, REWARDS, 4, gen(3), tau=0.05, coef=1e6, floor=-0.5)
    assert bonus2[ANCHORS].tolist() == [-0.5] * 5 and bonus2.abs().sum() == 2.5


def test_no_anchor_no_step_and_finite_stats():
    head, opt = make_head()
    w = head.proj.weight.detach().clone()
    rewards = torch.tensor([1, 1, 1, 1, 0, 0, 0, 0], dtype=torch.float32)
    bonus, stats = contrastive_bonus(head, opt, torch.randn(8, 16), rewards, 4, gen(0), tau=0.05, coef=0.2, floor=-0.5)
    assert bonus.abs().sum() == 0 and torch.equal(head.proj.weight, w)
    assert stats == {"clipo/contrastive_loss": 0.0, "clipo/frac_anchors": 0.0, "clipo/mean_bonus": 0.0}


def tiny_qwen2():
    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=40, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                      num_key_value_heads=1, head_dim=16, max_position_embeddings=64, tie_word_embeddings=True)
    return Qwen2ForCausalLM(cfg).train()


def test_pooled_hidden_is_the_mean_of_hidden_states_minus_1_over_the_response_tokens():
    model = tiny_qwen2()
    prompts, completions = [[5, 6, 7], [8, 9]], [[10, 11], [12, 13, 14, 0]]
    ids, attn, cmask, _ = build_batch(prompts, completions, pad_id=0, device="cpu")
    h = pooled_hidden(model, ids, attn, cmask)
    assert h.dtype == torch.float32 and not h.requires_grad and h.shape == (2, 32)
    with torch.no_grad():
        states = model(input_ids=ids, attention_mask=attn, output_hidden_states=True).hidden_states[-1]
    for i, (p, c) in enumerate(zip(prompts, completions)):
        assert torch.allclose(h[i], states[i, len(p) : len(p) + len(c)].mean(0), atol=1e-5)


def test_the_head_steps_and_the_policy_gets_no_gradient():
    model = tiny_qwen2()
    prompts = [[1, 2, 3]] * 4 + [[4, 5]] * 4
    completions = [[6, 7], [6, 8, 9], [10], [11, 12], [13], [13, 14], [15, 16, 17], [18]]
    ids, attn, cmask, _ = build_batch(prompts, completions, pad_id=0, device="cpu")
    hidden = pooled_hidden(model, ids, attn, cmask)
    rewards = torch.tensor([1, 1, 0, 0, 1, 1, 1, 0], dtype=torch.float32)
    head, opt = make_head(d=32)
    w = head.proj.weight.detach().clone()
    bonus, stats = contrastive_bonus(head, opt, hidden, rewards, 4, gen(0), tau=0.05, coef=0.2, floor=-0.5)
    assert stats["clipo/frac_anchors"] == 5 / 8 and stats["clipo/contrastive_loss"] > 0
    assert not torch.equal(head.proj.weight, w)  # the head took its step
    assert all(p.grad is None for p in model.parameters())  # the contrastive loss never reached the policy
    assert all(p.grad is not None for p in head.parameters())


# --- end to end on the embedded model -------------------------------------------------------------------------------

def weights(path):
    return load_file(path / "model.safetensors")


# enough groups of 8 that some hold anchors at the embedded model's ~10% sampled accuracy (P(none) ~ 0.8^16 per step)
MANY = [*TINY, "--prompts-per-step", "16", "--group-size", "8", "--eval-every", "0", "--no-vllm"]


@pytest.mark.slow
def test_clipo_embedded_end_to_end(tmp_path):
    p = run("clipo.py", "--total-steps", "2", *TINY, "--output-dir", str(tmp_path), "--no-vllm")
    assert p.returncode == 0, p.stderr[-3000:]
    (run_dir,) = tmp_path.iterdir()
    rows = read_metrics(run_dir)
    assert [r["step"] for r in rows] == [0, 1, 2]
    assert all(math.isfinite(v) for r in rows for v in r.values())
    for r in rows[1:]:
        assert {"clipo/contrastive_loss", "clipo/frac_anchors", "clipo/mean_bonus", "reward", "loss"} <= r.keys()
        assert 0 <= r["clipo/frac_anchors"] <= 1 and -0.5 <= r["clipo/mean_bonus"] <= 0
    assert "eval/accuracy" in rows[0] and "eval/accuracy" in rows[2]
    # the policy trained: the saved model differs from the embedded one it started from
    start, final = weights(ROOT / "tiny" / "model"), weights(run_dir / "final")
    assert any(not torch.equal(start[k], final[k]) for k in start)


@pytest.mark.slow
def test_head_warmup_leaves_the_policy_unchanged(tmp_path):
    p = run("clipo.py", *MANY, "--total-steps", "2", "--head-warmup-steps", "2", "--save-every", "2",
            "--output-dir", str(tmp_path))
    assert p.returncode == 0, p.stderr[-3000:]
    (run_dir,) = tmp_path.iterdir()
    start, final = weights(ROOT / "tiny" / "model"), weights(run_dir / "final")
    assert start.keys() == final.keys() and all(torch.equal(start[k], final[k]) for k in start)
    rows = read_metrics(run_dir)
    assert [r["step"] for r in rows] == [1, 2] and all(r["grad_norm"] == 0 and r["loss"] == 0 for r in rows)
    # meanwhile the head trained, and the checkpoint holds it and its optimizer
    state = torch.load(run_dir / "checkpoints" / "step_00000002" / "state.pt", weights_only=False)
    assert {"contrastive_head", "contrastive_head_optimizer"} <= state["algo"].keys()
    assert state["algo"]["contrastive_head_optimizer"]["state"]  # AdamW took at least one step


@pytest.mark.slow
def test_resume_is_exact(tmp_path):
    # a run cut after step 1 and resumed must match an uninterrupted one: the head and its AdamW come back from
    # the checkpoint and the positives of step 2 are drawn from (seed, step)
    flags = [*MANY, "--learning-rate", "1e-4"]
    p = run("clipo.py", *flags, "--total-steps", "2", "--output-dir", str(tmp_path / "a"))
    assert p.returncode == 0, p.stderr[-3000:]
    p = run("clipo.py", *flags, "--total-steps", "1", "--save-every", "1", "--output-dir", str(tmp_path / "b"))
    assert p.returncode == 0, p.stderr[-3000:]
    (run_a,), (run_b,) = (tmp_path / "a").iterdir(), (tmp_path / "b").iterdir()
    p = run("clipo.py", "--resume", str(run_b), "--total-steps", "2")
    assert p.returncode == 0, p.stderr[-3000:]
    ma, mb = ([{k: v for k, v in r.items() if not k.startswith("time/")} for r in read_metrics(d)]
              for d in (run_a, run_b))
    assert [r["step"] for r in mb] == [1, 2] and ma == mb
    assert ma[0]["clipo/frac_anchors"] > 0 and ma[1]["clipo/frac_anchors"] > 0  # the head learned at both steps
    wa, wb = weights(run_a / "final"), weights(run_b / "final")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)

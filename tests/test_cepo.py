"""cepo.py: the teachers' inputs and log-prob offsets, the token weights, the lambda schedule, the fallbacks, and a
short end-to-end run on the embedded model.

The teacher tests use a real (random) Qwen2 model and a real BPE tokenizer built here in a fraction of a second,
and compare cepo's batched, padded teacher log-probs with a plain HF forward of each concatenated sequence.
"""
import math

import pytest
import torch
from test_grpo_run import TINY, read_metrics, run  # tests/ is on sys.path: pytest's rootdir-less import mode

import cepo
import grpo
from losses import scripts_loss
from cepo import (build_batch, cepo_advantages, cepo_lambda, evidence_delta, get_logps, teacher_logps,
                  wrong_answers)

TEMPERATURE = 0.7
# TINY with 8 groups of 8: enough groups mix right and wrong rollouts for the teachers to run (last flag wins)
MIXED = [*TINY, "--prompts-per-step", "8", "--group-size", "8"]


@pytest.fixture(scope="module")
def tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    text = ["Tom has 12 apples and gets 7 more. How many? Answer in \\boxed{}.", "\\boxed{19} None 42 7 100"] * 20
    tok.train_from_iterator(text, trainers.BpeTrainer(vocab_size=300, special_tokens=["<pad>"],
                                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>")


@pytest.fixture(scope="module")
def model(tokenizer):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, head_dim=32, max_position_embeddings=256)
    return Qwen2ForCausalLM(config).eval()


def ids(tokenizer, text):
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def direct_response_logps(model, prefix, completion):
    """log pi(completion_t | prefix + completion_<t) from one unpadded HF forward of the concatenation."""
    seq = torch.tensor([prefix + completion])
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=seq).logits[0].float() / TEMPERATURE, dim=-1)  # (L, V)
    start = len(prefix) - 1  # the logits at position j predict token j + 1
    return logp[start : start + len(completion)].gather(1, torch.tensor(completion).unsqueeze(1)).squeeze(1)


@pytest.fixture(scope="module")
def batch(tokenizer):
    """Four rollouts with prompts, references and responses of different lengths (so rows pad differently)."""
    prompts = [ids(tokenizer, t) for t in ["Tom has 12 apples.", "How many?", "Tom has 12 apples and gets 7 more.",
                                           "Answer"]]
    completions = [ids(tokenizer, t) for t in ["\\boxed{19}", "\\boxed{7} 42", "19", "\\boxed{100} None"]]
    golds = ["19", "42", "100", "7"]
    _, _, completion_mask, _ = build_batch(prompts, completions, tokenizer.pad_token_id, "cpu")
    return prompts, completions, golds, completion_mask


KW = dict(temperature=TEMPERATURE, backend="torch", mb_size=3)  # mb_size 3: rows split over two micro-batches


def test_teacher_rows_lay_out_prompt_reference_response(tokenizer, model, batch, monkeypatch):
    prompts, completions, golds, completion_mask = batch
    seen = []

    def spy(prefixes, comps, pad_id, device, sampler_logps=None):
        out = build_batch(prefixes, comps, pad_id, device, sampler_logps)
        seen.append((out[0], out[2]))
        return out

    monkeypatch.setattr(cepo, "build_batch", spy)
    answers = ["19", None, "7", "100"]  # row 1 is skipped
    teacher_logps(model, tokenizer, prompts, answers, completions, completion_mask, pad_id=tokenizer.pad_token_id,
                  **KW)
    rows = [0, 2, 3]
    input_ids = [r for ids_, _ in seen for r in ids_.tolist()]
    masks = [r for _, m in seen for r in m.tolist()]
    assert len(input_ids) == len(rows)
    for row, i in zip(input_ids, rows):
        p, r, c = prompts[i], ids(tokenizer, " " + answers[i]), completions[i]
        assert r != ids(tokenizer, answers[i])  # the reference carries its leading space
        assert row[: len(p)] == p
        assert row[len(p) : len(p) + len(r)] == r
        assert row[len(p) + len(r) : len(p) + len(r) + len(c)] == c
        assert set(row[len(p) + len(r) + len(c) :]) <= {tokenizer.pad_token_id}
    for mask, i in zip(masks, rows):  # the mask covers the shifted targets of the response, nothing else
        start = len(prompts[i]) + len(ids(tokenizer, " " + answers[i])) - 1
        assert [k for k, m in enumerate(mask) if m] == list(range(start, start + len(completions[i])))


def test_teacher_logps_read_the_response_at_the_right_offsets(tokenizer, model, batch):
    prompts, completions, golds, completion_mask = batch
    answers = ["19", None, "7", "100"]
    got = teacher_logps(model, tokenizer, prompts, answers, completions, completion_mask,
                        pad_id=tokenizer.pad_token_id, **KW)
    assert got.shape == completion_mask.shape
    assert torch.all(got[1] == 0) and torch.all(got[completion_mask == 0] == 0)
    for i in (0, 2, 3):
        want = direct_response_logps(model, prompts[i] + ids(tokenizer, " " + answers[i]), completions[i])
        assert torch.allclose(got[i][completion_mask[i].bool()], want, atol=1e-5), i
        # the reference matters: reading without it (or one token off) gives other values
        without = direct_response_logps(model, prompts[i], completions[i])
        assert not torch.allclose(want, without, atol=1e-3)


def student_old_logps(model, prompts, completions, pad_id):
    """pi_old log-probs in the rollout layout, as the script's no-grad forward computes them."""
    input_ids, attention_mask, completion_mask, _ = build_batch(prompts, completions, pad_id, "cpu")
    with torch.no_grad():
        logps, _ = get_logps(model, input_ids, attention_mask, TEMPERATURE, "torch")
    return logps * completion_mask


@pytest.mark.parametrize("rlsd_fallback", [True, False])
def test_evidence_delta_and_its_fallbacks(tokenizer, model, batch, rlsd_fallback):
    prompts, completions, golds, completion_mask = batch
    pad_id = tokenizer.pad_token_id
    old_logps = student_old_logps(model, prompts, completions, pad_id)
    wrong = ["7", None, "None", "3"]  # row 1: no usable wrong answer; row 3 is not taught
    rows = [True, True, True, False]
    delta = evidence_delta(model, tokenizer, prompts, completions, completion_mask, golds, wrong, old_logps, rows,
                           rlsd_fallback=rlsd_fallback, pad_id=pad_id, **KW)
    m = completion_mask.bool()
    for i in (0, 2):  # a wrong answer: right-answer teacher minus wrong-answer teacher (" None" is a literal answer)
        plus = direct_response_logps(model, prompts[i] + ids(tokenizer, " " + golds[i]), completions[i])
        minus = direct_response_logps(model, prompts[i] + ids(tokenizer, " " + wrong[i]), completions[i])
        assert torch.allclose(delta[i][m[i]], plus - minus, atol=1e-5)
    plus = direct_response_logps(model, prompts[1] + ids(tokenizer, " " + golds[1]), completions[1])
    if rlsd_fallback:  # the paper: RLSD's Delta against the rollout policy without a reference
        assert torch.allclose(delta[1][m[1]], plus - old_logps[1][m[1]], atol=1e-5)
        assert delta[1][m[1]].abs().max() > 1e-3
    else:  # the official code: r- = r+, so Delta = 0 and w = 1
        assert torch.all(delta[1] == 0)
    assert torch.all(delta[3] == 0) and torch.all(delta[~m] == 0)


def test_wrong_answer_of_each_group_and_the_fallbacks():
    texts = ["\\boxed{19}", "no box", "\\boxed{7}", "so \\boxed{9}",  # right, rejected w/o box, two boxed rejected
             "\\boxed{5}", "\\boxed{5}", "\\boxed{5}", "\\boxed{5}",  # all right: no rejected rollout
             "nothing", "\\boxed{}", "\\boxed{", "???"]  # only rejected rollouts, none with an answer
    rewards = torch.tensor([1.0, 0, 0, 0, 1, 1, 1, 1, 0, 0, 0, 0])
    answers, falls_back = wrong_answers(texts, rewards, 4, official=False)
    assert answers == ["7", None, None] and falls_back == [False, True, True]  # first boxed rejected rollout wins
    answers, falls_back = wrong_answers(texts, rewards, 4, official=True)
    # official: the first rejected rollout whatever it holds ("None" without a box); no rejected rollout: r- = r+
    assert answers == ["None", None, "None"] and falls_back == [True, True, True]
    # graded rewards: the lowest-scoring rejected rollout, the first by index among ties
    graded = torch.tensor([0.4, 0.1, 0.1, 0.9])
    texts = ["\\boxed{1}", "\\boxed{2}", "\\boxed{3}", "\\boxed{4}"]
    assert wrong_answers(texts, graded, 4, official=False) == (["2"], [False])
    assert wrong_answers(texts, graded, 4, official=True) == (["2"], [False])


def test_token_weights_and_modulated_advantage_by_hand():
    adv = torch.tensor([2.0, -1.0, 0.0])
    delta = torch.tensor([[0.1, -0.3, 5.0]] * 3)
    ahat, w = cepo_advantages(adv, delta, lam=0.5, eps_w=0.2)
    e = math.exp
    assert torch.allclose(w, torch.tensor([[e(0.1), e(-0.3), e(5.0)], [e(-0.1), e(0.3), e(-5.0)], [1.0, 1.0, 1.0]]))
    # A > 0: w = e^0.1 inside the clip; e^-0.3 = 0.74 -> 0.8; e^5 -> 1.2. Factor (1 - 0.5) + 0.5 clip(w).
    # A < 0: w = e^-Delta: e^-0.1 = 0.905 inside; e^0.3 = 1.35 -> 1.2; e^-5 -> 0.8.
    want = torch.tensor([[2 * (0.5 + 0.5 * e(0.1)), 2 * 0.9, 2 * 1.1],
                         [-(0.5 + 0.5 * e(-0.1)), -1.1, -0.9],
                         [0.0, 0.0, 0.0]])
    assert torch.allclose(ahat, want)


def test_token_advantages_take_the_sign_of_each_rows_masked_sum():
    """The official `apply_cepo_weighting` takes (B, T) advantages: s_i = sign(sum_t A_it m_it), w_t = exp(s_i Delta_t),
    Ahat_t = A_it [(1 - lam) + lam clip(w_t)] m_it. The rows are chosen so that the first token's sign, each token's
    own sign and the sign of the sum over padding too each differ from the masked sum's somewhere."""
    e = math.exp
    adv = torch.tensor([[1.0, -0.5, -0.2, -10.0, -10.0],  # masked sum +0.3; with the padding -19.7; token 1 < 0
                        [-0.3, 0.5, 0.4, 0.0, 0.0],  # masked sum +0.6; first token < 0
                        [1.0, -1.0, 5.0, 0.0, 0.0],  # masked sum 0: s = 0, w = 1 (with the padding +5)
                        [0.2, -0.7, 0.0, 0.0, 0.0]])  # masked sum -0.5; first token > 0
    mask = torch.tensor([[1.0, 1, 1, 0, 0], [1, 1, 1, 0, 0], [1, 1, 0, 0, 0], [1, 1, 0, 0, 0]])
    delta = torch.full((4, 5), 0.1)
    ahat, w = cepo_advantages(adv, delta, lam=0.5, eps_w=0.2, mask=mask)
    up, down = 0.5 + 0.5 * e(0.1), 0.5 + 0.5 * e(-0.1)  # the factor for s = +1 and s = -1 (w inside the clip)
    want = torch.tensor([[1.0 * up, -0.5 * up, -0.2 * up, 0.0, 0.0],
                         [-0.3 * up, 0.5 * up, 0.4 * up, 0.0, 0.0],
                         [1.0, -1.0, 0.0, 0.0, 0.0],
                         [0.2 * down, -0.7 * down, 0.0, 0.0, 0.0]])  # 0 on padding, as the official code
    torch.testing.assert_close(ahat, want, rtol=0, atol=1e-6)
    torch.testing.assert_close(w, torch.tensor([[e(0.1)] * 5, [e(0.1)] * 5, [1.0] * 5, [e(-0.1)] * 5]))
    # (B,) advantages (GRPO's, cepo.py's call) give what the official function gives on their (B, T) copy
    rows = torch.tensor([1.5, -0.5, 0.0, -2.0])
    delta = torch.randn(4, 5, generator=torch.Generator().manual_seed(0))
    for lam in (0.3, 1.0):
        got, got_w = cepo_advantages(rows, delta, lam, 0.2, mask=mask)
        want, want_w = cepo_advantages(rows.unsqueeze(1) * mask, delta, lam, 0.2, mask=mask)
        assert torch.equal(got, want) and torch.equal(got_w, want_w)
        assert torch.equal(got == 0, (rows.unsqueeze(1) * mask) == 0)


@pytest.mark.parametrize("lam", [0.0, 0.02, 0.5, 1.0])
@pytest.mark.parametrize("eps_w", [0.2, 0.5, 0.9])
def test_advantage_sign_never_flips(lam, eps_w):
    g = torch.Generator().manual_seed(int(lam * 100 + eps_w * 10))
    adv = torch.randn(64, generator=g) * 3
    adv[::7] = 0.0
    scale = torch.tensor([1.0, 10.0, 1e3, 1e30, 3e38]).repeat_interleave(8)  # exp overflows to inf for the big ones
    delta = torch.randn(64, 40, generator=g).clamp(-1, 1) * scale
    ahat, _ = cepo_advantages(adv, delta, lam, eps_w)
    assert torch.isfinite(ahat).all()
    assert torch.equal(torch.sign(ahat), torch.sign(adv).unsqueeze(1).expand_as(ahat))
    factor = (ahat / adv.unsqueeze(1))[adv != 0]  # within [1 - lam eps_w, 1 + lam eps_w]
    assert factor.min() >= 1 - lam * eps_w - 1e-6 and factor.max() <= 1 + lam * eps_w + 1e-6
    if lam > 0:  # the huge Deltas hit both clip bounds
        assert factor.min() < 1 - lam * eps_w + 1e-6 and factor.max() > 1 + lam * eps_w - 1e-6


def test_lambda_schedule():
    assert cepo_lambda(1, 0.5, 25) == 0.5
    assert cepo_lambda(2, 0.5, 25) == pytest.approx(0.48)
    assert cepo_lambda(25, 0.5, 25) == pytest.approx(0.02)
    assert cepo_lambda(26, 0.5, 25) == 0.0
    assert cepo_lambda(1000, 0.5, 25) == 0.0


MASK = torch.tensor([[1.0, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]])


def _losses(ahat, adv, agg):
    torch.manual_seed(1)
    logps = (-torch.rand(3, 5)).requires_grad_()
    old = logps.detach() + 0.3 * torch.randn(3, 5)  # ratios on both sides of the clip
    mask = MASK
    kw = dict(eps_low=0.2, eps_high=0.28, beta=0.0, ref_logps=torch.zeros(3, 5), agg=agg, n_seqs=3, n_tokens=9,
              max_new_tokens=5)
    c, c_stats = scripts_loss(cepo, logps, old, ahat, mask, **kw)  # cepo.py's call: one advantage per token
    g, g_stats = scripts_loss(grpo, logps, old, adv, mask, **kw)  # grpo.py's: one per sequence
    (c_grad,) = torch.autograd.grad(c, logps)
    (g_grad,) = torch.autograd.grad(g, logps)
    return (c, c_stats, c_grad), (g, g_stats, g_grad)


@pytest.mark.parametrize("agg", ["seq-mean-token-mean", "token-mean", "seq-mean-token-sum-norm"])
def test_lambda_zero_is_grpo_loss(agg):
    adv = torch.tensor([1.5, -0.5, -0.5])
    delta = torch.randn(3, 5, generator=torch.Generator().manual_seed(0)) * 2
    ahat, _ = cepo_advantages(adv, delta, lam=0.0, eps_w=0.2, mask=MASK)  # as cepo.py calls it: 0 on padding
    (c, c_stats, c_grad), (g, g_stats, g_grad) = _losses(ahat, adv, agg)
    assert c.item() == g.item() and torch.equal(c_grad, g_grad)
    assert {k: float(v) for k, v in c_stats.items()} == {k: float(v) for k, v in g_stats.items()}
    ahat, _ = cepo_advantages(adv, delta, lam=0.5, eps_w=0.2, mask=MASK)  # the teachers do change the loss when lambda > 0
    (c, _, c_grad), (g, _, g_grad) = _losses(ahat, adv, agg)
    assert c.item() != pytest.approx(g.item()) and not torch.allclose(c_grad, g_grad)


@pytest.mark.slow
def test_cepo_embedded_end_to_end(tmp_path):
    p = run("cepo.py", "--total-steps", "2", *MIXED, "--output-dir", str(tmp_path), "--no-vllm")
    assert p.returncode == 0, p.stderr[-3000:]
    (run_dir,) = tmp_path.iterdir()
    rows = read_metrics(run_dir)
    assert [r["step"] for r in rows] == [0, 1, 2]
    assert all(math.isfinite(v) for r in rows for v in r.values())
    assert rows[1]["cepo/lambda"] == 0.5 and rows[2]["cepo/lambda"] == pytest.approx(0.48)
    taught = [r for r in rows[1:] if "cepo/delta_mean" in r]
    assert taught, "no step had a group with both right and wrong rollouts"
    for r in taught:
        assert 0 <= r["cepo/w_clip_frac"] <= 1 and 0 <= r["cepo/frac_fallback"] <= 1 and r["cepo/delta_mean"] != 0
        assert "clip_ratio/dual_mean" not in r  # grpo.py's default: no dual clip
    assert "eval/accuracy" in rows[0] and "eval/accuracy" in rows[2] and "entropy" in rows[1]
    assert (run_dir / "final" / "config.json").exists() and any((run_dir / "final").glob("*.safetensors"))


@pytest.mark.slow
def test_cepo_after_lambda_reaches_zero_is_grpo(tmp_path):
    """With lambda 0 from the start, cepo.py trains exactly as grpo.py given the same flags: the official script's
    loss settings, dual clip included. Two mini-batches, so the second update has rho != 1 and the loss reads
    per-token advantages and old log-probs."""
    common = ["--total-steps", "1", *MIXED, "--eval-every", "0", "--no-vllm", "--seed", "3", "--num-minibatches", "2",
              "--agg", "token-mean", "--eps-high", "0.28", "--adv-eps", "1e-6", "--dual-clip", "3"]
    a = run("cepo.py", *common, "--lambda-init", "0", "--output-dir", str(tmp_path / "cepo"))
    b = run("grpo.py", *common, "--output-dir", str(tmp_path / "grpo"))
    assert a.returncode == 0 and b.returncode == 0, (a.stderr + b.stderr)[-3000:]
    (ca,), (gb,) = (tmp_path / "cepo").iterdir(), (tmp_path / "grpo").iterdir()
    ra, rb = read_metrics(ca), read_metrics(gb)
    for x, y in zip(ra, rb):
        assert "cepo/delta_mean" not in x and x.get("cepo/lambda", 0.0) == 0.0
        for k in ("reward", "loss", "grad_norm", "entropy", "clip_ratio/region_mean", "clip_ratio/dual_mean"):
            assert (k in x) == (k in y) and x.get(k) == y.get(k), k
    assert any(x["grad_norm"] > 0 for x in ra)  # something was trained, so the equality above compares real updates
    assert "clip_ratio/dual_mean" in ra[-1]  # the dual clip reached the loss and the log

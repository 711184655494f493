"""r2po.py: the rollout head, the explorer's sampling and log-probs, the stage-1 advantages, and the script end to end.

The unit tests use a tiny random Qwen2 (tied embeddings, as the embedded model and Qwen2.5-1.5B); the end-to-end
test is a real subprocess of the script on the embedded model. Tests run from tests/ (pytest's default import mode
puts it on sys.path), so the helpers of test_grpo_run.py import directly.
"""
import math

import pytest
import torch
from safetensors import safe_open
from test_grpo_run import TINY, read_metrics, run
from transformers import AutoModelForCausalLM, Qwen2Config, Qwen2ForCausalLM

from common.data import EMBEDDED_MODEL
from common.vllm_engine import VLLMEngine, vllm_available
from common.hf_engine import HFEngine
from r2po import RolloutHead, explorer_logps, get_logps, head_advantages

EOS, PAD = 5, 0
PROMPTS = [[1, 10, 11, 12], [1, 20], [1, 30, 31, 32, 33, 34, 35]]


def tiny_qwen2() -> Qwen2ForCausalLM:
    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, head_dim=32, max_position_embeddings=256,
                         tie_word_embeddings=True, bos_token_id=1, eos_token_id=EOS, pad_token_id=PAD)
    return Qwen2ForCausalLM(config).float().eval()


def sample(model, head=None, seed=0, greedy=False, n=4, max_new_tokens=8):
    """Completions from the policy (head None) or the explorer, from the same random state."""
    torch.manual_seed(seed)
    engine = HFEngine(model, stop_token_ids=[EOS], pad_id=PAD, residual=head)  # r2po.py's explorer when head is set
    return engine.generate(PROMPTS, n=n, temperature=0.0 if greedy else 1.0, top_p=1.0,
                           max_tokens=max_new_tokens).completion_ids


def batch_of(model):
    """A padded batch of prompt + sampled completion rows: input_ids, attention_mask (b, L)."""
    rows = [p + c for p, c in zip(PROMPTS, sample(model, n=1))]
    L = max(len(r) for r in rows)
    ids = torch.tensor([r + [PAD] * (L - len(r)) for r in rows])
    mask = torch.tensor([[1] * len(r) + [0] * (L - len(r)) for r in rows])
    return ids, mask


def hidden_of(model, ids, mask):
    with torch.no_grad():
        return model.get_decoder()(input_ids=ids, attention_mask=mask).last_hidden_state[:, :-1]  # (b, L-1, d)


def test_explorer_starts_exactly_at_the_policy():
    model = tiny_qwen2()
    head = RolloutHead(64, 300, init_std=0.02)
    assert torch.count_nonzero(head.w2.weight) == 0 and torch.count_nonzero(head.w1.weight) > 0
    # sampling: the same random state gives the same completions only if every step's logits are equal
    assert sample(model, head) == sample(model)
    ids, mask = batch_of(model)
    plain, plain_ent = get_logps(model, ids, mask, 0.7, "torch", with_entropy=True)
    lm_weight = model.get_output_embeddings().weight
    logps, ent = explorer_logps(hidden_of(model, ids, mask), lm_weight, head, ids[:, 1:], 0.7, "torch", True)
    torch.testing.assert_close(logps, plain, rtol=0, atol=1e-6)
    torch.testing.assert_close(ent, plain_ent, rtol=0, atol=1e-6)
    # once W2 moves, both differ (so the checks above can fail)
    torch.nn.init.normal_(head.w2.weight, std=0.5)
    assert sample(model, head) != sample(model)
    moved, _ = explorer_logps(hidden_of(model, ids, mask), lm_weight, head, ids[:, 1:], 0.7, "torch")
    assert (moved - plain).abs().max() > 1e-2


def test_explorer_logps_and_sampling_follow_lm_head_plus_head():
    model = tiny_qwen2()
    head = RolloutHead(64, 300, init_std=0.3)
    torch.nn.init.normal_(head.w2.weight, std=0.3)
    ids, mask = batch_of(model)
    hidden = hidden_of(model, ids, mask)
    lm_weight = model.get_output_embeddings().weight
    # by hand: logits = W h + W2 ReLU(W1 h), softmax at temperature 0.7
    logits = (hidden @ lm_weight.T + torch.relu(hidden @ head.w1.weight.T) @ head.w2.weight.T).detach() / 0.7
    want = torch.log_softmax(logits, -1).gather(-1, ids[:, 1:, None])[..., 0]
    want_ent = -(torch.softmax(logits, -1) * torch.log_softmax(logits, -1)).sum(-1)
    logps, ent = explorer_logps(hidden, lm_weight.detach(), head, ids[:, 1:], 0.7, "torch", with_entropy=True)
    torch.testing.assert_close(logps, want, rtol=0, atol=1e-5)
    torch.testing.assert_close(ent, want_ent, rtol=0, atol=1e-5)
    # gradients reach both layers of the head, never the policy
    (logps * mask[:, 1:]).sum().backward()
    assert head.w1.weight.grad.abs().sum() > 0 and head.w2.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in model.parameters())
    # greedy sampling through the hook takes the argmax of the same logits (prompt 0's first token)
    first = sample(model, head, greedy=True, n=1, max_new_tokens=1)[0][0]
    h = hidden_of(model, torch.tensor([PROMPTS[0] + [0]]), torch.ones(1, len(PROMPTS[0]) + 1))[0, -1]
    assert first == int((lm_weight @ h + head(h)).argmax())
    assert first != sample(model, greedy=True, n=1, max_new_tokens=1)[0][0]  # the head changed the choice


def test_a_head_favouring_one_token_shows_in_the_samples():
    model = tiny_qwen2()
    favoured = 42
    head = RolloutHead(64, 300, init_std=0.02)
    with torch.no_grad():  # W1 = I: ReLU(h) > 0 somewhere for any h, so head(h)[42] = 100 * sum ReLU(h) is large
        head.w1.weight.copy_(torch.eye(64))
        head.w2.weight[favoured] = 100.0
    explorer = sample(model, head, seed=3)
    assert all(c == [favoured] * 8 for c in explorer)
    policy = sample(model, seed=3)
    assert sum(t == favoured for c in policy for t in c) < 4  # the policy alone almost never picks it


def test_head_advantages_by_hand():
    def adv(rewards, kind="inverse-frequency"):
        return head_advantages(torch.tensor(rewards, dtype=torch.float32), 8, kind)[0]

    # 1 right of 8: a = 1 for it, 1/7 for the others; z-scored (unbiased std) = the 1-of-8 indicator's z-score
    one_right = adv([1, 0, 0, 0, 0, 0, 0, 0])
    torch.testing.assert_close(one_right, torch.tensor([7 / (2 * math.sqrt(2))] + [-1 / (2 * math.sqrt(2))] * 7),
                               rtol=0, atol=1e-5)
    # 6 right of 8: the two wrong ones are the rare outcome and get the positive advantage (unlike GRPO)
    six_right = adv([1, 1, 1, 1, 1, 1, 0, 0])
    std = math.sqrt(8 / 7 * 0.25 * 0.75)
    # (rtol: the eps 1e-6 against a std of 0.15)
    torch.testing.assert_close(six_right, torch.tensor([-0.25 / std] * 6 + [0.75 / std] * 2), rtol=1e-5, atol=0)
    # every reward value equally frequent: 0 although the rewards differ (4/4, and 2/2/2/2 with four values)
    assert torch.count_nonzero(adv([1, 0, 1, 0, 0, 1, 1, 0])) == 0
    assert torch.count_nonzero(adv([0, 0, 1, 1, 2, 2, 3, 3])) == 0
    assert torch.count_nonzero(adv([1] * 8)) == 0
    # three values with counts 3, 2, 3: a = 1/3, 1/2, 1/3
    a = torch.tensor([1 / 3] * 3 + [1 / 2] * 2 + [1 / 3] * 3)
    torch.testing.assert_close(adv([0, 0, 0, 1, 1, 2, 2, 2]), (a - a.mean()) / (a.std() + 1e-6), rtol=0, atol=1e-6)
    # groups are independent; the logged std is the mean over groups of std(a_i)
    both, mean_std = head_advantages(torch.tensor([1, 0, 0, 0, 0, 0, 0, 0] + [1, 0] * 4, dtype=torch.float32), 8,
                                     "inverse-frequency")
    torch.testing.assert_close(both, torch.cat([one_right, torch.zeros(8)]))
    first_std = torch.tensor([1] + [1 / 7] * 7).std()
    assert mean_std == pytest.approx(float(first_std) / 2, abs=1e-6)
    # the task-reward ablation: the 4/4 group is not skipped
    torch.testing.assert_close(adv([1, 1, 1, 1, 0, 0, 0, 0], "reward"),
                               torch.tensor([0.5 / math.sqrt(2 / 7)] * 4 + [-0.5 / math.sqrt(2 / 7)] * 4),
                               rtol=0, atol=1e-5)


def equal_frequency_groups(group_size: int) -> list[list[float]]:
    """Every way to split a group into k >= 2 reward values of G / k rollouts each, values not 0/1 (graded rewards),
    in a shuffled order: 2 x 2 and 4 x 1 for G = 4, ..., 2 x 6, 3 x 4, 4 x 3, 6 x 2, 12 x 1 for G = 12."""
    values = [0.0, 1.0, 0.5, -1.0, 2.25, 0.1, 0.3, 1.25, -0.5, 0.7, 3.0, 0.2]
    g = torch.Generator().manual_seed(group_size)
    groups = []
    for k in [k for k in range(2, group_size + 1) if group_size % k == 0]:
        rewards = torch.tensor(values[:k]).repeat_interleave(group_size // k)
        groups.append(rewards[torch.randperm(group_size, generator=g)].tolist())
    return groups


@pytest.mark.parametrize("group_size", [4, 6, 8, 12])
def test_equally_frequent_reward_values_are_skipped_exactly(group_size):
    """The skip rule is decided on the integer counts: a group whose reward values are all equally frequent gets
    exactly 0 (and a logged std of 0), whatever the float error of z-scoring 1/count (1/6 and 1/3 at G = 12 leave a
    std of ~3e-8, which a float test takes for a signal). The same for equal graded rewards under `reward`."""
    groups = equal_frequency_groups(group_size)
    # each group alone and all in one batch: torch's std rounds differently for one row and for several
    for rewards in [*groups, sum(groups, [])]:
        adv, mean_std = head_advantages(torch.tensor(rewards), group_size, "inverse-frequency")
        assert torch.count_nonzero(adv) == 0 and mean_std == 0, rewards
    for value in (0.3, 0.7, 1 / 3, 0.1):  # all-equal graded rewards: std of G equal floats need not be 0
        adv, mean_std = head_advantages(torch.full((group_size,), value), group_size, "reward")
        assert torch.count_nonzero(adv) == 0 and mean_std == 0


@pytest.mark.parametrize("rewards", [
    [1.0, 1, 1, 0],  # G = 4, counts 3/1
    [0.0, 1, 0.5, 0.5],  # G = 4, counts 1/1/2
    [0.0, 0, 0, 1, 1, 2],  # G = 6, counts 3/2/1
    [1.0, 1, 1, 1, 0, 0, 0.5, 0.5],  # G = 8, counts 4/2/2: some counts equal, not all
    [0.0] * 6 + [1.0] * 4 + [0.5] * 2,  # G = 12, counts 6/4/2
    [0.0] * 5 + [1.0] * 7,  # G = 12, counts 5/7
])
def test_groups_with_unequal_counts_are_not_skipped(rewards):
    """a_i = 1/count, z-scored with the unbiased std + 1e-6, worked out in float64 from the counts."""
    r = torch.tensor(rewards)
    adv, mean_std = head_advantages(r, len(rewards), "inverse-frequency")
    a = torch.tensor([1 / rewards.count(x) for x in rewards], dtype=torch.float64)
    torch.testing.assert_close(adv.double(), (a - a.mean()) / (a.std() + 1e-6), rtol=1e-5, atol=1e-6)
    assert torch.count_nonzero(adv) == len(rewards) - int(((a - a.mean()).abs() < 1e-12).sum())
    assert mean_std == pytest.approx(float(a.std()), rel=1e-6)
    # next to a skipped group the two stay independent
    skipped = [0.0, 1.0] * (len(rewards) // 2) if len(rewards) % 2 == 0 else None
    if skipped is not None:
        both, both_std = head_advantages(torch.tensor(rewards + skipped), len(rewards), "inverse-frequency")
        torch.testing.assert_close(both[: len(rewards)], adv)  # (batched reductions may round differently)
        assert torch.count_nonzero(both[len(rewards) :]) == 0
        assert both_std == pytest.approx(float(a.std()) / 2, rel=1e-6)


def load_checkpoint_state(run_dir, step):
    return torch.load(run_dir / "checkpoints" / f"step_{step:08d}" / "state.pt", weights_only=False)


@pytest.mark.slow
def test_r2po_embedded_end_to_end(tmp_path):
    # one head round, then one policy step; 8 rollouts a prompt so that groups with unequal counts occur
    p = run("r2po.py", "--total-steps", "2", *TINY, "--group-size", "8", "--head-steps", "1", "--policy-steps", "1",
            "--save-every", "1", "--output-dir", str(tmp_path), "--no-vllm")
    assert p.returncode == 0, p.stderr[-3000:]
    (run_dir,) = tmp_path.iterdir()
    rows = read_metrics(run_dir)
    assert [r["step"] for r in rows] == [0, 1, 2]
    assert [r["r2po/stage"] for r in rows[1:]] == [0, 1]
    assert all(math.isfinite(v) for r in rows for v in r.values())
    for key in ["reward", "reward_std", "frac_reward_zero_std", "completions/mean_length", "completions/clipped_ratio",
                "entropy", "time/generate", "time/train"]:
        assert key in rows[1] and key in rows[2], key
    assert "eval/accuracy" in rows[0] and "eval/accuracy" in rows[2]
    assert "r2po/head_adv_std" in rows[1] and "r2po/head_adv_std" not in rows[2]
    for key in ["loss", "grad_norm", "kl", "clip_ratio/low_mean", "clip_ratio/high_mean", "clip_ratio/region_mean"]:
        assert key in rows[1] and key in rows[2], key  # the head's in the head round, the policy's in the policy step
    assert rows[1]["r2po/head_adv_std"] > 0 and rows[1]["entropy"] > 0
    assert rows[1]["grad_norm"] > 0 and rows[2]["grad_norm"] > 0

    # the head round changed only the head; the policy step only the policy
    initial = AutoModelForCausalLM.from_pretrained(EMBEDDED_MODEL).state_dict()
    s1, s2 = load_checkpoint_state(run_dir, 1), load_checkpoint_state(run_dir, 2)
    assert set(s1["algo"]) == {"rollout_head", "rollout_head_optimizer", "rollout_head_scheduler"}
    # each optimizer stepped its own schedule once: the head in the head round, the policy in the policy step
    assert s1["algo"]["rollout_head_scheduler"]["last_epoch"] == 1 and s1["scheduler"]["last_epoch"] == 0
    assert s2["algo"]["rollout_head_scheduler"]["last_epoch"] == 1 and s2["scheduler"]["last_epoch"] == 1
    assert all(torch.equal(s1["model"][k], initial[k]) for k in initial)
    assert torch.count_nonzero(s1["algo"]["rollout_head"]["w2.weight"]) > 0  # W2 starts at 0
    assert any(not torch.equal(s2["model"][k], s1["model"][k]) for k in initial)
    assert all(torch.equal(s2["algo"]["rollout_head"][k], v) for k, v in s1["algo"]["rollout_head"].items())

    # the saved model is the policy alone: plain transformers loads it, no head weights, the step-2 weights
    final = run_dir / "final"
    with safe_open(final / "model.safetensors", "pt") as f:
        saved = set(f.keys())
    assert not any("w1" in k or "w2" in k or "rollout" in k for k in saved)
    model = AutoModelForCausalLM.from_pretrained(final)
    assert set(model.state_dict()) == set(initial)
    assert all(torch.equal(model.state_dict()[k], s2["model"][k]) for k in initial)

    if not vllm_available():
        pytest.skip("vllm is not importable: the saved model was checked with transformers only")
    engine = VLLMEngine(str(final), dtype=torch.float32, seed=0, max_model_len=128)
    try:
        out = engine.generate(PROMPTS, n=1, temperature=0.0, top_p=1.0, max_tokens=6)
    finally:
        engine.close()
    hf = HFEngine(model.eval(), stop_token_ids=[model.config.eos_token_id], pad_id=0)
    assert out.completion_ids == hf.generate(PROMPTS, n=1, temperature=0.0, top_p=1.0, max_tokens=6).completion_ids

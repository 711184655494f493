"""The training loops, one update on a hand-built batch: does each script push the policy the way its algorithm says,
and does each function of the loop get the values it should (the loop's wiring)?

Every test runs a script's real `__main__` through tests/replay.py: the rollouts are hand-built (a sampler cannot be
told what to produce), everything else is real (the tiny model, its tokenizer, math-verify, the optimizers, the
checkpoints and the final save). A spy records the arguments and return values of the script's functions. The
tests then compare the initial model (tiny/model) with the saved one, row by row of the batch the script built.

The batches: one group with mixed rewards whose completions differ in a digit, plus groups whose rewards are all
equal (advantage 0). One mixed group, because with two the shared weights let one group's gradient move the other
group's sequences against their own advantage (measured: a positive of one group fell while the other's rose), so a
per-sequence direction would not be a property of the loop.

The step: `--max-grad-norm 1e-11 --learning-rate 1` (OPTIM). The clip leaves every gradient entry far below AdamW's
eps (1e-8), so the first AdamW step, lr * g / (|g| + eps), is a plain gradient step of norm ~1e-3, and each
sequence's log-prob moves with its own term of the gradient. AdamW's usual first step is lr * sign(g): every weight
moves by the same amount whatever its gradient, and a positive completion fell by 0.003 nats while its group's
negative fell by 0.05 (measured, CEPO, lr 1e-5). The loop is the script's own in both cases; only the size of each
weight's step differs.

The bugs these tests were checked against (planted in a scratch copy of the project, each caught): the advantages
negated in grpo.py's loop; CLIPO's bonus subtracted instead of added; R2PO's head advantages negated before the head
loss; the truncated importance weight inverted (pi_sampler / pi_old); CEPO's wrong answer taken from the next
group, and its gold too; all-equal groups dropped with and without --drop-zero-std-groups; ConSPO's score summed
instead of averaged, and its coefficients negated in the loop. And tools/mutate.py's main-loop mutants (each killed
by `python tools/mutate.py --only ID`): grpo's A = 0 rows skipped although beta > 0, old log-probs recomputed only
from 3 updates on, eps_low/eps_high swapped in the loss call (grpo and r2po), --no-scale-rewards ignored; CLIPO's
warm-up ending a step early; ConSPO's margin curriculum a step ahead and J averaged over every group.

Each test runs one replay (~7 s on 2 idle cores; the grpo knob tests share one), so the file is part of the fast
subset.
"""
import pytest
import torch
from replay import replay, write_dataset
from transformers import AutoModelForCausalLM

from common.checkpoint import load_checkpoint
from common.data import EMBEDDED_INSTRUCTION, EMBEDDED_MODEL, load_tokenizer

G = 4
OPTIM = ["--max-grad-norm", "1e-11", "--learning-rate", "1"]
ZOE = "Zoe had 20 shells and found 22 more. How many shells are there?"  # 42
ANNA = "Anna had 10 coins and found 20 more. How many coins are there?"  # 30
SAM = "Sam had 45 apples and found 12 more. How many apples are there?"  # 57
MIXED = (ZOE, 42, ["\\boxed{42}", "\\boxed{41}", "\\boxed{42}", "\\boxed{41}"], [1, 0, 1, 0])
ALL_WRONG = (ANNA, 30, ["\\boxed{31}"] * G, [0] * G)
ALL_RIGHT = (SAM, 57, ["\\boxed{57}"] * G, [1] * G)


class Batch:
    """The rollout batch of a step as the script laid it out (the step's first `build_batch` call): per row, its
    question, gold, completion text and the verifier reward the hand-built groups say it earns; the rows' tensors."""

    def __init__(self, result, groups, step=1):
        tok = load_tokenizer(str(EMBEDDED_MODEL))
        call = result.calls("build_batch", step=step)[0]
        self.prompts, self.completions = call["args"]["prompts"], call["args"]["completions"]
        self.input_ids, self.attention_mask, self.completion_mask, self.sampling_logps = call["ret"]
        by_question = {q: (gold, dict(zip(texts, rewards))) for q, gold, texts, rewards in groups}
        self.questions = [next(q for q in by_question if tok.decode(p).startswith(q)) for p in self.prompts]
        self.golds = [str(by_question[q][0]) for q in self.questions]
        self.texts = tok.batch_decode(self.completions, skip_special_tokens=True)
        self.rewards = torch.tensor([float(by_question[q][1][t]) for q, t in zip(self.questions, self.texts)])
        assert len(self.texts) == G * len(groups) and all(self.questions[i] == self.questions[i - i % G]
                                                          for i in range(len(self.texts))), "rows are not grouped"

    def token_logps(self, model, head=None) -> torch.Tensor:
        """(N, L-1) log-probs of the batch's tokens under `model` (+ R2PO's rollout `head`), 0 off the completions."""
        with torch.no_grad():
            hidden = model.get_decoder()(input_ids=self.input_ids, attention_mask=self.attention_mask
                                         ).last_hidden_state[:, :-1]
            logits = model.get_output_embeddings()(hidden) + (0 if head is None else head(hidden))
            logps = torch.log_softmax(logits.float(), -1).gather(-1, self.input_ids[:, 1:, None])[..., 0]
        return logps * self.completion_mask

    def seq_logps(self, model, head=None) -> torch.Tensor:
        return self.token_logps(model, head).sum(1)


def run(tmp_path, script, groups, *flags, spy=(), engine=None):
    data = write_dataset(tmp_path / "train.jsonl", [(q, gold) for q, gold, _, _ in groups])
    result = replay(script, {q: texts for q, _, texts, _ in groups}, tmp_path, spy=[*spy, "build_batch"],
                    engine=engine, flags=["--dataset", str(data), "--instruction", EMBEDDED_INSTRUCTION,
                                          "--prompts-per-step", str(len(groups)), "--group-size", str(G),
                                          "--max-new-tokens", "8", "--total-steps", "1", "--eval-every", "0",
                                          *OPTIM, *flags])
    return result, Batch(result, groups)


def model_from(path_or_state):
    if isinstance(path_or_state, dict):
        model = AutoModelForCausalLM.from_pretrained(EMBEDDED_MODEL)
        model.load_state_dict(path_or_state)
        return model
    return AutoModelForCausalLM.from_pretrained(path_or_state)


def grpo_advantages(rewards, eps):
    r = rewards.view(-1, G)
    return ((r - r.mean(1, keepdim=True)) / (r.std(1, keepdim=True) + eps)).view(-1)


def loss_rows(calls):
    """The rows each loss call saw (the loop's micro-batch indices) and the advantages it was given."""
    return [(c["caller"]["micro"], c["args"]["advantages"]) for c in calls]


def loss_args(result, step=None):
    """Each micro-batch's `grpo_loss` call, its arguments joined with those of the `aggregate` call that reduced its
    per-token loss (mask, n_seqs, n_tokens): the loop calls one after the other, once per micro-batch."""
    losses, aggs = result.calls("grpo_loss", step), result.calls("aggregate", step)
    assert len(aggs) == len(losses), "one aggregate call per grpo_loss call"
    return [{"micro": c["caller"]["micro"], **c["args"], **a["args"]} for c, a in zip(losses, aggs)]


def assert_direction(before, after, advantages, what):
    """Rows with a positive advantage rose, rows with a negative one fell; at least one of each."""
    assert (advantages > 0).any() and (advantages < 0).any()
    for i, a in enumerate(advantages.tolist()):
        if a != 0:
            moved = float(after[i] - before[i])
            assert (moved > 0) == (a > 0) and abs(moved) > 1e-4, f"{what} of row {i} (A = {a:+.3f}) moved {moved:+.5f}"


# --- grpo.py ------------------------------------------------------------------------------------------------------

def test_grpo_one_update_follows_the_advantages(tmp_path):
    groups = [MIXED, ALL_WRONG]
    result, batch = run(tmp_path, "grpo.py", groups, spy=["compute_advantages", "grpo_loss", "aggregate"])
    (adv_call,) = result.calls("compute_advantages")
    assert torch.equal(adv_call["args"]["rewards"], batch.rewards)  # the verifier's rewards, row by row
    advantages = grpo_advantages(batch.rewards, 1e-4)
    assert torch.allclose(adv_call["ret"][0], advantages, atol=1e-6)
    loss_calls = result.calls("grpo_loss")
    fed = loss_rows(loss_calls)
    for mb, adv in fed:  # the loss gets each row's own advantage
        assert torch.equal(adv, adv_call["ret"][0][mb])
    # the zero-advantage group contributed nothing: with beta = 0 its rows are not even forwarded (every other row
    # is, once), but it counts in the normalisers (no --drop-zero-std-groups)
    zero = advantages == 0
    assert zero.sum() == G
    assert sorted(torch.cat([mb for mb, _ in fed]).tolist()) == torch.nonzero(~zero).view(-1).tolist()
    assert all(c["n_seqs"] == 2 * G and c["n_tokens"] == int(batch.completion_mask.sum()) for c in loss_args(result))
    # one update: each positive completion's sequence log-prob rose, each negative one's fell
    before, after = batch.seq_logps(model_from(EMBEDDED_MODEL)), batch.seq_logps(model_from(result.run_dir / "final"))
    assert_direction(before, after, advantages, "log-prob")


# --- grpo.py's knobs in the loop: --beta, --update-epochs 2, --eps-low != --eps-high, --no-scale-rewards ------------

EPS_LOW, EPS_HIGH, BETA = 0.1, 0.3, 0.1


@pytest.fixture(scope="module")
def knobs(tmp_path_factory):
    """One grpo.py run with every optional knob of the loop set, two updates (--update-epochs 2) on one batch."""
    tmp_path = tmp_path_factory.mktemp("knobs")
    return run(tmp_path, "grpo.py", [MIXED, ALL_WRONG], "--beta", str(BETA), "--eps-low", str(EPS_LOW),
               "--eps-high", str(EPS_HIGH), "--update-epochs", "2", "--no-scale-rewards",
               spy=["compute_advantages", "grpo_loss", "aggregate"])


def test_grpo_eps_low_and_eps_high_reach_the_loss_each_as_itself(knobs):
    result, _ = knobs
    calls = loss_args(result)
    assert len(calls) == 2  # one micro-batch per update
    assert all(c["eps_low"] == EPS_LOW and c["eps_high"] == EPS_HIGH for c in calls)


def test_grpo_no_scale_rewards_gives_the_loss_unscaled_advantages(knobs):
    """--no-scale-rewards: A = r - mean r (here +-0.5), not (r - mean r) / std (+-0.866)."""
    result, batch = knobs
    (adv_call,) = result.calls("compute_advantages")
    assert adv_call["args"]["scale_rewards"] is False
    r = batch.rewards.view(-1, G)
    unscaled = (r - r.mean(1, keepdim=True)).view(-1)
    assert torch.allclose(adv_call["ret"][0], unscaled, atol=1e-6) and unscaled.abs().max() == 0.5
    for c in loss_args(result):
        assert torch.equal(c["advantages"], unscaled[c["micro"]])


def test_grpo_beta_trains_the_zero_advantage_rows_too(knobs):
    """With beta > 0 a row whose advantage is 0 still has a KL gradient (from the second update on, when the policy
    has left the reference): every row is forwarded in every update, the all-wrong group's as well, against the
    reference's log-probs (the initial model's)."""
    result, batch = knobs
    initial = batch.token_logps(model_from(EMBEDDED_MODEL))
    for c in loss_args(result):
        assert sorted(c["micro"].tolist()) == list(range(2 * G))
        assert c["beta"] == BETA
        mask = c["mask"].bool()
        assert torch.allclose(c["ref_logps"][mask], initial[c["micro"]][:, : mask.shape[1]][mask], atol=1e-5)


def test_grpo_two_updates_keep_the_rollout_policy_as_pi_old(knobs):
    """--update-epochs 2: both updates read pi_old from the no-grad pass before the first step (the initial model),
    the second update's rho differs from 1 (its policy has stepped)."""
    result, batch = knobs
    first, second = loss_args(result)
    initial = batch.token_logps(model_from(EMBEDDED_MODEL))
    for c in (first, second):
        mask = c["mask"].bool()
        assert torch.allclose(c["old_logps"][mask], initial[c["micro"]][:, : mask.shape[1]][mask], atol=1e-5)
    order = second["micro"].argsort()
    assert torch.equal(first["old_logps"][first["micro"].argsort()], second["old_logps"][order])
    mask = second["mask"].bool()
    assert (second["logps"] - second["old_logps"])[mask].abs().max() > 1e-6  # the first update moved the policy


# --- the engine path: truncated importance sampling and dropped groups -------------------------------------------

def test_tis_weights_are_pi_old_over_pi_sampler_and_zero_std_groups_drop(tmp_path):
    """grpo.py on the engine path (tests/replay.py's ReplayEngine): the sampler's log-prob of completion token t is
    the pushed weights' minus delta[t], so pi_old / pi_sampler = e^delta[t], capped at --tis-cap; some deltas put the
    weight above the cap, some below 1."""
    cap, delta = 2.0, [0.0, 1.0, -0.5, 2.0, 0.3]
    groups = [MIXED, ALL_WRONG, ALL_RIGHT]
    result, batch = run(tmp_path, "grpo.py", groups, "--tis-cap", str(cap), "--drop-zero-std-groups",
                        spy=["grpo_loss", "aggregate"], engine=dict(sampler_delta=delta))
    assert batch.sampling_logps is not None  # the engine's log-probs reached the batch
    loss_calls = loss_args(result)
    mixed = torch.tensor([q == ZOE for q in batch.questions])
    for args in loss_calls:
        mb = args["micro"]
        mask = args["mask"].bool()
        # completion position of each masked token: 0, 1, 2, ... along each row
        position = (mask.long().cumsum(1) - 1)[mask]
        expected = torch.tensor(delta)[position % len(delta)].exp().clamp(max=cap)
        assert torch.allclose(args["is_weights"][mask], expected, rtol=1e-4)
        sampler = batch.sampling_logps[mb][:, : mask.shape[1]]
        assert torch.allclose(args["is_weights"][mask], (args["old_logps"] - sampler)[mask].exp().clamp(max=cap),
                              rtol=1e-5)
        # --drop-zero-std-groups: the two all-equal groups are out of the loss, rows and normalisers
        assert args["n_seqs"] == G and args["n_tokens"] == int(batch.completion_mask[mixed].sum())
        assert bool(mixed[mb].all())
    assert len(loss_calls) >= 1
    weights = torch.cat([c["is_weights"][c["mask"].bool()] for c in loss_calls])
    assert (weights == cap).any() and (weights < 1).any() and (weights > 1).any()


# --- clipo.py -----------------------------------------------------------------------------------------------------

CLIPO_GROUP = (ZOE, 42, ["\\boxed{42}", "\\boxed{40+2}", "\\boxed{042}", "\\boxed{41}"], [1, 1, 1, 0])


def test_clipo_shapes_the_reward_with_its_bonus_and_the_policy_follows_the_shaped_advantages(tmp_path):
    """Three different correct completions (anchors) and a wrong one. With lambda = 1 and the floor at -1 (defaults
    0.2 and -0.5, which leave every anchor's shaped reward above the group mean here), the seeded head's InfoNCE puts
    one anchor's bonus at the floor and the others' above it, which turns that anchor's advantage negative
    (unshaped: +0.5)."""
    coef, floor = 1.0, -1.0
    groups = [CLIPO_GROUP, ALL_WRONG]
    result, batch = run(tmp_path, "clipo.py", groups, "--head-warmup-steps", "0", "--bonus-coef", str(coef),
                        "--bonus-min", str(floor),
                        spy=["compute_advantages", "contrastive_bonus", "group_infonce", "grpo_loss"])
    (bonus_call,) = result.calls("contrastive_bonus")
    assert torch.equal(bonus_call["args"]["rewards"], batch.rewards)
    bonus = bonus_call["ret"][0]
    (infonce_call,) = result.calls("group_infonce")
    losses, positives = infonce_call["ret"], infonce_call["args"]["positives"]
    # anchors: the correct rollouts of a group with another correct and a wrong one; the bonus is theirs alone
    anchors = torch.tensor([q == ZOE and r == 1 for q, r in zip(batch.questions, batch.rewards.tolist())])
    assert torch.equal(positives >= 0, anchors)
    assert torch.allclose(bonus[anchors], (-coef * losses[anchors]).clamp(min=floor), atol=1e-6)
    assert (bonus[anchors] <= 0).all() and (bonus[~anchors] == 0).all()
    assert (bonus[anchors] == floor).any() and (bonus[anchors] > floor).any()  # the floor binds, and not everywhere
    # the advantages come from the shaped reward r + bonus
    plain_call, shaped_call = result.calls("compute_advantages")
    assert torch.equal(plain_call["args"]["rewards"], batch.rewards)
    assert torch.allclose(shaped_call["args"]["rewards"], batch.rewards + bonus, atol=1e-6)
    shaped = grpo_advantages(batch.rewards + bonus, 1e-4)
    assert torch.allclose(shaped_call["ret"][0], shaped, atol=1e-5)
    for mb, adv in loss_rows(result.calls("grpo_loss")):
        assert torch.equal(adv, shaped_call["ret"][0][mb])
    flipped = torch.sign(shaped) != torch.sign(grpo_advantages(batch.rewards, 1e-4))
    assert flipped.any(), "the batch no longer has an anchor whose shaped advantage changes sign"
    before, after = batch.seq_logps(model_from(EMBEDDED_MODEL)), batch.seq_logps(model_from(result.run_dir / "final"))
    assert_direction(before, after, shaped, "log-prob")


def test_clipo_head_warmup_step_trains_the_head_alone(tmp_path):
    """--head-warmup-steps 1: step 1 trains the contrastive head and leaves the policy as it was (no policy loss at
    all); with 0 (the test above) step 1 trains the policy."""
    result, _ = run(tmp_path, "clipo.py", [CLIPO_GROUP, ALL_WRONG], "--head-warmup-steps", "1",
                    spy=["contrastive_bonus", "grpo_loss"])
    assert len(result.calls("contrastive_bonus")) == 1 and result.calls("grpo_loss") == []
    initial, final = model_from(EMBEDDED_MODEL).state_dict(), model_from(result.run_dir / "final").state_dict()
    assert all(torch.equal(v, initial[k]) for k, v in final.items())


# --- conspo.py ----------------------------------------------------------------------------------------------------

def test_conspo_score_is_length_normalised():
    """s_i is the mean per-token log-prob: the same tokens' log-probs twice over (twice the length) score the same."""
    from conspo import sequence_scores

    once = torch.tensor([[-1.0, -2.0, -3.0, 0.0, 0.0, 0.0]])
    twice = torch.tensor([[-1.0, -2.0, -3.0, -1.0, -2.0, -3.0]])
    s_once = sequence_scores(once, torch.tensor([[1.0, 1, 1, 0, 0, 0]]))
    s_twice = sequence_scores(twice, torch.ones(1, 6))
    assert s_once.item() == pytest.approx(-2.0) and s_twice.item() == pytest.approx(-2.0)


def test_conspo_one_update_raises_positive_scores_and_lowers_negative_ones(tmp_path):
    groups = [MIXED, ALL_WRONG]
    result, batch = run(tmp_path, "conspo.py", groups, spy=["group_infonce", "conspo_loss"])
    n_tokens = batch.completion_mask.sum(1)
    before = batch.seq_logps(model_from(EMBEDDED_MODEL)) / n_tokens
    (infonce,) = result.calls("group_infonce")
    # the InfoNCE reads every row's length-normalised score under the rollout policy, and the verifier's rewards
    assert torch.allclose(infonce["args"]["scores"], before, atol=1e-5)
    assert torch.equal(infonce["args"]["rewards"].cpu(), batch.rewards)
    coefs = infonce["ret"][1]
    mixed = torch.tensor([q == ZOE for q in batch.questions])
    assert (coefs[~mixed] == 0).all()
    assert ((coefs[mixed] > 0) == (batch.rewards[mixed] > 0)).all() and (coefs[mixed] != 0).all()
    assert infonce["args"]["margin"] == 0.0  # the curriculum's step 1 is progress 0: no margin yet
    for call in result.calls("conspo_loss"):
        assert torch.equal(call["args"]["coefs"], coefs[call["caller"]["micro"]])
        assert call["args"]["n_groups"] == 1  # J is averaged over the kept (mixed) groups: one of the two
    after = batch.seq_logps(model_from(result.run_dir / "final")) / n_tokens
    assert_direction(before, after, coefs, "score")


# --- cepo.py ------------------------------------------------------------------------------------------------------

def test_cepo_teachers_read_each_rollouts_own_answers_and_the_update_follows_sign_a(tmp_path):
    """Three groups, three wrong answers: ZOE's mixed group (41), ANNA's all wrong (31, not trained: A = 0) and SAM's
    all right (none). The teachers must read each rollout's own gold and its own group's wrong answer."""
    groups = [MIXED, ALL_WRONG, ALL_RIGHT]
    result, batch = run(tmp_path, "cepo.py", groups,
                        spy=["wrong_answers", "evidence_delta", "teacher_logps", "cepo_advantages", "cepo_loss",
                             "grpo_loss"])
    own_wrong = {ZOE: "41", ANNA: "31", SAM: None}
    (wrong_call,) = result.calls("wrong_answers")
    assert wrong_call["ret"][0] == [own_wrong[q] for q in batch.questions[::G]]
    (delta_call,) = result.calls("evidence_delta")
    args = delta_call["args"]
    assert list(args["golds"]) == batch.golds
    assert list(args["wrong"]) == [own_wrong[q] for q in batch.questions]
    taught = torch.tensor(args["rows"])
    assert torch.equal(taught, torch.tensor([q == ZOE for q in batch.questions]))
    plus_call, minus_call = result.calls("teacher_logps")
    assert plus_call["args"]["answers"] == [g if t else None for g, t in zip(batch.golds, taught.tolist())]
    assert minus_call["args"]["answers"] == [own_wrong[q] if t else None for q, t in zip(batch.questions,
                                                                                         taught.tolist())]
    # Delta_t, recomputed here: the initial weights read prompt + " " + answer + y
    tok, model = load_tokenizer(str(EMBEDDED_MODEL)), model_from(EMBEDDED_MODEL).eval()

    def teacher(i, answer):
        prefix = batch.prompts[i] + tok(" " + answer, add_special_tokens=False)["input_ids"]
        ids = torch.tensor([prefix + batch.completions[i]])
        with torch.no_grad():
            logps = torch.log_softmax(model(input_ids=ids).logits[0, len(prefix) - 1 : -1].float(), -1)
        return logps.gather(1, ids[0, len(prefix):, None])[:, 0]

    delta = delta_call["ret"]
    for i in range(len(batch.texts)):
        mask = batch.completion_mask[i].bool()
        expected = teacher(i, batch.golds[i]) - teacher(i, own_wrong[batch.questions[i]]) if taught[i] else 0.0
        assert torch.allclose(delta[i][mask], torch.as_tensor(expected), atol=1e-4), i
        assert (delta[i][~mask] == 0).all()
    # the per-token advantages: A_i from the verifier's rewards, weighted by the teachers' evidence
    (adv_call,) = result.calls("cepo_advantages")
    advantages = grpo_advantages(batch.rewards, 1e-4)  # --adv-eps: cepo.py's default is grpo.py's
    assert torch.allclose(adv_call["args"]["advantages"].cpu(), advantages, atol=1e-5)
    assert torch.equal(adv_call["args"]["delta"], delta) and adv_call["args"]["lam"] == 0.5
    a, mask = advantages.unsqueeze(1), batch.completion_mask.bool()
    ahat = adv_call["ret"][0]
    expected = a * (0.5 + 0.5 * torch.exp(torch.sign(a) * delta).clamp(0.8, 1.2))
    assert torch.allclose(ahat[mask], expected[mask], atol=1e-5)
    for mb, adv in loss_rows(result.calls("cepo_loss") or result.calls("grpo_loss")):
        assert torch.equal(adv, ahat[mb][:, : adv.shape[1]])
    before, after = batch.seq_logps(model_from(EMBEDDED_MODEL)), batch.seq_logps(model_from(result.run_dir / "final"))
    assert_direction(before, after, advantages, "log-prob")


# --- r2po.py ------------------------------------------------------------------------------------------------------

def test_r2po_head_round_trains_the_explorer_toward_rare_outcomes_then_a_policy_step_is_grpo(tmp_path):
    """Step 1 is a head round, step 2 a policy step (--head-steps 1 --policy-steps 1), checkpoints after each. The
    mixed group has three right and one wrong: GRPO favours the right ones, the head's inverse frequency the rare
    wrong one, so a stage fed the other stage's advantages moves the wrong way. The head's gradient is clipped at
    --max-grad-norm too, so --head-learning-rate 1 gives it the same plain gradient step as the policy (OPTIM)."""
    from r2po import RolloutHead

    groups = [(ZOE, 42, ["\\boxed{42}", "\\boxed{42}", "\\boxed{41}", "\\boxed{42}"], [1, 1, 0, 1]), ALL_WRONG]
    result, batch = run(tmp_path, "r2po.py", groups, "--head-steps", "1", "--policy-steps", "1", "--total-steps",
                        "2", "--save-every", "1", "--head-learning-rate", "1", "--eps-low", str(EPS_LOW),
                        "--eps-high", str(EPS_HIGH), spy=["compute_advantages", "head_advantages", "grpo_loss"])
    # both stages' losses get --eps-low and --eps-high each as itself
    assert all(c["args"]["eps_low"] == EPS_LOW and c["args"]["eps_high"] == EPS_HIGH
               for c in result.calls("grpo_loss"))
    state = [load_checkpoint(str(result.run_dir / "checkpoints" / f"step_{k:08d}"))[0] for k in (1, 2)]
    initial = model_from(EMBEDDED_MODEL)
    config = initial.config

    def head(algo_state):
        h = RolloutHead(config.hidden_size, config.vocab_size, 0.02)
        h.load_state_dict(algo_state["rollout_head"])
        return h

    # stage 1: inverse frequency, z-scored in the group: the rare wrong answer up, the common right one down
    (head_call,) = result.calls("head_advantages", step=1)
    assert torch.equal(head_call["args"]["rewards"], batch.rewards)
    # a = 1/3, 1/3, 1, 1/3 in the mixed group: mean 1/2, unbiased std 1/3; the all-wrong group is skipped (0)
    mixed, wrong = torch.tensor([q == ZOE for q in batch.questions]), batch.rewards == 0
    head_adv = torch.where(mixed, torch.where(wrong, 1.5, -0.5), 0.0)
    assert torch.allclose(head_call["ret"][0], head_adv, atol=1e-4)
    for mb, adv in loss_rows(result.calls("grpo_loss", step=1)):
        assert torch.equal(adv, head_call["ret"][0][mb])
    # ... the policy does not change, the explorer (policy + head) moves along the head's advantages
    initial_state = initial.state_dict()
    assert all(torch.equal(v, initial_state[k]) for k, v in state[0]["model"].items())
    before = batch.seq_logps(initial)  # W2 = 0: the explorer starts as the policy
    after = batch.seq_logps(initial, head(state[0]["algo"]))
    assert_direction(before, after, head_adv, "explorer log-prob")

    # stage 2: GRPO's advantages move the policy; the head does not change
    batch = Batch(result, groups, step=2)  # the same groups, in the order of the next epoch
    (adv_call,) = result.calls("compute_advantages", step=2)
    assert torch.equal(adv_call["args"]["rewards"], batch.rewards)
    advantages = grpo_advantages(batch.rewards, 1e-4)
    assert torch.allclose(adv_call["ret"][0], advantages, atol=1e-6)
    for mb, adv in loss_rows(result.calls("grpo_loss", step=2)):
        assert torch.equal(adv, adv_call["ret"][0][mb])
    assert all(torch.equal(v, state[0]["algo"]["rollout_head"][k]) for k, v in state[1]["algo"]["rollout_head"].items())
    before, after = batch.seq_logps(initial), batch.seq_logps(model_from(state[1]["model"]))
    assert_direction(before, after, advantages, "policy log-prob")

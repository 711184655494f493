"""torchrun: N ranks train as one process would (common/dist.py, docs/distributed.md), on CPU with gloo and FSDP2.

- One update under 2 ranks equals the one-process update on the same batch, for every script: the scripts run
  through tests/replay.py (hand-built rollouts, so both runs see the same batch; everything else real), once in one
  process and once under `torchrun --nproc-per-node 2`. The batch is laid out so that rank 1 trains no row of its own
  (IDLE: it runs padding micro-batches only, and padding teacher passes in cepo.py) or fewer micro-batches than rank 0
  (FEWER). Weights must agree to 1e-5 after an update of ~1e-4 per weight (AdamW's first step), the replicated heads
  (CLIPO's, R2PO's) in the last checkpoint to 1e-6, and the logged loss and gradient norm (whose scale AdamW would
  hide) to 1e-4. Every case checkpoints each step, which must not change the run.
- A real 2-rank run (HF generate on each rank, sharded evaluation, DCP checkpoints): one rank is killed mid-run,
  torchrun takes the job down and names the signal, the last checkpoint is intact, and resuming it gives the same
  weights and metrics as the run that was never interrupted. The same checkpoint resumes on 1 rank (resharded), and
  `python` (one process) refuses it with a message that says how to resume it. A 2-rank run with a vLLM engine per
  rank samples from the weights the trainer holds.

Checked against planted bugs, each made a test here fail: the loss normalisers left as each rank's own counts (the
run then divides by a rank's 0 tokens), the padding micro-batches' loss not zeroed (weights off by 2e-4), CLIPO's head
gradients not averaged over ranks (the heads differ), ConSPO's K left per rank, the weight push skipped on vLLM. And
it found a real one: saving a checkpoint before the policy's first step (R2PO's head round) made torch's
`get_optimizer_state_dict` count a step of AdamW, so the next update was 25% smaller (common/checkpoint.py).
"""
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from replay import replay, write_dataset
from safetensors.torch import load_file

from common import dist
from common.checkpoint import load_checkpoint
from common.data import EMBEDDED_INSTRUCTION

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
G = 4
ZOE = ("Zoe had 20 shells and found 22 more. How many shells are there?", 42,
       ["\\boxed{42}", "\\boxed{41}", "\\boxed{42}", "\\boxed{41}"])  # 2 right: CLIPO's positives are forced
TOM = ("Tom had 7 pens and found 5 more. How many pens are there?", 12,
       ["\\boxed{12}", "\\boxed{12}", "\\boxed{13}", "\\boxed{11}"])
LIA = ("Lia had 3 cups and found 4 more. How many cups are there?", 7,
       ["\\boxed{7}", "\\boxed{7}", "\\boxed{8}", "\\boxed{9}"])
ANNA = ("Anna had 10 coins and found 20 more. How many coins are there?", 30, ["\\boxed{31}"] * G)  # all wrong
SAM = ("Sam had 45 apples and found 12 more. How many apples are there?", 57, ["\\boxed{57}"] * G)  # all right
# The dataset, in file order, and the step's prompts split rank 0 | rank 1 (the seed is chosen for that):
IDLE = [ZOE, ANNA, SAM, TOM]  # rank 0: ZOE, TOM | rank 1: ANNA, SAM. Rank 1 trains no row: padding only
FEWER = [ZOE, ANNA, LIA, TOM]  # rank 0: ZOE, TOM | rank 1: ANNA, LIA. With micro-batches of 2, rank 1 has 2, rank 0 4


def seed_putting_rows_0_and_3_on_rank_0(groups) -> int:
    """A --seed whose first step takes the dataset's rows 0 and 3 first (rank 0's share) and rows 1 and 2 last."""
    for seed in range(1, 1000):
        if set(np.random.default_rng([seed, 0]).permutation(len(groups))[:2].tolist()) == {0, 3}:
            return seed
    raise AssertionError("no such seed")


CASES = {  # id: (script, dataset, flags that make its one update exercise what it must)
    # the loss's normalisers count only rank 0's rows: local counts would double rank 0's share of the gradient
    "grpo-drop-zero-std": ("grpo.py", IDLE, ["--total-steps", "1", "--drop-zero-std-groups"]),
    # rank 1 runs 2 padding micro-batches of a row with A != 0: an unzeroed padding loss would count it 3 times
    "grpo-padding": ("grpo.py", FEWER, ["--total-steps", "1", "--micro-batch-size", "2"]),
    # a sharded reference model, gradient checkpointing under FSDP2, old log-probs and two optimizer steps (one
    # mini-batch: with several, each rank splits its own rows, so the split differs from one process's)
    "grpo-knobs": ("grpo.py", IDLE, ["--total-steps", "1", "--beta", "0.04", "--gradient-checkpointing",
                                     "--update-epochs", "2", "--eps-high", "0.1"]),
    "clipo": ("clipo.py", IDLE, ["--total-steps", "1"]),  # the contrastive head's step, the bonus, the update
    "conspo": ("conspo.py", IDLE, ["--total-steps", "1"]),
    "cepo": ("cepo.py", IDLE, ["--total-steps", "1"]),  # lambda > 0 at step 1: the teachers' passes (rank 1: padding)
    "r2po": ("r2po.py", IDLE, ["--total-steps", "2", "--head-steps", "1", "--policy-steps", "1"]),  # head, then policy
}


def metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
@pytest.mark.parametrize("case", list(CASES))
def test_one_update_on_two_ranks_equals_the_one_process_update(tmp_path, case):
    script, groups, extra = CASES[case]
    data = write_dataset(tmp_path / "train.jsonl", [(q, gold) for q, gold, _ in groups])
    flags = ["--dataset", str(data), "--instruction", EMBEDDED_INSTRUCTION, "--prompts-per-step", str(len(groups)),
             "--group-size", str(G), "--max-new-tokens", "8", "--eval-every", "0",
             "--save-every", "1", "--seed", str(seed_putting_rows_0_and_3_on_rank_0(groups)), *extra]
    rollouts = {q: texts for q, _, texts in groups}
    (tmp_path / "one").mkdir(), (tmp_path / "two").mkdir()
    one = replay(script, rollouts, tmp_path / "one", flags=flags, spy=["build_batch"])
    two = replay(script, rollouts, tmp_path / "two", flags=flags, spy=["build_batch"], ranks=2)
    # rank 0 laid out its share only: ZOE's and TOM's rows
    call = two.calls("build_batch", step=1)[0]
    assert len(call["args"]["prompts"]) == 2 * G
    a = load_file(one.run_dir / "final" / "model.safetensors")
    b = load_file(two.run_dir / "final" / "model.safetensors")
    initial = load_file(os.path.join(ROOT, "tiny", "model", "model.safetensors"))
    moved = max(float((a[k] - initial[k]).abs().max()) for k in a)
    assert moved > 5e-5, f"the update moved no weight by more than {moved}: the comparison would prove nothing"
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-5, rtol=0), (k, float((a[k] - b[k]).abs().max()))
    # the replicated heads (CLIPO's contrastive head, R2PO's rollout head) trained alike: the last checkpoints'
    ckpt_one = load_checkpoint(one.run_dir)[0]
    ckpt_two = load_checkpoint(two.run_dir)[0]
    for name, state in ckpt_one["algo"].items():
        if name.endswith("_head"):
            for k, v in state.items():
                assert torch.allclose(v, ckpt_two["plain"][f"algo/{name}"][k], atol=1e-6, rtol=0), (name, k)
    for row_one, row_two in zip(metrics(one.run_dir), metrics(two.run_dir), strict=True):
        for key in ("loss", "grad_norm", "reward", "kl", "clip_ratio/region_mean"):
            if key in row_one:
                assert row_two[key] == pytest.approx(row_one[key], rel=1e-4, abs=1e-7), (row_one["step"], key)


def test_in_one_process_the_helpers_change_nothing():
    assert not dist.ON and dist.WORLD == 1
    rows = torch.arange(10)
    assert [(m.tolist(), pad) for m, pad in dist.micro_batches(rows, 4, pad=rows[:1])] == \
        [([0, 1, 2, 3], False), ([4, 5, 6, 7], False), ([8, 9], False)]
    assert dist.micro_batches(rows[:0], 4, pad=rows[:1]) == []
    assert dist.mean(3, 7) == (3, 7) and dist.total(5) == 5 and dist.share([1, 2, 3]) == [1, 2, 3]
    assert dist.rank_seed(123) == 123 and dist.reduce_metrics({"a": 1.0}) == {"a": 1.0}

    @dist.fsdp_forward
    def f(model, x):
        return model(x)

    layer = torch.nn.Linear(2, 2)
    x = torch.ones(1, 2)
    assert torch.equal(f(layer, x), layer(x)) and dist.shard(layer) is layer


def test_metrics_of_the_ranks_reduce_by_kind():
    from common.dist import _reduction

    assert _reduction("time/train") == "max" and _reduction("sampling/sampling_logp_difference/max") == "max"
    assert _reduction("reward/timeouts") == "sum" and _reduction("loss") == "mean" and _reduction("reward") == "mean"


# --- a real 2-rank run: killed, resumed ------------------------------------------------------------------------------

RUN = ["--total-steps", "8", "--prompts-per-step", "8", "--eval-every", "4", "--eval-limit", "10", "--save-every", "2",
       "--no-vllm"]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled", "CUDA_VISIBLE_DEVICES": "",
       "TOKENIZERS_PARALLELISM": "false"}


def torchrun(ranks, *args, **kw):
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(ranks),
            "grpo.py", *args]


def only_run(out):
    (run_dir,) = list(out.iterdir())
    return run_dir


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    out = tmp_path_factory.mktemp("uninterrupted")
    proc = subprocess.run(torchrun(2, *RUN, "--output-dir", str(out)), cwd=ROOT, env=ENV, capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return only_run(out), proc


@pytest.mark.slow
def test_a_two_rank_run_logs_once_and_evaluates_every_problem(uninterrupted):
    run_dir, proc = uninterrupted
    rows = metrics(run_dir)
    assert [r["step"] for r in rows] == list(range(0, 9))  # one line per step, from rank 0 only
    assert all(0 <= r["eval/accuracy"] <= 1 for r in rows if "eval/accuracy" in r)
    # 10 problems over 2 ranks: every accuracy is a multiple of 1/10 (each problem counted once)
    assert all(abs(r["eval/accuracy"] * 10 - round(r["eval/accuracy"] * 10)) < 1e-9 for r in rows
               if "eval/accuracy" in r)
    assert proc.stdout.count("done: ") == 1  # rank 1 prints nothing
    config = json.loads((run_dir / "final" / "config.json").read_text())
    assert config["architectures"] == ["Qwen2ForCausalLM"]  # not FSDP2's subclass
    ckpt = sorted((run_dir / "checkpoints").iterdir())[-1]
    assert {p.name for p in ckpt.iterdir()} == {"state.pt", "rng_0.pt", "rng_1.pt", "sharded"}


@pytest.mark.slow
def test_a_killed_rank_takes_the_job_down_and_the_run_resumes_exactly(uninterrupted, tmp_path):
    out = tmp_path / "runs"
    proc = subprocess.Popen(torchrun(2, *RUN, "--output-dir", str(out)), cwd=ROOT, env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 600
    while not list(out.glob("*/checkpoints/step_00000002/state.pt")):
        assert proc.poll() is None and time.time() < deadline, "the run ended before its first checkpoint"
        time.sleep(0.1)
    ranks = subprocess.run(["pgrep", "-f", "-P", str(proc.pid), "grpo.py"], capture_output=True, text=True)
    victim = int(ranks.stdout.split()[-1])  # one rank's process (torchrun's child)
    os.kill(victim, signal.SIGKILL)
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode != 0
    assert "SIGKILL" in stderr or "Signal 9" in stderr, stderr[-3000:]  # torchrun names the failure
    run_dir = only_run(out)
    done = [json.loads(l)["step"] for l in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert max(done) < 8, "the run was not interrupted"
    resumed = subprocess.run(torchrun(2, "--resume", str(run_dir)), cwd=ROOT, env=ENV, capture_output=True,
                             text=True, timeout=900)
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    reference, _ = uninterrupted
    a = load_file(reference / "final" / "model.safetensors")
    b = load_file(run_dir / "final" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a), "the resumed run's weights differ from the uninterrupted run's"
    drop = lambda rows: [{k: v for k, v in r.items() if not k.startswith("time/")} for r in rows]  # noqa: E731
    assert drop(metrics(run_dir)) == drop(metrics(reference))


@pytest.mark.slow
def test_a_two_rank_checkpoint_resumes_on_one_rank_and_not_in_one_process(uninterrupted, tmp_path):
    reference, _ = uninterrupted
    copy = tmp_path / reference.name
    shutil.copytree(reference, copy)
    shutil.rmtree(copy / "final")
    python = subprocess.run([sys.executable, "grpo.py", "--resume", str(copy)], cwd=ROOT, env=ENV,
                            capture_output=True, text=True, timeout=300)
    assert python.returncode != 0 and "written under torchrun (2 ranks)" in python.stderr, python.stderr[-2000:]
    # on 1 rank, resharded: with nothing left to train, the saved model is the checkpoint's (step 8, the last)
    one = subprocess.run(torchrun(1, "--resume", str(copy)), cwd=ROOT, env=ENV, capture_output=True, text=True,
                         timeout=600)
    assert one.returncode == 0, one.stderr[-4000:]
    assert "resharded" in one.stdout
    a = load_file(reference / "final" / "model.safetensors")
    b = load_file(copy / "final" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    # and the optimizer's state came along: one more step on 1 rank is AdamW's 9th, not a fresh optimizer's 1st
    more = subprocess.run(torchrun(1, "--resume", str(copy), "--total-steps", "9", "--save-every", "1"), cwd=ROOT,
                          env=ENV, capture_output=True, text=True, timeout=600)
    assert more.returncode == 0, more.stderr[-4000:]
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    dcp_to_torch_save(copy / "checkpoints" / "step_00000009" / "sharded", tmp_path / "flat.pt")
    optimizer = torch.load(tmp_path / "flat.pt", weights_only=False)["optimizer"]
    assert {float(s["step"]) for s in optimizer["state"].values()} == {9.0}


@pytest.mark.slow
@pytest.mark.parametrize("tp", [1, 2])
def test_two_ranks_sample_with_vllm_engines_inside_the_job(tmp_path, tp):
    """vLLM inside the training processes (`external_launcher`): one engine per rank (tp 1), or one engine over both
    ranks (tp 2, the ranks pool their prompts). Each engine gets the sharded policy's weights gathered one tensor at a
    time, so its log-probs of what it sampled match the trainer's after updates."""
    out = tmp_path / "runs"
    proc = subprocess.run(torchrun(2, "--vllm", "--vllm-tensor-parallel-size", str(tp), "--total-steps", "3",
                                   "--prompts-per-step", "8", "--eval-every", "3", "--eval-limit", "10",
                                   "--output-dir", str(out)), cwd=ROOT, env=ENV, capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    rows = metrics(only_run(out))
    assert [r["step"] for r in rows] == [0, 1, 2, 3] and "eval/accuracy" in rows[-1]
    assert all(r["time/sync_weights"] > 0 for r in rows[2:])  # the weights after each update were pushed
    diffs = [r["sampling/sampling_logp_difference/mean"] for r in rows[1:]]
    assert len(diffs) == 3 and max(diffs) < 1e-4, diffs  # fp32 on both sides: ~1e-6

"""Rehearsal of the real preset on CPU (issue 18, item 3): each script run as `python <algo>.py --model <Qwen2.5
stand-in> --vllm` for 2 steps, so that REAL_MODEL's settings apply (gradient checkpointing on, the papers' learning
rate) with the tiniest sizes given on the command line (2 prompts x 2 completions a step, micro-batches of 2 in a
batch of 4, at most 8 new tokens), on local GSM8K rows in the hub schema (tests/data/gsm8k_test.jsonl). Checked per
script: the run trains (finite loss, weights move), vLLM's log-probs match the trainer's, the engine samples and
evaluates the trainer's current weights, and every completion stops at <|im_end|>; for grpo.py also the resume and
the final save's reload in transformers and vLLM.

The model: tests/qwen_standin.py's Qwen2.5-1.5B stand-in (its real tokenizer, chat template, 151,936-row tied
vocabulary, base generation_config.json whose only eos is <|endoftext|>), with one edit (a stand-in of a trained
policy, said so): random weights never write `\\boxed{}`, so every reward is 0 and no advantage is nonzero (ConSPO,
which has no KL term, would not train at all), and they sample <|im_end|> once in ~150k tokens, so an early stop
would never be seen. `programmed` rewrites six rows of the embedding and six entries of the final norm so that after
the prompt's last token (the "\\n" of "<|im_start|>assistant\\n") the model writes `\\boxed3<|im_end|>` or
`\\boxed4<|im_end|>`, each with probability ~1/2: gold-3 rows then give groups with mixed rewards (a real gradient
in every script), and every completion has 4 tokens and ends with <|im_end|> (151645), which only the chat-template
rule of common/stop_tokens.py makes a stop for this base model. Everything else (layers, the other 151,930 rows) is
the stand-in's random weights.

One run per script (a module-scoped fixture) serves all its checks. Each run goes through a small wrapper that
records, without changing anything, every rollout call of both engines (stop set, completions, finished flags) and
whether the vLLM engine held the trainer's current weights when it generated.
"""
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from common.vllm_engine import vllm_available
from qwen_standin import ENDOFTEXT, IM_END, qwen_base, qwen_root  # noqa: F401
from test_grpo_run import ROOT, read_metrics

pytestmark = pytest.mark.slow

STEPS, MAX_NEW = 2, 8
BOXED = [59, 79075]  # "\\boxed" in Qwen2.5's BPE: "\\" + "boxed"
THREE, FOUR = 18, 19  # "3", "4"
FLAGS = ["--vllm", "--total-steps", str(STEPS), "--max-new-tokens", str(MAX_NEW), "--prompts-per-step", "2",
         "--group-size", "2", "--micro-batch-size", "2", "--eval-limit", "2", "--eval-every", str(STEPS)]
# Seeds whose 2 steps hold a group with mixed rewards (asserted below, so a change that loses them fails, not passes).
# r2po.py: a head round at step 1 and a policy round at step 2 (its defaults, 2 and 4, are all head rounds in 2 steps);
# the head's advantage is the z-scored reward, as the official inverse frequency is 0 in every group of 2 (1/1 counts).
SCRIPTS = {
    "grpo.py": ["--seed", "2", "--save-every", "1"],
    "clipo.py": ["--seed", "2"],
    "conspo.py": ["--seed", "2"],
    "cepo.py": ["--seed", "2"],
    "r2po.py": ["--seed", "2", "--head-steps", "1", "--policy-steps", "1", "--head-advantage", "reward"],
}
# Runs the script as `python <script> <flags>` does, after wrapping the engines' rollout (and vLLM's weight push) in
# recorders: one JSON line per rollout call in $REHEARSAL_LOG. `current`: the weights last pushed into vLLM are the
# trainer's weights at this call (a digest of every tensor of the state dict).
WRAPPER = r"""
import hashlib, json, os, runpy, sys
from common.hf_engine import HFEngine
from common.vllm_engine import VLLMEngine

def digest(model):
    h = hashlib.blake2b(digest_size=16)
    for t in model.state_dict().values():
        h.update(t.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()

push = VLLMEngine.push_weights
def push_weights(self, model):
    self.pushed = digest(model)
    return push(self, model)
VLLMEngine.push_weights = push_weights

def recorded(cls):
    rollout = cls.rollout
    def wrapped(self, model, version, prompt_ids, **sampling):
        batch = rollout(self, model, version, prompt_ids, **sampling)
        row = dict(engine=cls.__name__, stop=list(self.stop_token_ids), completions=batch.completion_ids,
                   finished=batch.finished, temperature=sampling["temperature"], max_tokens=sampling["max_tokens"],
                   current=getattr(self, "pushed", None) == digest(model) if cls is VLLMEngine else None)
        with open(os.environ["REHEARSAL_LOG"], "a") as f:
            f.write(json.dumps(row) + "\n")
        return batch
    cls.rollout = wrapped

recorded(VLLMEngine)
recorded(HFEngine)
script = sys.argv[1]
sys.argv = [script] + sys.argv[2:]
runpy.run_path(script, run_name="__main__")
"""


def env(**extra):
    return {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled", "TOKENIZERS_PARALLELISM": "false", **extra}


def programmed(src: Path, dst: Path, tokenizer) -> Path:
    """A copy of the stand-in whose next token depends on the current one along \\n -> \\ -> boxed -> 3|4 ->
    <|im_end|> (see the module docstring). With tied weights the logit of v after u is, up to the random layers'
    small share, sqrt(d) |e_u| e_u^T diag(w) e_v / |e_u|^2 with e the embedding rows and w the final norm's weight:
    a symmetric bilinear form. Writing the wanted logits as a symmetric matrix M = Q diag(lam) Q^T, rows
    e_u = R Q[u] in six dimensions and w = lam / (sqrt(d) R) on them give the logits M[u, v]."""
    nodes = [tokenizer.convert_tokens_to_ids("Ċ"), *BOXED, THREE, FOUR, IM_END]  # Ċ: "\n" in byte-level BPE
    M = torch.zeros(6, 6, dtype=torch.float64)
    for a, b, logit in [(0, 1, 20), (1, 2, 40), (2, 3, 60), (2, 4, 60), (3, 5, 80), (4, 5, 80)]:
        M[a, b] = M[b, a] = logit  # the next node wins over the previous one by 20 and over the vocabulary by >= 8
    lam, Q = torch.linalg.eigh(M)
    shutil.copytree(src, dst)
    weights = load_file(src / "model.safetensors")
    E, norm = weights["model.embed_tokens.weight"].float(), weights["model.norm.weight"].float()
    R = 20.0  # the rows' norm: dominates what the random layers add to the residual stream
    for k, token in enumerate(nodes):
        E[token] = 0
        E[token, :6] = R * Q[k].float()
    norm[:6] = (lam / (E.shape[1] ** 0.5 * R)).float()
    weights["model.embed_tokens.weight"], weights["model.norm.weight"] = E.to(torch.bfloat16), norm.to(torch.bfloat16)
    save_file(weights, dst / "model.safetensors", metadata={"format": "pt"})
    return dst


@pytest.fixture(scope="module")
def standin(qwen_base, tmp_path_factory):
    from common.data import load_tokenizer

    return programmed(qwen_base, tmp_path_factory.mktemp("rehearsal") / "standin", load_tokenizer(str(qwen_base)))


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """GSM8K test rows (hub schema: question, answer "... #### 3") whose answer is 3: 4 to train on, 2 to eval."""
    rows = [l for l in (ROOT / "tests" / "data" / "gsm8k_test.jsonl").read_text().splitlines()
            if json.loads(l)["answer"].endswith("#### 3")]
    rows.sort(key=len)  # the shortest: the prompts' full-vocabulary log-probs are most of a step's time
    out = tmp_path_factory.mktemp("gsm8k")
    (out / "train.jsonl").write_text("\n".join(rows[:4]) + "\n")
    (out / "test.jsonl").write_text("\n".join(rows[4:6]) + "\n")
    return out / "train.jsonl", out / "test.jsonl"


class Rehearsal:
    def __init__(self, script, run_dir, proc, calls):
        self.script, self.run_dir, self.proc, self.calls = script, run_dir, proc, calls
        self.rows = read_metrics(run_dir)


def run_script(script, *flags, log=None, timeout=600):
    cmd = [sys.executable, "-c", WRAPPER, str(ROOT / script)] if log else [sys.executable, str(ROOT / script)]
    return subprocess.run([*cmd, *flags], cwd=ROOT, env=env(REHEARSAL_LOG=str(log or "")), capture_output=True,
                          text=True, timeout=timeout)


@pytest.fixture(scope="module", params=list(SCRIPTS))
def rehearsal(request, standin, data, tmp_path_factory):
    if not vllm_available():
        pytest.skip("vllm is not importable: the real preset's rollouts are vLLM's")
    script = request.param
    out = tmp_path_factory.mktemp(script[: -len(".py")])
    log = out / "rollouts.jsonl"
    p = run_script(script, "--model", str(standin), "--dataset", str(data[0]), "--eval-dataset", str(data[1]),
                   *FLAGS, *SCRIPTS[script], "--output-dir", str(out / "runs"), log=log)
    assert p.returncode == 0, p.stderr[-3000:]
    (run_dir,) = (out / "runs").iterdir()
    return Rehearsal(script, run_dir, p, [json.loads(l) for l in log.read_text().splitlines()])


def test_real_preset_trains(rehearsal, standin):
    r = rehearsal
    # the real preset applied (not the embedded one), with the sizes given on the command line
    assert "preset: real model" in r.proc.stdout and "gradient_checkpointing=True" in r.proc.stdout
    args = json.loads((r.run_dir / "final" / "minirlvr.json").read_text())["args"]
    assert args["gradient_checkpointing"] and args["micro_batch_size"] < args["prompts_per_step"] * args["group_size"]
    assert [row["step"] for row in r.rows] == list(range(STEPS + 1))
    assert all(math.isfinite(v) for row in r.rows for v in row.values())
    assert all(math.isfinite(row["loss"]) for row in r.rows[1:])
    # a group with mixed rewards in a step whose update trains the policy: the gradient comes from the reward
    trained = [row["step"] for row in r.rows[1:] if row["frac_reward_zero_std"] < 1 and row.get("r2po/stage", 1) == 1]
    assert trained, [(row["reward"], row["frac_reward_zero_std"]) for row in r.rows[1:]]
    if r.script == "r2po.py":  # its head round (step 1) trained the head at the full vocabulary
        assert r.rows[1]["r2po/stage"] == 0 and r.rows[1]["grad_norm"] > 0, r.rows[1]
    initial, final = load_file(standin / "model.safetensors"), load_file(r.run_dir / "final" / "model.safetensors")
    assert initial.keys() <= final.keys()
    moved = [k for k in initial if not torch.equal(initial[k].float(), final[k].float())]
    assert "model.embed_tokens.weight" in moved and any(".layers." in k for k in moved), moved


def test_vllm_and_trainer_logprobs_agree(rehearsal):
    """The sampled tokens' log-probs under vLLM and under the trainer (both fp32 on CPU, same weights, temperature
    1) differ by float rounding only: measured 4.4e-6-4.8e-6 on the mean, 1.8e-5 at most, over the five scripts.
    The bounds leave 10x of that; the trainer's log-probs taken at temperature 1.05 instead of 1 give 1.2e-4 on
    the mean (the programmed tokens are near-certain: a wrong temperature shows in the first token's tail mass over
    the other 151,930 tokens)."""
    if rehearsal.script == "r2po.py":  # its training rollouts are HF generate's (the explorer): no engine log-probs
        assert all("sampling/sampling_logp_difference/mean" not in row for row in rehearsal.rows)
        return
    for row in rehearsal.rows[1:]:
        assert row["sampling/sampling_logp_difference/mean"] < 5e-5, row
        assert row["sampling/sampling_logp_difference/max"] < 2e-4, row


def test_engine_holds_the_current_weights(rehearsal):
    """Every vLLM generate (training rollouts and greedy evals) ran on the trainer's weights of that moment: in
    particular the evaluation after a step's update evaluates the updated policy, which final/ saves."""
    vllm_calls = [c for c in rehearsal.calls if c["engine"] == "VLLMEngine"]
    evals = [c for c in vllm_calls if c["temperature"] == 0]
    assert len(evals) == 2  # steps 0 and STEPS
    assert rehearsal.rows[STEPS]["grad_norm"] > 0  # the last step changed the policy: a stale engine would show
    assert [c["current"] for c in vllm_calls] == [True] * len(vllm_calls)


def test_completions_stop_at_im_end(rehearsal):
    """The base stand-in's EOS is <|endoftext|>; its chat-template prompts end turns with <|im_end|>, which both
    engines must stop at, in training and in evaluation."""
    calls = rehearsal.calls
    assert {c["engine"] for c in calls} == ({"HFEngine", "VLLMEngine"} if rehearsal.script == "r2po.py"
                                            else {"VLLMEngine"})
    for c in calls:
        assert IM_END in c["stop"] and ENDOFTEXT in c["stop"], c["stop"]
        for ids, finished in zip(c["completions"], c["finished"]):
            assert IM_END not in ids[:-1], ids  # nothing generated past the end of the turn
            assert finished and ids[-1] == IM_END and len(ids) < c["max_tokens"], ids
            if c["temperature"] > 0:  # the programmed policy's two answers
                assert ids in ([*BOXED, THREE, IM_END], [*BOXED, FOUR, IM_END]), ids
    for row in rehearsal.rows[1:]:  # the same seen in the logs
        assert row["completions/clipped_ratio"] == 0 and row["completions/mean_length"] == 4, row


def test_resume(rehearsal, tmp_path):
    """grpo.py: a run resumed from its step-1 checkpoint continues at step 2 and ends where the uninterrupted run
    ended, every logged value and every final weight bit for bit."""
    if rehearsal.script != "grpo.py":
        pytest.skip("grpo.py's run stands for the resume of every script here (tests/test_resume.py: all five)")
    run_a = rehearsal.run_dir
    assert sorted(c.name for c in (run_a / "checkpoints").iterdir()) == ["step_00000001", "step_00000002"]
    run_b = tmp_path / run_a.name
    shutil.copytree(run_a / "checkpoints" / "step_00000001", run_b / "checkpoints" / "step_00000001")
    shutil.copy(run_a / "metrics.jsonl", run_b / "metrics.jsonl")  # with step 2's row: the resume must drop it
    p = run_script("grpo.py", "--resume", str(run_b))
    assert p.returncode == 0, p.stderr[-3000:]
    assert "at step 1 from" in p.stdout and "preset: real" in p.stdout

    def without_times(rows):
        return [{k: v for k, v in row.items() if not k.startswith("time/")} for row in rows]

    assert without_times(read_metrics(run_b)) == without_times(rehearsal.rows)
    wa, wb = load_file(run_a / "final" / "model.safetensors"), load_file(run_b / "final" / "model.safetensors")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def test_final_save_reloads(rehearsal, qwen_base, data):
    """grpo.py's final/: transformers loads the model and a tokenizer that encodes as the stand-in's (plain
    AutoTokenizer too), and vLLM serves it: greedy, the programmed answer, stopped at <|im_end|>, with the
    log-probs transformers gives the same tokens."""
    if rehearsal.script != "grpo.py":
        pytest.skip("the final save is common/data.py's, the same for every script")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from common.data import load_tokenizer
    from common.stop_tokens import stop_token_ids
    from common.vllm_engine import VLLMEngine

    final = rehearsal.run_dir / "final"
    reference = load_tokenizer(str(qwen_base))
    questions = [json.loads(l)["question"] + " Answer in \\boxed{}." for l in data[1].read_text().splitlines()]
    texts = [*(reference.apply_chat_template([{"role": "user", "content": q}], tokenize=False,
                                             add_generation_prompt=True) for q in questions),
             "数学 1234567 \\frac{1}{2}  \n\n x", "<|im_start|>user\nhi<|im_end|>\n<|endoftext|>"]
    expected = [reference(t, add_special_tokens=False)["input_ids"] for t in texts]
    for tok in (load_tokenizer(str(final)), AutoTokenizer.from_pretrained(final)):
        assert [tok(t, add_special_tokens=False)["input_ids"] for t in texts] == expected, type(tok).__name__
    model = AutoModelForCausalLM.from_pretrained(final, dtype=torch.float32)
    saved = load_file(final / "model.safetensors")
    assert all(torch.equal(model.state_dict()[k], saved[k]) for k in saved)

    tok = load_tokenizer(str(final))
    prompt = expected[0]
    engine = VLLMEngine(str(final), dtype=torch.float32, seed=0, max_model_len=len(prompt) + MAX_NEW,
                        stop_token_ids=stop_token_ids(tok, str(final), True))
    try:
        out = engine.generate([prompt], n=1, temperature=0.0, top_p=1.0, max_tokens=MAX_NEW)
    finally:
        engine.close()
    (ids,) = out.completion_ids
    assert out.finished == [True] and ids in ([*BOXED, THREE, IM_END], [*BOXED, FOUR, IM_END]), ids
    with torch.no_grad():
        logits = model(torch.tensor([prompt + ids])).logits[0, len(prompt) - 1 : -1]
    hf = logits.log_softmax(-1).gather(1, torch.tensor(ids)[:, None])[:, 0]
    assert torch.allclose(torch.tensor(out.logprobs[0]), hf, atol=1e-3), (out.logprobs[0], hf.tolist())

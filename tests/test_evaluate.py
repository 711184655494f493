"""The eval-only command (`python -m common.evaluate`) and its numbers: pass@k and avg@k worked by hand, the same
prompts as training, the same greedy accuracy as `evaluate(...)` (what the scripts log), settings from the run."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"

import pytest
import torch

from common.checkpoint import save_checkpoint
from common.data import (DEFAULT_INSTRUCTION, EMBEDDED_INSTRUCTION, EMBEDDED_MODEL, UserError, load_datasets,
                         load_model_and_tokenizer)
from common.evaluate import (Args, avg_at_k, check_args, eval_examples, evaluate, mean_pass_at_k, pass_at_k,
                             resolve_settings, sample_correct)
from common.hf_engine import HFEngine
from common.reward import RewardChecker

ROOT = Path(__file__).resolve().parent.parent
LIMIT, K = 24, 4


def test_pass_at_k_by_hand():
    # n=4 samples, 1 correct, k=2: of the C(4,2)=6 pairs, the 3 without the correct one fail: 1 - 3/6
    assert pass_at_k(4, 1, 2) == pytest.approx(0.5)
    # n=5, c=2, k=3: only the single triple of the 3 wrong samples fails: 1 - 1/10
    assert pass_at_k(5, 2, 3) == pytest.approx(0.9)
    assert pass_at_k(4, 3, 1) == pytest.approx(0.75)  # pass@1 = c / n
    assert pass_at_k(8, 1, 8) == 1.0 and pass_at_k(8, 0, 8) == 0.0  # n = k: "some sample is correct"
    assert pass_at_k(4, 3, 2) == 1.0  # n - c < k: every draw of 2 holds a correct one
    with pytest.raises(ValueError):
        pass_at_k(4, 5, 2)


def test_avg_and_pass_at_k_over_problems_by_hand():
    correct, n = [0, 2, 4], 4  # three problems, 4 samples each
    assert avg_at_k(correct, n) == pytest.approx((0 + 0.5 + 1) / 3)
    # pass@2: problem 0 never, problem 1: 1 - C(2,2)/C(4,2) = 5/6, problem 2 always
    assert mean_pass_at_k(correct, n, 2) == pytest.approx((0 + 5 / 6 + 1) / 3)
    assert mean_pass_at_k(correct, n, 4) == pytest.approx(2 / 3)
    assert mean_pass_at_k(correct, n, 1) == pytest.approx(avg_at_k(correct, n))


def test_same_prompts_as_training():
    """The eval-only command's problems are a run's eval set, token for token (grpo.py's defaults)."""
    import grpo

    _, tok, _ = load_model_and_tokenizer("embedded", torch.float32)
    run_args = grpo.Args()
    run_args.instruction = EMBEDDED_INSTRUCTION  # what Run sets for the embedded dataset
    _, eval_set, _ = load_datasets(run_args, tok)
    args, _ = resolve_settings(Args(model="embedded"))
    examples, skipped, _ = eval_examples(args, tok)
    assert skipped == 0 and len(eval_set) == len(examples) == 200
    assert [(e.prompt_ids, e.gold) for e in examples] == [(e.prompt_ids, e.gold) for e in eval_set]


def fake_final(tmp_path) -> Path:
    """A run directory as a script leaves it: final/ (here the embedded model's files) and a checkpoint."""
    final = tmp_path / "run" / "final"
    shutil.copytree(EMBEDDED_MODEL, final)
    return final


def test_settings_come_from_the_run(tmp_path):
    final = fake_final(tmp_path)
    # no run's flags: a dir with the embedded tokenizer keeps the embedded task's defaults (not gsm8k, 1024)
    args, where = resolve_settings(Args(model=str(final)))
    assert (args.dataset, args.max_new_tokens, args.instruction, args.limit) == ("embedded", 12, EMBEDDED_INSTRUCTION,
                                                                                 None)
    assert "embedded" in where
    # the run's checkpoint holds its flags
    run_args = dict(dataset="embedded", max_new_tokens=7, temperature=0.7, top_p=0.9, eval_limit=5,
                    instruction=" Box it.", max_prompt_len=100, eval_dataset=None, prompt_field=None,
                    answer_field=None, answer_format=None, learning_rate=1e-4)
    save_checkpoint(final.parent / "checkpoints", 3, {"args": run_args}, keep_last=1)
    args, where = resolve_settings(Args(model=str(final)))
    assert (args.max_new_tokens, args.temperature, args.top_p, args.limit, args.instruction, args.max_prompt_len) == (
        7, 0.7, 0.9, 5, " Box it.", 100)
    assert "state.pt" in where
    args, _ = resolve_settings(Args(model=str(final), max_new_tokens=9, limit=2))  # flags given win
    assert (args.max_new_tokens, args.limit, args.temperature) == (9, 2, 0.7)
    # another dataset than the run's: its defaults, not the run's instruction and lengths
    args, _ = resolve_settings(Args(model=str(final), dataset="gsm8k"))
    assert (args.max_new_tokens, args.instruction, args.temperature) == (1024, DEFAULT_INSTRUCTION, 0.7)
    # a run's minirlvr.json (written into final/) comes first
    (final / "minirlvr.json").write_text(json.dumps({"args": {**run_args, "max_new_tokens": 11}}))
    args, where = resolve_settings(Args(model=str(final)))
    assert args.max_new_tokens == 11 and "minirlvr.json" in where
    # any other model with no run: the dataset's defaults
    args, _ = resolve_settings(Args(model="Qwen/Qwen2.5-1.5B"))
    assert (args.dataset, args.max_new_tokens, args.instruction) == ("gsm8k", 1024, DEFAULT_INSTRUCTION)


@pytest.mark.parametrize("field, value, flag", [("samples", -1, "--samples"), ("temperature", 0.0, "--temperature"),
                                                ("top_p", 1.5, "--top-p"), ("limit", 0, "--limit"),
                                                ("max_new_tokens", 0, "--max-new-tokens")])
def test_bad_flags(field, value, flag):
    args, _ = resolve_settings(Args(**{field: value}))
    with pytest.raises(UserError, match=f"{flag} {value} is not valid"):
        check_args(args)


def run_cli(*flags, timeout=600):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.run([sys.executable, "-m", "common.evaluate", *flags], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)


@pytest.fixture(scope="module")
def tiny():
    """The embedded model, its tokenizer and its first LIMIT eval problems as the command builds them."""
    model, tok, _ = load_model_and_tokenizer("embedded", torch.float32)
    args, _ = resolve_settings(Args(model="embedded", limit=LIMIT))
    examples, _, _ = eval_examples(args, tok)
    return model, tok, examples


def greedy_by_evaluate(tiny) -> float:
    """What a script logs as eval/accuracy for the embedded model on the first LIMIT problems."""
    model, tok, examples = tiny
    engine = HFEngine(model, stop_token_ids=[tok.eos_token_id], pad_id=tok.pad_token_id)
    with RewardChecker() as checker:
        accuracy, _ = evaluate(engine, model, 0, examples, tok, checker, 12)
    return accuracy


@torch.no_grad()
def greedy_by_hand(tiny) -> list[float]:
    """Each problem's greedy completion, by `generate` one prompt at a time, scored by the checker."""
    model, tok, examples = tiny
    texts = [tok.decode(model.eval().generate(input_ids=torch.tensor([e.prompt_ids]), max_new_tokens=12,
                                              do_sample=False, pad_token_id=tok.pad_token_id)[0, len(e.prompt_ids):],
                        skip_special_tokens=True) for e in examples]
    with RewardChecker() as checker:
        return checker.score(texts, [e.gold for e in examples])


def test_samples_at_a_low_temperature_are_the_greedy_completion(tiny):
    """At temperature 0.001 every sample is the greedy completion (the smallest top-2 logit gap on these problems'
    greedy paths is 0.014, so another token has odds below e^-14): each problem has K or 0 correct, as greedy."""
    model, tok, examples = tiny
    engine = HFEngine(model, stop_token_ids=[tok.eos_token_id], pad_id=tok.pad_token_id)
    with RewardChecker() as checker:
        counts = sample_correct(engine, model, 0, examples, tok, checker, 12, K, 0.001, 1.0, seed=1, batch_size=16)
    assert counts == [K * int(g) for g in greedy_by_hand(tiny)] and 0 < sum(counts) < K * LIMIT


def check_results(p, out: Path, engine: str) -> dict:
    assert p.returncode == 0, p.stderr[-3000:]
    res = json.loads(out.read_text())
    assert res["settings"]["engine"] == engine and res["problems"] == LIMIT and res["samples"] == K
    rows = res["per_problem"]
    assert len(rows) == LIMIT and all(0 <= r["correct"] <= K for r in rows)
    assert res["greedy_accuracy"] == pytest.approx(sum(r["greedy"] for r in rows) / LIMIT)
    assert res["avg_at_k"] == pytest.approx(sum(r["correct"] for r in rows) / (K * LIMIT))
    assert res["pass_at_k"][str(K)] == pytest.approx(sum(r["correct"] > 0 for r in rows) / LIMIT)
    assert res["pass_at_k"]["1"] == pytest.approx(res["avg_at_k"])
    assert 0 < res["avg_at_k"] < res["pass_at_k"]["2"] < res["pass_at_k"][str(K)]  # the tiny model: partly right
    assert f"greedy accuracy  {res['greedy_accuracy']:.3f}" in p.stdout
    assert f"pass@{K}" in p.stdout and f"avg@{K}" in p.stdout
    return res


def test_cli_hf_engine(tmp_path, tiny):
    out = tmp_path / "res.json"
    p = run_cli("--model", "embedded", "--no-vllm", "--limit", str(LIMIT), "--samples", str(K), "--output", str(out))
    res = check_results(p, out, "hf")
    assert res["greedy_accuracy"] == pytest.approx(greedy_by_evaluate(tiny))
    assert [r["greedy"] for r in res["per_problem"]] == greedy_by_hand(tiny)


@pytest.mark.slow
def test_cli_vllm_engine(tmp_path, tiny):
    pytest.importorskip("vllm")
    out = tmp_path / "res.json"
    p = run_cli("--model", "embedded", "--vllm", "--limit", str(LIMIT), "--samples", str(K), "--output", str(out))
    res = check_results(p, out, "vllm")
    assert res["greedy_accuracy"] == pytest.approx(greedy_by_evaluate(tiny))
    assert [r["greedy"] for r in res["per_problem"]] == greedy_by_hand(tiny)

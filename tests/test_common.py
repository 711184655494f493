"""Fast unit tests of common/'s plumbing: checkpoints, data loading and order, the run helper, the HF engine.

The end-to-end and resume tests (slow) exercise all of these through the scripts; these pin each promise on its
own, in well under a second each, so the fast subset (and tools/mutate.py) sees a bug in them.
"""
import json
import math
import random

import numpy as np
import pytest
import torch

from common.checkpoint import list_checkpoints, load_checkpoint, rng_state, save_checkpoint, set_rng_state
from common.data import (EMBEDDED_INSTRUCTION, EMBEDDED_MODEL, Example, UserError, encode_prompts, gold_from_field,
                         load_examples, load_tokenizer, step_prompts)
from common.hf_engine import HFEngine
from common.run import REAL_MODEL, Run, given_flags


# checkpoints
def test_keep_last_and_resume_from_the_newest(tmp_path):
    for step in (2, 4, 6):
        save_checkpoint(tmp_path / "checkpoints", step, {"step": step}, keep_last=2)
    assert [p.name for p in list_checkpoints(tmp_path / "checkpoints")] == ["step_00000004", "step_00000006"]
    state, path = load_checkpoint(tmp_path)  # a run directory: its newest checkpoint
    assert state["step"] == 6 and path.name == "step_00000006"
    state, _ = load_checkpoint(tmp_path / "checkpoints" / "step_00000004")  # one checkpoint, named
    assert state["step"] == 4


def test_rng_state_restores_python_numpy_and_torch():
    random.seed(0), np.random.seed(0), torch.manual_seed(0)
    saved = rng_state()
    first = (random.random(), float(np.random.rand()), float(torch.rand(())))
    random.seed(1), np.random.seed(1), torch.manual_seed(1)
    set_rng_state(saved)
    assert (random.random(), float(np.random.rand()), float(torch.rand(()))) == first


# data
def test_gold_answers_by_format():
    assert gold_from_field("Natalia sold 48 clips.\n#### 72", "gsm8k", "row") == "72"
    assert gold_from_field("so it is $\\boxed{\\frac{1}{2}}$.", "boxed", "row") == "\\frac{1}{2}"
    assert gold_from_field("  3/4 \n", "plain", "row") == "3/4"
    assert gold_from_field(12, "plain", "row") == "12"
    for bad in (True, None, ["1"]):
        with pytest.raises(UserError, match="answer field"):
            gold_from_field(bad, "plain", "row 3")
    with pytest.raises(UserError, match="no '#### N'"):
        gold_from_field("72", "gsm8k", "row")


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(str(EMBEDDED_MODEL))


def test_the_embedded_tokenizer_is_its_own_not_qwen2s(tokenizer):
    """The Qwen2 trap: AutoTokenizer on a Qwen2 dir builds Qwen2Tokenizer whatever tokenizer_config.json says."""
    assert "Qwen2" not in type(tokenizer).__name__
    assert len(tokenizer) < 1000  # the embedded task's own small vocabulary, not Qwen's 151k
    assert tokenizer.decode(tokenizer("\\boxed{12}")["input_ids"]) == "\\boxed{12}"


def test_prompt_is_question_then_instruction_and_the_length_limit_is_inclusive(tokenizer, tmp_path):
    question = "What is 12 + 30?"
    (ids,) = encode_prompts(tokenizer, [question], EMBEDDED_INSTRUCTION)
    assert tokenizer.decode(ids).startswith(question) and tokenizer.decode(ids).endswith(EMBEDDED_INSTRUCTION.strip())
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps({"question": question, "answer": "#### 42"}) + "\n")
    source = (str(path), None, None, "question", "answer", "gsm8k")
    examples, skipped = load_examples(source, tokenizer, EMBEDDED_INSTRUCTION, len(ids), "train")
    assert skipped == 0 and examples[0].prompt_ids == ids and examples[0].gold == "42"  # exactly at the limit: kept
    with pytest.raises(UserError, match="longer than --max-prompt-len"):
        load_examples(source, tokenizer, EMBEDDED_INSTRUCTION, len(ids) - 1, "train")


def test_step_prompts_walk_a_seeded_permutation_per_epoch():
    examples = [Example([i], str(i)) for i in range(10)]
    order = lambda seed, steps: [e.gold for s in steps for e in step_prompts(examples, seed, s, 5)]  # noqa: E731
    epoch = order(1, [1, 2])
    assert sorted(epoch) == [str(i) for i in range(10)]  # steps 1-2 are one epoch: every prompt once
    assert order(1, [1, 2]) == epoch and order(2, [1, 2]) != epoch  # the seed sets the order
    assert sorted(order(1, [3, 4])) == sorted(epoch) and order(1, [3, 4]) != epoch  # a new permutation per epoch


# the run helper
def test_given_flags():
    assert given_flags(["--learning-rate", "1e-5", "--no-vllm", "--eval-limit=8", "x"]) == {
        "learning_rate", "no_vllm", "vllm", "eval_limit"}


def test_real_model_settings_apply_only_where_no_flag_was_given(tmp_path):
    import grpo

    run = Run(grpo.Args, grpo.REAL_MODEL, ["--model", "some/model", "--eval-every", "7", "--output-dir", str(tmp_path)])
    assert run.args.eval_every == 7  # given: kept
    assert run.args.learning_rate == grpo.REAL_MODEL["learning_rate"] and run.args.max_new_tokens == 1024
    assert run.args.dataset == REAL_MODEL["dataset"]
    embedded = Run(grpo.Args, grpo.REAL_MODEL, ["--output-dir", str(tmp_path)])
    assert embedded.args.learning_rate == grpo.Args.learning_rate and embedded.args.max_new_tokens == 12


def test_guards_checkpoints_and_the_metrics_of_a_resumed_run(tmp_path):
    import grpo

    run = Run(grpo.Args, grpo.REAL_MODEL, ["--output-dir", str(tmp_path), "--save-every", "2"])
    assert [s for s in range(1, 7) if run.should_save(s)] == [2, 4, 6]
    run.check_grad_norm(torch.tensor(3.0), 1)
    with pytest.raises(UserError, match="gradient norm is nan"):
        run.check_grad_norm(torch.tensor(math.nan), 1)
    for step in range(4):
        run.log({"reward": 0.5}, step)
    with pytest.raises(UserError, match="metric loss is inf"):
        run.log({"loss": math.inf}, 4)
    run.save(2, {"model": {}})
    resumed = Run(grpo.Args, grpo.REAL_MODEL, ["--resume", str(run.dir)])
    rows = [json.loads(l) for l in resumed.metrics_path.read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 1, 2] and resumed.step == 2  # rows after the checkpoint are dropped


# the HF engine
def test_hf_engine_keeps_the_stop_token_and_flags_unfinished_rows():
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=40, hidden_size=64, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, head_dim=32, eos_token_id=3, pad_token_id=0)
    model = Qwen2ForCausalLM(config).eval()

    class StopBias(torch.nn.Module):  # the residual hook (R2PO's head) raises the stop id's logit: some rows end
        def forward(self, h):
            return torch.zeros(*h.shape[:-1], 40).index_fill_(-1, torch.tensor([3]), 2.5)

    out = HFEngine(model, stop_token_ids=[3], pad_id=0, residual=StopBias()).generate(
        [[5, 7], [6]], n=4, temperature=1.0, top_p=1.0, max_tokens=6)
    assert len(out.completion_ids) == 8 and out.logprobs is None
    for ids, finished in zip(out.completion_ids, out.finished):
        assert finished == (3 in ids)
        if finished:
            assert ids.index(3) == len(ids) - 1  # cut after the stop token, which is kept
        else:
            assert len(ids) == 6
    assert any(out.finished) and any(3 in ids for ids in out.completion_ids)

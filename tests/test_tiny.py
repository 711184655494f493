"""The embedded default: tiny/data and tiny/model exist, load, agree with tiny/make_tiny.py, and are warm."""
import importlib.util
import json
import os
import re
import sys
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"  # a hub lookup must fail fast, never hang a test

import pytest
import torch
from tokenizers import Tokenizer
from transformers import PreTrainedTokenizerFast, Qwen2ForCausalLM

TINY = Path(__file__).resolve().parents[1] / "tiny"
MODEL_DIR = TINY / "model"

# tiny/ is not a package: load the generator script as a module for its constants and helpers
_spec = importlib.util.spec_from_file_location("make_tiny", TINY / "make_tiny.py")
make_tiny = importlib.util.module_from_spec(_spec)
sys.modules["make_tiny"] = make_tiny  # its @dataclass looks its module up there
_spec.loader.exec_module(make_tiny)


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def rows():
    return read_jsonl(TINY / "data" / "train.jsonl"), read_jsonl(TINY / "data" / "test.jsonl")


@pytest.fixture(scope="module")
def tokenizer():
    return PreTrainedTokenizerFast.from_pretrained(MODEL_DIR)


@pytest.fixture(scope="module")
def model():
    return Qwen2ForCausalLM.from_pretrained(MODEL_DIR).eval()


def test_shipped_files_exist_and_are_small():
    for name in ["config.json", "model.safetensors", "generation_config.json", "tokenizer.json", "tokenizer_config.json"]:
        assert (MODEL_DIR / name).is_file(), name
    assert sum(f.stat().st_size for f in MODEL_DIR.iterdir()) < 10e6  # a few MB, fit for git


def test_config_is_tied_qwen2_that_vllm_can_load(model, tokenizer):
    cfg = model.config
    assert cfg.model_type == "qwen2"
    assert cfg.tie_word_embeddings and model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert cfg.head_dim >= 32  # vLLM's attention backends need it
    assert cfg.hidden_size == cfg.num_attention_heads * cfg.head_dim
    assert model.dtype == torch.float32
    assert cfg.vocab_size == len(tokenizer)  # every id the model can emit decodes
    assert cfg.eos_token_id == cfg.pad_token_id == tokenizer.eos_token_id == tokenizer.pad_token_id == 0
    gen = json.loads((MODEL_DIR / "generation_config.json").read_text())
    assert gen["eos_token_id"] == gen["pad_token_id"] == 0


def test_tokenizer_avoids_the_qwen2_autotokenizer_trap(tokenizer, rows):
    # transformers 5.19's AutoTokenizer builds a Qwen2Tokenizer for a qwen2 model dir, breaking the
    # custom vocabulary; common/data.py loads PreTrainedTokenizerFast when this class is declared
    assert json.loads((MODEL_DIR / "tokenizer_config.json").read_text())["tokenizer_class"] == "PreTrainedTokenizerFast"
    raw = Tokenizer.from_file(str(MODEL_DIR / "tokenizer.json"))
    text = make_tiny.format_prompt(rows[1][0]["question"]) + make_tiny.format_target(123)
    ids = tokenizer(text)["input_ids"]
    assert ids == raw.encode(text).ids
    assert tokenizer.decode(ids) == text
    assert len(tokenizer) < 1000  # a task vocabulary, not a copy of Qwen's 151k


def test_tokenizer_splits_digits_and_keeps_boxed_short(tokenizer):
    assert tokenizer.convert_ids_to_tokens(tokenizer("\\boxed{123}")["input_ids"]) == ["\\boxed{", "1", "2", "3", "}"]
    assert tokenizer.decode([tokenizer.eos_token_id]) == "<|endoftext|>"


def test_prompt_and_target_format():
    assert make_tiny.PROMPT_SUFFIX == " Answer in \\boxed{}."
    assert make_tiny.format_prompt("How many?") == "How many? Answer in \\boxed{}."
    assert make_tiny.format_target(51) == "\\boxed{51}"
    assert make_tiny.extract_boxed_int("\\boxed{1} then \\boxed{ 42 }") == 42
    assert make_tiny.extract_boxed_int("\\boxed{4x}") is None
    assert make_tiny.extract_boxed_int("42") is None


def test_rows_are_consistent_and_disjoint(rows):
    train, test = rows
    assert (len(train), len(test)) == (20_000, 200)
    pairs = {"train": set(), "test": []}
    for split, split_rows in (("train", train), ("test", test)):
        for row in split_rows:
            a, b = map(int, re.findall(r"\d+", row["question"]))  # templates state a, then b
            assert 10 <= a <= 99 and 10 <= b <= 99
            assert row["answer"] == f"{a} + {b} = {a + b}\n#### {a + b}"  # GSM8K schema: gold after ####
            if split == "train":
                pairs["train"].add((a, b))
            else:
                pairs["test"].append((a, b))
    assert len(set(pairs["test"])) == len(pairs["test"])  # 200 distinct test problems
    assert not pairs["train"] & set(pairs["test"])  # held out: no test pair is ever trained on
    assert len(pairs["train"]) > 7000  # most of the 7,900 other pairs appear: no small set to memorise


def test_shipped_data_is_what_the_script_regenerates(rows):
    assert make_tiny.make_rows(20_000, 200, seed=0) == rows


def test_warm_start_answers_in_a_box_and_is_partly_right(model, tokenizer, rows):
    test = rows[1]
    completions = make_tiny.greedy_completions(model, tokenizer, [r["question"] for r in test])
    # exactly "\boxed{N}" then EOS within the 10 new tokens: the short completions RL samples around
    assert all(re.fullmatch(r"\\boxed\{\d+\}", c) for c in completions)
    acc = sum(make_tiny.extract_boxed_int(c) == make_tiny.gold_int(r) for c, r in zip(completions, test)) / len(test)
    assert 0.05 <= acc <= 0.5  # RL needs some right answers to learn from, and room to improve

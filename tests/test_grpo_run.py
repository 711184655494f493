"""grpo.py end to end on the embedded tiny model, and its answers to bad input.

Each run is a real subprocess of the script (real model, tokenizer, generate, math-verify), kept to a few
steps so the file stays well under a minute or two on 2 cores.
"""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
TINY = ["--prompts-per-step", "4", "--group-size", "4", "--eval-limit", "8", "--eval-every", "2"]


def run(script, *flags, timeout=300):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled", "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.run([sys.executable, str(ROOT / script), *flags], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_grpo_embedded_end_to_end(tmp_path):
    p = run("grpo.py", "--total-steps", "3", *TINY, "--output-dir", str(tmp_path), "--no-vllm")
    assert p.returncode == 0, p.stderr[-3000:]
    (run_dir,) = tmp_path.iterdir()
    rows = read_metrics(run_dir)
    assert [r["step"] for r in rows] == [0, 1, 2, 3]
    for key in ["reward", "reward_std", "frac_reward_zero_std", "completions/mean_length", "completions/clipped_ratio",
                "entropy", "clip_ratio/low_mean", "clip_ratio/high_mean", "clip_ratio/region_mean",
                "time/generate", "time/sync_weights", "time/train"]:
        assert key in rows[1], key
    assert "eval/accuracy" in rows[0] and "eval/accuracy" in rows[2] and "eval/accuracy" in rows[3]
    assert all(math.isfinite(v) for r in rows for v in r.values())
    assert 0 <= rows[1]["reward"] <= 1 and rows[1]["entropy"] > 0
    # the final model is an HF model dir that transformers loads, with its tokenizer
    from transformers import AutoModelForCausalLM

    from common.data import load_tokenizer

    model = AutoModelForCausalLM.from_pretrained(run_dir / "final")
    tok = load_tokenizer(str(run_dir / "final"))
    assert model.config.model_type == "qwen2" and tok.decode(tok("\\boxed{12}")["input_ids"]) == "\\boxed{12}"


def error_of(p) -> str:
    assert p.returncode != 0
    assert "Traceback" not in p.stderr, p.stderr[-2000:]
    return p.stderr


def test_missing_dataset_file(tmp_path):
    err = error_of(run("grpo.py", "--dataset", str(tmp_path / "nope.jsonl"), "--output-dir", str(tmp_path)))
    assert "does not exist" in err and "nope.jsonl" in err


@pytest.mark.slow
def test_missing_field_wrong_type_and_empty_dataset(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"question": "1+1?", "solution": "2"}) + "\n")
    err = error_of(run("grpo.py", "--dataset", str(bad), "--output-dir", str(tmp_path)))
    assert "no field 'answer'" in err and "--answer-field" in err
    bad.write_text(json.dumps({"question": ["not", "text"], "answer": "#### 2"}) + "\n")
    err = error_of(run("grpo.py", "--dataset", str(bad), "--output-dir", str(tmp_path)))
    assert "'question' holds a list" in err
    bad.write_text("")
    err = error_of(run("grpo.py", "--dataset", str(bad), "--output-dir", str(tmp_path)))
    assert "is empty" in err


def test_unknown_model(tmp_path):
    err = error_of(run("grpo.py", "--model", "Qwen-does-not-exist-0.1B", "--output-dir", str(tmp_path)))
    assert "could not load model 'Qwen-does-not-exist-0.1B'" in err and "Qwen/Qwen-does-not-exist-0.1B" in err


def test_unwritable_output_dir(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("a file where a folder should be")
    err = error_of(run("grpo.py", "--output-dir", str(blocker / "runs")))
    assert "not writable" in err


def test_resume_dir_that_is_not_a_checkpoint(tmp_path):
    err = error_of(run("grpo.py", "--resume", str(tmp_path)))
    assert "is not a checkpoint" in err


@pytest.mark.slow
def test_long_prompts_are_skipped_and_counted(tmp_path):
    p = run("grpo.py", "--total-steps", "1", *TINY, "--max-prompt-len", "26", "--output-dir", str(tmp_path),
            "--eval-every", "0", "--no-vllm")
    assert p.returncode == 0, p.stderr[-3000:]
    (run_dir,) = tmp_path.iterdir()
    skipped = read_metrics(run_dir)[0]["data/skipped_long_prompts"]
    assert skipped > 0 and f"({int(skipped)} skipped" in p.stdout

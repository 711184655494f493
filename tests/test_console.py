"""What a run prints: a quiet console by default (--verbose: every library's INFO lines), an error raised inside the
training loop on its own line, and the summary at the end (Run.finish), resumed runs included."""
import io
import logging
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tqdm import tqdm

from common import vllm_engine
from common.data import UserError, load_model_and_tokenizer
from common.run import Run, set_console

ROOT = Path(__file__).resolve().parent.parent


# the summary
def test_summary_of_a_resumed_run_counts_the_steps_before_the_resume(tmp_path, capsys):
    import grpo

    flags = ["--output-dir", str(tmp_path), "--prompts-per-step", "4", "--group-size", "8", "--total-steps", "4"]
    step = {"time/generate": 2.0, "time/sync_weights": 0.5, "time/reward": 0.25, "time/train": 3.0}
    run = Run(grpo.Args, grpo.REAL_MODEL, [*flags, "--save-every", "2"])
    run.log({"eval/accuracy": 0.2, "time/eval": 1.0}, 0)
    run.log({**step, "completions/mean_length": 10.0}, 1)
    run.log({**step, "completions/mean_length": 5.0, "eval/accuracy": 0.5, "time/eval": 1.0}, 2)
    run.save(2, {"model": {}})
    run.log({**step, "completions/mean_length": 1000.0, "eval/accuracy": 0.9, "time/eval": 1.0}, 3)  # lost: killed
    resumed = Run(grpo.Args, grpo.REAL_MODEL, ["--resume", str(run.dir)])
    resumed.log({**step, "completions/mean_length": 10.0}, 3)
    resumed.log({**step, "completions/mean_length": 10.0, "eval/accuracy": 0.4, "time/eval": 1.0}, 4)
    model, tokenizer, _ = load_model_and_tokenizer("embedded", torch.float32)
    capsys.readouterr()
    final = resumed.finish(model, tokenizer)
    out = capsys.readouterr().out
    assert f"done: {resumed.args.run_name}, steps 0-4 (grpo.py, embedded preset)" in out
    assert "eval/accuracy: 0.200 (step 0) -> 0.400 (step 4); best 0.500 (step 2)" in out
    # four steps of 2 s generate (steps 1-4), 0.5 s sync, ...; eval at steps 0, 2, 4
    assert ("time by phase: generate 8.0 s (31%), sync_weights 2.0 s (8%), reward 1.0 s (4%), train 12.0 s (46%), "
            "eval 3.0 s (12%); 26.0 s in all\n") in out
    assert re.search(r"wall time of this process: \d+ s \(steps 3-4, loading included\)", out), out
    # (10 + 5 + 10 + 10) mean completion tokens x 4 prompts x 8 completions = 1,120 tokens over 8 s of generate
    assert "rollout: 140 tokens/s (1,120 sampled completion tokens in 8.0 s of generate)" in out
    assert f"model: {final}" in out and f"metrics: {run.dir / 'metrics.jsonl'}" in out
    assert f"evaluate: python -m common.evaluate --model {final}\n" in out
    assert f"resume: python grpo.py --resume {run.dir} --total-steps 8  (from step 2;" in out


def test_summary_without_evaluation_or_checkpoints(tmp_path, capsys):
    import r2po

    run = Run(r2po.Args, r2po.REAL_MODEL, ["--output-dir", str(tmp_path), "--eval-every", "0"])
    run.log({"time/generate": 0.0, "completions/mean_length": 3.0}, 1)
    model, tokenizer, _ = load_model_and_tokenizer("embedded", torch.float32)
    run.finish(model, tokenizer)
    out = capsys.readouterr().out
    assert "eval/accuracy: not evaluated" in out and "rollout:" not in out  # no generate time: no rate
    assert f"resume: no checkpoint in {run.dir}" in out and "python -m common.evaluate --model" in out
    assert "(r2po.py, embedded preset)" in out


# an error inside the loop
def test_an_error_inside_the_loop_starts_on_its_own_line(tmp_path):
    import grpo

    run = Run(grpo.Args, grpo.REAL_MODEL, ["--output-dir", str(tmp_path)])
    stream = io.StringIO()
    bar = tqdm(range(3), file=stream)
    steps = iter(bar)  # the loop is running: the bar's line is open
    next(steps)
    assert not stream.getvalue().endswith("\n")
    with pytest.raises(UserError):
        run.check_grad_norm(torch.tensor(math.nan), 1)
    assert stream.getvalue().endswith("\n")  # the bar's line is ended: the message printed next starts a line


# the console's knobs
def test_expected_vllm_warnings_show_only_with_verbose():
    records = []

    class Keep(logging.Handler):
        def emit(self, record):
            records.append(record.getMessage())

    handler = Keep()
    parent = logging.getLogger("vllm")
    parent.addHandler(handler)
    try:
        for verbose in (False, True):
            set_console(verbose)
            records.clear()
            logging.getLogger("vllm.renderers.base").warning("Chat template warmup failed")
            logging.getLogger("vllm.v1.worker.cpu_worker").warning("%s is not found in LD_PRELOAD. For best", "libiomp")
            logging.getLogger("vllm.renderers.base").warning("something unexpected")
            logging.getLogger("vllm.model_executor.model_loader.reload.layerwise").warning("RotaryEmbedding: x")
            expected = ["Chat template warmup failed", "libiomp is not found in LD_PRELOAD. For best"]
            assert records == (expected if verbose else []) + ["something unexpected"], (verbose, records)
            assert vllm_engine.VERBOSE is verbose
    finally:
        parent.removeHandler(handler)
        set_console(False)


def progress_bar_line(line: str) -> bool:
    """tqdm redraws its line with \\r; a finished bar ends it with \\n (and vLLM's loading bar with its own \\n)."""
    return "\r" in line or re.search(r"\d+%\|", line) is not None or re.search(r"\d+% Completed \|", line) is not None


def console_of(*flags) -> list[str]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled"}
    env.pop("VLLM_LOGGING_LEVEL", None)
    p = subprocess.run([sys.executable, str(ROOT / "grpo.py"), *flags], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                       stderr=subprocess.STDOUT, text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-3000:]
    return [l for l in p.stdout.split("\n") if l.strip() and not progress_bar_line(l)]


@pytest.mark.slow
def test_a_default_vllm_run_prints_the_lines_that_matter_and_verbose_brings_vllm_info(tmp_path):
    pytest.importorskip("vllm")
    tiny = ["--vllm", "--eval-limit", "8", "--prompts-per-step", "4", "--output-dir", str(tmp_path)]
    lines = console_of("--total-steps", "2", *tiny)
    text = "\n".join(lines)
    assert " INFO " not in text and "Reloading" not in text and "prefix cache" not in text, text
    for needed in ["preset: embedded", "data: ", "step 0: eval/accuracy", "done: ", "eval/accuracy:",
                   "time by phase:", "rollout:", "metrics: ", "evaluate: python -m common.evaluate", "resume: "]:
        assert needed in text, (needed, text)
    # 17 such lines when written (the summary is 9 of them); 65 before the quiet console (3 steps; ~600 for the
    # default 300-step run), and vLLM's expected warnings alone would add ~35
    assert len(lines) <= 24, text
    verbose = "\n".join(console_of("--total-steps", "1", "--eval-every", "0", "--verbose", *tiny))
    assert " INFO " in verbose and "Reloading and processing weights" in verbose and "Chat template" in verbose

"""Flag checks and presets: what common/run.py's Run decides before any model loads.

Fast tests call Run(Args, REAL_MODEL, argv) on each script's own Args (the scripts are imported as modules); one slow
test runs a script to show the message a user sees and the exit status.
"""
import dataclasses
import importlib
import json
import os
import shutil
import subprocess
import sys
import typing
from pathlib import Path

import pytest
import torch

from common.data import EMBEDDED_MODEL, UserError
from common.run import CHECKS, RUN_FILE, Run, choose_preset

ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = ["grpo", "clipo", "conspo", "cepo", "r2po"]

# (flag, a bad value, a valid value at the edge of the range); a script without the field skips the row
BAD = [
    ("--group-size", "1", "2"), ("--prompts-per-step", "0", "1"), ("--max-new-tokens", "0", "1"),
    ("--max-prompt-len", "0", "1"), ("--temperature", "0", "0.01"), ("--top-p", "0", "1"), ("--top-p", "1.5", "0.5"),
    ("--vllm-gpu-memory-utilization", "1.2", "1"), ("--vllm-tensor-parallel-size", "2", "1"),
    ("--tis-cap", "0", "0.5"), ("--total-steps", "0", "1"),
    ("--learning-rate", "-1", "1e-9"), ("--learning-rate", "0", "1e-9"), ("--weight-decay", "-0.1", "0"),
    ("--warmup-steps", "-1", "0"), ("--max-grad-norm", "0", "0.1"), ("--num-minibatches", "0", "1"),
    ("--update-epochs", "0", "1"), ("--micro-batch-size", "0", "1"), ("--adv-eps", "-1e-6", "0"),
    ("--eps-low", "1", "0"), ("--eps-low", "-0.1", "0.99"), ("--eps-high", "-0.1", "0"), ("--beta", "-0.01", "0"),
    ("--dual-clip", "1", "1.01"), ("--eval-every", "-1", "0"), ("--eval-limit", "0", "1"),
    ("--save-every", "-1", "0"), ("--keep-last", "0", "1"), ("--reward-timeout-s", "0", "0.1"),
    ("--reward-workers", "0", "1"),
    # CLIPO
    ("--head-dim", "0", "1"), ("--head-lr", "0", "1e-9"), ("--head-weight-decay", "-1", "0"),
    ("--head-warmup-steps", "-1", "0"), ("--tau", "0", "0.01"), ("--bonus-coef", "-0.1", "0"),
    ("--bonus-min", "0.1", "0"), ("--supcon-eps", "-1e-8", "0"),
    # ConSPO
    ("--max-margin", "-0.01", "0"), ("--margin-alpha", "0", "1"), ("--margin-alpha", "1.5", "0.01"),
    # CEPO
    ("--lambda-init", "1.5", "1"), ("--lambda-init", "-0.1", "0"), ("--lambda-decay-steps", "-1", "0"),
    ("--eps-w", "1", "0"),
    # R2PO
    ("--head-steps", "-1", "0"), ("--policy-steps", "0", "1"), ("--head-learning-rate", "0", "1e-9"),
    ("--head-init-std", "-0.1", "0"), ("--rollout-temperature", "0", "0.01"),
]

# numeric fields that take any value (no check needed)
UNCHECKED = {"seed"}
# ConSPO's Args refuse these before Run's checks (one optimizer step per rollout batch, no ratio): its own message
OWN_CHECK = {"conspo": {"tis_cap", "num_minibatches", "update_epochs"}}


def field_of(flag: str) -> str:
    return flag[2:].replace("-", "_")


def script(name):
    return importlib.import_module(name)


def numeric_fields(Args) -> set[str]:
    hints = typing.get_type_hints(Args)
    numeric = {int, float, typing.Optional[int], typing.Optional[float]}
    return {f.name for f in dataclasses.fields(Args) if hints[f.name] in numeric}


def test_every_numeric_flag_of_every_script_is_checked_and_every_check_is_tested():
    fields = set()
    for name in SCRIPTS:
        numeric = numeric_fields(script(name).Args)
        assert numeric - set(CHECKS) - UNCHECKED == set(), f"{name}.py: a numeric flag without a check in CHECKS"
        fields |= numeric
    assert set(CHECKS) - fields == set(), "a CHECKS entry names a field no script has"
    assert set(CHECKS) - {field_of(flag) for flag, _, _ in BAD} == set(), "a check no row of BAD exercises"


@pytest.mark.parametrize("name", SCRIPTS)
def test_bad_values_are_refused_before_anything_is_written_and_edge_values_pass(name, tmp_path):
    mod = script(name)
    fields = {f.name for f in dataclasses.fields(mod.Args)}
    out = tmp_path / "runs"
    tried = 0
    for flag, bad, good in BAD:
        if field_of(flag) not in fields or field_of(flag) in OWN_CHECK.get(name, ()):
            continue
        tried += 1
        with pytest.raises(UserError) as e:
            Run(mod.Args, mod.REAL_MODEL, ["--output-dir", str(out), flag, bad])
        message = str(e.value.code)
        assert message.startswith("minirlvr: error: ") and "\n" not in message, message
        assert f"{flag} {float(bad)!r}" in message or f"{flag} {int(float(bad))!r}" in message, message
        assert "must be" in message, message
        assert not out.exists(), f"{flag} {bad}: the run dir was created before the check"
        run = Run(mod.Args, mod.REAL_MODEL, ["--output-dir", str(out), flag, good])  # the edge of the range passes
        assert getattr(run.args, field_of(flag)) == type(getattr(run.args, field_of(flag)))(good)
        shutil.rmtree(out)
    assert tried >= 25  # ConSPO, with the fewest flags, has 25 rows


def test_a_combination_and_several_bad_flags_in_one_message(tmp_path):
    import grpo

    base = ["--output-dir", str(tmp_path), "--prompts-per-step", "4", "--group-size", "8"]
    expected = r"--num-minibatches 33 is invalid: .* = 32 sequences, so it must be in \[1, 32\]"
    with pytest.raises(UserError, match=expected):
        Run(grpo.Args, grpo.REAL_MODEL, [*base, "--num-minibatches", "33"])
    assert Run(grpo.Args, grpo.REAL_MODEL, [*base, "--num-minibatches", "32"]).args.num_minibatches == 32
    with pytest.raises(UserError) as e:
        Run(grpo.Args, grpo.REAL_MODEL, ["--output-dir", str(tmp_path), "--group-size", "1", "--learning-rate", "-1"])
    assert "--group-size 1 is invalid" in str(e.value.code) and "--learning-rate -1.0 is invalid" in str(e.value.code)


def test_flags_of_a_resumed_run_are_checked_too(tmp_path):
    import grpo

    run = Run(grpo.Args, grpo.REAL_MODEL, ["--output-dir", str(tmp_path)])
    run.save(1, {"model": {}})
    with pytest.raises(UserError, match="--eps-low 1.0 is invalid"):
        Run(grpo.Args, grpo.REAL_MODEL, ["--resume", str(run.dir), "--eps-low", "1"])


@pytest.mark.slow
def test_a_script_prints_one_clean_message_and_exits_1(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled"}
    for flags, expected in [(["--group-size", "1"], "--group-size 1 is invalid: it must be >= 2"),
                            (["--learning-rate", "-1"], "--learning-rate -1.0 is invalid: it must be > 0")]:
        p = subprocess.run([sys.executable, str(ROOT / "grpo.py"), *flags, "--output-dir", str(tmp_path)], cwd=ROOT,
                           env=env, capture_output=True, text=True, timeout=300)
        assert p.returncode == 1, p.stderr[-2000:]
        assert "Traceback" not in p.stderr, p.stderr[-2000:]
        (line,) = [l for l in p.stderr.splitlines() if "error" in l]
        assert line.startswith("minirlvr: error: ") and expected in line, p.stderr
        assert "data:" not in p.stdout and not any(tmp_path.iterdir())  # refused before the model and data load


# presets
def saved_final(tmp_path, argv) -> Path:
    """A run's final/ (written by Run.finish) from the embedded model, under the flags in argv."""
    import grpo
    from common.data import load_model_and_tokenizer

    run = Run(grpo.Args, grpo.REAL_MODEL, ["--output-dir", str(tmp_path), *argv])
    model, tokenizer, _ = load_model_and_tokenizer("embedded", torch.float32)
    return run.finish(model, tokenizer)


def test_a_model_saved_by_an_embedded_run_keeps_the_embedded_preset(tmp_path, capsys):
    import grpo

    final = saved_final(tmp_path, [])
    saved = json.loads((final / RUN_FILE).read_text())
    assert saved["preset"] == "embedded" and saved["script"] == "grpo.py" and saved["args"]["max_new_tokens"] == 12
    capsys.readouterr()
    run = Run(grpo.Args, grpo.REAL_MODEL, ["--model", str(final), "--output-dir", str(tmp_path)])
    assert (run.args.dataset, run.args.max_new_tokens, run.args.learning_rate) == ("embedded", 12, 1e-4)
    (line,) = [l for l in capsys.readouterr().out.splitlines() if l.startswith("preset:")]
    assert line.startswith("preset: embedded") and RUN_FILE in line
    # and the run trained from it saves the same preset again
    assert json.loads((saved_final(tmp_path, ["--model", str(final)]) / RUN_FILE).read_text())["preset"] == "embedded"


def test_a_model_saved_by_a_real_preset_run_keeps_the_real_preset(tmp_path):
    import grpo

    model_dir = tmp_path / "model"
    shutil.copytree(EMBEDDED_MODEL, model_dir)
    (model_dir / RUN_FILE).write_text(json.dumps({"preset": "real"}))
    final = saved_final(tmp_path, ["--model", str(model_dir), "--dataset", "embedded"])
    assert json.loads((final / RUN_FILE).read_text())["preset"] == "real"
    run = Run(grpo.Args, grpo.REAL_MODEL, ["--model", str(final), "--output-dir", str(tmp_path)])
    assert (run.args.dataset, run.args.max_new_tokens, run.args.learning_rate) == ("gsm8k", 1024, 1e-6)


def test_a_dir_without_a_run_file_is_matched_by_its_architecture(tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(EMBEDDED_MODEL, copy)
    assert choose_preset(str(copy))[0] == "embedded"
    config = json.loads((copy / "config.json").read_text())
    (copy / "config.json").write_text(json.dumps({**config, "num_hidden_layers": config["num_hidden_layers"] + 1}))
    assert choose_preset(str(copy))[0] == "real"
    assert choose_preset("Qwen/Qwen2.5-1.5B")[0] == "real" and choose_preset("embedded")[0] == "embedded"
    (copy / RUN_FILE).write_text("{not json")
    with pytest.raises(UserError, match=RUN_FILE):
        choose_preset(str(copy))


def test_a_resumed_run_keeps_its_preset(tmp_path):
    import grpo

    model_dir = tmp_path / "model"
    shutil.copytree(EMBEDDED_MODEL, model_dir)
    (model_dir / RUN_FILE).write_text(json.dumps({"preset": "embedded"}))
    run = Run(grpo.Args, grpo.REAL_MODEL, ["--model", str(model_dir), "--output-dir", str(tmp_path)])
    run.save(1, {"model": {}})
    resumed = Run(grpo.Args, grpo.REAL_MODEL, ["--resume", str(run.dir)])
    assert resumed.preset == "embedded" and resumed.args.max_new_tokens == 12

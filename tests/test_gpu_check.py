"""benchmarks/gpu_check.py's CPU-safe parts: the plan and the script commands (the real preset: no flag that
REAL_MODEL sets is given, --vllm on), the metrics summary, the memory-meter wrapper a script runs under, the kernel
section at toy size, and (slow) the weight push and one script run on the 2-layer Qwen2.5 stand-in, as
`python benchmarks/gpu_check.py --tiny --device cpu` runs them. The GPU sizes themselves need a GPU
(docs/gpu_check.md)."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from common.run import REAL_MODEL
from qwen_standin import qwen_base, qwen_root  # noqa: F401

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import gpu_check  # noqa: E402


def test_plan_full_sizes():
    plan = gpu_check.make_plan(gpu_check.parse_args(["--device", "cuda"]))
    k = plan["kernels"]
    assert (k["ns"], k["vocab"], k["d"], k["dtype"], k["entropy"]) == ((4096, 16384), 151936, 1536, "bfloat16", True)
    assert plan["model"] == dict(kind="base", full_width=True)
    assert plan["runs"]["steps"] == 10 and plan["scripts"] == list(gpu_check.SCRIPTS)
    assert plan["budget_s"] <= 600


def test_script_command_is_the_real_preset(tmp_path):
    plan = gpu_check.make_plan(gpu_check.parse_args(["--device", "cuda"]))
    cmd = gpu_check.script_command(plan, "cepo", tmp_path / "model", tmp_path / "out", tmp_path / "peak.json")
    assert cmd[2:5] == ["--child", str(tmp_path / "peak.json"), str(gpu_check.ROOT / "cepo.py")]
    flags = cmd[5:]
    assert "--vllm" in flags and flags[flags.index("--model") + 1] == str(tmp_path / "model")
    assert float(flags[flags.index("--beta") + 1]) > 0  # random weights: no reward, so beta makes every sequence train
    given = {f[2:].replace("-", "_") for f in flags if f.startswith("--")}
    # REAL_MODEL's micro-batch size, gradient checkpointing, total steps aside: they come from the preset
    assert not given & (set(REAL_MODEL) - {"dataset", "max_new_tokens", "total_steps", "eval_every"})
    rows = [json.loads(l) for l in gpu_check.DATA.read_text().splitlines()[:3]]
    assert all("question" in r and "####" in r["answer"] for r in rows)  # the hub schema of openai/gsm8k


def test_summarize_metrics():
    rows = [{"step": 0, "eval/accuracy": 0.0, "time/eval": 9.0},
            {"step": 1, "time/generate": 2.0, "time/sync_weights": 0.5, "time/reward": 0.1, "time/train": 3.0,
             "completions/mean_length": 100.0, "sampling/sampling_logp_difference/max": 0.01},
            {"step": 2, "time/generate": 4.0, "time/sync_weights": 0.5, "time/reward": 0.3, "time/train": 5.0,
             "completions/mean_length": 200.0, "sampling/sampling_logp_difference/max": 0.03}]
    s = gpu_check.summarize_metrics(rows, prompts_per_step=4, group_size=8)
    assert s["steps"] == 2
    assert (s["generate"], s["sync_weights"], s["reward"], s["train"]) == (3.0, 0.5, 0.2, 4.0)
    assert s["tokens_per_s"] == pytest.approx((100 + 200) * 32 / 6.0)
    assert s["logp_diff_max"] == 0.03


def test_format_table():
    table = gpu_check.format_table([dict(section="kernels", item="head N=4096 triton fwd", seconds=0.0123,
                                         memory=3 * 2**30, rate="1 TFLOP/s", note="2.00x vs plain"),
                                    dict(section="runs", item="r2po.py", note="timeout | x")], "header")
    lines = table.splitlines()
    assert lines[0] == "header" and lines[2].startswith("| section |")
    assert "| 12.30 ms | 3.0 GiB | 1 TFLOP/s | 2.00x vs plain |" in lines[4]
    assert lines[5].count("|") == 7  # a | in a note does not add a column


def test_child_wrapper_writes_peak(tmp_path):
    script = tmp_path / "s.py"
    script.write_text("import sys\nx = bytearray(50 * 2**20)\nprint(sys.argv[1:])\nsys.exit(3)\n")
    out = tmp_path / "peak.json"
    proc = subprocess.run([sys.executable, gpu_check.__file__, "--child", str(out), str(script),
                           "--a", "1"], capture_output=True, text=True)
    assert proc.returncode == 3 and "['--a', '1']" in proc.stdout
    assert json.loads(out.read_text())["max_rss"] > 50 * 2**20


def test_kernels_tiny(tmp_path):
    rows = gpu_check.main(["--tiny", "--device", "cpu", "--sections", "kernels", "--out", str(tmp_path / "table")])
    items = {r["item"]: r for r in rows}
    for task in ("logits", "head"):
        for mode in ("fwd", "fwd+bwd"):
            row, plain = items[f"{task} N=64 torch (chunked) {mode}"], items[f"{task} N=64 plain (eager) {mode}"]
            speedup = float(row["note"].split("x vs plain")[0])  # the eager path's time over this one's
            assert speedup == pytest.approx(plain["seconds"] / row["seconds"], abs=0.006)
    assert "| kernels | head N=64 torch (chunked) fwd+bwd |" in (tmp_path / "table").read_text()


@pytest.mark.slow
def test_push_and_one_run_tiny(tmp_path, qwen_root):
    work = tmp_path / "work"
    (work / "standin").mkdir(parents=True)
    for f in qwen_root.glob("tokenizer.json"):  # the session's tokenizer build, so it is not built twice
        (work / "standin" / f.name).write_bytes(f.read_bytes())
    rows = gpu_check.main(["--tiny", "--device", "cpu", "--sections", "push", "runs", "--scripts", "grpo",
                           "--work-dir", str(work), "--out", str(tmp_path / "table")])
    by = {(r["section"], r["item"].split(" (")[0]): r for r in rows}
    assert not [r for r in rows if "FAILED" in (r.get("note") or "")], rows
    push = by[("push", "push_weights")]
    assert push["seconds"] > 0
    rollout = next(r for r in rows if r["item"].startswith("rollout"))
    assert float(rollout["note"].split("log-prob max ")[1].split(";")[0]) < 1e-3  # fp32 on CPU: the same numbers
    run = by[("runs", "grpo.py")]
    assert run["note"].startswith("ok; 2/2 steps") and "tokens/s" in run["rate"]
    assert float(run["note"].split("train ")[1].split(";")[0]) > 0  # the update ran (beta > 0)

"""benchmarks/compare.py: a real comparison of two scripts end to end (interrupted by Ctrl-C and resumed),
skipped runs, and the table's arithmetic on hand-written metrics.

The end-to-end runs are real subprocesses (compare.py, which runs grpo.py and conspo.py on the embedded model),
2 steps each, made once for the module; the tests after the first read them.
"""
import csv
import json
import math
import re
import signal
import subprocess
import sys
import time

import pytest
import tyro

from benchmarks.compare import BUDGET, MARKERS, Args, find_run, saved_args, summarize, train, update_readme
from common.checkpoint import save_checkpoint
import grpo
from test_grpo_run import ROOT, TINY, read_metrics, run
from test_resume import env

FLAGS = ["--algos", "grpo", "conspo", "--seeds", "1", "--total-steps", "2", *TINY, "--no-vllm", "--save-every", "1"]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def compare(tmp, *extra):
    return run("benchmarks/compare.py", *FLAGS, "--runs-dir", str(tmp / "runs"), "--out-dir", str(tmp / "out"), *extra)


def table_rows(md: str) -> dict:
    """algo -> the cells of its row in a compare.md table."""
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in md.splitlines() if line.startswith("| ")]
    return {r[0]: r[1:] for r in rows[1:]}


@pytest.fixture(scope="module")
def compared(tmp_path_factory):
    """compare.py on grpo and conspo, stopped by Ctrl-C (SIGINT to compare.py alone) while conspo trains, then the
    same command again, which must resume conspo and finish."""
    tmp = tmp_path_factory.mktemp("compare")
    log = tmp / "interrupted.log"
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, str(ROOT / "benchmarks" / "compare.py"), *FLAGS, "--runs-dir",
                                 str(tmp / "runs"), "--out-dir", str(tmp / "out")], cwd=ROOT, env=env(), stdout=out,
                                stderr=subprocess.STDOUT)
        deadline = time.time() + 240
        while not list((tmp / "runs").glob("conspo__1/*/metrics.jsonl")):  # conspo is past its step-0 evaluation
            assert proc.poll() is None and time.time() < deadline, log.read_text()[-3000:]
            time.sleep(0.05)
        proc.send_signal(signal.SIGINT)
        interrupted_rc = proc.wait(timeout=120)
    conspo = find_run(tmp / "runs", "conspo", 1)
    interrupted = {"rc": interrupted_rc, "log": log.read_text(), "metrics": read_metrics(conspo),
                   "final": (conspo / "final").exists()}
    p = compare(tmp)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    return tmp, interrupted, p


@pytest.mark.slow
def test_ctrl_c_stops_cleanly_and_the_same_command_resumes(compared):
    tmp, interrupted, p = compared
    log = interrupted["log"]
    assert interrupted["rc"] == 130 and "Traceback" not in log, log[-3000:]
    assert "[1/2] grpo seed 1: starting" in log and "[2/2] conspo seed 1: starting" in log
    assert "stopped by signal 2 after step" in log  # conspo got the signal from compare.py, finished a step, saved
    assert "[2/2] conspo seed 1 stopped before the end" in log and "Re-run the same command to resume." in log
    assert not interrupted["final"]

    conspo = find_run(tmp / "runs", "conspo", 1)
    assert "[1/2] grpo seed 1: finished before, skipped" in p.stdout
    assert f"[2/2] conspo seed 1: resuming {conspo}" in p.stdout and "resumed conspo__1__" in p.stdout
    assert (conspo / "final").is_dir() and len(list((tmp / "runs" / "conspo__1").iterdir())) == 1
    after = read_metrics(conspo)
    assert [r["step"] for r in after] == [0, 1, 2]
    assert after[0] == interrupted["metrics"][0]  # not restarted: a fresh run would have re-timed its evaluation


@pytest.mark.slow
def test_two_algorithms_end_to_end(compared):
    tmp, _, _ = compared
    with open(tmp / "out" / "compare.csv") as f:
        rows = list(csv.DictReader(f))
    for algo in ("grpo", "conspo"):
        mine = [r for r in rows if r["algo"] == algo]
        assert [int(r["step"]) for r in mine] == [0, 1, 2] and {r["seed"] for r in mine} == {"1"}
        walls = [float(r["wall_s"]) for r in mine]
        assert 0 < walls[0] < walls[1] < walls[2]
        assert mine[0]["eval/accuracy"] != "" and mine[2]["eval/accuracy"] != "" and mine[1]["reward"] != ""
    budgets = [{k: saved_args(find_run(tmp / "runs", a, 1))[k] for k in BUDGET} for a in ("grpo", "conspo")]
    assert budgets[0] == budgets[1] and budgets[0]["total_steps"] == 2 and budgets[0]["group_size"] == 4
    assert (tmp / "out" / "compare.png").read_bytes()[:8] == PNG_MAGIC
    md = (tmp / "out" / "compare.md").read_text()
    cells = table_rows(md)
    assert set(cells) == {"grpo", "conspo"}
    for algo, (start, final, tokens_per_s, wall) in cells.items():
        numbers = [float(start), float(final), float(tokens_per_s), float(wall.removesuffix(" s"))]
        assert all(math.isfinite(x) for x in numbers) and numbers[2] > 0 and numbers[3] > 0, (algo, numbers)
    max_new_tokens = grpo.Args.max_new_tokens  # not set by FLAGS: grpo.py's default, given to both
    assert f"2 steps x 4 prompts x 4 completions of at most {max_new_tokens} tokens" in md
    assert "on 8 held-out problems at step 0 and every 2 steps" in md and "HF generate" in md
    assert (f"--algos grpo conspo --seeds 1 --total-steps 2 --prompts-per-step 4 --group-size 4 --max-new-tokens "
            f"{max_new_tokens} --eval-every 2 --eval-limit 8 --no-vllm`") in md


@pytest.mark.slow
def test_finished_runs_are_skipped_and_a_new_budget_is_refused(compared, capsys):
    tmp, _, _ = compared  # in-process: nothing here starts a script (it would, were a run not skipped)
    metrics = {a: find_run(tmp / "runs", a, 1) / "metrics.jsonl" for a in ("grpo", "conspo")}
    before = {a: (m.read_bytes(), m.stat().st_mtime_ns) for a, m in metrics.items()}
    args = tyro.cli(Args, args=[*FLAGS, "--runs-dir", str(tmp / "runs")])
    train(args, tmp / "runs")
    out = capsys.readouterr().out
    assert "[1/2] grpo seed 1: finished before, skipped" in out
    assert "[2/2] conspo seed 1: finished before, skipped" in out
    assert {a: (m.read_bytes(), m.stat().st_mtime_ns) for a, m in metrics.items()} == before

    args.total_steps = 3  # resuming these runs under another budget would mix two budgets
    refused = re.escape("another budget (total_steps 2 there, 3 now). Use another --runs-dir")
    with pytest.raises(SystemExit, match=refused):
        train(args, tmp / "runs")


def fake_run(runs_dir, algo, seed, rows, finished=True, **budget):
    """A run directory as a script leaves it: metrics.jsonl, a checkpoint holding its args, and final/."""
    run_dir = runs_dir / f"{algo}__{seed}" / f"{algo}__{seed}__1700000000"
    (run_dir / "final").mkdir(parents=True) if finished else run_dir.mkdir(parents=True)
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    args = {**dict(model="embedded", dataset="embedded", total_steps=2, prompts_per_step=2, group_size=3,
                   eval_every=2, eval_limit=200, max_new_tokens=12, vllm=False), **budget}
    save_checkpoint(run_dir / "checkpoints", 2, {"args": args}, keep_last=1)


def test_summarize_math_on_hand_written_runs(tmp_path):
    runs = tmp_path / "runs"
    # 2 prompts x 3 completions = 6 completions per step; wall time = the sum of the time/* keys
    fake_run(runs, "grpo", 1, [
        {"step": 0, "eval/accuracy": 0.2, "time/eval": 1.0},
        {"step": 1, "reward": 0.5, "completions/mean_length": 4.0, "time/generate": 2.0, "time/train": 1.0},
        {"step": 2, "reward": 0.25, "completions/mean_length": 6.0, "time/generate": 2.0, "time/reward": 0.5,
         "time/train": 0.5, "eval/accuracy": 0.4, "time/eval": 1.0}])
    # wall 1, 4, 8; tokens (4 + 6) * 6 = 60 in 8 - 2 s outside evaluation: 10 tokens/s
    fake_run(runs, "grpo", 2, [
        {"step": 0, "eval/accuracy": 0.2, "time/eval": 1.0},
        {"step": 1, "reward": 0.0, "completions/mean_length": 5.0, "time/generate": 3.75},
        {"step": 2, "reward": 1.0, "completions/mean_length": 5.0, "time/generate": 3.75, "eval/accuracy": 0.6,
         "time/eval": 4.0}])
    # wall 1, 4.75, 12.5; 60 tokens in 12.5 - 5 s: 8 tokens/s. grpo: final 0.5 ± 0.1414, 9 tokens/s, 10.25 s
    fake_run(runs, "grpo", 3, [{"step": 0, "eval/accuracy": 0.9, "time/eval": 1.0}], finished=False)  # left out
    fake_run(runs, "cepo", 1, [
        {"step": 0, "eval/accuracy": 0.1, "time/eval": 1.0},
        {"step": 1, "reward": 0.5, "completions/mean_length": 2.0, "time/generate": 1.0},
        {"step": 2, "reward": 0.5, "completions/mean_length": 2.0, "time/train": 1.0, "eval/accuracy": 0.3,
         "time/eval": 1.0}])
    # wall 4; 24 tokens in 2 s: 12 tokens/s
    table = summarize(runs, tmp_path / "out", ("grpo", "cepo"), (1, 2, 3))

    assert table_rows(table) == {"grpo": ["0.200", "0.500 ± 0.141 (0.400, 0.600)", "9", "10 s"],
                                 "cepo": ["0.100", "0.300", "12", "4 s"]}
    assert "2 steps x 2 prompts x 3 completions of at most 12 tokens" in table
    assert "--algos grpo cepo --seeds 1 2 " in table
    with open(tmp_path / "out" / "compare.csv") as f:
        rows = list(csv.DictReader(f))
    assert [(r["algo"], r["seed"], r["step"], float(r["wall_s"])) for r in rows] == [
        ("grpo", "1", "0", 1.0), ("grpo", "1", "1", 4.0), ("grpo", "1", "2", 8.0),
        ("grpo", "2", "0", 1.0), ("grpo", "2", "1", 4.75), ("grpo", "2", "2", 12.5),
        ("cepo", "1", "0", 1.0), ("cepo", "1", "1", 2.0), ("cepo", "1", "2", 4.0)]
    assert rows[0]["reward"] == "" and float(rows[1]["reward"]) == 0.5
    assert (tmp_path / "out" / "compare.png").read_bytes()[:8] == PNG_MAGIC
    assert (tmp_path / "out" / "compare.md").read_text().startswith(table)

    fake_run(runs, "clipo", 1, [{"step": 0, "eval/accuracy": 0.1, "time/eval": 1.0}], eval_every=5)
    with pytest.raises(SystemExit, match="do not share one budget"):
        summarize(runs, tmp_path / "out", ("grpo", "clipo"), (1,))


def test_update_readme_between_the_markers(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text(f"# title\n\nbefore\n{MARKERS[0]}\nold table\n{MARKERS[1]}\nafter\n")
    update_readme(readme, "| algo |\n|---|\n| grpo |", tmp_path / "docs" / "results" / "compare.png")
    text = readme.read_text()
    assert text == (f"# title\n\nbefore\n{MARKERS[0]}\n| algo |\n|---|\n| grpo |\n\n"
                    f"![eval accuracy and reward](docs/results/compare.png)\n{MARKERS[1]}\nafter\n")
    update_readme(readme, "| algo |\n|---|\n| cepo |", tmp_path / "docs" / "results" / "compare.png")
    assert "| cepo |" in readme.read_text() and "| grpo |" not in readme.read_text()  # replaced, not appended

    readme.write_text("# title\nno markers here\n")
    with pytest.raises(SystemExit, match=re.escape(MARKERS[0])):
        update_readme(readme, "| algo |", tmp_path / "compare.png")
    assert readme.read_text() == "# title\nno markers here\n"

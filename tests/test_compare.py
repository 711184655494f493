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

import numpy as np
import pytest
import tyro

from benchmarks.compare import (BOOTSTRAP_DRAWS, BUDGET, MARKERS, Args, bootstrap_means, eval_size, find_run, interval,
                                resolution, saved_args, summarize, train, update_readme)
from common.checkpoint import save_checkpoint
import grpo
from test_grpo_run import ROOT, TINY, read_metrics, run
from test_resume import env

FLAGS = ["--algos", "grpo", "conspo", "--seeds", "1", "--total-steps", "2", *TINY, "--no-vllm", "--save-every", "1"]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def compare(tmp, *extra):
    return run("benchmarks/compare.py", *FLAGS, "--runs-dir", str(tmp / "runs"), "--out-dir", str(tmp / "out"), *extra)


def mean_and_interval(cell: str) -> tuple[float, float, float]:
    """'0.500 [0.368, 0.633]' -> (0.5, 0.368, 0.633)"""
    mean, lo, hi = re.fullmatch(r"([\d.]+) \[([\d.]+), ([\d.]+)\]", cell).groups()
    return float(mean), float(lo), float(hi)


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
    for algo, (start, final, per_seed, tokens_per_s, wall) in cells.items():
        assert mean_and_interval(final)[0] == float(per_seed)  # one seed
        numbers = [*mean_and_interval(start), *mean_and_interval(final), float(tokens_per_s),
                   float(wall.removesuffix(" s"))]
        assert all(math.isfinite(x) for x in numbers) and numbers[-2] > 0 and numbers[-1] > 0, (algo, numbers)
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

    rows = table_rows(table)
    assert {a: r[2:] for a, r in rows.items()} == {"grpo": ["0.400, 0.600", "9", "10 s"],
                                                   "cepo": ["0.300", "12", "4 s"]}
    for algo, start, final in (("grpo", 0.2, 0.5), ("cepo", 0.1, 0.3)):
        for cell, mean in ((rows[algo][0], start), (rows[algo][1], final)):
            m, lo, hi = mean_and_interval(cell)
            assert m == mean and lo < m < hi, (algo, cell)
    # seeds 0.4 and 0.6 of 200 problems: wider than one seed's binomial 0.3 of 200 alone
    assert mean_and_interval(rows["grpo"][1])[2] - mean_and_interval(rows["grpo"][1])[1] > 0.2
    assert "Binomial(200, its accuracy)" in table and "differences in final accuracy smaller than about" in table
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


def width(accs, n_problems, draws=BOOTSTRAP_DRAWS):
    lo, hi = interval(bootstrap_means(accs, n_problems, np.random.default_rng(0), draws))
    return hi - lo


def test_interval_of_a_constant_has_zero_width():
    assert interval(bootstrap_means([1.0, 1.0, 1.0], 200, np.random.default_rng(0))) == (1.0, 1.0)  # every problem
    assert interval(bootstrap_means([0.0, 0.0], 200, np.random.default_rng(0))) == (0.0, 0.0)  # solved / none
    assert width([0.35, 0.35, 0.35], None) == 0.0  # seeds only: equal seeds leave nothing to resample


def test_interval_by_hand():
    # seeds only, two seeds 0.2 and 0.4: a draw's mean is 0.2, 0.3 or 0.4 with chances 1/4, 1/2, 1/4, so the 2.5th
    # and 97.5th percentiles are 0.2 and 0.4
    assert interval(bootstrap_means([0.2, 0.4], None, np.random.default_rng(0))) == pytest.approx((0.2, 0.4))
    # one seed at 0.5 on 100 problems: Binomial(100, 0.5)'s 2.5% and 97.5% quantiles are 40 and 60
    assert interval(bootstrap_means([0.5], 100, np.random.default_rng(0))) == pytest.approx((0.40, 0.60), abs=0.011)


def test_more_seeds_or_problems_give_narrower_intervals():
    spread = [0.3, 0.5]
    assert width(spread * 4, 200) < width(spread, 200)  # 8 seeds vs 2 with the same spread
    assert width([0.4] * 3, 1000) < width([0.4] * 3, 100)  # more problems per evaluation
    assert width(spread, None) < width(spread, 50)  # resampling the problems adds their noise


def test_resolution_sentence():
    finals = {"good": [0.8, 0.82, 0.79], "bad": [0.2, 0.22, 0.18], "also_bad": [0.21, 0.2, 0.19]}
    text = resolution(finals, 200)
    assert "good > bad" in text and "good > also_bad" in text and "bad > also_bad" not in text
    assert "also_bad > bad" not in text
    # two algorithms both at 0.5 on 3 seeds of 200 problems: the difference's sd is sqrt(2 * 0.25 / 600) = 0.029,
    # so its 95% interval is about +-1.96 * 2.9 = +-5.7 points
    text = resolution({"a": [0.5] * 3, "b": [0.5] * 3}, 200)
    x = float(re.search(r"smaller than about ([\d.]+) points", text).group(1))
    assert x == pytest.approx(5.7, abs=0.3) and "resolves (interval excludes 0): none" in text


def test_eval_size():
    assert eval_size("embedded", 200) == 200 and eval_size("embedded", None) == 200  # tiny/data/test.jsonl: 200 rows
    assert eval_size("embedded", 1000) == 200 and eval_size("gsm8k", None) == 1319 and eval_size("math", 64) == 64
    assert eval_size("my.jsonl", None) is None and eval_size("my.jsonl", 30) == 30

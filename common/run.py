"""A run's plumbing, so that a script shows the algorithm: flags and the real-model table, the run directory,
metrics and wandb, SIGINT/SIGTERM, the non-finite guard, checkpoints and the final save.

A script uses it like this (nanoGPT keeps resume to a few visible lines; so do the scripts):

    run = Run(Args, REAL_MODEL)             # parses the flags; --resume brings the run's own flags back
    args = run.args
    ...                                     # model, optimizer, the algorithm's own state
    if run.state:                           # resuming: every state dict back, then the RNG states
        model.load_state_dict(run.state["model"]); ...; run.restore_rng()
    for global_step in range(run.step + 1, args.total_steps + 1):
        ...
        run.check_grad_norm(grad_norm, global_step)   # before optimizer.step(): a NaN stops the run, names the
        run.log(metrics, global_step)                 # last good checkpoint; metrics.jsonl (+ wandb with --track)
        if run.should_save(global_step):
            run.save(global_step, {"model": model.state_dict(), ...})
        if run.stop_requested: run.exit(global_step)  # after SIGINT/SIGTERM: the step was saved above
    run.finish(model, tokenizer)            # the final model in HF format, atomically

Checkpoints hold what the script passes plus the RNG states, the step, the run's flags and its wandb id
(`common/checkpoint.py` writes them atomically); a resumed run continues bit for bit.

Before any model loads, Run checks every flag against `CHECKS` (a bad value is one UserError naming the flag, the
value and what is valid), chooses the preset (`choose_preset`: the embedded model's defaults or REAL_MODEL's) and
sets the console (quiet; --verbose shows vLLM's and other libraries' INFO logs). `final/` holds `minirlvr.json` (the
preset and the run's flags), so a model saved by a run keeps its preset when it is trained further. `finish` prints
a summary: accuracy, time by phase, tokens/s, where the files are, the commands to evaluate and to resume.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import signal
import sys
import time
from dataclasses import asdict
from pathlib import Path

import tyro

from common import dist, vllm_engine
from common.checkpoint import list_checkpoints, load_checkpoint, load_objects, save_objects, set_rng_state
from common.data import DEFAULT_INSTRUCTION, EMBEDDED_INSTRUCTION, EMBEDDED_MODEL, UserError, save_model_and_tokenizer

# A real model's settings (the papers': 1k-token responses, micro-batches that fit a GPU, gradient checkpointing,
# GSM8K). Args' defaults are the embedded tiny model's; with any other --model, every key here that was not given
# on the command line takes this value. A script adds its own (its learning rate, at least) to this table.
REAL_MODEL = dict(dataset="gsm8k", max_new_tokens=1024, total_steps=500, micro_batch_size=8,
                  gradient_checkpointing=True, eval_every=50, eval_limit=None)

RUN_FILE = "minirlvr.json"  # in final/: the preset and the flags of the run that saved the model


def _none_or(check):
    return lambda v: v is None or check(v)


# Flag checks, run before any model loads: field -> (valid?, what is valid). A field a script lacks is skipped.
CHECKS = {
    "group_size": (lambda v: v >= 2, ">= 2 (advantages compare the completions of a prompt; one has no std)"),
    "prompts_per_step": (lambda v: v >= 1, ">= 1"),
    "max_new_tokens": (lambda v: v >= 1, ">= 1"),
    "max_prompt_len": (lambda v: v >= 1, ">= 1"),
    "temperature": (lambda v: v > 0, "> 0 (log-probs are computed at this temperature; 0 is greedy, not a policy)"),
    "top_p": (lambda v: 0 < v <= 1, "in (0, 1]"),
    "vllm_gpu_memory_utilization": (lambda v: 0 < v <= 1, "in (0, 1]"),
    "vllm_tensor_parallel_size": (lambda v: v >= 1 and dist.WORLD % v == 0,
                                  f">= 1 and divide the number of ranks ({dist.WORLD}): an engine is a group of ranks"),
    "tis_cap": (_none_or(lambda v: v > 0), "> 0, or None (off)"),
    "total_steps": (lambda v: v >= 1, ">= 1"),
    "learning_rate": (lambda v: v > 0, "> 0"),
    "weight_decay": (lambda v: v >= 0, ">= 0"),
    "warmup_steps": (lambda v: v >= 0, ">= 0"),
    "max_grad_norm": (lambda v: v > 0, "> 0"),
    "num_minibatches": (lambda v: v >= 1, ">= 1"),
    "update_epochs": (lambda v: v >= 1, ">= 1"),
    "micro_batch_size": (lambda v: v >= 1, ">= 1"),
    "adv_eps": (lambda v: v >= 0, ">= 0"),
    "eps_low": (lambda v: 0 <= v < 1, "in [0, 1) (the ratio is clipped below at 1 - eps_low)"),
    "eps_high": (lambda v: v >= 0, ">= 0"),
    "beta": (lambda v: v >= 0, ">= 0"),
    "dual_clip": (_none_or(lambda v: v > 1), "> 1, or None (off)"),
    "eval_every": (lambda v: v >= 0, ">= 0 (0: no evaluation)"),
    "eval_limit": (_none_or(lambda v: v >= 1), ">= 1, or None (every held-out problem)"),
    "save_every": (lambda v: v >= 0, ">= 0 (0: no checkpoints)"),
    "keep_last": (lambda v: v >= 1, ">= 1"),
    "reward_timeout_s": (lambda v: v > 0, "> 0"),
    "reward_workers": (lambda v: v >= 1, ">= 1"),
    # CLIPO
    "head_dim": (lambda v: v >= 1, ">= 1"),
    "head_lr": (lambda v: v > 0, "> 0"),
    "head_weight_decay": (lambda v: v >= 0, ">= 0"),
    "head_warmup_steps": (lambda v: v >= 0, ">= 0"),
    "tau": (lambda v: v > 0, "> 0 (a temperature divides by it)"),
    "bonus_coef": (lambda v: v >= 0, ">= 0 (the bonus -lambda * L_i rewards agreement with the correct answers)"),
    "bonus_min": (lambda v: v <= 0, "<= 0 (the bonus is <= 0; it is clamped from below at this value)"),
    "supcon_eps": (lambda v: v >= 0, ">= 0"),
    # ConSPO
    "max_margin": (lambda v: v >= 0, ">= 0"),
    "margin_alpha": (lambda v: 0 < v <= 1, "in (0, 1] (a fraction of --total-steps)"),
    # CEPO
    "lambda_init": (lambda v: 0 <= v <= 1, "in [0, 1] (the teachers' share of the advantage weight)"),
    "lambda_decay_steps": (lambda v: v >= 0, ">= 0"),
    "eps_w": (lambda v: 0 <= v < 1, "in [0, 1) (token weights are clipped to [1 - eps_w, 1 + eps_w])"),
    # R2PO
    "head_steps": (lambda v: v >= 0, ">= 0"),
    "policy_steps": (lambda v: v >= 1, ">= 1"),
    "head_learning_rate": (lambda v: v > 0, "> 0"),
    "head_init_std": (lambda v: v >= 0, ">= 0"),
    "rollout_temperature": (lambda v: v > 0, "> 0"),
}


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def check_flags(args) -> None:
    """One UserError naming every flag with an invalid value or combination, and what is valid."""
    errors = [f"{flag(name)} {getattr(args, name)!r} is invalid: it must be {what}"
              for name, (valid, what) in CHECKS.items() if hasattr(args, name) and not valid(getattr(args, name))]
    if dist.WORLD > 1 and hasattr(args, "prompts_per_step") and args.prompts_per_step % dist.WORLD:
        errors.append(f"--prompts-per-step {args.prompts_per_step} is invalid under torchrun with {dist.WORLD} ranks: "
                      f"each rank takes whole groups, so it must be a multiple of {dist.WORLD}")
    if not errors and hasattr(args, "num_minibatches"):
        n = args.prompts_per_step * args.group_size
        if args.num_minibatches > n:
            errors.append(f"--num-minibatches {args.num_minibatches} is invalid: a rollout batch holds "
                          f"--prompts-per-step x --group-size = {n} sequences, so it must be in [1, {n}] (every "
                          f"mini-batch needs at least one)")
    if errors:
        raise UserError("; ".join(errors) + ". `python <script>.py --help` describes every flag.")


def _architecture(model_dir: Path) -> dict | None:
    keys = ("model_type", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
            "num_attention_heads", "num_key_value_heads", "max_position_embeddings")
    try:
        config = json.loads((model_dir / "config.json").read_text())
    except (OSError, ValueError):
        return None
    return {k: config.get(k) for k in keys}


def choose_preset(model: str) -> tuple[str, str]:
    """("embedded" or "real", why): the settings a --model gets where no flag is given.

    `embedded`, a model saved by a run of the embedded preset (its final/minirlvr.json says so), or a local dir with
    the embedded model's architecture and vocabulary: Args' defaults. Anything else: REAL_MODEL's values."""
    if model == "embedded":
        return "embedded", "--model embedded"
    saved = Path(model) / RUN_FILE
    if saved.is_file():
        try:
            preset = json.loads(saved.read_text())["preset"]
        except (ValueError, KeyError, TypeError) as e:
            raise UserError(f"{saved} is not a minirlvr run file ({type(e).__name__}: {e}); a run's final/ writes "
                            f"it. Delete it to choose the preset from the model alone.") from None
        if preset in ("embedded", "real"):
            return preset, f"{saved} says the run that saved this model used the {preset} preset"
    architecture = _architecture(Path(model))
    if architecture is not None and architecture == _architecture(EMBEDDED_MODEL):
        return "embedded", f"{Path(model) / 'config.json'} has the embedded model's architecture and vocabulary"
    return "real", f"{model!r} is not the embedded model"


def given_flags(argv: list[str]) -> set[str]:
    """Field names of the flags on a command line (`--learning-rate 1e-5`, `--no-vllm`, `--eval-limit=8`)."""
    names = set()
    for arg in argv:
        if arg.startswith("--"):
            name = arg[2:].split("=")[0].replace("-", "_")
            names.add(name)
            if name.startswith("no_"):
                names.add(name[3:])
    return names


class Run:
    """The run directory and everything written to it; see the module docstring."""

    def __init__(self, Args, real_model: dict, argv: list[str] | None = None):
        self.start_time = time.time()
        dist.init()  # under torchrun: join the job (rank 0 alone prints and writes); one process: nothing
        argv = sys.argv[1:] if argv is None else argv
        self.script = os.path.basename(getattr(sys.modules.get(Args.__module__), "__file__", None) or "grpo.py")
        args = tyro.cli(Args, args=argv)
        set_console(getattr(args, "verbose", False))
        self.state, self.step = None, 0
        if args.resume:  # the run's own flags come back; flags given now override them
            self.state, self.checkpoint_path = load_checkpoint(args.resume)
            args = tyro.cli(Args, args=argv, default=Args(**{**self.state["args"], "resume": args.resume}))
            set_console(getattr(args, "verbose", False))
            self.dir = self.checkpoint_path.parent.parent
            self.step = self.state["step"]
            self.preset = self.state.get("preset", "embedded" if args.model == "embedded" else "real")
            print(f"preset: {self.preset} (the resumed run's flags; flags given now override them)")
        else:
            self.preset, why = choose_preset(args.model)
            if self.preset == "real":
                unset = {k: v for k, v in real_model.items() if k not in given_flags(argv)}
                for key, value in unset.items():
                    setattr(args, key, value)
                print(f"preset: real model ({why}): {', '.join(f'{k}={v}' for k, v in unset.items())}; "
                      f"flags given override them")
            else:
                print(f"preset: embedded ({why}): "
                      f"{', '.join(f'{k}={getattr(args, k)}' for k in real_model if hasattr(args, k))}")
            args.run_name = dist.broadcast(f"{args.exp_name}__{args.seed}__{int(time.time())}")
            self.dir = Path(args.output_dir) / args.run_name
        if args.instruction is None:
            args.instruction = EMBEDDED_INSTRUCTION if args.dataset == "embedded" else DEFAULT_INSTRUCTION
        check_flags(args)  # before any model loads or anything is written
        self.args = args
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            (self.dir / f".write_test{dist.RANK}").touch()
            (self.dir / f".write_test{dist.RANK}").unlink()
        except OSError as e:
            raise UserError(f"output directory {str(self.dir)!r} is not writable ({e.strerror}). "
                            f"Pass --output-dir a folder you can write to.") from None
        self.metrics_path = self.dir / "metrics.jsonl"
        if self.metrics_path.exists() and dist.is_main():  # drop the lines a killed run wrote after its last checkpoint
            lines = [l for l in self.metrics_path.read_text().splitlines() if json.loads(l)["step"] <= self.step]
            self.metrics_path.write_text("".join(l + "\n" for l in lines))
        # every metric of the run, for the summary; a resumed run's earlier steps come from metrics.jsonl
        self.rows = [json.loads(l) for l in self.metrics_path.read_text().splitlines()] \
            if self.step and self.metrics_path.exists() else []
        self.rows_before = len(self.rows)
        self.wandb_id = self.state["wandb_id"] if self.state else None
        if args.track and dist.is_main():
            import wandb

            # a new run gets its id from wandb; checkpoints keep it, so a resumed run continues the same wandb run
            self.wandb_run = wandb.init(project=args.wandb_project_name, entity=args.wandb_entity,
                                        name=args.run_name, id=self.wandb_id, resume="allow", config=asdict(args),
                                        settings=wandb.Settings(quiet=not getattr(args, "verbose", False)))
            self.wandb_id, self.wandb_config = self.wandb_run.id, asdict(args)
        self.signals = []
        for sig in (signal.SIGINT, signal.SIGTERM):  # finish the step, save, exit cleanly
            signal.signal(sig, lambda signum, frame: self.signals.append(signum))

    def load(self, objects: dict) -> None:
        """Resume: each object's state from the checkpoint (`objects` is laid out as given to `save`), then the RNG
        states. Call it after every object that draws random numbers at creation."""
        load_objects(self.checkpoint_path, self.state, objects)
        set_rng_state(self.state["rng"])
        print(f"resumed {self.args.run_name} at step {self.step} from {self.checkpoint_path}")

    def last_checkpoint(self) -> str:
        last = list_checkpoints(self.dir / "checkpoints")
        return str(last[-1]) if last else "none (use --save-every N)"

    def check_grad_norm(self, grad_norm, step: int) -> None:
        """Stop before the optimizer step when the gradient is NaN/inf: nothing is updated or overwritten."""
        if not math.isfinite(float(grad_norm)):
            _close_progress_bars()
            raise UserError(f"step {step}: the gradient norm is {float(grad_norm)} (NaN or inf); nothing was updated "
                            f"or overwritten. Last good checkpoint: {self.last_checkpoint()}. Lower the learning "
                            f"rate or check the data.")

    def log(self, metrics: dict, step: int) -> None:
        """One line of metrics.jsonl (and wandb with --track); a non-finite metric stops the run first. Under
        torchrun every rank calls it, and rank 0 writes the metrics of all ranks, reduced (common/dist.py)."""
        metrics = {"step": step, **dist.reduce_metrics({k: float(v) for k, v in metrics.items()})}
        for key, value in metrics.items():
            if not math.isfinite(value):
                _close_progress_bars()
                raise UserError(f"step {step}: metric {key} is {value}. Last good checkpoint: "
                                f"{self.last_checkpoint()}.")
        self.rows.append(metrics)
        if not dist.is_main():
            return
        with open(self.metrics_path, "a") as f:
            f.write(json.dumps(metrics) + "\n")
        if self.args.track:
            import wandb

            if asdict(self.args) != self.wandb_config:  # a flag the script changed (e.g. max_prompt_len to fit)
                self.wandb_config = asdict(self.args)
                wandb.config.update(self.wandb_config, allow_val_change=True)
            wandb.log(metrics, step=step)

    @property
    def stop_requested(self) -> bool:
        return bool(self.signals)

    def should_save(self, step: int) -> bool:
        if dist.any_rank(self.stop_requested):  # under torchrun a signal to any rank stops all of them
            self.signals = self.signals or [signal.SIGTERM]
        return bool(self.args.save_every and step % self.args.save_every == 0) or self.stop_requested

    def save(self, step: int, objects: dict) -> Path:
        """A checkpoint of `objects` (the script's model, optimizer, ...: each saved by its state_dict(), nested dicts
        kept) with the RNG states, the step, the flags, the wandb id. Under torchrun the sharded model and optimizer
        are written by every rank with torch.distributed.checkpoint (common/checkpoint.py)."""
        meta = {"step": step, "wandb_id": self.wandb_id, "run_name": self.args.run_name, "args": asdict(self.args),
                "preset": self.preset}
        return save_objects(self.dir / "checkpoints", step, objects, meta, self.args.keep_last)

    def exit(self, step: int) -> None:
        print(f"stopped by signal {self.signals[0]} after step {step}; resume with --resume {self.dir}")
        dist.close()
        sys.exit(0)

    def finish(self, model, tokenizer) -> Path:
        """The final model in HF format (weights + tokenizer + RUN_FILE), written under a temporary name, then
        renamed; then the run's summary. Under torchrun every rank gathers the sharded weights, rank 0 writes."""
        final, tmp = self.dir / "final", self.dir / ".tmp_final"
        state_dict = None
        if dist.is_sharded(model):
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

            state_dict = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
            if getattr(model.config, "tie_word_embeddings", False):  # gathered apart; saved once, as one process does
                state_dict.pop("lm_head.weight", None)
        if not dist.is_main():
            dist.close()
            return final
        save_model_and_tokenizer(model, tokenizer, tmp, state_dict)  # reloads exactly, in plain transformers too
        step = max((row["step"] for row in self.rows), default=self.step)
        (tmp / RUN_FILE).write_text(json.dumps({"preset": self.preset, "script": self.script, "step": step,
                                                "run_dir": str(self.dir), "args": asdict(self.args)}, indent=1))
        if final.exists():
            shutil.rmtree(final)
        os.rename(tmp, final)
        wandb_where = None
        if self.args.track:
            import wandb

            wandb_where = str(Path(self.wandb_run.dir).parent) if self.wandb_run.offline else self.wandb_run.url
            wandb.finish()
        print(self.summary(final, wandb_where))
        dist.close()
        return final

    def summary(self, final: Path, wandb_where: str | None = None) -> str:
        """What the run did and where its files are, from every logged metric (a resumed run's earlier ones too)."""
        rows, lines = self.rows, []
        first, last = (rows[0]["step"], rows[-1]["step"]) if rows else (0, 0)
        lines.append(f"done: {self.args.run_name}, steps {first}-{last} ({self.script}, {self.preset} preset)")
        evals = [(row["step"], row["eval/accuracy"]) for row in rows if "eval/accuracy" in row]
        if evals:
            best = max(evals, key=lambda e: e[1])  # the first step that reached the best accuracy
            lines.append(f"  eval/accuracy: {evals[0][1]:.3f} (step {evals[0][0]}) -> {evals[-1][1]:.3f} "
                         f"(step {evals[-1][0]}); best {best[1]:.3f} (step {best[0]})")
        else:
            lines.append("  eval/accuracy: not evaluated (--eval-every 0, or no held-out set)")
        phases = {k[len("time/"):]: sum(row.get(k, 0.0) for row in rows)
                  for k in ("time/generate", "time/sync_weights", "time/reward", "time/train", "time/eval")}
        total = sum(phases.values())
        here = rows[self.rows_before:]  # the steps of this process (a resumed run's earlier ones are in rows)
        here = f"steps {here[0]['step']}-{here[-1]['step']}" if here else "no step"
        lines.append("  time by phase: " + ", ".join(f"{k} {v:.1f} s ({v / max(total, 1e-9):.0%})"
                                                     for k, v in phases.items()) + f"; {total:.1f} s in all")
        lines.append(f"  wall time of this process: {time.time() - self.start_time:.0f} s ({here}, loading included)")
        tokens = sum(row["completions/mean_length"] * self.args.prompts_per_step * self.args.group_size
                     for row in rows if "completions/mean_length" in row)
        if phases["generate"] > 0:
            lines.append(f"  rollout: {tokens / phases['generate']:.0f} tokens/s ({tokens:,.0f} sampled completion "
                         f"tokens in {phases['generate']:.1f} s of generate)")
        lines.append(f"  model: {final} (its {RUN_FILE}: the preset and the flags)")
        lines.append(f"  metrics: {self.metrics_path}" + (f"; wandb: {wandb_where}" if wandb_where else ""))
        lines.append(f"  evaluate: python -m common.evaluate --model {final}")
        checkpoints = list_checkpoints(self.dir / "checkpoints")
        if checkpoints:
            ckpt_step = int(checkpoints[-1].name[len("step_"):])
            launch = f"torchrun --nproc-per-node {os.environ.get('LOCAL_WORLD_SIZE', dist.WORLD)}" \
                if dist.ON else "python"  # the same launch as this run's
            lines.append(f"  resume: {launch} {self.script} --resume {self.dir} "
                         f"--total-steps {2 * self.args.total_steps}"
                         f"  (from step {ckpt_step}; any --total-steps above {ckpt_step} trains further)")
        else:
            lines.append(f"  resume: no checkpoint in {self.dir} (train with --save-every N to resume)")
        return "\n".join(lines)


def set_console(verbose: bool) -> None:
    """Quiet by default: the scripts' own lines, the progress bar, warnings and errors. --verbose: vLLM's and
    transformers' INFO logs and loading bars too. Called before any model loads (vLLM reads its level then)."""
    from transformers.utils import logging as hf_logging

    vllm_engine.set_verbose(verbose)
    hf_logging.set_verbosity_info() if verbose else hf_logging.set_verbosity_warning()
    hf_logging.enable_progress_bar() if verbose else hf_logging.disable_progress_bar()
    if not verbose and not os.environ.get("HF_HUB_DISABLE_PROGRESS_BARS"):  # downloads keep their bars
        from huggingface_hub.utils import enable_progress_bars

        enable_progress_bars()


def _close_progress_bars() -> None:
    """End the line of a running tqdm bar, so that an error raised inside the loop starts on its own line."""
    from tqdm import tqdm

    for bar in list(getattr(tqdm, "_instances", [])):
        bar.close()

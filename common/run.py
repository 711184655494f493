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

from common.checkpoint import list_checkpoints, load_checkpoint, rng_state, save_checkpoint, set_rng_state
from common.data import DEFAULT_INSTRUCTION, EMBEDDED_INSTRUCTION, UserError

# A real model's settings (the papers': 1k-token responses, micro-batches that fit a GPU, gradient checkpointing,
# GSM8K). Args' defaults are the embedded tiny model's; with any other --model, every key here that was not given
# on the command line takes this value. A script adds its own (its learning rate, at least) to this table.
REAL_MODEL = dict(dataset="gsm8k", max_new_tokens=1024, total_steps=500, micro_batch_size=8,
                  gradient_checkpointing=True, eval_every=50, eval_limit=None)


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
        argv = sys.argv[1:] if argv is None else argv
        args = tyro.cli(Args, args=argv)
        self.state, self.step = None, 0
        if args.resume:  # the run's own flags come back; flags given now override them
            self.state, self.checkpoint_path = load_checkpoint(args.resume)
            args = tyro.cli(Args, args=argv, default=Args(**{**self.state["args"], "resume": args.resume}))
            self.dir = self.checkpoint_path.parent.parent
            self.step = self.state["step"]
        else:
            if args.model != "embedded":
                unset = {k: v for k, v in real_model.items() if k not in given_flags(argv)}
                for key, value in unset.items():
                    setattr(args, key, value)
                print(f"model {args.model!r} is not the embedded one: a real model's settings apply "
                      f"({', '.join(f'{k}={v}' for k, v in unset.items())}); flags given override them")
            args.run_name = f"{args.exp_name}__{args.seed}__{int(time.time())}"
            self.dir = Path(args.output_dir) / args.run_name
        if args.instruction is None:
            args.instruction = EMBEDDED_INSTRUCTION if args.dataset == "embedded" else DEFAULT_INSTRUCTION
        self.args = args
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            (self.dir / ".write_test").touch()
            (self.dir / ".write_test").unlink()
        except OSError as e:
            raise UserError(f"output directory {str(self.dir)!r} is not writable ({e.strerror}). "
                            f"Pass --output-dir a folder you can write to.") from None
        self.metrics_path = self.dir / "metrics.jsonl"
        if self.metrics_path.exists():  # drop the lines a killed run wrote after its last checkpoint
            lines = [l for l in self.metrics_path.read_text().splitlines() if json.loads(l)["step"] <= self.step]
            self.metrics_path.write_text("".join(l + "\n" for l in lines))
        self.wandb_id = self.state["wandb_id"] if self.state else None
        if args.track:
            import wandb

            self.wandb_id = self.wandb_id or wandb.util.generate_id()
            wandb.init(project=args.wandb_project_name, entity=args.wandb_entity, name=args.run_name,
                       id=self.wandb_id, resume="allow", config=asdict(args))
        self.signals = []
        for sig in (signal.SIGINT, signal.SIGTERM):  # finish the step, save, exit cleanly
            signal.signal(sig, lambda signum, frame: self.signals.append(signum))

    def restore_rng(self) -> None:
        """The RNG states of the checkpoint: call it after every object that draws random numbers at creation."""
        set_rng_state(self.state["rng"])
        print(f"resumed {self.args.run_name} at step {self.step} from {self.checkpoint_path}")

    def last_checkpoint(self) -> str:
        last = list_checkpoints(self.dir / "checkpoints")
        return str(last[-1]) if last else "none (use --save-every N)"

    def check_grad_norm(self, grad_norm, step: int) -> None:
        """Stop before the optimizer step when the gradient is NaN/inf: nothing is updated or overwritten."""
        if not math.isfinite(float(grad_norm)):
            raise UserError(f"step {step}: the gradient norm is {float(grad_norm)} (NaN or inf); nothing was updated "
                            f"or overwritten. Last good checkpoint: {self.last_checkpoint()}. Lower the learning "
                            f"rate or check the data.")

    def log(self, metrics: dict, step: int) -> None:
        """One line of metrics.jsonl (and wandb with --track); a non-finite metric stops the run first."""
        metrics = {"step": step, **{k: float(v) for k, v in metrics.items()}}
        for key, value in metrics.items():
            if not math.isfinite(value):
                raise UserError(f"step {step}: metric {key} is {value}. Last good checkpoint: "
                                f"{self.last_checkpoint()}.")
        with open(self.metrics_path, "a") as f:
            f.write(json.dumps(metrics) + "\n")
        if self.args.track:
            import wandb

            wandb.log(metrics, step=step)

    @property
    def stop_requested(self) -> bool:
        return bool(self.signals)

    def should_save(self, step: int) -> bool:
        return bool(self.args.save_every and step % self.args.save_every == 0) or self.stop_requested

    def save(self, step: int, state: dict) -> Path:
        """A checkpoint of `state` (the script's state dicts) with the RNG states, the step, the flags, the wandb id."""
        state = {**state, "rng": rng_state(), "step": step, "wandb_id": self.wandb_id, "run_name": self.args.run_name,
                 "args": asdict(self.args)}
        return save_checkpoint(self.dir / "checkpoints", step, state, self.args.keep_last)

    def exit(self, step: int) -> None:
        print(f"stopped by signal {self.signals[0]} after step {step}; resume with --resume {self.dir}")
        sys.exit(0)

    def finish(self, model, tokenizer) -> Path:
        """The final model in HF format (weights + tokenizer), written under a temporary name, then renamed."""
        final, tmp = self.dir / "final", self.dir / ".tmp_final"
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        if final.exists():
            shutil.rmtree(final)
        os.rename(tmp, final)
        print(f"saved {final}")
        if self.args.track:
            import wandb

            wandb.finish()
        return final

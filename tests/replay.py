"""Replay: run a script's real `__main__` on hand-built rollouts, with a spy on its functions.

    result = replay("clipo.py", rollouts, tmp_path, flags=[...], spy=["compute_advantages", "contrastive_bonus"])
    result.calls("contrastive_bonus")[0]["ret"]       # what the function returned, in that call
    result.calls("grpo_loss", step=2)                 # the calls of the second rollout step
    result.run_dir / "final"                          # the model the script saved

What is replaced, and why (everything else is the script's own code on real parts: the tiny model in tiny/model,
its tokenizer, the math-verify reward workers, the optimizers, checkpoints and the final save):
- the SAMPLER. A test of the loop's direction needs a batch it chose: groups whose rewards, and so whose advantages,
  are known, completions that differ in known tokens. A sampler cannot be told which completions to produce. So
  - HF path (`--no-vllm`, added by `replay` when `engine` is None): `GenerationMixin.generate` is patched, so
    `common.hf_engine.HFEngine` (R2PO's explorer too) gets back, for each prompt it was given, the
    hand-built completion ids of that prompt, laid out as `model.generate` lays them out (the left-padded prompt,
    then the completion padded with pad_id);
  - engine path (`engine=dict(sampler_delta=[...])`, `--vllm` added): `common.vllm_engine.VLLMEngine` and
    `vllm_available` are replaced, before the script imports them, by `ReplayEngine`, which has the engine's calls
    (wake_up, sleep, push_weights, generate -> RolloutBatch) and returns the hand-built completion ids AND
    hand-built sampler log-probs: the log-prob of each completion token under the weights pushed to it (a plain HF
    forward at the requested temperature) minus a known delta, `sampler_delta[t % len(sampler_delta)]` at
    completion position t.
    A real engine's log-probs match the trainer's to ~1e-5, so truncated importance weights against it would all
    be ~1 and could not tell pi_old / pi_sampler from its inverse.
  Completions are answered by the prompt's ids (decoded, matched to a question), never by position: the script
  walks its training set in a permutation seeded by --seed.
- nothing else. The SPY only watches: `sys.setprofile` records, for each call of a named function defined in the
  script (the function's code lives in the script file, whether module-level or nested in `__main__`), its
  arguments at entry, its return value, and the caller's `micro` (the micro-batch's row indices, when the caller is the
  loop), all cloned to CPU (tensors the loop later writes in place are copied at the time of the call). Objects
  that are not tensors, numbers, strings or containers of them are recorded as '<TypeName>'. The replay adds a
  mark at each sampling call (not a greedy one), which is where a rollout step begins. The records are written with
  torch.save when the script ends, whether it ends cleanly or not.

The script runs in a subprocess (`python tests/replay.py SPEC.json`) with `runpy.run_path(script,
run_name="__main__")` and sys.argv set, so each run starts from a fresh interpreter, as a user's would. It runs on
the CPU (CUDA_VISIBLE_DEVICES=""), also on a GPU machine: fp32 throughout, so a test can recompute the loop's
log-probs to ~1e-6.
"""
from __future__ import annotations

import json
import os
import runpy
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
CALLER_LOCALS = ("micro",)  # read from the caller's frame at each spied call (the loop's micro-batch rows)
ROLLOUT_MARK = "<rollouts>"  # the record the replay adds at each sampling (not greedy) call: a rollout step begins
RECORDS: list[dict] = []  # the subprocess's records: the spy's and the replay's marks, in order


# --- the test side ------------------------------------------------------------------------------------------------

def write_dataset(path: Path, problems: list[tuple[str, int]]) -> Path:
    """A .jsonl in GSM8K's schema (question, answer ending '#### N'), as tiny/data is."""
    with open(path, "w") as f:
        for question, answer in problems:
            f.write(json.dumps({"question": question, "answer": f"{answer}\n#### {answer}"}) + "\n")
    return path


@dataclass
class Replay:
    proc: subprocess.CompletedProcess
    records: list[dict]
    run_dir: Path | None

    def calls(self, name: str, step: int | None = None) -> list[dict]:
        """The spied calls of `name` in the order they returned, each a dict of 'args' (name -> value at entry),
        'ret' and 'caller'; `step` (1-based): only those that returned after the step's sampling call (the replay
        marks each one) and before the next step's."""
        records, k = [], 0
        for r in self.records:
            k += r["name"] == ROLLOUT_MARK
            if r["name"] == name and step in (None, k):
                records.append(r)
        return records


def replay(script: str, rollouts: dict[str, list[str]], tmp_path: Path, *, flags=(), spy=(), engine=None,
           timeout: float = 300, ranks: int = 1) -> Replay:
    """Run ROOT/script's `__main__` once on hand-built rollouts; fails the test if the script fails.

    rollouts: question -> the completion texts of its group (G of them); each becomes its token ids + EOS.
    flags: the script's flags (--output-dir is set here, and --vllm or --no-vllm: the default is vLLM on CUDA only).
    spy: names of functions defined in the script whose calls are recorded.
    engine: None (HF generate), or dict(sampler_delta=[floats]) for the replay engine (see the module docstring).
    ranks: > 1 runs the script under `torchrun --standalone --nproc-per-node RANKS` (gloo); the records are rank 0's.
    """
    out = tmp_path / "runs"
    argv = [*flags, "--output-dir", str(out)] + (["--vllm"] if engine else ["--no-vllm"])
    spec = {"script": str(ROOT / script), "argv": argv, "rollouts": rollouts, "spy": list(spy),
            "engine": engine, "records": str(tmp_path / "spy.pt")}
    spec_path = tmp_path / "replay.json"
    spec_path.write_text(json.dumps(spec))
    # CPU only, also on a GPU machine: fp32 everywhere (no bf16 autocast), so the loop's log-probs match the tests'
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled", "TOKENIZERS_PARALLELISM": "false",
           "CUDA_VISIBLE_DEVICES": ""}
    launch = [sys.executable] if ranks == 1 else [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                                  "--nproc-per-node", str(ranks)]
    proc = subprocess.run([*launch, __file__, str(spec_path)], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    records = torch.load(tmp_path / "spy.pt", weights_only=False)
    runs = sorted(out.iterdir()) if out.exists() else []
    return Replay(proc, records, runs[0] if len(runs) == 1 else None)


# --- the subprocess side ------------------------------------------------------------------------------------------

def _snapshot(value, depth: int = 0):
    if isinstance(value, torch.Tensor):
        return value.detach().to("cpu", copy=True)
    if value is None or isinstance(value, (bool, int, float, str, slice)):
        return value
    if depth < 4 and type(value) in (list, tuple):
        return type(value)([_snapshot(v, depth + 1) for v in value])
    if depth < 4 and type(value) is dict:
        return {k: _snapshot(v, depth + 1) for k, v in value.items()}
    return f"<{type(value).__name__}>"


def _install_spy(script: str, names: set[str], records: list) -> None:
    open_calls = {}  # id(frame) -> its record, until the frame returns

    def profile(frame, event, arg):
        if event == "call":
            code = frame.f_code
            if code.co_name in names and code.co_filename == script:
                n_args = code.co_argcount + code.co_kwonlyargcount
                n_args += bool(code.co_flags & 0x04) + bool(code.co_flags & 0x08)  # *args, **kwargs
                local = frame.f_locals
                caller = frame.f_back.f_locals if frame.f_back is not None else {}
                open_calls[id(frame)] = {
                    "name": code.co_name,
                    "args": {k: _snapshot(local[k]) for k in code.co_varnames[:n_args] if k in local},
                    "caller": {k: _snapshot(caller[k]) for k in CALLER_LOCALS if k in caller},
                }
        elif event == "return":
            record = open_calls.pop(id(frame), None)
            if record is not None:
                record["ret"] = _snapshot(arg)
                records.append(record)

    sys.setprofile(profile)


class _Rollouts:
    """question -> completion ids (text ids + EOS), looked up by a prompt's token ids."""

    def __init__(self, rollouts: dict[str, list[str]]):
        from common.data import EMBEDDED_MODEL, load_tokenizer

        self.tokenizer = load_tokenizer(str(EMBEDDED_MODEL))
        eos = self.tokenizer.eos_token_id
        self.by_question = {q: [self.tokenizer(t, add_special_tokens=False)["input_ids"] + [eos] for t in texts]
                            for q, texts in rollouts.items()}

    def mark(self, prompts) -> None:
        RECORDS.append({"name": ROLLOUT_MARK, "args": {"prompts": _snapshot(prompts)}, "ret": None, "caller": {}})

    def of(self, prompt_ids: list[int], n: int) -> list[list[int]]:
        text = self.tokenizer.decode(prompt_ids, skip_special_tokens=True)
        (question,) = [q for q in self.by_question if text.startswith(q)] or [None]
        if question is None:
            raise KeyError(f"replay: no hand-built rollouts for the prompt {text!r}")
        comps = self.by_question[question]
        if n == 1:  # a greedy call (evaluation): the group's first completion
            return comps[:1]
        if len(comps) != n:
            raise ValueError(f"replay: {len(comps)} completions for {question!r}, the script asked for {n}")
        return comps


def _patch_hf_generate(rollouts: _Rollouts) -> None:
    from transformers.generation.utils import GenerationMixin

    def generate(self, input_ids=None, attention_mask=None, max_new_tokens=None, num_return_sequences=1,
                 pad_token_id=None, do_sample=False, **kwargs):
        if do_sample:
            rollouts.mark(input_ids.tolist())
        rows = []
        for ids, mask in zip(input_ids.tolist(), attention_mask.tolist()):
            prompt = [t for t, m in zip(ids, mask) if m]
            rows += [(ids, c) for c in rollouts.of(prompt, num_return_sequences)]
        width = max(len(c) for _, c in rows)
        if width > max_new_tokens:
            raise ValueError(f"replay: a completion of {width} tokens, but max_new_tokens is {max_new_tokens}")
        return torch.tensor([p + c + [pad_token_id] * (width - len(c)) for p, c in rows], device=input_ids.device)

    GenerationMixin.generate = generate


class ReplayEngine:
    """The calls of common.vllm_engine.VLLMEngine, answering with hand-built completions and sampler log-probs."""

    sampler_delta = [0.0]
    rollouts = None

    def __init__(self, model_dir, **kwargs):
        self.model, self.asleep, self.version = None, False, None

    def wake_up(self):
        self.asleep = False

    def sleep(self):
        self.asleep = True

    def push_weights(self, model, version=None) -> float:
        assert not self.asleep, "push_weights() while asleep"
        self.model = model  # generate() follows the push at once: the weights it reads are the pushed ones
        return 0.0

    def rollout(self, model, version, prompt_ids, **sampling):
        """wake_up, push_weights, generate, sleep in one call (the engine's `rollout`, where it has one)."""
        self.wake_up()
        self.push_weights(model, version)
        batch = self.generate(prompt_ids, **sampling)
        self.sleep()
        return batch

    @torch.no_grad()
    def generate(self, prompt_ids, *, n, temperature, top_p, max_tokens, seed=None):
        from common.vllm_engine import RolloutBatch

        assert not self.asleep and self.model is not None, "generate() before wake_up()/push_weights()"
        if temperature > 0:
            self.rollouts.mark([list(p) for p in prompt_ids])
        completions, logprobs = [], []
        for prompt in prompt_ids:
            for comp in self.rollouts.of(list(prompt), n):
                assert len(comp) <= max_tokens, f"replay: a completion of {len(comp)} tokens > max_tokens {max_tokens}"
                ids = torch.tensor([list(prompt) + comp], device=next(self.model.parameters()).device)
                logits = self.model(input_ids=ids).logits[0, len(prompt) - 1 : -1].float()
                logp = torch.log_softmax(logits / (temperature or 1.0), -1).gather(1, ids[0, len(prompt):, None])[:, 0]
                delta = [self.sampler_delta[t % len(self.sampler_delta)] for t in range(len(comp))]
                completions.append(comp)
                logprobs.append((logp.cpu() - torch.tensor(delta)).tolist())
        return RolloutBatch(completion_ids=completions, logprobs=logprobs, finished=[True] * len(completions),
                            seconds=0.0)

    def close(self):
        pass


def main(spec_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    script = spec["script"]
    sys.path.insert(0, str(ROOT))
    rollouts = _Rollouts(spec["rollouts"])
    if spec["engine"]:
        import common.vllm_engine as vllm_engine

        ReplayEngine.rollouts, ReplayEngine.sampler_delta = rollouts, spec["engine"]["sampler_delta"]
        vllm_engine.VLLMEngine, vllm_engine.vllm_available = ReplayEngine, lambda: True
    else:
        _patch_hf_generate(rollouts)
    sys.argv = [script, *spec["argv"]]
    _install_spy(script, set(spec["spy"]), RECORDS)
    try:
        runpy.run_path(script, run_name="__main__")
    finally:
        sys.setprofile(None)
        rank = int(os.environ.get("RANK", 0))  # under torchrun: rank 0's records are the test's
        torch.save(RECORDS, spec["records"] + (f".rank{rank}" if rank else ""))


if __name__ == "__main__":
    t0 = time.time()
    main(sys.argv[1])
    print(f"replay: {time.time() - t0:.1f} s", file=sys.stderr)

"""Greedy accuracy on held-out problems, through the run's rollout engine and reward checker; and, run as a
module, the eval-only command: greedy accuracy, avg@k and pass@k of a saved or hub model, without training.

    python -m common.evaluate --model runs/<run>/final            # the settings the run was trained with
    python -m common.evaluate --model Qwen2.5-1.5B --dataset math --samples 8 --temperature 1.0
    python -m common.evaluate --model embedded --samples 16 --output results.json

The prompts are built as training builds them (common/data.py: the same instruction, chat template and length
cut), and scored by the same reward (common.reward.RewardChecker). Settings: flags given here, else the run's own
(a dir written by a run: its minirlvr.json, or the newest checkpoint of the run it sits in), else the dataset's
defaults (the embedded preset, or a real model's). Details: README.md#evaluate-a-model.
"""
from __future__ import annotations

import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal, Optional

import torch

from common import dist


def greedy_scores(engine, model, version, examples, tokenizer, checker, max_tokens: int,
                  batch_size: int = 256) -> list[float]:
    """1.0 or 0.0 per example: does the checker accept its greedy completion."""
    scores = []
    for s in range(0, len(examples), batch_size):
        chunk = examples[s : s + batch_size]
        out = engine.rollout(model, version, [e.prompt_ids for e in chunk], n=1, temperature=0.0, top_p=1.0,
                             max_tokens=max_tokens)
        texts = tokenizer.batch_decode(out.completion_ids, skip_special_tokens=True)
        scores += checker.score(texts, [e.gold for e in chunk])
    return scores


def evaluate(engine, model, version, examples, tokenizer, checker, max_tokens: int,
             batch_size: int = 256) -> tuple[float, float]:
    """(share of `examples` whose greedy completion the checker accepts, seconds). `engine.rollout` loads the
    model's weights first when `version` (the trainer's step) is not the one it holds."""
    start = time.time()
    if dist.WORLD == 1:
        scores = greedy_scores(engine, model, version, examples, tokenizer, checker, max_tokens, batch_size)
        return sum(scores) / max(len(examples), 1), time.time() - start
    # under torchrun: each rank scores every WORLD-th example, padded to one length (the same number of generate
    # calls on every rank: a sharded model's forward is a collective), and the correct counts are summed
    mine = examples[dist.RANK :: dist.WORLD]
    padded = mine + examples[: -(-len(examples) // dist.WORLD) - len(mine)]
    scores = greedy_scores(engine, model, version, padded, tokenizer, checker, max_tokens, batch_size)
    return dist.total(sum(scores[: len(mine)])) / max(len(examples), 1), time.time() - start


def sample_correct(engine, model, version, examples, tokenizer, checker, max_tokens: int, n: int,
                   temperature: float, top_p: float, seed: int, batch_size: int = 256) -> list[int]:
    """How many of n sampled completions of each example the checker accepts."""
    counts, per_call = [], max(batch_size // n, 1)
    for call, s in enumerate(range(0, len(examples), per_call)):
        chunk = examples[s : s + per_call]
        out = engine.rollout(model, version, [e.prompt_ids for e in chunk], n=n, temperature=temperature,
                             top_p=top_p, max_tokens=max_tokens, seed=seed * 1_000_003 + call)
        texts = tokenizer.batch_decode(out.completion_ids, skip_special_tokens=True)
        scores = checker.score(texts, [e.gold for e in chunk for _ in range(n)])  # grouped: example 0's n first
        counts += [int(sum(scores[i * n : (i + 1) * n])) for i in range(len(chunk))]
    return counts


def pass_at_k(n: int, c: int, k: int) -> float:
    """The unbiased pass@k of one problem with c correct among n samples (Chen et al. 2021, arXiv 2107.03374):
    1 - C(n - c, k) / C(n, k), the chance that k of the n samples drawn without replacement hold a correct one."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"need 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def avg_at_k(correct: list[int], n: int) -> float:
    """Mean accuracy of the n samples: the share of correct samples, averaged over problems."""
    return sum(c / n for c in correct) / max(len(correct), 1)


def mean_pass_at_k(correct: list[int], n: int, k: int) -> float:
    return sum(pass_at_k(n, c, k) for c in correct) / max(len(correct), 1)


@dataclass
class Args:
    model: str = "embedded"
    """a local HF model dir (e.g. runs/<run>/final), a hub id, a bare Qwen name, or `embedded`"""
    dataset: Optional[str] = None
    """`embedded`, `gsm8k`, `math` (MATH-500), or a local .jsonl/.parquet to score (default: the run's, else
    embedded for the embedded model and gsm8k for any other)"""
    eval_dataset: Optional[str] = None
    """a local eval file for a local --dataset (the file scored); hub datasets use their test split"""
    prompt_field: Optional[str] = None
    """the field holding the question (default: the run's, else the dataset's)"""
    answer_field: Optional[str] = None
    """the field holding the gold answer (default: the run's, else the dataset's)"""
    answer_format: Optional[Literal["gsm8k", "boxed", "plain"]] = None
    """how the answer field holds the final answer (default: the run's, else the dataset's)"""
    instruction: Optional[str] = None
    """appended to each question (default: the run's, else the dataset's, as in training)"""
    max_prompt_len: Optional[int] = None
    """prompts longer than this many tokens are skipped and counted (default: the run's, else 512)"""
    samples: int = 8
    """k: completions sampled per problem for avg@k and pass@k (0: greedy accuracy only)"""
    temperature: Optional[float] = None
    """sampling temperature of the k samples (default: the run's, else 1.0); greedy accuracy is always greedy"""
    top_p: Optional[float] = None
    """nucleus sampling of the k samples (default: the run's, else 1.0)"""
    limit: Optional[int] = None
    """score the first N problems (default: the run's --eval-limit, else all)"""
    max_new_tokens: Optional[int] = None
    """the longest completion (default: the run's, else 12 on the embedded task and 1024 on others)"""
    vllm: bool = torch.cuda.is_available()
    """generate with vLLM (default on CUDA, as the scripts; on CPU HF generate is faster for the tiny model)"""
    vllm_gpu_memory_utilization: float = 0.9
    """the share of GPU memory vLLM may take (nothing else is on the GPU)"""
    seed: int = 1
    """seed of the sampled completions"""
    batch_size: int = 256
    """completions per generate call"""
    reward_timeout_s: float = 5.0
    """wall-clock bound of one reward check"""
    output: Optional[str] = None
    """also write the results, settings and per-problem scores to this JSON file"""


# What a run's flags set for its evaluation, and their defaults where a run left none.
RUN_KEYS = ("dataset", "eval_dataset", "prompt_field", "answer_field", "answer_format", "instruction",
            "max_prompt_len", "max_new_tokens", "temperature", "top_p", "eval_limit")


def run_settings(model: str) -> tuple[Optional[dict], str]:
    """The flags of the run that wrote `model` (a local dir), and where they were found: its minirlvr.json, else
    the newest checkpoint of the run it sits in (runs/<run>/final -> runs/<run>/checkpoints). (None, "") if none."""
    path = Path(model)
    if not path.is_dir():
        return None, ""
    marker = path / "minirlvr.json"
    if marker.is_file():
        saved = json.loads(marker.read_text())
        return (saved.get("args", saved) if isinstance(saved, dict) else None), str(marker)
    from common.checkpoint import STATE_FILE, list_checkpoints

    ckpts = list_checkpoints(path.parent / "checkpoints") if (path.parent / "checkpoints").is_dir() else []
    if ckpts:
        import torch

        state = torch.load(ckpts[-1] / STATE_FILE, map_location="cpu", mmap=True, weights_only=False)
        return state.get("args"), str(ckpts[-1] / STATE_FILE)
    return None, ""


def has_embedded_tokenizer(model: str) -> bool:
    """True for a local dir whose tokenizer has the embedded model's vocabulary (e.g. a trained tiny model)."""
    from common.data import EMBEDDED_MODEL

    path, shipped = Path(model), EMBEDDED_MODEL / "config.json"
    config = path / "config.json"
    if not (config.is_file() and (path / "tokenizer.json").is_file()):
        return False
    if json.loads(config.read_text()).get("vocab_size") != json.loads(shipped.read_text())["vocab_size"]:
        return False  # not worth parsing a large tokenizer.json

    def vocab(d):
        return json.loads((d / "tokenizer.json").read_text())["model"].get("vocab")

    return vocab(path) == vocab(EMBEDDED_MODEL)


def resolve_settings(args: Args) -> tuple[Args, str]:
    """Fill the flags not given from the run's own (see run_settings), else from the dataset's defaults.
    Returns the filled Args and a line saying where the settings came from."""
    from common.data import DEFAULT_INSTRUCTION, EMBEDDED_INSTRUCTION

    saved, source = run_settings(args.model)
    saved = {k: v for k, v in (saved or {}).items() if k in RUN_KEYS}
    given = {k for k in RUN_KEYS if k != "eval_limit" and getattr(args, k, None) is not None}
    if args.limit is not None:
        given.add("eval_limit")
    if args.dataset is not None and args.dataset != saved.get("dataset"):
        # another dataset than the run's: its field names, instruction and lengths are not this one's
        saved = {k: v for k, v in saved.items() if k in ("temperature", "top_p")}
    filled = dict(saved)
    filled.update({k: getattr(args, k) for k in given if k != "eval_limit"})
    if "eval_limit" in given:
        filled["eval_limit"] = args.limit
    tiny = args.model == "embedded" or has_embedded_tokenizer(args.model)
    dataset = filled.get("dataset") or ("embedded" if tiny else "gsm8k")
    embedded = dataset == "embedded"
    defaults = dict(dataset=dataset, max_prompt_len=512, max_new_tokens=12 if embedded else 1024, temperature=1.0,
                    top_p=1.0, eval_limit=None,
                    instruction=EMBEDDED_INSTRUCTION if embedded else DEFAULT_INSTRUCTION)
    for key, value in defaults.items():
        if filled.get(key) is None:
            filled[key] = value
    out = Args(**{**asdict(args), **{k: v for k, v in filled.items() if k != "eval_limit"}})
    out.limit = filled["eval_limit"]
    if source:
        where = f"settings: the run's own ({source}); flags given here override them"
    elif tiny and args.model != "embedded":
        where = ("settings: the embedded task's defaults (no run's flags next to the model; it has the embedded "
                 "tokenizer)")
    else:
        where = f"settings: the {dataset} defaults (no run's flags next to the model)"
    return out, where


def check_args(args: Args) -> None:
    from common.data import UserError

    bad = [("--samples", args.samples, args.samples >= 0, "an integer >= 0 (0: greedy accuracy only)"),
           ("--temperature", args.temperature, args.temperature > 0, "a number > 0"),
           ("--top-p", args.top_p, 0 < args.top_p <= 1, "a number in (0, 1]"),
           ("--limit", args.limit, args.limit is None or args.limit >= 1, "an integer >= 1, or None for all"),
           ("--max-new-tokens", args.max_new_tokens, args.max_new_tokens >= 1, "an integer >= 1"),
           ("--max-prompt-len", args.max_prompt_len, args.max_prompt_len >= 1, "an integer >= 1"),
           ("--batch-size", args.batch_size, args.batch_size >= 1, "an integer >= 1"),
           ("--reward-timeout-s", args.reward_timeout_s, args.reward_timeout_s > 0, "a number > 0")]
    for flag, value, ok, valid in bad:
        if not ok:
            raise UserError(f"{flag} {value} is not valid: it must be {valid}.")


def eval_examples(args: Args, tokenizer):
    """(examples, prompts skipped as too long, source): the held-out problems of the resolved settings, read and
    tokenized by the code training uses (common.data.resolve_dataset and load_examples, as load_datasets does for
    a run's eval set). A local --dataset without --eval-dataset: that file is scored."""
    from common.data import load_examples, resolve_dataset

    train_src, eval_src = resolve_dataset(args.dataset, args.prompt_field, args.answer_field, args.answer_format,
                                          args.eval_dataset)
    source = eval_src or train_src
    examples, skipped = load_examples(source, tokenizer, args.instruction, args.max_prompt_len, "eval")
    return examples[: args.limit], skipped, source[0]


def main(argv: list[str] | None = None) -> dict:
    """The eval-only command; returns the results it prints (and writes to --output)."""
    import numpy as np
    import torch
    import tyro

    from common.data import load_model_and_tokenizer
    from common.hf_engine import HFEngine
    from common.reward import RewardChecker
    from common.stop_tokens import applies_chat_template, stop_token_ids
    from common.vllm_engine import VLLMEngine, vllm_available

    args, where = resolve_settings(tyro.cli(Args, args=sys.argv[1:] if argv is None else argv))
    check_args(args)
    print(where)
    torch.manual_seed(args.seed)
    np.random.seed(args.seed)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    use_vllm = args.vllm and vllm_available()
    if args.vllm and not use_vllm:
        print("vLLM is not installed: HF generate (pip install -r requirements-gpu.txt)")
    model, tokenizer, model_path = load_model_and_tokenizer(args.model, torch.float32)
    context = getattr(model.config, "max_position_embeddings", None)
    if context is not None and args.max_prompt_len + args.max_new_tokens > context:
        args.max_prompt_len = context - args.max_new_tokens  # prompt + completion must fit, as in training
    examples, skipped, source = eval_examples(args, tokenizer)
    stop_ids = stop_token_ids(tokenizer, model_path, applies_chat_template(tokenizer))  # as the scripts
    if use_vllm:  # built from the model's own files: it holds these weights already (version 0), no push
        engine = VLLMEngine(model_path, dtype=torch.bfloat16 if device.type == "cuda" else torch.float32,
                            seed=args.seed, max_model_len=args.max_prompt_len + args.max_new_tokens,
                            gpu_memory_utilization=args.vllm_gpu_memory_utilization, stop_token_ids=stop_ids)
        engine.version = 0
        del model
        model = None
    else:
        model.to(device)
        engine = HFEngine(model, stop_token_ids=stop_ids, pad_id=tokenizer.pad_token_id, autocast=autocast)
    print(f"eval: {len(examples)} problems of {source} ({skipped} skipped as longer than {args.max_prompt_len} "
          f"tokens), greedy and {args.samples} samples at temperature {args.temperature} (top-p {args.top_p}), "
          f"at most {args.max_new_tokens} new tokens, {'vLLM' if use_vllm else 'HF generate'}")
    with RewardChecker(timeout_s=args.reward_timeout_s) as checker:
        start = time.time()
        greedy = greedy_scores(engine, model, 0, examples, tokenizer, checker, args.max_new_tokens, args.batch_size)
        greedy_s = time.time() - start
        correct = []
        if args.samples:
            correct = sample_correct(engine, model, 0, examples, tokenizer, checker, args.max_new_tokens,
                                     args.samples, args.temperature, args.top_p, args.seed, args.batch_size)
        sampled_s = time.time() - start - greedy_s
    engine.close()
    k = args.samples
    results = {"model": args.model, "resolved_model": model_path, "problems": len(examples), "skipped": skipped,
               "greedy_accuracy": sum(greedy) / max(len(examples), 1), "samples": k,
               "settings": {**asdict(args), "engine": "vllm" if use_vllm else "hf"},
               "seconds": {"greedy": greedy_s, "sampled": sampled_s}}
    lines = [f"greedy accuracy  {results['greedy_accuracy']:.3f}"]
    if k:
        ks = sorted({2 ** i for i in range(int(math.log2(k)) + 1)} | {k})
        results["avg_at_k"] = avg_at_k(correct, k)
        results["pass_at_k"] = {str(j): mean_pass_at_k(correct, k, j) for j in ks}
        others = ", ".join(f"pass@{j} {results['pass_at_k'][str(j)]:.3f}" for j in ks if j != k)
        lines += [f"{f'avg@{k}':<17}{results['avg_at_k']:.3f}   (mean accuracy of the {k} samples)",
                  f"{f'pass@{k}':<17}{results['pass_at_k'][str(k)]:.3f}   (some sample of {k} correct"
                  + (f"; unbiased estimates: {others}" if others else "") + ")"]
    results["per_problem"] = [{"gold": e.gold, "greedy": g, **({"correct": c} if k else {})}
                              for e, g, c in zip(examples, greedy, correct or [None] * len(examples))]
    print("\n".join(lines) + f"\n({greedy_s:.1f} s greedy, {sampled_s:.1f} s sampled)")
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(json.dumps(results, indent=1) + "\n")
        print(f"wrote {args.output}")
    return results


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()

"""ConSPO: Contrastive Sequence-level Policy Optimization, as a diff of grpo.py.

Paper: "Revisiting Reinforcement Learning with Verifiable Rewards from a Contrastive Perspective",
arXiv 2605.12969 (ConSPO). Official code: none released ("upon paper acceptance"); this file follows the
paper's equations as ALGORITHMS.md section 2 writes them. Docs: docs/conspo.md.

How this file differs from grpo.py:
1. the score of a rollout is its length-normalised sequence log-prob under the current policy,
   s_i = (1/|o_i|) sum_t log pi_theta(o_{i,t} | q, o_{i,<t}) (fp32, with grad), not a token ratio;
2. the objective is a group InfoNCE: each positive (reward > 0) against the negatives of its own group,
   J(q) = (1/N+) sum_{i in P} tau log[e^{(s_i - m)/tau} / (e^{(s_i - m)/tau} + sum_{j in N} e^{s_j/tau})],
   loss = -mean of J over the groups that hold both positives and negatives (the other groups are dropped);
3. the margin m follows a cosine curriculum m_t = (M/2)(1 - cos(pi min(progress/alpha, 1))),
   progress = steps done / total_steps (0 at the first update, M from progress alpha on);
4. no importance ratio, no clipping, no KL (beta = 0), one optimizer step per rollout batch; the loss is
   back-propagated micro-batch by micro-batch through fixed coefficients dJ/ds_i (Lemma 2), computed from
   a no-grad pass over the whole batch, which gives the same gradient as one graph over every group.

Paper vs code: nothing differs from the paper's equations; the choices the paper leaves open (which step the
curriculum counts, rewards > 0 as positives, the embedded learning rate) are listed in docs/conspo.md.

Real run (one GPU):  python conspo.py --model Qwen2.5-1.5B --dataset gsm8k --track
Default (CPU, minutes): python conspo.py
"""
# TRY NOT TO MODIFY: imports
import json
import math
import os
import random
import shutil
import signal
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal, Optional

import numpy as np
import torch
import tyro
from tqdm import tqdm

from common.checkpoint import list_checkpoints, load_checkpoint, rng_state, save_checkpoint, set_rng_state
from common.data import (DEFAULT_INSTRUCTION, EMBEDDED_INSTRUCTION, UserError, load_examples,
                         load_model_and_tokenizer, resolve_dataset)
from common.logprobs import hidden_logprobs
from common.reward import RewardChecker
from common.vllm_engine import VLLMEngine, vllm_available


@dataclass
class Args:
    exp_name: str = os.path.basename(__file__)[: -len(".py")]
    """the name of this experiment (the script's name)"""
    seed: int = 1
    """seed of Python, NumPy, torch, the data order and the rollout engine"""
    track: bool = False
    """log to Weights & Biases (a local metrics.jsonl is always written)"""
    wandb_project_name: str = "minirlvr"
    """the wandb project"""
    wandb_entity: Optional[str] = None
    """the wandb entity (team)"""
    output_dir: str = "runs"
    """runs are written to OUTPUT_DIR/RUN_NAME: metrics.jsonl, checkpoints/, final/"""

    # model and data
    model: str = "embedded"
    """a local HF model dir, a hub id, a bare Qwen name (`Qwen2.5-1.5B` -> `Qwen/Qwen2.5-1.5B`), or `embedded`"""
    dataset: Optional[str] = None
    """`embedded`, `gsm8k`, `math` (train on MATH, eval on MATH-500), or a local .jsonl/.parquet (preset)"""
    eval_dataset: Optional[str] = None
    """a local eval file for a local --dataset (same field names); hub datasets bring their own test split"""
    prompt_field: Optional[str] = None
    """the field holding the question (default: question, or problem for MATH)"""
    answer_field: Optional[str] = None
    """the field holding the gold answer (default: answer, or solution for MATH)"""
    answer_format: Optional[Literal["gsm8k", "boxed", "plain"]] = None
    """how the answer field holds the final answer: after `####`, in the last \\boxed{}, or as is"""
    instruction: Optional[str] = None
    """appended to each question; asks for the final answer in \\boxed{} (default depends on the dataset)"""
    max_prompt_len: int = 512
    """prompts longer than this many tokens are skipped and counted"""

    # rollouts
    group_size: int = 8
    """G: completions sampled per prompt"""
    prompts_per_step: Optional[int] = None
    """prompts per rollout batch; the batch holds prompts_per_step * group_size completions (preset)"""
    max_new_tokens: Optional[int] = None
    """the longest completion, in tokens (preset)"""
    temperature: float = 1.0
    """sampling temperature; log-probs are computed at the same temperature"""
    top_p: float = 1.0
    """nucleus sampling"""
    vllm: bool = True
    """generate with the colocated vLLM engine when vLLM is installed (--no-vllm: HF generate)"""
    vllm_gpu_memory_utilization: float = 0.3
    """the share of GPU memory vLLM may take (its weights and KV cache; it sleeps while the trainer steps)"""
    tis_cap: Optional[float] = None
    """truncated importance sampling: weight each token by min(pi_old / pi_vllm, cap) (off: None)"""

    # optimisation
    total_steps: Optional[int] = None
    """rollout batches to train on (preset)"""
    learning_rate: Optional[float] = None
    """AdamW learning rate (preset: 1e-6 for real models, 1e-4 for the embedded tiny model)"""
    weight_decay: float = 0.0
    """AdamW weight decay"""
    warmup_steps: int = 0
    """linear learning-rate warm-up, in optimizer steps; constant after"""
    max_grad_norm: float = 1.0
    """gradient-norm clip"""
    num_minibatches: int = 1
    """optimizer steps per epoch over a rollout batch"""
    update_epochs: int = 1
    """epochs over each rollout batch; with one update in all, rho == 1 and old log-probs are the detached current ones"""
    micro_batch_size: Optional[int] = None
    """sequences per forward/backward; gradients accumulate over micro-batches (preset)"""
    gradient_checkpointing: Optional[bool] = None
    """recompute activations in the backward (preset: on for real models)"""
    logprob_backend: Literal["auto", "torch", "triton", "plain"] = "auto"
    """log-prob kernels: auto (Triton on CUDA, chunked torch on CPU), or plain log_softmax(...).gather"""

    # ALGO LOGIC: ConSPO's arguments (ALGORITHMS.md section 2)
    tau: float = 10.0
    """InfoNCE temperature; J carries a factor tau, so tau only sets how sharply the credit follows the score gaps"""
    max_margin: float = 0.01
    """M: the margin a positive's score must beat its negatives by, once the curriculum is done"""
    margin_alpha: float = 0.3
    """alpha: the margin rises from 0 to M over this fraction of total_steps (cosine), then stays at M"""
    beta = 0.0  # not a flag (no annotation): ConSPO has no KL term; the shared setup reads args.beta

    def __post_init__(self):
        # the coefficients are dJ/ds at the rollout policy: exact for the one optimizer step per rollout batch the
        # paper takes (no importance ratio corrects a second one), and there is no ratio for --tis-cap to truncate
        if self.num_minibatches * self.update_epochs != 1 or self.tis_cap is not None:
            raise UserError("ConSPO takes one optimizer step per rollout batch and has no importance ratio: use "
                            "--num-minibatches 1 --update-epochs 1 and no --tis-cap.")

    # TRY NOT TO MODIFY: evaluation, logging, checkpoints
    eval_every: Optional[int] = None
    """greedy evaluation every N steps, and before the first (preset; 0 disables)"""
    eval_limit: Optional[int] = None
    """evaluate on the first N held-out problems (preset; None: all)"""
    save_every: int = 0
    """write a checkpoint every N steps (0: never); see --resume"""
    keep_last: int = 2
    """checkpoints kept"""
    resume: Optional[str] = None
    """continue a run from its directory (or one of its checkpoints)"""
    reward_timeout_s: float = 5.0
    """wall-clock bound of one reward check; a check past it scores 0 and its worker is restarted"""
    reward_workers: int = 1
    """math-verify worker processes; a batch's distinct answers are split between them (helps slow checks only)"""

    # computed at runtime
    run_name: str = ""
    """computed at runtime"""


# ALGO LOGIC: defaults that depend on the model: the embedded tiny model trains in minutes on a CPU; a real
# model uses the values of the paper (ALGORITHMS.md: G=8, lr 2e-6, 1k-token responses).
PRESETS = {
    "embedded": dict(dataset="embedded", prompts_per_step=32, max_new_tokens=12, total_steps=300, learning_rate=1e-4,
                     micro_batch_size=256, gradient_checkpointing=False, eval_every=20, eval_limit=200),
    "real": dict(dataset="gsm8k", prompts_per_step=32, max_new_tokens=1024, total_steps=500, learning_rate=2e-6,
                 micro_batch_size=8, gradient_checkpointing=True, eval_every=50, eval_limit=None),
}


# ALGO LOGIC: scores, margin curriculum, group InfoNCE and its micro-batch loss (ALGORITHMS.md section 2)
def sequence_scores(logps: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """s_i = (1/|o_i|) sum_t log pi(o_{i,t} | q, o_{i,<t}): logps, mask (b, T) -> (b,), in logps' dtype (fp32)."""
    return (logps * mask).sum(1) / mask.sum(1).clamp(min=1)


def margin_schedule(progress: float, max_margin: float, alpha: float) -> float:
    """Cosine margin curriculum m_t = (M/2)(1 - cos(pi min(progress/alpha, 1))): 0 at progress 0, M from alpha on."""
    return 0.5 * max_margin * (1 - math.cos(math.pi * min(progress / alpha, 1.0)))


def mixed_groups(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """(B,) True for the groups that hold a positive (reward > 0) and a negative; rewards (B*G,) grouped."""
    positive = (rewards > 0).view(-1, group_size)  # (B, G)
    return positive.any(1) & ~positive.all(1)


def group_infonce(scores: torch.Tensor, rewards: torch.Tensor, group_size: int, tau: float, margin: float):
    """The margin-shifted group InfoNCE of ALGORITHMS.md section 2 and its gradient in the scores (Lemma 2).

    scores, rewards (B*G,) grouped. Positive i of group q is contrasted with the negatives N of q only:
        Z_i = e^{(s_i - m)/tau} + sum_{j in N} e^{s_j/tau},  P_i+ = e^{(s_i - m)/tau} / Z_i,  P_ij- = e^{s_j/tau} / Z_i
        J(q) = (1/N+) sum_{i in P} tau log P_i+
    Returns (terms, coefs), both (B*G,) and 0 outside the groups that hold positives and negatives:
        terms: tau log P_i+ / N+ for a positive, 0 for a negative, so J(q) = the sum of q's terms (differentiable);
        coefs: dJ(q)/ds_i, without grad: (1/N+)(1 - P_i+) for a positive, -(1/N+) sum_i P_ij- for a negative.
    """
    s = scores.view(-1, group_size)  # (B, G)
    positive = (rewards > 0).view(-1, group_size)  # (B, G)
    rows = positive & mixed_groups(rewards, group_size).unsqueeze(1)  # (B, G): positives whose J term counts
    n_pos = positive.sum(1, keepdim=True).clamp(min=1)  # (B, 1) N+
    # row i is positive i's softmax: its own margin-shifted score on the diagonal, the negatives' scores off it;
    # other positives are masked out (a negative row is computed but never counted)
    eye = torch.eye(group_size, dtype=torch.bool, device=s.device)
    logits = torch.where(eye, ((s - margin) / tau).unsqueeze(2), (s / tau).unsqueeze(1))  # (B, G, G)
    log_p = logits.masked_fill(~(eye | ~positive.unsqueeze(1)), -math.inf).log_softmax(2)  # (B, G, G)
    terms = torch.where(rows, tau * log_p.diagonal(dim1=1, dim2=2) / n_pos, 0.0)  # (B, G)
    with torch.no_grad():
        p = log_p.exp() * rows.unsqueeze(2)  # (B, G, G): the weights of the rows that count
        # column j holds P_j+ alone for a positive j (no positive sits in another's denominator) and the P_ij- of
        # every positive i for a negative j, so Lemma 2 reads coef_j = ([j counts as positive] - sum_i P_ij) / N+
        coefs = (rows.to(s.dtype) - p.sum(1)) / n_pos  # (B, G)
    return terms.reshape(-1), coefs.reshape(-1)


def conspo_loss(scores: torch.Tensor, old_scores: torch.Tensor, coefs: torch.Tensor, terms: torch.Tensor,
                n_groups: int) -> torch.Tensor:
    """A micro-batch's share of loss = -(1/K) sum_q J(q), K = n_groups kept, as a first-order expansion at the scores
    of the no-grad pass: -(1/K) sum_i [terms_i + coefs_i (s_i(theta) - old_s_i)].

    scores (b,) with grad; old_scores, coefs, terms (b,) from `group_infonce` on every sequence's old score. With
    one update old_s_i == s_i(theta): the value is the sequences' share of -J/K (the shares sum to the loss) and the
    gradient is -(1/K) sum_i coefs_i ds_i/dtheta, that of the whole groups' graph (the chain rule through s_i),
    whichever sequences the micro-batch holds.
    """
    return -(terms + coefs * (scores - old_scores)).sum() / n_groups


# TRY NOT TO MODIFY: rollouts, batching, log-probs
def get_logps(model, input_ids, attention_mask, temperature, backend, with_entropy=False):
    """Per-token log-probs of input_ids[:, 1:] under softmax(logits / T), fp32, (b, L-1); optionally entropy.

    The LM head runs inside `hidden_logprobs`, so the [b, L, V] fp32 logits are never built.
    """
    hidden = model.get_decoder()(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state  # (b, L, d)
    weight = model.get_output_embeddings().weight
    return hidden_logprobs(hidden[:, :-1], weight.to(hidden.dtype), input_ids[:, 1:], temperature, with_entropy,
                           backend)


def build_batch(prompts, completions, pad_id, device, completion_values=None):
    """Lay out [prompt | completion | pad] rows. Returns input_ids, attention_mask (N, L), the completion
    mask (N, L-1) over the shifted targets (position t predicts token t+1), and per-completion-token values
    (e.g. the rollout engine's log-probs) laid out like the mask, or None."""
    L = max(len(p) + len(c) for p, c in zip(prompts, completions))
    input_ids = torch.full((len(prompts), L), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(prompts), L), dtype=torch.long)
    completion_mask = torch.zeros((len(prompts), L - 1), dtype=torch.float32)
    values = None if completion_values is None else torch.zeros((len(prompts), L - 1), dtype=torch.float32)
    for i, (p, c) in enumerate(zip(prompts, completions)):
        input_ids[i, : len(p) + len(c)] = torch.tensor(p + c)
        attention_mask[i, : len(p) + len(c)] = 1
        completion_mask[i, len(p) - 1 : len(p) + len(c) - 1] = 1
        if values is not None:
            values[i, len(p) - 1 : len(p) + len(c) - 1] = torch.tensor(completion_values[i], dtype=torch.float32)
    values = None if values is None else values.to(device)
    return input_ids.to(device), attention_mask.to(device), completion_mask.to(device), values


@torch.no_grad()
def hf_generate(model, prompts, *, n, temperature, top_p, max_new_tokens, eos_id, pad_id, greedy=False):
    """HF `generate` rollouts: n completions per prompt, grouped (prompt 0's n first), each cut after its EOS.

    Returns (completion token lists, finished flags). The vLLM engine returns the same shapes.
    """
    device = next(model.parameters()).device
    width = max(len(p) for p in prompts)
    input_ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)  # left padding
    attention_mask = torch.zeros_like(input_ids)
    for i, p in enumerate(prompts):
        input_ids[i, width - len(p) :] = torch.tensor(p)
        attention_mask[i, width - len(p) :] = 1
    sampling = dict(do_sample=False) if greedy else dict(do_sample=True, temperature=temperature, top_p=top_p, top_k=0)
    out = model.generate(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device),
                         max_new_tokens=max_new_tokens, num_return_sequences=1 if greedy else n,
                         eos_token_id=eos_id, pad_token_id=pad_id, use_cache=True, **sampling)[:, width:].tolist()
    completions, finished = [], []
    for row in out:
        cut = row.index(eos_id) + 1 if eos_id in row else len(row)  # keep the EOS: it is trained on
        completions.append(row[:cut])
        finished.append(eos_id in row)
    return completions, finished


def evaluate(generate, examples, tokenizer, checker, batch_size=256):
    """Greedy accuracy on held-out examples; `generate(prompts, n, greedy)` is the run's rollout function."""
    correct = 0.0
    for s in range(0, len(examples), batch_size):
        chunk = examples[s : s + batch_size]
        comps = generate([e.prompt_ids for e in chunk], 1, True)[0]
        correct += sum(checker.score(tokenizer.batch_decode(comps, skip_special_tokens=True), [e.gold for e in chunk]))
    return correct / max(len(examples), 1)


if __name__ == "__main__":
    # TRY NOT TO MODIFY: setup
    args = tyro.cli(Args)
    resume_state, resume_dir = None, None
    if args.resume:  # the run's own flags come back; flags given now override them
        resume_state, ckpt = load_checkpoint(args.resume)
        resume_dir = ckpt.parent.parent
        args = tyro.cli(Args, default=Args(**{**resume_state["args"], "resume": args.resume}))
    preset = PRESETS["embedded" if args.model == "embedded" else "real"]
    for key, value in preset.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.instruction is None:
        args.instruction = EMBEDDED_INSTRUCTION if args.dataset == "embedded" else DEFAULT_INSTRUCTION
    if not args.resume:
        args.run_name = f"{args.exp_name}__{args.seed}__{int(time.time())}"
    run_dir = resume_dir or Path(args.output_dir) / args.run_name
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / ".write_test").touch()
        (run_dir / ".write_test").unlink()
    except OSError as e:
        raise UserError(f"output directory {str(run_dir)!r} is not writable ({e.strerror}). "
                        f"Pass --output-dir a folder you can write to.") from None

    torch.manual_seed(args.seed)
    np.random.seed(args.seed)
    random.seed(args.seed)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    # fp32 master weights everywhere; bf16 compute on CUDA via autocast (lr 1e-6 updates vanish in bf16 weights)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    model, tokenizer, model_path = load_model_and_tokenizer(args.model, torch.float32)
    model.to(device)
    if args.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    model.config.use_cache = False
    ref_model = None
    if args.beta > 0:
        ref_model, _, _ = load_model_and_tokenizer(model_path, torch.float32)
        ref_model.to(device).eval().requires_grad_(False)
    eos_id, pad_id = tokenizer.eos_token_id, tokenizer.pad_token_id
    context = getattr(model.config, "max_position_embeddings", None)
    if context is not None and args.max_prompt_len + args.max_new_tokens > context:
        args.max_prompt_len = context - args.max_new_tokens  # prompt + completion must fit the model's context
        print(f"max_prompt_len lowered to {args.max_prompt_len}: the model's context is {context} tokens")
    engine = None
    if args.vllm and vllm_available():  # colocated engine; weights are pushed in place before each rollout
        engine = VLLMEngine(model_path, dtype=torch.bfloat16 if device.type == "cuda" else torch.float32,
                            seed=args.seed, max_model_len=args.max_prompt_len + args.max_new_tokens,
                            gpu_memory_utilization=args.vllm_gpu_memory_utilization, stop_token_ids=[eos_id])
    elif args.vllm:
        print("vLLM is not installed: rollouts use HF generate (pip install -r requirements-gpu.txt)")

    train_src, eval_src = resolve_dataset(args.dataset, args.prompt_field, args.answer_field, args.answer_format,
                                          args.eval_dataset)
    train_set, skipped = load_examples(train_src, tokenizer, args.instruction, args.max_prompt_len, "train")
    eval_set = []
    if eval_src is not None and args.eval_every:
        eval_set, eval_skipped = load_examples(eval_src, tokenizer, args.instruction, args.max_prompt_len, "eval")
        eval_set = eval_set[: args.eval_limit]
    print(f"data: {len(train_set)} train prompts ({skipped} skipped as longer than {args.max_prompt_len} tokens), "
          f"{len(eval_set)} eval prompts")

    optimizer = torch.optim.AdamW(model.parameters(), lr=args.learning_rate, weight_decay=args.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / max(args.warmup_steps, 1)))
    checker = RewardChecker(timeout_s=args.reward_timeout_s, num_workers=args.reward_workers)

    # ALGO LOGIC: the algorithm's own trainable state, saved in checkpoints by name (ConSPO: none)
    algo_state = {}

    # TRY NOT TO MODIFY: resume, logging, checkpoints
    global_step, wandb_id = 0, None
    if resume_state is not None:
        model.load_state_dict(resume_state["model"])
        optimizer.load_state_dict(resume_state["optimizer"])
        scheduler.load_state_dict(resume_state["scheduler"])
        for name, obj in algo_state.items():
            obj.load_state_dict(resume_state["algo"][name])
        set_rng_state(resume_state["rng"])
        global_step, wandb_id = resume_state["step"], resume_state["wandb_id"]
        print(f"resumed {args.run_name} at step {global_step} from {ckpt}")
    metrics_path = run_dir / "metrics.jsonl"
    if metrics_path.exists():  # drop lines a killed run wrote after its last checkpoint
        lines = [l for l in metrics_path.read_text().splitlines() if json.loads(l)["step"] <= global_step]
        metrics_path.write_text("".join(l + "\n" for l in lines))
    if args.track:
        import wandb

        wandb_id = wandb_id or wandb.util.generate_id()
        wandb.init(project=args.wandb_project_name, entity=args.wandb_entity, name=args.run_name, id=wandb_id,
                   resume="allow", config=asdict(args))

    def log(metrics: dict, step: int):
        metrics = {"step": step, **{k: float(v) for k, v in metrics.items()}}
        with open(metrics_path, "a") as f:
            f.write(json.dumps(metrics) + "\n")
        if args.track:
            wandb.log(metrics, step=step)

    def checkpoint(step: int) -> Path:
        state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                 "scheduler": scheduler.state_dict(), "rng": rng_state(), "step": step, "wandb_id": wandb_id,
                 "run_name": args.run_name, "data_position": step * args.prompts_per_step, "args": asdict(args),
                 "algo": {name: obj.state_dict() for name, obj in algo_state.items()}}
        return save_checkpoint(run_dir / "checkpoints", step, state, args.keep_last)

    pushed_at = [-1]  # the step whose weights the engine holds

    def generate(prompts: list, n: int, greedy: bool = False):
        """n completions per prompt from the current weights: (completions, finished, the engine's sampled-token
        log-probs or None, push seconds, generation seconds)."""
        if engine is None:
            t0 = time.time()
            model.eval()
            with autocast:
                comps, fin = hf_generate(model, prompts, n=n, temperature=args.temperature, top_p=args.top_p,
                                         max_new_tokens=args.max_new_tokens, eos_id=eos_id, pad_id=pad_id,
                                         greedy=greedy)
            model.train()
            return comps, fin, None, 0.0, time.time() - t0
        engine.wake_up()
        push = 0.0
        if pushed_at[0] != global_step:
            push, pushed_at[0] = engine.push_weights(model), global_step
        out = engine.generate(prompts, n=n, temperature=0.0 if greedy else args.temperature,
                              top_p=1.0 if greedy else args.top_p, max_tokens=args.max_new_tokens,
                              seed=args.seed * 1_000_003 + global_step)
        engine.sleep()
        return out.completion_ids, out.finished, out.logprobs, push, out.seconds

    # ALGO LOGIC: the rollout function of training steps (GRPO: `generate` itself)

    # TRY NOT TO MODIFY: signals, data order, step-0 evaluation
    stop_signal = []
    for sig in (signal.SIGINT, signal.SIGTERM):  # finish the step, save, exit cleanly
        signal.signal(sig, lambda signum, frame: stop_signal.append(signum))

    def data_batch(step: int) -> list:
        """The prompts of a step: epoch e walks a permutation seeded by (seed, e); resumable from the step alone."""
        start = step * args.prompts_per_step
        batch = []
        for pos in range(start, start + args.prompts_per_step):
            epoch, i = divmod(pos, len(train_set))
            order = np.random.default_rng([args.seed, epoch]).permutation(len(train_set))
            batch.append(train_set[order[i]])
        return batch

    if global_step == 0 and eval_set:
        t0 = time.time()
        accuracy = evaluate(generate, eval_set, tokenizer, checker)
        log({"eval/accuracy": accuracy, "time/eval": time.time() - t0}, 0)
        print(f"step 0: eval/accuracy {accuracy:.3f}")
    model.train()
    progress = tqdm(range(global_step, args.total_steps), initial=global_step, total=args.total_steps,
                    desc=args.run_name, dynamic_ncols=True)
    last_acc = float("nan")
    for step in progress:
        global_step = step + 1
        metrics = {}
        # TRY NOT TO MODIFY: rollout phase (generate, then verify)
        batch = data_batch(step)
        prompts = [e.prompt_ids for e in batch for _ in range(args.group_size)]  # (B*G,) grouped
        golds = [e.gold for e in batch for _ in range(args.group_size)]
        completions, finished, sampling_logps, metrics["time/sync_weights"], metrics["time/generate"] = generate(
            [e.prompt_ids for e in batch], args.group_size)
        t0 = time.time()
        texts = tokenizer.batch_decode(completions, skip_special_tokens=True)
        rewards = torch.tensor(checker.score(texts, golds), dtype=torch.float32)  # (B*G,)
        metrics["time/reward"] = time.time() - t0

        # ALGO LOGIC: advantages: ConSPO's credit of o_i is dJ/ds_i (Lemma 2), set once the scores are known (below)
        advantages = torch.zeros_like(rewards)  # (B*G,)
        group_std = rewards.view(-1, args.group_size).std(dim=1)  # (B,)
        kept = mixed_groups(rewards, args.group_size)  # (B,) groups without both positives and negatives are dropped
        # every sequence of a kept group has a nonzero coefficient, every other one has none
        in_loss = needs_grad = kept.repeat_interleave(args.group_size)  # (B*G,)
        # a group's coefficients need all its scores before any backward: the no-grad pass computes every s_i, and
        # with one update it gives the current policy's log-probs exactly
        compute_old_logps = True
        margin = margin_schedule(step / args.total_steps, args.max_margin, args.margin_alpha)  # m_t

        # TRY NOT TO MODIFY: batch tensors, old and reference log-probs
        t0 = time.time()
        input_ids, attention_mask, completion_mask, sampling_logps = build_batch(prompts, completions, pad_id, device,
                                                                                 sampling_logps)
        advantages = advantages.to(device)
        N = input_ids.shape[0]
        mb_size = args.micro_batch_size
        num_updates = args.num_minibatches * args.update_epochs
        old_logps = torch.zeros(completion_mask.shape, device=device)
        ref_logps = torch.zeros(completion_mask.shape, device=device)
        entropy = torch.zeros(completion_mask.shape, device=device)
        have_old = torch.zeros(N, dtype=torch.bool)
        with torch.no_grad(), autocast:
            for s in range(0, N, mb_size):
                mb = slice(s, s + mb_size)
                L = int(attention_mask[mb].sum(1).max())
                if compute_old_logps:
                    old_logps[mb, : L - 1], entropy[mb, : L - 1] = get_logps(
                        model, input_ids[mb, :L], attention_mask[mb, :L], args.temperature, args.logprob_backend,
                        with_entropy=True)
                    have_old[mb] = True
                if ref_model is not None:
                    ref_logps[mb, : L - 1], _ = get_logps(ref_model, input_ids[mb, :L], attention_mask[mb, :L],
                                                          args.temperature, args.logprob_backend)

        # ALGO LOGIC: terms that need the rollout policy's log-probs: the scores, J and its coefficients
        old_scores = sequence_scores(old_logps, completion_mask)  # (B*G,) fp32, every sequence
        terms, advantages = group_infonce(old_scores, rewards.to(device), args.group_size, args.tau, margin)
        n_groups = max(int(kept.sum()), 1)  # K: the loss is -mean over kept groups of J(q)
        metrics.update({"conspo/loss": -float(terms.sum()) / n_groups, "conspo/margin": margin,
                        "conspo/frac_groups_kept": kept.float().mean()})
        if bool(kept.any()):  # mean score of the positives and of the negatives the InfoNCE contrasts
            positive = (rewards > 0).to(device)
            in_kept = in_loss.to(device)
            metrics["conspo/score_pos"] = old_scores[positive & in_kept].mean()
            metrics["conspo/score_neg"] = old_scores[~positive & in_kept].mean()

        # TRY NOT TO MODIFY: update phase
        stats_sum = {}
        for epoch in range(args.update_epochs):
            perm = torch.randperm(N)
            for mb_idx in perm.chunk(args.num_minibatches):
                b_in_loss = mb_idx[in_loss[mb_idx]]
                n_seqs = len(b_in_loss)
                n_tokens = int(completion_mask[b_in_loss].sum())
                b_idx = mb_idx[needs_grad[mb_idx]]
                optimizer.zero_grad(set_to_none=True)
                for mb in b_idx.split(mb_size) if len(b_idx) else []:  # all A = 0: nothing to back-propagate
                    L = int(attention_mask[mb].sum(1).max())
                    mb_mask = completion_mask[mb, : L - 1]
                    with autocast:
                        logps, mb_entropy = get_logps(model, input_ids[mb, :L], attention_mask[mb, :L],
                                                      args.temperature, args.logprob_backend, with_entropy=True)
                    if not bool(have_old[mb].all()):
                        old_logps[mb, : L - 1] = logps.detach()
                        entropy[mb, : L - 1] = mb_entropy.detach()
                        have_old[mb] = True
                    is_weights = None  # truncated importance sampling against the engine's log-probs
                    if args.tis_cap is not None and sampling_logps is not None:
                        is_weights = torch.exp(old_logps[mb, : L - 1] - sampling_logps[mb, : L - 1]).clamp(
                            max=args.tis_cap)
                    # ALGO LOGIC: the loss of a micro-batch
                    loss, stats = conspo_loss(sequence_scores(logps, mb_mask), old_scores[mb], advantages[mb],
                                              terms[mb], n_groups), {}
                    # TRY NOT TO MODIFY: backward, statistics
                    loss.backward()
                    for k, v in {"loss": loss.detach(), **stats}.items():
                        stats_sum[k] = stats_sum.get(k, 0.0) + float(v)
                grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.max_grad_norm)
                if not torch.isfinite(grad_norm):
                    last = list_checkpoints(run_dir / "checkpoints")
                    raise UserError(f"step {global_step}: the gradient norm is {float(grad_norm)} (NaN or inf); "
                                    f"nothing was updated or overwritten. Last good checkpoint: "
                                    f"{str(last[-1]) if last else 'none (use --save-every N)'}. Lower the learning "
                                    f"rate or check the data.")
                optimizer.step()
                scheduler.step()
        metrics["time/train"] = time.time() - t0

        # TRY NOT TO MODIFY: logging
        lengths = completion_mask.sum(1).cpu()
        trained_tokens = completion_mask[have_old.to(device)]
        n_trained_tokens = max(float(trained_tokens.sum()), 1.0)
        metrics.update({
            "reward": rewards.mean(), "reward_std": rewards.view(-1, args.group_size).std(dim=1).mean(),
            "frac_reward_zero_std": (group_std == 0).float().mean(),
            "completions/mean_length": lengths.mean(),
            "completions/clipped_ratio": 1.0 - torch.tensor(finished, dtype=torch.float32).mean(),
            "loss": stats_sum.get("loss", 0.0) / num_updates, "grad_norm": float(grad_norm),
            "learning_rate": scheduler.get_last_lr()[0],
            "reward/timeouts": checker.stats["timeouts"], "reward/errors": checker.stats["errors"],
            "data/skipped_long_prompts": skipped,
        })
        if bool(have_old.any()):  # entropy of the rollout policy over the response tokens that were forwarded
            metrics["entropy"] = float((entropy[have_old.to(device)] * trained_tokens).sum()) / n_trained_tokens
        n_tok = max(float(completion_mask[in_loss.to(device)].sum()), 1.0) * num_updates  # token-updates
        seen = completion_mask * have_old.to(device).unsqueeze(1)
        if sampling_logps is not None and bool(seen.any()):  # the engine's log-probs against the trainer's
            diff = (old_logps - sampling_logps).abs() * seen
            metrics["sampling/sampling_logp_difference/mean"] = float(diff.sum()) / max(float(seen.sum()), 1.0)
            metrics["sampling/sampling_logp_difference/max"] = float(diff.max())
        for k in ("clip_ratio/low_mean", "clip_ratio/high_mean", "clip_ratio/region_mean", "clip_ratio/dual_mean", "kl"):
            if k in stats_sum:
                metrics[k] = stats_sum[k] / n_tok
        if args.eval_every and eval_set and (global_step % args.eval_every == 0 or global_step == args.total_steps):
            t0 = time.time()
            last_acc = evaluate(generate, eval_set, tokenizer, checker)
            metrics["eval/accuracy"], metrics["time/eval"] = last_acc, time.time() - t0
        for k, v in metrics.items():
            if not math.isfinite(float(v)):
                last = list_checkpoints(run_dir / "checkpoints")
                raise UserError(f"step {global_step}: metric {k} is {float(v)}. Last good checkpoint: "
                                f"{str(last[-1]) if last else 'none'}.")
        log(metrics, global_step)
        progress.set_postfix(reward=f"{float(metrics['reward']):.3f}", acc=f"{last_acc:.3f}")
        if (args.save_every and global_step % args.save_every == 0) or stop_signal:
            checkpoint(global_step)
        if stop_signal:
            print(f"stopped by signal {stop_signal[0]} after step {global_step}; resume with --resume {run_dir}")
            sys.exit(0)

    # TRY NOT TO MODIFY: save the final model in HF format (weights + tokenizer), atomically
    final, tmp = run_dir / "final", run_dir / ".tmp_final"
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    if final.exists():
        shutil.rmtree(final)
    os.rename(tmp, final)
    checker.close()
    print(f"saved {final}")
    if args.track:
        wandb.finish()

"""CEPO: Contrastive Evidence Policy Optimization, token credit from a right-answer vs a wrong-answer teacher.

Paper: "CEPO: RLVR Self-Distillation using Contrastive Evidence Policy Optimization", arXiv 2605.19436; official
code github.com/ahmedheakl/CEPO (on EasyR1). Predecessor: RLSD, arXiv 2604.03128. Spec: ALGORITHMS.md section 3;
docs: docs/cepo.md.

How this file differs from grpo.py:
1. two teachers read every trained rollout y: the current weights (eval mode, no grad, the rollout temperature)
   on prompt + " " + gold answer + y, and on prompt + " " + wrong answer + y, where the wrong answer is the last
   \\boxed{} of the group's lowest-scoring rejected rollout (`wrong_answers`, `teacher_logps`);
2. Delta_t = log pi(y_t | x, r+, y_<t) - log pi(y_t | x, r-, y_<t), w_t = exp(sign(A_i) Delta_t), and each token
   gets its own advantage Ahat_t = A_i [(1 - lambda) + lambda clip(w_t, 1 - eps_w, 1 + eps_w)], same sign as A_i
   (`cepo_advantages`);
3. lambda decays linearly from 0.5 to 0 over 25 steps (`cepo_lambda`); from then on the teachers are skipped and
   the update is GRPO's;
4. the loss is grpo.py's `grpo_loss` given the (b, T) Ahat_t; defaults of the official script: clip 0.2 / 0.28,
   EasyR1's dual clip 3.0 (a token with Ahat < 0 loses at most -3 Ahat; binds only with more than one update per
   rollout batch, grpo.py: off), token-mean, no KL, std eps 1e-6, lr 5e-6 for a real model.

Paper vs official code (default first, the other behind a flag):
- no usable wrong answer (no rejected rollout in the group, or none with a \\boxed{} answer): the paper falls back
  to RLSD, Delta_t = log pi(y_t | x, r+, y_<t) - log pi_old(y_t | x, y_<t); the official code takes the first
  rejected rollout, uses the literal answer " None" when it has no box, and r- = r+ (w = 1) when the group has no
  rejected rollout (--fallback official).
- eps_w: 0.2 in the official script (default), 0.5 in the paper and its README (--eps-w 0.5).
- lr for a real model: 5e-6 in the official CEPO script (default), 1e-6 for its GRPO and RLSD baselines
  (--learning-rate 1e-6 compares at grpo.py's lr).
- the surrogate: the README says "a standard PPO-clipped surrogate"; the official code adds the dual clip (default;
  --dual-clip None for the plain one).
- updates per rollout batch: the official script takes 2 (32 prompts a rollout batch, 16 an update); the default
  here is grpo.py's 1 (--num-minibatches 2 for the official schedule).

Real run (one GPU):  python cepo.py --model Qwen2.5-1.5B --dataset gsm8k --track
Default (CPU, minutes): python cepo.py
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

    # ALGO LOGIC: CEPO's arguments (ALGORITHMS.md sections 0 and 3; defaults of the official script)
    scale_rewards: bool = True
    """divide advantages by the group std (Dr. GRPO: --no-scale-rewards)"""
    adv_eps: float = 1e-6
    """eps added to the group std (EasyR1, as the official code)"""
    agg: Literal["seq-mean-token-mean", "token-mean", "seq-mean-token-sum-norm"] = "token-mean"
    """loss aggregation: DeepSeekMath GRPO, DAPO token-mean (official CEPO), Dr. GRPO constant normaliser"""
    eps_low: float = 0.2
    """lower clip of the ratio"""
    eps_high: float = 0.28
    """upper clip of the ratio (official script 0.28; its config default is 0.3)"""
    beta: float = 0.0
    """k3 KL coefficient to a frozen copy of the initial policy (CEPO: 0, no reference model)"""
    drop_zero_std_groups: bool = False
    """drop groups whose rewards are all equal from the loss (they are always counted in frac_reward_zero_std)"""
    lambda_init: float = 0.5
    """lambda_0: the teachers' share of each token's advantage weight at step 1"""
    lambda_decay_steps: int = 25
    """lambda decays linearly to 0 over this many steps; after them the teachers are skipped (plain GRPO)"""
    eps_w: float = 0.2
    """token weights are clipped to [1 - eps_w, 1 + eps_w] (official script 0.2; paper and README 0.5); keep < 1"""
    dual_clip: Optional[float] = 3.0
    """dual-clip PPO: the loss of a token with Ahat < 0 is capped at -c Ahat, binds where rho > c (official: EasyR1's
    clip_ratio_dual 3.0; None: off, as grpo.py)"""
    fallback: Literal["rlsd", "official"] = "rlsd"
    """no usable wrong answer in a group: the paper's RLSD Delta against pi_old, or the official code's r- = r+
    and literal ' None' answer"""

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
# model uses the values of the papers (ALGORITHMS.md: G=8, 1k-token responses; lr 5e-6 as the official CEPO script).
PRESETS = {
    "embedded": dict(dataset="embedded", prompts_per_step=32, max_new_tokens=12, total_steps=300, learning_rate=1e-4,
                     micro_batch_size=256, gradient_checkpointing=False, eval_every=20, eval_limit=200),
    "real": dict(dataset="gsm8k", prompts_per_step=32, max_new_tokens=1024, total_steps=500, learning_rate=5e-6,
                 micro_batch_size=8, gradient_checkpointing=True, eval_every=50, eval_limit=None),
}


# ALGO LOGIC: advantages, the teachers' token weights and the loss (ALGORITHMS.md sections 0 and 3)
from common.reward import extract_boxed  # noqa: E402  (the wrong answer: a rejected rollout's last \\boxed{})


def compute_advantages(rewards: torch.Tensor, group_size: int, scale_rewards: bool, eps: float) -> torch.Tensor:
    """A_i = (r_i - mean_g r) / (std_g r + eps); rewards (B*G,) grouped, prompt 0's G completions first."""
    r = rewards.view(-1, group_size)  # (B, G)
    adv = r - r.mean(dim=1, keepdim=True)
    if scale_rewards:
        adv = adv / (r.std(dim=1, keepdim=True) + eps)  # unbiased std, as TRL and verl
    return adv.view(-1)  # (B*G,)


def aggregate(per_token: torch.Tensor, mask: torch.Tensor, agg: str, n_seqs: int, n_tokens: int,
              max_new_tokens: int) -> torch.Tensor:
    """Reduce a (b, T) per-token loss of a micro-batch to its share of the mini-batch loss.

    n_seqs and n_tokens count the whole mini-batch, so the micro-batch shares sum to the mini-batch loss.
    """
    masked = per_token * mask
    if agg == "seq-mean-token-mean":  # DeepSeekMath: mean over tokens of a sequence, then over sequences
        return (masked.sum(1) / mask.sum(1).clamp(min=1)).sum() / n_seqs
    if agg == "token-mean":  # DAPO: mean over every response token of the mini-batch
        return masked.sum() / max(n_tokens, 1)
    if agg == "seq-mean-token-sum-norm":  # Dr. GRPO: a constant normaliser, no length bias
        return masked.sum() / (max_new_tokens * n_seqs)
    raise ValueError(f"unknown agg {agg!r}")


def k3_kl(logps: torch.Tensor, ref_logps: torch.Tensor) -> torch.Tensor:
    """Schulman's k3 estimator of KL(pi_theta || pi_ref) per sampled token: e^x - x - 1, x = ref - logp >= 0."""
    x = ref_logps - logps
    return torch.exp(x) - x - 1


def grpo_loss(logps, old_logps, advantages, mask, *, eps_low, eps_high, beta, ref_logps, agg, n_seqs, n_tokens,
              max_new_tokens, is_weights=None, dual_clip=None):
    """Clipped surrogate with k3 KL. logps/old_logps/ref_logps/mask/is_weights (b, T); advantages (b,), one per
    sequence, or (b, T), one per token.

    dual_clip: c > 1 caps the loss of a token with A < 0 at -c A (dual-clip PPO, arXiv 1912.09729, as verl and
    EasyR1); it binds only where rho > c, i.e. with more than one update per rollout batch. None: off (TRL).
    is_weights: truncated importance weights min(pi_old / pi_sampler, cap) against the rollout engine, or None.

    Returns (loss, stats) where stats holds sums over masked tokens for the clip-ratio and KL logs.
    """
    ratio = torch.exp(torch.clamp(logps - old_logps, -20.0, 20.0))  # (b, T); verl/EasyR1 clamp: no inf, no NaN grad
    adv = advantages.unsqueeze(1) if advantages.dim() == 1 else advantages  # (b, 1) or (b, T)
    per_token = -torch.min(ratio * adv, torch.clamp(ratio, 1 - eps_low, 1 + eps_high) * adv)
    stats = {}
    if dual_clip is not None:
        if dual_clip <= 1:
            raise ValueError(f"dual_clip must be > 1, got {dual_clip}")
        dual = (adv < 0) & (per_token > -dual_clip * adv)  # the cap binds (EasyR1's pg_clipfrac_lower)
        per_token = torch.where(dual, -dual_clip * adv, per_token)
        stats["clip_ratio/dual_mean"] = (dual.float() * mask).sum()
    if is_weights is not None:
        per_token = per_token * is_weights
    if beta > 0:
        kl = k3_kl(logps, ref_logps)
        per_token = per_token + beta * kl
        stats["kl"] = (kl.detach() * mask).sum()
    loss = aggregate(per_token, mask, agg, n_seqs, n_tokens, max_new_tokens)
    with torch.no_grad():  # TRL's definitions: a token is clipped where the clip is active for its advantage's sign
        low = ((ratio < 1 - eps_low) & (adv < 0)).float() * mask
        high = ((ratio > 1 + eps_high) & (adv > 0)).float() * mask
        stats.update({"clip_ratio/low_mean": low.sum(), "clip_ratio/high_mean": high.sum(),
                      "clip_ratio/region_mean": (low + high).sum()})
    return loss, stats


def cepo_lambda(step: int, lambda_init: float, decay_steps: int) -> float:
    """lambda of rollout step `step` (1-based): lambda_0 (1 - (step - 1) / decay_steps), 0 from step decay_steps + 1.

    The official code starts at lambda_0 and sets lambda_0 (1 - s / decay_steps) after step s: the same values.
    """
    return max(0.0, lambda_init * (1.0 - (step - 1) / max(decay_steps, 1)))


def wrong_answers(texts: list[str], rewards: torch.Tensor, group_size: int, official: bool):
    """The wrong answer r- of each group, from its lowest-scoring rejected rollout (reward < 0.5, as the official code).

    Rewards are 0/1 here, so every rejected rollout ties: the first one by index wins (Python's `min`, as the
    official code). The answer is that rollout's last \\boxed{} content (common.reward.extract_boxed).
    - paper (official=False): only rejected rollouts with a non-empty boxed answer compete; with none, the group
      gets None and falls back to RLSD;
    - official: the first rejected rollout is taken whatever it holds; without a box its answer is the literal
      "None"; a group with no rejected rollout gets None (there r- = r+).
    Returns (answers, falls_back): per group the answer or None, and whether it had no usable wrong answer.
    """
    answers, falls_back = [], []
    for g in range(len(texts) // group_size):
        rows = [i for i in range(g * group_size, (g + 1) * group_size) if rewards[i] < 0.5]  # rejected rollouts
        boxed = {i: (extract_boxed(texts[i]) or "").strip() for i in rows}
        if not official:
            rows = [i for i in rows if boxed[i]]
        worst = min(rows, key=lambda i: float(rewards[i]), default=None)  # first of the lowest rewards
        answers.append(None if worst is None else (boxed[worst] or "None"))
        falls_back.append(worst is None or not boxed[worst])
    return answers, falls_back


def cepo_advantages(advantages: torch.Tensor, delta: torch.Tensor, lam: float, eps_w: float,
                    mask: Optional[torch.Tensor] = None):
    """Ahat_t = A_t [(1 - lam) + lam clip(w_t, 1 - eps_w, 1 + eps_w)] with w_t = exp(s_i Delta_t), where s_i is the
    sign of row i's masked sum of advantages: the official `apply_cepo_weighting`.

    advantages (N,), one per rollout (GRPO's: then s_i = sign(A_i)), or (N, T), one per token; delta, mask (N, T)
    -> (Ahat (N, T), 0 where mask is 0 as the official code; w (N, T)). mask None: every position is a response
    token. The bracket is positive for eps_w < 1, so Ahat_t keeps A_t's sign whatever Delta_t is; exp may overflow
    to inf, which the clip caps (official code: no clamp either).
    """
    a = advantages.unsqueeze(1) if advantages.dim() == 1 else advantages  # (N, 1) or (N, T)
    mask = torch.ones_like(delta) if mask is None else mask
    sign = torch.sign((a * mask).sum(1, keepdim=True))  # (N, 1) the sign of each row's masked sum
    w = torch.exp(sign * delta)  # (N, T)
    return a * ((1 - lam) + lam * w.clamp(1 - eps_w, 1 + eps_w)) * mask, w


@torch.no_grad()
def teacher_logps(model, tokenizer, prompts, answers, completions, completion_mask, *, pad_id, temperature, backend,
                  mb_size):
    """log pi(y_t | prompt + " " + answer + y_<t) per response token, laid out like `completion_mask` (N, L-1).

    prompts, completions: the rollout batch's token lists; answers[i]: a string, or None to skip row i (left 0).
    The reference " " + answer is tokenized on its own and put between prompt and response tokens (official code),
    so in the teacher row [prompt | reference | response | pad] the response sits len(reference) tokens later than
    in the rollout row [prompt | response | pad]. Both rows' completion masks select the same response tokens in
    the same order, so a masked copy moves the teacher's values to the rollout layout.
    """
    out = torch.zeros(completion_mask.shape, device=completion_mask.device)
    rows = [i for i, a in enumerate(answers) if a is not None]
    for s in range(0, len(rows), mb_size):
        mb = rows[s : s + mb_size]
        prefixes = [prompts[i] + tokenizer(" " + answers[i], add_special_tokens=False)["input_ids"] for i in mb]
        input_ids, attention_mask, mask, _ = build_batch(prefixes, [completions[i] for i in mb], pad_id, out.device)
        logps, _ = get_logps(model, input_ids, attention_mask, temperature, backend)  # (b, L_teacher - 1)
        values = torch.zeros_like(completion_mask[mb])
        values[completion_mask[mb].bool()] = logps[mask.bool()].float()
        out[mb] = values
    return out


@torch.no_grad()
def evidence_delta(model, tokenizer, prompts, completions, completion_mask, golds, wrong, old_logps, rows, *,
                   rlsd_fallback, **kw):
    """Delta_t = log pi(y_t | x, r+, y_<t) - log pi(y_t | x, r-, y_<t) (N, L-1) for the rollouts in `rows` (bools), 0
    elsewhere. golds[i]: rollout i's gold answer; wrong[i]: its group's wrong answer, or None (no usable one): then
    the paper's RLSD baseline log pi_old(y_t | x, y_<t) (old_logps) or, official, r- = r+ (Delta = 0)."""
    plus = teacher_logps(model, tokenizer, prompts, [g if r else None for g, r in zip(golds, rows)], completions,
                         completion_mask, **kw)
    minus = teacher_logps(model, tokenizer, prompts, [a if r else None for a, r in zip(wrong, rows)], completions,
                          completion_mask, **kw)
    no_answer = torch.tensor([a is None for a in wrong], device=plus.device).unsqueeze(1)  # (N, 1)
    minus = torch.where(no_answer, old_logps if rlsd_fallback else plus, minus)
    return (plus - minus) * completion_mask * torch.tensor(rows, device=plus.device).unsqueeze(1)


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

    # ALGO LOGIC: the algorithm's own trainable state, saved in checkpoints by name (GRPO: none)
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

        # ALGO LOGIC: advantages
        advantages = compute_advantages(rewards, args.group_size, args.scale_rewards, args.adv_eps)  # (B*G,)
        group_std = rewards.view(-1, args.group_size).std(dim=1)  # (B,)
        zero_std = (group_std == 0).repeat_interleave(args.group_size)  # (B*G,)
        in_loss = ~zero_std if args.drop_zero_std_groups else torch.ones_like(zero_std)
        # a sequence with A = 0 and beta = 0 has zero gradient: skip its forward/backward (exact, denominators
        # below still count it)
        needs_grad = in_loss & ((advantages != 0) | (args.beta > 0))
        lam = cepo_lambda(global_step, args.lambda_init, args.lambda_decay_steps)
        teach = needs_grad & (advantages != 0) & (lam > 0)  # (B*G,) rollouts whose Ahat_t reads the teachers
        answers, falls_back = wrong_answers(texts, rewards, args.group_size, args.fallback == "official")
        falls_back = torch.tensor(falls_back).repeat_interleave(args.group_size)  # (B*G,) no usable wrong answer
        # with one update in all, rho == 1: old log-probs are the detached current ones, no extra forward; the RLSD
        # fallback needs pi_old before the update
        compute_old_logps = (args.num_minibatches * args.update_epochs > 1
                             or (args.fallback == "rlsd" and bool((teach & falls_back).any())))

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

        # ALGO LOGIC: terms that need the rollout policy's log-probs: CEPO's per-token advantages
        delta = torch.zeros(completion_mask.shape, device=device)  # (B*G, L-1) Delta_t, 0 where no teacher reads
        if bool(teach.any()):
            model.eval()  # the teachers are the current weights, in eval mode, without grad
            with autocast:
                delta = evidence_delta(model, tokenizer, prompts, completions, completion_mask, golds,
                                       [answers[i // args.group_size] for i in range(N)], old_logps, teach.tolist(),
                                       rlsd_fallback=args.fallback == "rlsd", pad_id=pad_id,
                                       temperature=args.temperature, backend=args.logprob_backend, mb_size=mb_size)
            model.train()
        advantages, w = cepo_advantages(advantages, delta, lam, args.eps_w, completion_mask)  # (B*G, L-1) Ahat_t
        metrics["cepo/lambda"] = lam
        taught = completion_mask.bool() & teach.to(device).unsqueeze(1)  # response tokens the teachers read
        if bool(taught.any()):
            metrics["cepo/delta_mean"] = delta[taught].mean()
            metrics["cepo/w_clip_frac"] = ((w[taught] - 1).abs() > args.eps_w).float().mean()
            metrics["cepo/frac_fallback"] = falls_back[teach].float().mean()

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
                    # ALGO LOGIC: the loss of a micro-batch (one advantage per token)
                    loss, stats = grpo_loss(logps, old_logps[mb, : L - 1], advantages[mb, : L - 1], mb_mask,
                                            eps_low=args.eps_low, eps_high=args.eps_high, beta=args.beta,
                                            ref_logps=ref_logps[mb, : L - 1], agg=args.agg, n_seqs=n_seqs,
                                            n_tokens=n_tokens, max_new_tokens=args.max_new_tokens,
                                            is_weights=is_weights, dual_clip=args.dual_clip)
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

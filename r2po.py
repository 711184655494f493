"""R2PO: Residual Rollout Policy Optimization, GRPO whose rollouts come from a separately trained explorer.

Paper: "R^2PO: Decoupling Training Trajectories from Inference Responses for LLM Reasoning", arXiv 2601.11960;
official code: github.com/RRPO-ARR/Code (built on simple_GRPO). Spec: ALGORITHMS.md section 4; docs: docs/r2po.md.

How this file differs from grpo.py:
1. a residual rollout head on the final post-norm hidden state h (the input of the LM head), head(h) = W2 ReLU(W1 h),
   W1 d x d, W2 V x d, no biases (`RolloutHead`), with its own AdamW, saved in checkpoints (`algo_state`). W2 starts
   at 0, so the explorer starts exactly at the policy, and W1 ~ N(0, 0.02^2);
2. every training rollout is sampled from the explorer pi_{theta,phi}, logits = lm_head(h) + head(h), at
   `--rollout-temperature` 0.9 with HF generate (`explorer_generate`): vLLM does not know the head, and a forward
   hook on the LM head reuses grpo.py's `hf_generate` unchanged. Evaluation (greedy) and the saved model are the policy alone, on vLLM
   when it runs. `generate` is rebound in an ALGO LOGIC block (`with_explorer`);
3. steps alternate: `--head-steps` N1 head rounds, then `--policy-steps` N2 policy steps; step k (from 0) is a head
   round when k mod (N1 + N2) < N1 (logged as `r2po/stage`: 0 head, 1 policy). One step is one rollout batch;
4. a head round (stage 1) trains only phi: advantages are the group inverse frequency of each reward value,
   a_i = 1 / #{j: r_j = r_i}, z-scored in the group (`head_advantages`); groups whose a_i are all equal are
   skipped, including those whose reward values all have the same count (4/4, 2/2/2/2). The loss is grpo_loss on
   the explorer's log-probs (`explorer_logps`): rho = pi_{theta,phi} / pi_{theta,phi_old}, clip 0.2, plus beta k3
   KL to the frozen initial policy. theta is frozen, so the decoder runs once per step, without grad;
5. a policy step (stage 2) is grpo.py's update on the explorer's rollouts: ratios of the policy WITHOUT the head,
   pi_theta / pi_theta_old, with no correction for sampling from the explorer (as the official code);
6. R2PO's official values replace two of grpo.py's defaults: `--beta 0.04` (both stages) and
   `--drop-zero-std-groups` (the official code skips groups whose rewards are all equal).

Paper vs official code, and our choices (docs/r2po.md has the full list):
- initialisation: the paper zero-initialises the residual (then W1 and W2 get no gradient and the head never
  trains); the official run initialises both layers N(0, 0.02^2) (HF's init of missing weights), so its explorer
  differs from the policy from the start. Here W2 = 0 and W1 ~ N(0, `--head-init-std`^2);
- stage-1 advantage: inverse frequency (official) or `--head-advantage reward`, the z-scored task reward (the
  paper's ablation finds it at least as good);
- the explorer's rollouts are off-policy for pi_theta: an unbiased gradient would weight them by
  pi_theta_old / pi_{theta_old,phi}; the official code does not, nor does this file (no flag);
- `--head-steps 0` is the ablation without head rounds: GRPO, beta 0.04, rollouts from the policy at temperature 0.9;
- the official code strips EOS from the decoded text and re-tokenises it, so EOS is never trained; here the
  sampled token ids, EOS included, are trained on in both stages;
- the official code samples at temperature 0.9 and computes log-probs at temperature 1: `--rollout-temperature`
  (0.9) and `--temperature` (1.0) here; everything there is bf16, here fp32 on CPU (bf16 autocast on CUDA).

Real run (one GPU):  python r2po.py --model Qwen2.5-1.5B --dataset gsm8k --track
Default (CPU, minutes): python r2po.py
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

    # ALGO LOGIC: GRPO's arguments (ALGORITHMS.md section 0; R2PO's official beta and zero-std skip), then R2PO's
    scale_rewards: bool = True
    """divide advantages by the group std (Dr. GRPO: --no-scale-rewards)"""
    adv_eps: float = 1e-4
    """eps added to the group std (verl/EasyR1: 1e-6)"""
    agg: Literal["seq-mean-token-mean", "token-mean", "seq-mean-token-sum-norm"] = "seq-mean-token-mean"
    """loss aggregation: DeepSeekMath GRPO, DAPO token-mean, Dr. GRPO constant normaliser (max_new_tokens)"""
    eps_low: float = 0.2
    """lower clip of the ratio"""
    eps_high: float = 0.2
    """upper clip of the ratio (DAPO clip-higher: 0.28)"""
    beta: float = 0.04
    """k3 KL coefficient to a frozen copy of the initial policy, in both stages (official 0.04; 0: no reference)"""
    drop_zero_std_groups: bool = True
    """drop groups whose rewards are all equal from the loss (official: skipped); counted in frac_reward_zero_std"""
    dual_clip: Optional[float] = None
    """dual-clip PPO: cap the loss of a token with A < 0 at -c A, binds where rho > c, both stages (None: off)"""
    head_steps: Optional[int] = None
    """N1: rollout batches per head round, where only the rollout head trains (preset)"""
    policy_steps: Optional[int] = None
    """N2: rollout batches per policy segment, where only the policy trains (preset)"""
    head_learning_rate: Optional[float] = None
    """AdamW learning rate of the rollout head (preset; official: 1e-6, the policy's)"""
    head_init_std: float = 0.02
    """W1 ~ N(0, std^2); W2 starts at 0, so the explorer starts as the policy"""
    head_advantage: Literal["inverse-frequency", "reward"] = "inverse-frequency"
    """stage-1 advantage: the z-scored group inverse frequency of r_i (official), or the z-scored reward (ablation)"""
    rollout_temperature: float = 0.9
    """sampling temperature of the explorer's rollouts (official 0.9); log-probs use --temperature (official 1)"""

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
# model uses the values of the papers (ALGORITHMS.md: G=8, lr 1e-6, 1k-token responses).
PRESETS = {
    "embedded": dict(dataset="embedded", prompts_per_step=32, max_new_tokens=12, total_steps=300, learning_rate=1e-4,
                     micro_batch_size=256, gradient_checkpointing=False, eval_every=20, eval_limit=200,
                     head_steps=2, policy_steps=4, head_learning_rate=1e-3),
    # official schedule: 10 head updates, then 20 (later 10) policy updates, both at lr 1e-6
    "real": dict(dataset="gsm8k", prompts_per_step=32, max_new_tokens=1024, total_steps=500, learning_rate=1e-6,
                 micro_batch_size=8, gradient_checkpointing=True, eval_every=50, eval_limit=None,
                 head_steps=10, policy_steps=20, head_learning_rate=1e-6),
}


# ALGO LOGIC: advantages and loss (ALGORITHMS.md section 0); R2PO's rollout head and its advantages (section 4)
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


class RolloutHead(torch.nn.Module):
    """head(h) = W2 ReLU(W1 h) on the final post-norm hidden state h; W1 (d, d), W2 (V, d), no biases (official).

    The explorer's logits are lm_head(h) + head(h). W2 = 0 makes the explorer start exactly at the policy while W2
    still gets a gradient (ReLU(W1 h) != 0); zeroing W1 too, as the paper says, would leave both without one.
    """

    def __init__(self, hidden_size: int, vocab_size: int, init_std: float):
        super().__init__()
        self.w1 = torch.nn.Linear(hidden_size, hidden_size, bias=False)
        self.w2 = torch.nn.Linear(hidden_size, vocab_size, bias=False)
        torch.nn.init.normal_(self.w1.weight, std=init_std)
        torch.nn.init.zeros_(self.w2.weight)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.w2(torch.relu(self.w1(h)))  # (..., V)


def explorer_generate(model, head, prompts, **kwargs):
    """`hf_generate` from the explorer pi_{theta,phi}: a forward hook adds head(h) to the LM head's output (its input
    is h) for the duration of the call. vLLM cannot sample from the explorer: it does not know the head."""
    hook = model.get_output_embeddings().register_forward_hook(lambda module, inputs, logits: logits + head(inputs[0]))
    try:
        return hf_generate(model, prompts, **kwargs)
    finally:
        hook.remove()


def explorer_logps(hidden, lm_weight, head, index, temperature, backend, with_entropy=False):
    """Log-probs of index (b, T) under the explorer, softmax((lm_head(h) + head(h)) / temperature), fp32 (b, T), and
    optionally its entropy. hidden (b, T, d). The explorer's logits are linear in [h, ReLU(W1 h)]: [W | W2] applied
    to it, so the fused LM-head kernel computes them without building (b, T, V) logits; gradients reach W1 and W2."""
    features = torch.cat([hidden, torch.relu(head.w1(hidden)).to(hidden.dtype)], dim=-1)  # (b, T, 2d)
    weight = torch.cat([lm_weight, head.w2.weight], dim=1).to(features.dtype)  # (V, 2d)
    return hidden_logprobs(features, weight, index, temperature, with_entropy, backend)


def head_advantages(rewards: torch.Tensor, group_size: int, kind: str, eps: float = 1e-6):
    """Stage-1 advantages of the rollout head; rewards (B*G,) grouped, prompt 0's G completions first.

    inverse-frequency (official `reward_rarity`): a_i = 1 / #{j in the group: r_j = r_i}, the rare outcome scores
    high; `reward` (the paper's ablation): a_i = r_i. Then z-scored in the group (unbiased std + eps, official 1e-6).
    A group whose a_i are all equal gets 0 and is skipped: equal rewards, but also reward values that are all equally
    frequent (4/4, 2/2/2/2, 6/6) although the rewards differ (official). Equality is decided exactly, on the integer
    counts (on the rewards for `reward`), never on a float std. Returns (advantages (B*G,), the mean over groups of the
    std of a_i, 0 for a skipped group, logged as r2po/head_adv_std).
    """
    r = rewards.view(-1, group_size)  # (B, G)
    counts = (r.unsqueeze(2) == r.unsqueeze(1)).sum(2)  # (B, G) integer: #{j: r_j = r_i}
    scores = 1.0 / counts if kind == "inverse-frequency" else r  # (B, G)
    # skip decided exactly, on the counts or the rewards: the float std of equal scores (1/6 or 1/3, G = 12) is ~3e-8
    equal = (counts == counts[:, :1]) if kind == "inverse-frequency" else (r == r[:, :1])  # (B, G)
    signal = ~equal.all(dim=1, keepdim=True)  # (B, 1)
    std = torch.where(signal, scores.std(dim=1, keepdim=True), 0.0)  # (B, 1)
    adv = torch.where(signal, (scores - scores.mean(dim=1, keepdim=True)) / (std + eps), 0.0)
    return adv.view(-1), float(std.mean())


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

    # ALGO LOGIC: the algorithm's own trainable state, saved in checkpoints by name (R2PO: the rollout head)
    if args.head_steps < 0 or args.policy_steps < 1:
        raise UserError(f"--head-steps must be >= 0 and --policy-steps >= 1 (got {args.head_steps}, "
                        f"{args.policy_steps})")
    lm_weight = model.get_output_embeddings().weight  # (V, d), possibly tied to the embedding
    rollout_head = RolloutHead(model.config.hidden_size, lm_weight.shape[0], args.head_init_std).to(device)
    head_optimizer = torch.optim.AdamW(rollout_head.parameters(), lr=args.head_learning_rate,
                                       weight_decay=args.weight_decay)
    algo_state = {"rollout_head": rollout_head, "rollout_head_optimizer": head_optimizer}

    def with_explorer(generate):
        """The run's rollout function with training rollouts (sampled) from the explorer, with HF generate; greedy
        calls (evaluation) keep `generate`: the policy alone, on vLLM when it runs."""

        def explorer_or_policy(prompts: list, n: int, greedy: bool = False):
            if greedy:
                return generate(prompts, n, greedy)
            t0 = time.time()
            model.eval()
            with autocast:
                comps, fin = explorer_generate(model, rollout_head, prompts, n=n, temperature=args.rollout_temperature,
                                               top_p=args.top_p, max_new_tokens=args.max_new_tokens, eos_id=eos_id,
                                               pad_id=pad_id)
            model.train()
            return comps, fin, None, 0.0, time.time() - t0

        return explorer_or_policy

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
    generate = with_explorer(generate)

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

        # ALGO LOGIC: advantages (R2PO: GRPO's in a policy step, stage 2; the head's in a head round, stage 1)
        advantages = compute_advantages(rewards, args.group_size, args.scale_rewards, args.adv_eps)  # (B*G,)
        group_std = rewards.view(-1, args.group_size).std(dim=1)  # (B,)
        zero_std = (group_std == 0).repeat_interleave(args.group_size)  # (B*G,)
        in_loss = ~zero_std if args.drop_zero_std_groups else torch.ones_like(zero_std)
        # a sequence with A = 0 and beta = 0 has zero gradient: skip its forward/backward (exact, denominators
        # below still count it)
        needs_grad = in_loss & ((advantages != 0) | (args.beta > 0))
        # with one update in all, rho == 1: old log-probs are the detached current ones, no extra forward
        compute_old_logps = args.num_minibatches * args.update_epochs > 1
        head_round = step % (args.head_steps + args.policy_steps) < args.head_steps  # head rounds come first
        metrics["r2po/stage"] = 0 if head_round else 1
        if head_round:  # theta is frozen: the shared update below trains nothing, the head trains before it
            advantages, metrics["r2po/head_adv_std"] = head_advantages(rewards, args.group_size, args.head_advantage)
            in_loss = (advantages.view(-1, args.group_size) != 0).any(dim=1).repeat_interleave(args.group_size)
            needs_grad, compute_old_logps = torch.zeros_like(in_loss), False

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

        # ALGO LOGIC: terms that need the rollout policy's log-probs (R2PO: a head round's whole update, stage 1)
        if head_round:
            # theta is frozen, so its hidden states are computed once, without grad. The explorer's log-probs at
            # phi_old (rho's denominator: the rollout policy's, up to the sampling temperature) and its entropy fill
            # old_logps and entropy, so `entropy` logs the explorer's in a head round
            hidden = torch.zeros(*completion_mask.shape, model.config.hidden_size, device=device)  # (N, L-1, d)
            with torch.no_grad(), autocast:
                for s in range(0, N, mb_size):
                    mb = slice(s, s + mb_size)
                    L = int(attention_mask[mb].sum(1).max())
                    hidden[mb, : L - 1] = model.get_decoder()(
                        input_ids=input_ids[mb, :L], attention_mask=attention_mask[mb, :L]).last_hidden_state[:, :-1]
                    old_logps[mb, : L - 1], entropy[mb, : L - 1] = explorer_logps(
                        hidden[mb, : L - 1], lm_weight, rollout_head, input_ids[mb, 1:L], args.temperature,
                        args.logprob_backend, with_entropy=True)
                    have_old[mb] = True
            head_sum = {}
            for epoch in range(args.update_epochs):
                for mb_idx in torch.randperm(N).chunk(args.num_minibatches):
                    b_idx = mb_idx[in_loss[mb_idx]]
                    n_tokens = int(completion_mask[b_idx].sum())
                    head_optimizer.zero_grad(set_to_none=True)
                    for mb in b_idx.split(mb_size) if len(b_idx) else []:  # every group skipped: no step
                        L = int(attention_mask[mb].sum(1).max())
                        with autocast:  # lm_weight detached: only W1 and W2 get gradients
                            logps, _ = explorer_logps(hidden[mb, : L - 1], lm_weight.detach(), rollout_head,
                                                      input_ids[mb, 1:L], args.temperature, args.logprob_backend)
                        loss, stats = grpo_loss(logps, old_logps[mb, : L - 1], advantages[mb],
                                                completion_mask[mb, : L - 1], eps_low=args.eps_low,
                                                eps_high=args.eps_high, beta=args.beta,
                                                ref_logps=ref_logps[mb, : L - 1], agg=args.agg, n_seqs=len(b_idx),
                                                n_tokens=n_tokens, max_new_tokens=args.max_new_tokens,
                                                dual_clip=args.dual_clip)
                        loss.backward()
                        for k, v in {"loss": loss.detach(), **stats}.items():
                            head_sum[k] = head_sum.get(k, 0.0) + float(v)
                    metrics["r2po/head_grad_norm"] = float(
                        torch.nn.utils.clip_grad_norm_(rollout_head.parameters(), args.max_grad_norm))
                    head_optimizer.step()
            n_tok = max(float(completion_mask[in_loss.to(device)].sum()), 1.0) * num_updates  # token-updates
            metrics.update({f"r2po/head_{k}": v / (num_updates if k == "loss" else n_tok) for k, v in head_sum.items()})

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
                    loss, stats = grpo_loss(logps, old_logps[mb, : L - 1], advantages[mb], mb_mask,
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

"""CEPO: Contrastive Evidence Policy Optimization, token credit from a right-answer vs a wrong-answer teacher.

Paper: "CEPO: RLVR Self-Distillation using Contrastive Evidence Policy Optimization", arXiv 2605.19436; official
code github.com/ahmedheakl/CEPO (on EasyR1). Predecessor: RLSD, arXiv 2604.03128. Spec: docs/algorithms.md#cepo;
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
4. the loss is grpo.py's `grpo_loss` given the (b, T) Ahat_t, with grpo.py's defaults, so that cepo.py vs grpo.py
   compares the token credit alone. The official script's settings, as a command line:
   `python cepo.py --eps-high 0.28 --dual-clip 3 --agg token-mean --adv-eps 1e-6 --num-minibatches 2`, and
   `--learning-rate 5e-6` with a real model (EasyR1's dual clip: a token with Ahat < 0 loses at most -3 Ahat; it binds
   only with more than one update per rollout batch).

Paper vs official code (default first, the other behind a flag):
- no usable wrong answer (no rejected rollout in the group, or none with a \\boxed{} answer): the paper falls back
  to RLSD, Delta_t = log pi(y_t | x, r+, y_<t) - log pi_old(y_t | x, y_<t); the official code takes the first
  rejected rollout, uses the literal answer " None" when it has no box, and r- = r+ (w = 1) when the group has no
  rejected rollout (--fallback official).
- eps_w: 0.2 in the official script (default), 0.5 in the paper and its README (--eps-w 0.5).
- lr for a real model: 5e-6 in the official CEPO script, 1e-6 (grpo.py's, the default) for its GRPO and RLSD
  baselines.
- the surrogate: the README says "a standard PPO-clipped surrogate" (the default); the official code adds the dual
  clip (--dual-clip 3).
- updates per rollout batch: the official script takes 2 (32 prompts a rollout batch, 16 an update); the default
  here is grpo.py's 1 (--num-minibatches 2).

Real run (one GPU):  python cepo.py --model Qwen2.5-1.5B --dataset gsm8k --track
Default (CPU, minutes): python cepo.py
"""
# TRY NOT TO MODIFY: imports
import os
import random
import time
from dataclasses import dataclass
from typing import Literal, Optional

import numpy as np
import torch
from tqdm import tqdm

from common import dist
from common.data import load_datasets, load_model_and_tokenizer, step_prompts
from common.evaluate import evaluate
from common.hf_engine import HFEngine
from common.logprobs import hidden_logprobs
from common.reward import RewardChecker
from common.run import REAL_MODEL, Run
from common.stop_tokens import applies_chat_template, stop_token_ids
from common.vllm_engine import VLLMEngine, vllm_available

# ALGO LOGIC: the algorithm's own imports
from common.reward import extract_boxed  # the wrong answer: a rejected rollout's last \\boxed{}


# TRY NOT TO MODIFY: the run's flags
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

    # model and data (defaults: the embedded tiny model; any other --model takes REAL_MODEL's values, see below)
    model: str = "embedded"
    """a local HF model dir, a hub id, a bare Qwen name (`Qwen2.5-1.5B` -> `Qwen/Qwen2.5-1.5B`), or `embedded`"""
    dataset: str = "embedded"
    """`embedded`, `gsm8k`, `math` (train on MATH, eval on MATH-500), or a local .jsonl/.parquet"""
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
    prompts_per_step: int = 32
    """prompts per rollout batch; the batch holds prompts_per_step * group_size completions"""
    max_new_tokens: int = 12
    """the longest completion, in tokens"""
    temperature: float = 1.0
    """sampling temperature; log-probs are computed at the same temperature"""
    top_p: float = 1.0
    """nucleus sampling"""
    vllm: bool = torch.cuda.is_available()
    """roll out with the colocated vLLM engine (default on CUDA); on CPU HF generate is faster for the tiny model"""
    vllm_gpu_memory_utilization: float = 0.3
    """the share of GPU memory vLLM may take (its weights and KV cache; it sleeps while the trainer steps)"""
    vllm_tensor_parallel_size: int = 1
    """under torchrun: ranks per vLLM engine (a model too large for one GPU's share); 1: one engine per rank"""
    tis_cap: Optional[float] = None
    """truncated importance sampling: weight each token by min(pi_old / pi_vllm, cap) (off: None)"""

    # optimisation
    total_steps: int = 300
    """rollout batches to train on"""
    learning_rate: float = 1e-4
    """AdamW learning rate"""
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
    micro_batch_size: int = 256
    """sequences per forward/backward; gradients accumulate over micro-batches"""
    gradient_checkpointing: bool = False
    """recompute activations in the backward"""
    logprob_backend: Literal["auto", "torch", "triton", "plain"] = "auto"
    """log-prob kernels: auto (Triton on CUDA, chunked torch on CPU), or plain log_softmax(...).gather"""

    # ALGO LOGIC: GRPO's arguments (docs/algorithms.md#grpo), then CEPO's (#cepo; official values)
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
    beta: float = 0.0
    """k3 KL coefficient to a frozen copy of the initial policy (0: no reference model)"""
    dual_clip: Optional[float] = None
    """dual-clip PPO: cap the loss of a token with A < 0 at -c A, binds where rho > c (verl: 3.0; None: off, as TRL)"""
    drop_zero_std_groups: bool = False
    """drop groups whose rewards are all equal from the loss (they are always counted in frac_reward_zero_std)"""
    lambda_init: float = 0.5
    """lambda_0: the teachers' share of each token's advantage weight at step 1"""
    lambda_decay_steps: int = 25
    """lambda decays linearly to 0 over this many steps; after them the teachers are skipped (plain GRPO)"""
    eps_w: float = 0.2
    """token weights are clipped to [1 - eps_w, 1 + eps_w] (official script 0.2; paper and README 0.5); keep < 1"""
    fallback: Literal["rlsd", "official"] = "rlsd"
    """no usable wrong answer in a group: the paper's RLSD Delta against pi_old, or the official code's r- = r+
    and literal ' None' answer"""

    # TRY NOT TO MODIFY: evaluation, logging, checkpoints
    eval_every: int = 20
    """greedy evaluation every N steps, and before the first (0 disables)"""
    eval_limit: Optional[int] = 200
    """evaluate on the first N held-out problems (None: all)"""
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
    verbose: bool = False
    """show vLLM's and other libraries' INFO logs (default: the progress bar, warnings and the lines that matter)"""

    # computed at runtime
    run_name: str = ""
    """computed at runtime"""


# ALGO LOGIC: a real model's settings: common/run.py's REAL_MODEL (gsm8k, 1k-token responses, micro-batches of 8,
# gradient checkpointing, eval every 50 steps on the whole test set) and the papers' learning rate
REAL_MODEL = {**REAL_MODEL, "learning_rate": 1e-6}


# ALGO LOGIC: advantages, the teachers' token weights and the loss (docs/algorithms.md#grpo and #cepo)
def compute_advantages(rewards: torch.Tensor, group_size: int, scale_rewards: bool, eps: float):
    """A_i = (r_i - mean_g r) / (std_g r + eps); rewards (B*G,) grouped, prompt 0's G completions first.

    Returns (advantages (B*G,), the group std (B,)). A group whose rewards are all equal gets std 0 and A = 0
    exactly (not the float residue of r - mean r, nor 0/0 with eps 0)."""
    r = rewards.view(-1, group_size)  # (B, G)
    same = (r == r[:, :1]).all(dim=1, keepdim=True)  # (B, 1)
    std = torch.where(same, 0.0, r.std(dim=1, keepdim=True))  # unbiased std, as TRL and verl
    adv = r - r.mean(dim=1, keepdim=True)
    if scale_rewards:
        adv = adv / (std + eps)
    return torch.where(same, 0.0, adv).view(-1), std.view(-1)


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


def grpo_loss(logps, old_logps, advantages, *, eps_low, eps_high, beta=0.0, ref_logps=None, is_weights=None,
              dual_clip=None):
    """Per-token clipped surrogate with k3 KL; `aggregate` reduces it. logps/old_logps/ref_logps/is_weights (b, T);
    advantages (b,), one per sequence, or (b, T), one per token.

    dual_clip: c > 1 caps the loss of a token with A < 0 at -c A (dual-clip PPO, arXiv 1912.09729, as verl and
    EasyR1); it binds only where rho > c, i.e. with more than one update per rollout batch. None: off (TRL).
    is_weights: truncated importance weights min(pi_old / pi_sampler, cap) against the rollout engine, or None.

    Returns (per_token loss (b, T), stats): per-token 0/1 clip indicators and the KL, (b, T), for the logs.
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
        stats["clip_ratio/dual_mean"] = dual.float()
    if is_weights is not None:
        per_token = per_token * is_weights
    if beta > 0:
        kl = k3_kl(logps, ref_logps)
        per_token = per_token + beta * kl
        stats["kl"] = kl.detach()
    with torch.no_grad():  # TRL's definitions: a token is clipped where the clip is active for its advantage's sign
        low, high = ((ratio < 1 - eps_low) & (adv < 0)).float(), ((ratio > 1 + eps_high) & (adv > 0)).float()
        stats.update({"clip_ratio/low_mean": low, "clip_ratio/high_mean": high, "clip_ratio/region_mean": low + high})
    return per_token, stats


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
    rows = torch.tensor([i for i, a in enumerate(answers) if a is not None], dtype=torch.long)
    for mb, pad in dist.micro_batches(rows, mb_size, pad=torch.tensor([0])):  # torchrun: as many on every rank
        mb = mb.tolist()
        prefixes = [prompts[i] + tokenizer(" " + (answers[i] or ""), add_special_tokens=False)["input_ids"] for i in mb]
        input_ids, attention_mask, mask, _ = build_batch(prefixes, [completions[i] for i in mb], pad_id, out.device)
        logps, _ = get_logps(model, input_ids, attention_mask, temperature, backend)  # (b, L_teacher - 1)
        values = torch.zeros_like(completion_mask[mb])
        values[completion_mask[mb].bool()] = logps[mask.bool()].float()
        if not pad:
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


# TRY NOT TO MODIFY: log-probs and the batch layout
@dist.fsdp_forward  # under torchrun (FSDP2) this runs as a forward of `model`, with its sharded weights gathered
def get_logps(model, input_ids, attention_mask, temperature, backend, with_entropy=False):
    """Per-token log-probs of input_ids[:, 1:] under softmax(logits / T), fp32, (b, L-1); optionally entropy.

    The LM head runs inside `hidden_logprobs`, so the [b, L, V] fp32 logits are never built.
    """
    hidden = model.get_decoder()(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state  # (b, L, d)
    weight = model.get_output_embeddings().weight
    return hidden_logprobs(hidden[:, :-1], weight.to(hidden.dtype), input_ids[:, 1:], temperature, with_entropy,
                           backend)


def build_batch(prompts, completions, pad_id, device, sampler_logps=None):
    """Lay out [prompt | completion | pad] rows. Returns input_ids, attention_mask (N, L), the completion
    mask (N, L-1) over the shifted targets (position t predicts token t+1), and the rollout engine's log-prob of
    each completion token laid out like the mask (None without them)."""
    L = max(len(p) + len(c) for p, c in zip(prompts, completions))
    input_ids = torch.full((len(prompts), L), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(prompts), L), dtype=torch.long)
    completion_mask = torch.zeros((len(prompts), L - 1), dtype=torch.float32)
    laid_out = None if sampler_logps is None else torch.zeros((len(prompts), L - 1), dtype=torch.float32)
    for i, (p, c) in enumerate(zip(prompts, completions)):
        input_ids[i, : len(p) + len(c)] = torch.tensor(p + c)
        attention_mask[i, : len(p) + len(c)] = 1
        completion_mask[i, len(p) - 1 : len(p) + len(c) - 1] = 1
        if laid_out is not None:
            laid_out[i, len(p) - 1 : len(p) + len(c) - 1] = torch.tensor(sampler_logps[i], dtype=torch.float32)
    laid_out = None if laid_out is None else laid_out.to(device)
    return input_ids.to(device), attention_mask.to(device), completion_mask.to(device), laid_out


if __name__ == "__main__":
    # TRY NOT TO MODIFY: setup
    run = Run(Args, REAL_MODEL)  # flags (--resume brings the run's own back), run dir, metrics, wandb, signals
    args = run.args
    torch.manual_seed(args.seed)
    np.random.seed(args.seed)
    random.seed(args.seed)
    device = dist.device()  # cuda (this rank's GPU under torchrun) or cpu
    # fp32 master weights everywhere; bf16 compute on CUDA via autocast (lr 1e-6 updates vanish in bf16 weights)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    model, tokenizer, model_path = load_model_and_tokenizer(args.model, torch.float32)
    model.to(device)
    if args.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    model.config.use_cache = False
    model = dist.shard(model)  # under torchrun: FSDP2, each rank holds 1/N of the weights, gradients and AdamW states
    ref_model = None
    if args.beta > 0:
        ref_model, _, _ = load_model_and_tokenizer(model_path, torch.float32)
        dist.shard(ref_model.to(device).eval().requires_grad_(False))
    # completions end at the tokenizer's EOS, every eos id of the model's generation config, and <|im_end|> after a
    # chat-template prompt: one stop set for both engines, in training and evaluation (common/stop_tokens.py)
    stop_ids, pad_id = stop_token_ids(tokenizer, model_path, applies_chat_template(tokenizer)), tokenizer.pad_token_id
    context = getattr(model.config, "max_position_embeddings", None)
    if context is not None and args.max_prompt_len + args.max_new_tokens > context:
        args.max_prompt_len = context - args.max_new_tokens  # prompt + completion must fit the model's context
        print(f"max_prompt_len lowered to {args.max_prompt_len}: the model's context is {context} tokens")
    if args.vllm and vllm_available():  # colocated engine; the policy's weights are loaded in place before rollouts
        engine = VLLMEngine(model_path, dtype=torch.bfloat16 if device.type == "cuda" else torch.float32,
                            seed=args.seed, max_model_len=args.max_prompt_len + args.max_new_tokens,
                            gpu_memory_utilization=args.vllm_gpu_memory_utilization, stop_token_ids=stop_ids,
                            tensor_parallel_size=args.vllm_tensor_parallel_size)
    else:
        if args.vllm:
            print("vLLM is not installed: rollouts use HF generate (pip install -r requirements-gpu.txt)")
        engine = HFEngine(model, stop_token_ids=stop_ids, pad_id=pad_id, autocast=autocast)
    train_set, eval_set, skipped = load_datasets(args, tokenizer)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.learning_rate, weight_decay=args.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / max(args.warmup_steps, 1)))
    checker = RewardChecker(timeout_s=args.reward_timeout_s, num_workers=args.reward_workers)

    # ALGO LOGIC: the algorithm's own trainable state, saved in checkpoints by name, and the engine of training
    # rollouts (none here, and the run's engine)
    algo_state, train_engine = {}, engine

    # TRY NOT TO MODIFY: resume: what a checkpoint holds, each object's state_dict() (Run.save adds the RNG states,
    # the step and the flags; under torchrun the sharded model and optimizer go through torch.distributed.checkpoint)
    saved = {"model": model, "optimizer": optimizer, "scheduler": scheduler, "algo": algo_state}
    if run.state:
        run.load(saved)  # every object's state back, then the RNG states
    if run.step == 0 and eval_set:
        accuracy, seconds = evaluate(engine, model, 0, eval_set, tokenizer, checker, args.max_new_tokens)
        run.log({"eval/accuracy": accuracy, "time/eval": seconds}, 0)
        print(f"step 0: eval/accuracy {accuracy:.3f}")
    model.train()
    num_updates = args.num_minibatches * args.update_epochs
    last_acc = float("nan")
    progress = tqdm(range(run.step + 1, args.total_steps + 1), initial=run.step, total=args.total_steps,
                    desc=args.run_name, dynamic_ncols=True)
    for global_step in progress:
        metrics = {}
        # TRY NOT TO MODIFY: rollout phase (generate, then verify)
        batch = step_prompts(train_set, args.seed, global_step, args.prompts_per_step)
        # the engine's weights are named by the updates they hold: global_step - 1 here, global_step at the eval below
        rollout = train_engine.rollout(model, global_step - 1, [e.prompt_ids for e in batch], n=args.group_size,
                                       temperature=args.temperature, top_p=args.top_p, max_tokens=args.max_new_tokens,
                                       seed=args.seed * 1_000_003 + global_step)  # one seed per (seed, step) pair
        metrics["time/sync_weights"], metrics["time/generate"] = rollout.sync_seconds, rollout.seconds
        prompts = [e.prompt_ids for e in batch for _ in range(args.group_size)]  # (B*G,) grouped
        golds = [e.gold for e in batch for _ in range(args.group_size)]
        t0 = time.time()
        texts = tokenizer.batch_decode(rollout.completion_ids, skip_special_tokens=True)
        rewards = torch.tensor(checker.score(texts, golds), dtype=torch.float32)  # (B*G,)
        metrics["time/reward"] = time.time() - t0

        # ALGO LOGIC: advantages
        advantages, group_std = compute_advantages(rewards, args.group_size, args.scale_rewards, args.adv_eps)
        zero_std = (group_std == 0).repeat_interleave(args.group_size)  # (B*G,)
        in_loss = ~zero_std if args.drop_zero_std_groups else torch.ones_like(zero_std)
        # a sequence with A = 0 and beta = 0 has zero gradient: skip its forward/backward (exact: the loss's
        # normalisers still count it)
        needs_grad = in_loss & ((advantages != 0) | (args.beta > 0))
        lam = cepo_lambda(global_step, args.lambda_init, args.lambda_decay_steps)
        teach = needs_grad & (advantages != 0) & (lam > 0)  # (B*G,) rollouts whose Ahat_t reads the teachers
        answers, falls_back = wrong_answers(texts, rewards, args.group_size, args.fallback == "official")
        falls_back = torch.tensor(falls_back).repeat_interleave(args.group_size)  # (B*G,) no usable wrong answer
        # with one update in all, rho == 1: old log-probs are the detached current ones, no extra forward; the RLSD
        # fallback needs pi_old before the update
        compute_old_logps = (num_updates > 1
                             or (args.fallback == "rlsd" and bool((teach & falls_back).any())))
        # the update phase trains the policy: its log-probs, module, optimizer and learning-rate schedule
        update_logps, update_module, update_optimizer, update_scheduler = get_logps, model, optimizer, scheduler

        # TRY NOT TO MODIFY: batch tensors, old and reference log-probs
        t0 = time.time()
        b_input_ids, b_attention_mask, b_mask, b_sampler_logps = build_batch(prompts, rollout.completion_ids, pad_id,
                                                                             device, rollout.logprobs)
        b_advantages = advantages.to(device)
        N, micro_size = b_input_ids.shape[0], args.micro_batch_size
        b_old_logps, b_ref_logps, b_entropy = (torch.zeros(b_mask.shape, device=device) for _ in range(3))
        b_forwarded = torch.zeros(N, dtype=torch.bool)  # sequences whose old log-probs and entropy are known
        with torch.no_grad(), autocast:
            for s in range(0, N, micro_size):
                micro = slice(s, s + micro_size)
                L = int(b_attention_mask[micro].sum(1).max())
                if compute_old_logps:
                    b_old_logps[micro, : L - 1], b_entropy[micro, : L - 1] = update_logps(
                        model, b_input_ids[micro, :L], b_attention_mask[micro, :L], args.temperature,
                        args.logprob_backend, with_entropy=True)
                    b_forwarded[micro] = True
                if ref_model is not None:
                    b_ref_logps[micro, : L - 1], _ = get_logps(ref_model, b_input_ids[micro, :L],
                                                               b_attention_mask[micro, :L], args.temperature,
                                                               args.logprob_backend)

        # ALGO LOGIC: terms that need the rollout policy's log-probs: CEPO's per-token advantages
        delta = torch.zeros(b_mask.shape, device=device)  # (B*G, L-1) Delta_t, 0 where no teacher reads
        if dist.any_rank(bool(teach.any())):  # torchrun: every rank joins the teachers' forwards
            model.eval()  # the teachers are the current weights, in eval mode, without grad
            with autocast:
                delta = evidence_delta(model, tokenizer, prompts, rollout.completion_ids, b_mask, golds,
                                       [answers[i // args.group_size] for i in range(N)], b_old_logps, teach.tolist(),
                                       rlsd_fallback=args.fallback == "rlsd", pad_id=pad_id,
                                       temperature=args.temperature, backend=args.logprob_backend, mb_size=micro_size)
            model.train()
        b_advantages, w = cepo_advantages(b_advantages, delta, lam, args.eps_w, b_mask)  # (B*G, L-1) Ahat_t
        metrics["cepo/lambda"] = lam
        taught = b_mask.bool() & teach.to(device).unsqueeze(1)  # response tokens the teachers read
        if bool(taught.any()):
            metrics["cepo/delta_mean"] = delta[taught].mean()
            metrics["cepo/w_clip_frac"] = ((w[taught] - 1).abs() > args.eps_w).float().mean()
            metrics["cepo/frac_fallback"] = falls_back[teach].float().mean()

        # TRY NOT TO MODIFY: update phase: num_updates optimizer steps over mini-batches, each accumulated over
        # micro-batches of at most micro_batch_size sequences
        stats_sum = {"loss": 0.0}
        for epoch in range(args.update_epochs):
            for mb_inds in torch.randperm(N).chunk(args.num_minibatches):
                mb_in_loss = mb_inds[in_loss[mb_inds]]  # what the loss's normalisers count
                # means over ranks under torchrun: FSDP averages the ranks' gradients, so these make it the batch's
                n_seqs, n_tokens = dist.mean(len(mb_in_loss), int(b_mask[mb_in_loss].sum()))
                mb_trained = mb_inds[needs_grad[mb_inds]]  # what is forwarded and back-propagated
                update_optimizer.zero_grad(set_to_none=True)
                for micro, pad in dist.micro_batches(mb_trained, micro_size, pad=mb_inds[:1]):
                    L = int(b_attention_mask[micro].sum(1).max())
                    micro_mask = b_mask[micro, : L - 1] * (not pad)  # torchrun's padding micro-batches add nothing
                    with autocast:
                        logps, entropy = update_logps(model, b_input_ids[micro, :L], b_attention_mask[micro, :L],
                                                      args.temperature, args.logprob_backend, with_entropy=True)
                    if not compute_old_logps:  # one update in all: pi_old is this forward, detached (rho == 1)
                        b_old_logps[micro, : L - 1], b_entropy[micro, : L - 1] = logps.detach(), entropy.detach()
                        b_forwarded[micro] = True
                    is_weights = None  # truncated importance sampling against the engine's log-probs
                    if args.tis_cap is not None and b_sampler_logps is not None:
                        is_weights = torch.exp(b_old_logps[micro, : L - 1] - b_sampler_logps[micro, : L - 1]).clamp(
                            max=args.tis_cap)
                    # ALGO LOGIC: the loss of a micro-batch (one advantage per token)
                    per_token, stats = grpo_loss(logps, b_old_logps[micro, : L - 1], b_advantages[micro, : L - 1],
                                                 eps_low=args.eps_low, eps_high=args.eps_high, beta=args.beta,
                                                 ref_logps=b_ref_logps[micro, : L - 1], is_weights=is_weights,
                                                 dual_clip=args.dual_clip)
                    loss = aggregate(per_token, micro_mask, args.agg, n_seqs, n_tokens, args.max_new_tokens)
                    # TRY NOT TO MODIFY: backward, statistics
                    loss.backward()
                    stats_sum["loss"] += loss.item() / num_updates
                    for k, v in stats.items():  # per token of the mini-batch's loss, averaged over updates
                        stats_sum[k] = stats_sum.get(k, 0.0) + float((v * micro_mask).sum()) / n_tokens / num_updates
                grad_norm = dist.clip_grad_norm_(update_module, args.max_grad_norm)
                run.check_grad_norm(grad_norm, global_step)  # NaN/inf: stop before the step, name the last checkpoint
                update_optimizer.step()
                update_scheduler.step()
        metrics["time/train"] = time.time() - t0

        # TRY NOT TO MODIFY: logging
        seen = b_mask * b_forwarded.to(device).unsqueeze(1)  # response tokens whose old log-probs are known
        metrics.update({**stats_sum,
            "reward": rewards.mean(), "reward_std": group_std.mean(),
            "frac_reward_zero_std": (group_std == 0).float().mean(),
            "completions/mean_length": b_mask.sum(1).mean(),
            "completions/clipped_ratio": 1.0 - torch.tensor(rollout.finished, dtype=torch.float32).mean(),
            "grad_norm": float(grad_norm),
            "learning_rate": update_scheduler.get_last_lr()[0], "reward/timeouts": checker.stats["timeouts"],
            "reward/errors": checker.stats["errors"], "data/skipped_long_prompts": skipped,
        })
        if bool(seen.any()):  # the rollout policy's entropy over the response tokens forwarded
            metrics["entropy"] = float((b_entropy * seen).sum()) / float(seen.sum())
        if b_sampler_logps is not None and bool(seen.any()):  # the engine's log-probs against the trainer's
            diff = (b_old_logps - b_sampler_logps).abs() * seen
            metrics["sampling/sampling_logp_difference/mean"] = float(diff.sum()) / float(seen.sum())
            metrics["sampling/sampling_logp_difference/max"] = float(diff.max())
        if args.eval_every and eval_set and (global_step % args.eval_every == 0 or global_step == args.total_steps):
            last_acc, metrics["time/eval"] = evaluate(engine, model, global_step, eval_set, tokenizer, checker,
                                                      args.max_new_tokens)
            metrics["eval/accuracy"] = last_acc
        run.log(metrics, global_step)  # metrics.jsonl (+ wandb); a NaN/inf metric stops the run here
        progress.set_postfix(reward=f"{float(metrics['reward']):.3f}", acc=f"{last_acc:.3f}")
        if run.should_save(global_step):  # every --save-every steps, and on SIGINT/SIGTERM
            run.save(global_step, saved)
        if run.stop_requested:
            run.exit(global_step)

    # TRY NOT TO MODIFY: the final model in HF format (weights + tokenizer), written atomically
    checker.close()
    run.finish(model, tokenizer)

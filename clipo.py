"""CLIPO: Contrastive Learning in Policy Optimization, GRPO with a contrastive reward bonus.

Paper: "CLIPO: Contrastive Learning in Policy Optimization Generalizes RLVR" (arXiv 2603.10101); official code:
github.com/Qwen-Applications/CLIPO (built on verl 0.6). Spec: docs/algorithms.md#clipo; docs: docs/clipo.md.

How this file differs from grpo.py:
1. after the rollouts, a no-grad forward of the rollout policy gives each response's representation h_i: the mean
   of the last layer's hidden states (after the final norm) over its tokens, in fp32 (`pooled_hidden`);
2. a separate contrastive head z_i = normalize(W h_i) (`ContrastiveHead`, Linear(d, D) or `--head mlp`) with its
   own AdamW, saved in checkpoints; it takes one step per RL step on a group InfoNCE (`group_infonce`, tau 0.05):
   an anchor is a correct rollout whose group holds another correct and at least one incorrect rollout; it gets
   ONE positive drawn from the other correct ones (`sample_positives`, seeded by (seed, step)), and every other
   member of the group in the denominator. The loss never reaches the policy;
3. the anchors' rewards are shaped, r'_i = r_i + max(-lambda L_i, -0.5), with L_i detached and computed before
   the head's step (`contrastive_bonus`); GRPO's advantages are computed from r';
4. `--head-warmup-steps N`: for the first N steps only the head trains, the policy does not change.

Paper vs official code, and our choices (docs/clipo.md has the full list):
- the GRPO part keeps grpo.py's defaults so that `clipo.py` vs `grpo.py` compares the bonus alone; the official
  scripts use token-mean, k3 KL coef 0.001, std eps 1e-6 and verl's dual clip 3.0 (binds with their 2 mini-batches
  per rollout batch on GSM8K): `--agg token-mean --beta 0.001 --adv-eps 1e-6 --dual-clip 3`;
- InfoNCE: the exact formula by default; the official `supcon_loss` subtracts the row maximum (1/tau) and adds
  1e-8 inside the log, which adds 1e-8 e^(1/tau) = 4.85 to the denominator: `--supcon-eps 1e-8`;
- the official scripts freeze the policy for their first epoch (verl `critic_warmup` 14 on GSM8K, 58 on MATH,
  i.e. 13 and 57 steps): `--head-warmup-steps 13`; the default here is 0;
- the official head dim is 512 on GSM8K and 2048 on MATH: `--head-dim 2048`.

Real run (one GPU):  python clipo.py --model Qwen2.5-1.5B --dataset gsm8k --track
Default (CPU, minutes): python clipo.py
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
import math


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

    # ALGO LOGIC: GRPO's arguments (docs/algorithms.md#grpo), then CLIPO's (#clipo; official values)
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
    head: Literal["linear", "mlp"] = "linear"
    """the contrastive head: Linear(d, D), or `mlp` Linear(d, d) -> ReLU -> Linear(d, D) (no biases, as official)"""
    head_dim: int = 512
    """D, the contrastive embedding size (official: 512 on GSM8K, 2048 on MATH)"""
    head_lr: float = 1e-3
    """AdamW learning rate of the head (one step per RL step)"""
    head_weight_decay: float = 0.01
    """AdamW weight decay of the head"""
    head_warmup_steps: int = 0
    """the first N steps train only the head; the policy does not change (official: one epoch, 13 steps on GSM8K)"""
    tau: float = 0.05
    """InfoNCE temperature"""
    bonus_coef: float = 0.2
    """lambda: an anchor's reward bonus is -lambda * L_i"""
    bonus_min: float = -0.5
    """the bonus is clamped from below at this value"""
    supcon_eps: float = 0.0
    """added inside the log after subtracting the row max 1/tau, as the official supcon_loss (1e-8); 0: exact InfoNCE"""

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


# ALGO LOGIC: advantages and loss (docs/algorithms.md#grpo); CLIPO's representation, head, InfoNCE, bonus (#clipo)
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


@torch.no_grad()
@dist.fsdp_forward
def pooled_hidden(model, input_ids, attention_mask, completion_mask) -> torch.Tensor:
    """h_i: the mean over a response's tokens of the last layer's hidden states after the final norm (the decoder's
    last_hidden_state == `hidden_states[-1]` of the HF forward), fp32, (b, d). No grad: CLIPO never trains the
    policy through its representation. completion_mask (b, L-1) marks shifted targets: the response token at
    position t+1 sits under completion_mask[:, t]."""
    hidden = model.get_decoder()(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state.float()
    mask = torch.nn.functional.pad(completion_mask, (1, 0))  # (b, L): the response tokens' own positions
    return (hidden * mask.unsqueeze(-1)).sum(1) / mask.sum(1, keepdim=True).clamp(min=1)  # (b, d)


class ContrastiveHead(torch.nn.Module):
    """z = normalize(W h): Linear(d, D), or `mlp`: Linear(d, d) -> ReLU -> Linear(d, D); no biases (official)."""

    def __init__(self, d_model: int, dim: int, kind: str = "linear"):
        super().__init__()
        if kind == "linear":
            self.proj = torch.nn.Linear(d_model, dim, bias=False)
        elif kind == "mlp":
            self.proj = torch.nn.Sequential(torch.nn.Linear(d_model, d_model, bias=False), torch.nn.ReLU(),
                                            torch.nn.Linear(d_model, dim, bias=False))
        else:
            raise ValueError(f"unknown head {kind!r}")

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.normalize(self.proj(h), dim=-1)  # (N, D) unit rows


def sample_positives(correct: torch.Tensor, group_size: int, generator: torch.Generator) -> torch.Tensor:
    """Anchors and their positives. correct (B*G,) bool, grouped. A correct rollout is an anchor when its group holds
    another correct rollout and at least one incorrect one; its ONE positive is drawn uniformly from the other
    correct rollouts of its group. Returns (B*G,) long: the positive's index within the group, -1 off anchors."""
    c = correct.cpu().view(-1, group_size)  # (B, G)
    n_correct = c.sum(1, keepdim=True)
    anchors = c & (n_correct >= 2) & (n_correct < group_size)  # (B, G)
    others = c.unsqueeze(1) & ~torch.eye(group_size, dtype=torch.bool)  # (B, G, G): j is correct and j != i
    positives = torch.full(c.shape, -1, dtype=torch.long)
    if anchors.any():
        positives[anchors] = torch.multinomial(others[anchors].float(), 1, generator=generator).squeeze(1)
    return positives.view(-1)


def group_infonce(z: torch.Tensor, positives: torch.Tensor, group_size: int, tau: float,
                  eps: float = 0.0) -> torch.Tensor:
    """L_i = -s_ip + log sum_{a != i} exp(s_ia), s = z z^T / tau within a group; z (B*G, D) unit rows, positives
    from `sample_positives`. Returns (B*G,), 0 off anchors. eps > 0 reproduces the official supcon_loss, which
    subtracts the row max m = s_ii = 1/tau and adds eps inside the log: log(sum_a exp(s_ia) + eps * e^m)."""
    zg = z.view(-1, group_size, z.shape[-1])  # (B, G, D)
    s = (zg @ zg.transpose(1, 2) / tau).reshape(-1, group_size)  # (B*G, G): row i against its own group
    self_mask = torch.eye(group_size, dtype=torch.bool, device=z.device).repeat(len(zg), 1)  # (B*G, G)
    log_denominator = torch.logsumexp(s.masked_fill(self_mask, float("-inf")), dim=1)  # (B*G,)
    if eps > 0:
        row_max = s.max(dim=1).values.detach()
        log_denominator = torch.logaddexp(log_denominator, row_max + math.log(eps))
    is_anchor = positives >= 0
    s_pos = s.gather(1, positives.clamp(min=0).unsqueeze(1)).squeeze(1)  # (B*G,)
    return torch.where(is_anchor, log_denominator - s_pos, torch.zeros_like(s_pos))


def contrastive_bonus(head, head_optimizer, hidden, rewards, group_size, generator, *, tau, coef, floor, eps=0.0):
    """One CLIPO step: the reward bonus max(-coef * L_i, floor) of each anchor (0 elsewhere) from the head as it is,
    then one optimizer step of the head on the mean of L_i over the anchors. hidden (B*G, d) no-grad fp32;
    rewards (B*G,) verifier rewards, correct means > 0 (official). Returns (bonus (B*G,) on CPU, stats)."""
    positives = sample_positives(rewards > 0, group_size, generator).to(hidden.device)
    is_anchor = positives >= 0
    losses = group_infonce(head(hidden), positives, group_size, tau, eps)  # (B*G,)
    bonus = torch.where(is_anchor, (-coef * losses.detach()).clamp(min=floor), torch.zeros_like(losses))
    n_anchors, loss = int(is_anchor.sum()), torch.zeros(())
    if dist.total(n_anchors):  # a batch without anchors leaves the head as it is (torchrun: no rank has one)
        loss = losses[is_anchor].sum() / dist.mean(n_anchors)  # torchrun: with sync_grads, the mean over all anchors
        head_optimizer.zero_grad(set_to_none=True)
        loss.backward()
        dist.sync_grads(head)  # torchrun: the replicated head's gradients, averaged over ranks
        head_optimizer.step()
    stats = {"clipo/contrastive_loss": float(loss.detach()), "clipo/frac_anchors": n_anchors / len(rewards),
             "clipo/mean_bonus": float(bonus.sum()) / max(n_anchors, 1)}  # mean over the anchors
    return bonus.cpu(), stats

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
    # rollouts (CLIPO: the contrastive head, and the run's engine)
    head = ContrastiveHead(model.config.hidden_size, args.head_dim, args.head).to(device)
    head_optimizer = torch.optim.AdamW(head.parameters(), lr=args.head_lr, weight_decay=args.head_weight_decay)
    algo_state, train_engine = {"contrastive_head": head, "contrastive_head_optimizer": head_optimizer}, engine

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

        # ALGO LOGIC: advantages of the verifier rewards here (their group std is logged); replaced below by those of
        # the shaped rewards once the hidden states exist
        advantages, group_std = compute_advantages(rewards, args.group_size, args.scale_rewards, args.adv_eps)
        zero_std = (group_std == 0).repeat_interleave(args.group_size)  # (B*G,)
        in_loss = ~zero_std if args.drop_zero_std_groups else torch.ones_like(zero_std)
        # a sequence with A = 0 and beta = 0 has zero gradient: skip its forward/backward (exact: the loss's
        # normalisers still count it)
        needs_grad = in_loss & ((advantages != 0) | (args.beta > 0))
        # with one update in all, rho == 1: the old log-probs are the detached current ones, no extra forward
        compute_old_logps = num_updates > 1
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

        # ALGO LOGIC: terms that need the rollout policy's log-probs (CLIPO: the bonus from its hidden states)
        hidden = torch.zeros(N, model.config.hidden_size, device=device)  # (B*G, d) fp32
        with autocast:
            for s in range(0, N, micro_size):
                micro = slice(s, s + micro_size)
                L = int(b_attention_mask[micro].sum(1).max())
                hidden[micro] = pooled_hidden(model, b_input_ids[micro, :L], b_attention_mask[micro, :L],
                                              b_mask[micro, : L - 1])
        # positives are drawn from (seed, step) alone, like the engine's seed: a resumed run draws the same ones
        generator = torch.Generator().manual_seed(args.seed * 1_000_003 + global_step)
        bonus, clipo_stats = contrastive_bonus(head, head_optimizer, hidden, rewards, args.group_size, generator,
                                               tau=args.tau, coef=args.bonus_coef, floor=args.bonus_min,
                                               eps=args.supcon_eps)
        metrics.update(clipo_stats)
        advantages, _ = compute_advantages(rewards + bonus, args.group_size, args.scale_rewards, args.adv_eps)
        b_advantages = advantages.to(device)
        # anchors lie only in groups with mixed rewards, so zero-std groups keep A = 0. During the head's warm-up
        # nothing is back-propagated: the policy's optimizer finds no gradient and leaves the weights as they are
        needs_grad = in_loss & ((advantages != 0) | (args.beta > 0)) & (global_step > args.head_warmup_steps)

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
                    # ALGO LOGIC: the loss of a micro-batch
                    per_token, stats = grpo_loss(logps, b_old_logps[micro, : L - 1], b_advantages[micro],
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

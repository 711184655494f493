"""Mutation testing: plant one small bug at a time in a scratch copy of the project, run the fast tests, and count
the bugs they catch (the kill rate) and the ones they miss (the survivors).

    python tools/mutate.py                          # every mutant; report: benchmarks/results/mutation.md
    python tools/mutate.py --list                   # id, file, function, description of each mutant
    python tools/mutate.py --only grpo.clip-swap-eps cepo.lambda-off-by-one
    python tools/mutate.py --files grpo.py common/reward.py --report /tmp/mutation.md

The mutants are a curated list (MUTANTS below), not generated from the AST. Each one names its file, the function
it lives in (`__main__` for the `if __name__ == "__main__":` block), the exact original snippet, its replacement, and
the bug it stands for: a sign flip, a comparison swap, min <-> max, swapped clamp bounds or eps_low/eps_high, an
off-by-one in a slice, an index or a step count, sum <-> mean, a dropped term, a tweaked constant. A curated list
keeps every mutant a bug someone could plausibly write, leaves out the equivalent ones an AST generator produces by
the hundred (`CHUNK_ROWS = 1024` -> `1025`), reaches the main loops' wiring lines, and keeps the run to minutes.
The PyPI tools were tried on this layout: cosmic-ray 8.7 generates 1,749 mutants for grpo.py alone (the whole
module, docstrings and the main loop included, no per-function filter); mutmut 3.8 mutates only inside functions
(never the `__main__` block), copies only the mutated files (the tests then miss common/) and first traces the whole
test selection. The original snippet must occur exactly once inside its
function, and in a script inside an `# ALGO LOGIC:` block (a shared block is compared to grpo.py by
tests/test_house_rule.py, which would catch any edit there); tests/test_mutate.py checks that for every mutant, so
the list cannot rot silently when the code changes: a stale mutant stops the run before any test runs, unless
`--skip-stale` (to run this list on an older tree) reports it as stale and leaves it out of the rates.

Which tests run: the fast subset (`-m "not slow"`, the marker tests/conftest.py registers) of the test files that
refer to the mutated file directly: they import it (`import grpo`, `from common.reward import ...`, also inside a
function), or name it (`"grpo.py"`, a test that runs the script as a subprocess). `--depth 2` adds the tests one
more hop away (a test importing a script that imports common/logprobs.py, ...): a wider net, a slower run. Files
are run nearest first, then quickest first (from the baseline), with `-x`: the first failure kills the mutant and
ends its run. A mutant's run that passes the per-mutant timeout is killed too (a planted bug that hangs a test is
a caught bug), and the report says `timeout`. tests/test_mutate.py never runs inside the tool.

Before any mutant, a baseline runs the same tests on the unmutated copy: a test that fails there is deselected
from every mutant's run and named in the report (else it would "kill" every mutant). pytest runs in children forked
from a server that imported torch and transformers once (`--no-fork`: a plain `python -m pytest` each time; the
tool switches to it by itself when a test fails only under the fork server). Everything runs in scratch
copies of the repository (one per `--jobs` worker, under the system temp dir, removed at the end); the tree the tool
lives in is only read. Bytecode caching is off in the copies, so a mutant and the original can never share a .pyc.

Reading a survivor: either the mutant is equivalent (no input the project can produce tells it apart: say why in
the survivor list), or a test is missing. docs/testing.md has the how-to and the latest numbers.
"""
from __future__ import annotations

import argparse
import ast
import functools
import json
import os
import queue
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from tools.sync_shared import MARKER  # noqa: E402  (one definition of the block markers)

SCRIPTS = ("grpo.py", "clipo.py", "conspo.py", "cepo.py", "r2po.py")
DEFAULT_REPORT = "benchmarks/results/mutation.md"
SKIP_DIRS = {".git", "__pycache__", ".pytest_cache", "runs", "wandb", "benchmarks/results", "benchmarks/out"}


@dataclass(frozen=True)
class Mutant:
    id: str
    file: str  # relative to the repository root
    function: str  # "name", "Class.method", or "__main__" for the `if __name__ == "__main__":` block
    original: str  # occurs exactly once in the function's source
    replacement: str
    description: str


M = Mutant
MUTANTS = [
    # ---------------------------------------------------------------- grpo.py: advantages, aggregation, loss
    M("grpo.adv-sign", "grpo.py", "compute_advantages", "adv = r - r.mean(dim=1, keepdim=True)",
      "adv = r.mean(dim=1, keepdim=True) - r", "sign flip: A = mean - r"),
    M("grpo.adv-mean-axis", "grpo.py", "compute_advantages", "adv = r - r.mean(dim=1,", "adv = r - r.mean(dim=0,",
      "off-by-one axis: baseline is the mean over prompts, not over the group"),
    M("grpo.adv-group-layout", "grpo.py", "compute_advantages", "rewards.view(-1, group_size)",
      "rewards.view(group_size, -1).T", "grouping transposed: completions of different prompts share a group"),
    M("grpo.adv-biased-std", "grpo.py", "compute_advantages", "r.std(dim=1, keepdim=True)",
      "r.std(dim=1, keepdim=True, correction=0)", "biased std instead of the unbiased one of TRL/verl"),
    M("grpo.adv-no-eps", "grpo.py", "compute_advantages", "adv = adv / (std + eps)", "adv = adv / std",
      "dropped term: no eps added to the group std"),
    M("grpo.adv-scale-inverted", "grpo.py", "compute_advantages", "if scale_rewards:", "if not scale_rewards:",
      "negation: --scale-rewards does the opposite"),
    M("grpo.agg-no-mask", "grpo.py", "aggregate", "masked = per_token * mask", "masked = per_token",
      "dropped term: padding and prompt positions enter the loss"),
    M("grpo.agg-seq-mean", "grpo.py", "aggregate", "mask.sum(1).clamp(min=1)).sum() / n_seqs",
      "mask.sum(1).clamp(min=1)).mean()", "sum -> mean: a micro-batch normalised by its own size, not the mini-batch's"),
    M("grpo.agg-token-mean-denominator", "grpo.py", "aggregate", "masked.sum() / max(n_tokens, 1)",
      "masked.sum() / max(n_seqs, 1)", "token-mean divided by the number of sequences"),
    M("grpo.agg-drgrpo-no-seqs", "grpo.py", "aggregate", "(max_new_tokens * n_seqs)", "max_new_tokens",
      "dropped term: Dr. GRPO's normaliser forgets the number of sequences"),
    M("grpo.k3-sign", "grpo.py", "k3_kl", "x = ref_logps - logps", "x = logps - ref_logps",
      "sign flip: the reverse-direction k3"),
    M("grpo.k3-no-const", "grpo.py", "k3_kl", "torch.exp(x) - x - 1", "torch.exp(x) - x",
      "dropped term: k3 without the -1 (same gradient, wrong value)"),
    M("grpo.ratio-sign", "grpo.py", "grpo_loss", "logps - old_logps", "old_logps - logps",
      "sign flip: rho = pi_old / pi"),
    M("grpo.surrogate-max", "grpo.py", "grpo_loss", "torch.min(ratio * adv,", "torch.max(ratio * adv,",
      "min -> max: the optimistic bound of the clipped surrogate"),
    M("grpo.clip-swap-eps", "grpo.py", "grpo_loss", "torch.clamp(ratio, 1 - eps_low, 1 + eps_high)",
      "torch.clamp(ratio, 1 - eps_high, 1 + eps_low)", "eps_low and eps_high swapped in the clip"),
    M("grpo.clip-dropped", "grpo.py", "grpo_loss", "torch.clamp(ratio, 1 - eps_low, 1 + eps_high) * adv)",
      "ratio * adv)", "dropped term: no clipping at all"),
    M("grpo.tis-ignored", "grpo.py", "grpo_loss", "* is_weights", "* 1",
      "dropped term: truncated importance weights never applied"),
    M("grpo.dual-clip-sign", "grpo.py", "grpo_loss", "dual = (adv < 0) &", "dual = (adv > 0) &",
      "comparison swap: dual clip applied to positive advantages"),
    M("grpo.kl-sign", "grpo.py", "grpo_loss", "per_token = per_token + beta * kl", "per_token = per_token - beta * kl",
      "sign flip: the KL penalty rewards drifting from the reference"),
    M("grpo.clip-stat-low-sign", "grpo.py", "grpo_loss", "(ratio < 1 - eps_low) & (adv < 0)",
      "(ratio < 1 - eps_low) & (adv > 0)", "comparison swap in the logged clip_ratio/low_mean"),
    # grpo.py's main loop (ALGO LOGIC blocks of `if __name__ == "__main__":`)
    M("grpo.main-drop-zero-std-inverted", "grpo.py", "__main__", "in_loss = ~zero_std if", "in_loss = zero_std if",
      "negation: --drop-zero-std-groups keeps only the zero-std groups"),
    M("grpo.main-skip-kl-grad", "grpo.py", "__main__", "needs_grad = in_loss & ((advantages != 0) | (args.beta > 0))",
      "needs_grad = in_loss & (advantages != 0)", "dropped term: A = 0 sequences skipped although beta > 0 (no KL grad)"),
    M("grpo.main-old-logps-off-by-one", "grpo.py", "__main__",
      "compute_old_logps = num_updates > 1", "compute_old_logps = num_updates > 2",
      "off-by-one: with 2 updates old log-probs come from a policy already stepped"),
    M("grpo.main-swap-eps", "grpo.py", "__main__", "eps_low=args.eps_low, eps_high=args.eps_high",
      "eps_low=args.eps_high, eps_high=args.eps_low", "wiring: --eps-low and --eps-high swapped in the loss call"),
    M("grpo.main-adv-scale-flag", "grpo.py", "__main__",
      "compute_advantages(rewards, args.group_size, args.scale_rewards, args.adv_eps)",
      "compute_advantages(rewards, args.group_size, True, args.adv_eps)",
      "wiring: --no-scale-rewards ignored"),
    # a copy of GRPO's functions in a variant (the variants use their own, not grpo.py's)
    M("clipo.adv-sign", "clipo.py", "compute_advantages", "adv = r - r.mean(dim=1, keepdim=True)",
      "adv = r.mean(dim=1, keepdim=True) - r", "sign flip in clipo.py's copy of compute_advantages"),
    M("r2po.clip-swap-eps", "r2po.py", "grpo_loss", "torch.clamp(ratio, 1 - eps_low, 1 + eps_high)",
      "torch.clamp(ratio, 1 - eps_high, 1 + eps_low)", "eps_low/eps_high swapped in r2po.py's copy of grpo_loss"),
    M("cepo.surrogate-max", "cepo.py", "grpo_loss", "torch.min(ratio * adv,", "torch.max(ratio * adv,",
      "min -> max in cepo.py's per-token loss"),
    # ---------------------------------------------------------------- clipo.py
    M("clipo.pool-shift", "clipo.py", "pooled_hidden", "pad(completion_mask, (1, 0))", "pad(completion_mask, (0, 1))",
      "off-by-one: pools the positions before the response tokens"),
    M("clipo.pool-mean", "clipo.py", "pooled_hidden", "(hidden * mask.unsqueeze(-1)).sum(1) / mask.sum(1, keepdim=True)",
      "(hidden * mask.unsqueeze(-1)).mean(1) / mask.sum(1, keepdim=True)",
      "sum -> mean: pooled over the padded length as well"),
    M("clipo.head-normalize-axis", "clipo.py", "ContrastiveHead.forward", "dim=-1)", "dim=0)",
      "wrong axis: normalises over the batch, not each embedding"),
    M("clipo.anchor-min-correct", "clipo.py", "sample_positives", "(n_correct >= 2)", "(n_correct >= 1)",
      "comparison tweak: a lone correct rollout becomes an anchor"),
    M("clipo.anchor-all-correct", "clipo.py", "sample_positives", "(n_correct < group_size)",
      "(n_correct <= group_size)", "comparison swap: all-correct groups get anchors"),
    M("clipo.positive-may-be-self", "clipo.py", "sample_positives", "c.unsqueeze(1) & ~torch.eye(group_size, dtype=torch.bool)",
      "c.unsqueeze(1).expand(-1, group_size, -1)", "dropped term: an anchor may draw itself as its positive"),
    M("clipo.infonce-self-in-denominator", "clipo.py", "group_infonce", "s.masked_fill(self_mask, float(\"-inf\"))",
      "s", "dropped term: the anchor's own similarity enters the denominator"),
    M("clipo.infonce-sign", "clipo.py", "group_infonce", "log_denominator - s_pos, torch.zeros_like",
      "s_pos - log_denominator, torch.zeros_like", "sign flip of the InfoNCE loss"),
    M("clipo.infonce-tau", "clipo.py", "group_infonce", "zg.transpose(1, 2) / tau", "zg.transpose(1, 2) * tau",
      "similarities multiplied by tau instead of divided"),
    M("clipo.supcon-row-min", "clipo.py", "group_infonce", "row_max = s.max(dim=1)", "row_max = s.min(dim=1)",
      "max -> min: the official supcon_eps term uses the row minimum"),
    M("clipo.infonce-nonanchors", "clipo.py", "group_infonce",
      "torch.where(is_anchor, log_denominator - s_pos, torch.zeros_like(s_pos))", "log_denominator - s_pos",
      "dropped guard: non-anchors get a loss"),
    M("clipo.bonus-clamp-bound", "clipo.py", "contrastive_bonus", ".clamp(min=floor)", ".clamp(max=floor)",
      "swapped clamp bound: the bonus is capped from above at the floor"),
    M("clipo.correct-threshold", "clipo.py", "contrastive_bonus", "sample_positives(rewards > 0,",
      "sample_positives(rewards >= 0,", "comparison swap: every rollout counts as correct"),
    M("clipo.head-loss-sum", "clipo.py", "contrastive_bonus", "loss = losses[is_anchor].sum() / dist.mean(n_anchors)",
      "loss = losses[is_anchor].sum()", "mean -> sum: the head's loss (and its logged value) scales with the anchors"),
    M("clipo.main-bonus-dropped", "clipo.py", "__main__", "compute_advantages(rewards + bonus,",
      "compute_advantages(rewards,", "wiring: the contrastive bonus never reaches the advantages"),
    M("clipo.main-bonus-sign", "clipo.py", "__main__", "compute_advantages(rewards + bonus,",
      "compute_advantages(rewards - bonus,", "wiring sign flip: the bonus is subtracted"),
    M("clipo.main-warmup-off-by-one", "clipo.py", "__main__", "(global_step > args.head_warmup_steps)",
      "(global_step >= args.head_warmup_steps)", "off-by-one: the head warm-up ends one step early"),
    # ---------------------------------------------------------------- conspo.py
    M("conspo.score-mean-over-T", "conspo.py", "sequence_scores", "(logps * mask).sum(1) / mask.sum(1).clamp(min=1)",
      "(logps * mask).mean(1)", "sum -> mean: scores normalised by the padded length, not |o_i|"),
    M("conspo.score-no-mask", "conspo.py", "sequence_scores", "(logps * mask).sum(1)", "logps.sum(1)",
      "dropped term: padding positions enter the score"),
    M("conspo.margin-cos-sign", "conspo.py", "margin_schedule", "(1 - math.cos(", "(1 + math.cos(",
      "sign flip: the margin curriculum runs backwards"),
    M("conspo.margin-max", "conspo.py", "margin_schedule", "min(progress / alpha, 1.0)", "max(progress / alpha, 1.0)",
      "min -> max: the margin is M from the start"),
    M("conspo.margin-half", "conspo.py", "margin_schedule", "0.5 * max_margin", "max_margin",
      "constant tweak: the margin rises to 2M"),
    M("conspo.mixed-any", "conspo.py", "mixed_groups", "positive.any(1) & ~positive.all(1)", "positive.any(1)",
      "dropped term: all-positive groups are kept"),
    M("conspo.mixed-threshold", "conspo.py", "mixed_groups", "(rewards > 0)", "(rewards >= 0)",
      "comparison swap: every rollout is a positive"),
    M("conspo.margin-sign", "conspo.py", "group_infonce", "((s - margin) / tau)", "((s + margin) / tau)",
      "sign flip: the margin helps the positive"),
    M("conspo.negatives-axis", "conspo.py", "group_infonce", "(s / tau).unsqueeze(1)", "(s / tau).unsqueeze(2)",
      "off-by-one axis: row i holds its own score everywhere instead of the negatives'"),
    M("conspo.softmax-axis", "conspo.py", "group_infonce", ".log_softmax(2)", ".log_softmax(1)",
      "off-by-one axis: softmax over the wrong dimension"),
    M("conspo.no-tau-factor", "conspo.py", "group_infonce", "tau * log_p.diagonal(dim1=1, dim2=2) / n_pos",
      "log_p.diagonal(dim1=1, dim2=2) / n_pos", "dropped term: J without its factor tau"),
    M("conspo.coef-axis", "conspo.py", "group_infonce", "- p.sum(1)) / n_pos", "- p.sum(2)) / n_pos",
      "off-by-one axis: Lemma 2's column sums taken over rows"),
    M("conspo.npos-no-clamp", "conspo.py", "group_infonce", "positive.sum(1, keepdim=True).clamp(min=1)",
      "positive.sum(1, keepdim=True)", "constant tweak: N+ = 0 is divided by (NaN in groups without positives)"),
    M("conspo.loss-sign", "conspo.py", "conspo_loss", "return -(terms", "return (terms",
      "sign flip: the loss maximises -J"),
    M("conspo.loss-old-minus-new", "conspo.py", "conspo_loss", "(scores - old_scores)", "(old_scores - scores)",
      "sign flip of the first-order term: the gradient points the wrong way"),
    M("conspo.loss-mean", "conspo.py", "conspo_loss", ".sum() / n_groups", ".mean()",
      "sum -> mean: normalised by the micro-batch's sequences, not the kept groups"),
    M("conspo.main-progress-off-by-one", "conspo.py", "__main__", "margin_schedule((global_step - 1) / args.total_steps",
      "margin_schedule(global_step / args.total_steps", "off-by-one: the curriculum is one step ahead"),
    M("conspo.main-kept-layout", "conspo.py", "__main__", "kept.repeat_interleave(args.group_size)",
      "kept.repeat(args.group_size)", "wiring: group flags laid out per completion in the wrong order"),
    M("conspo.main-n-groups-all", "conspo.py", "__main__", "n_groups = dist.mean(int(kept.sum())) or 1",
      "n_groups = dist.mean(int(kept.numel())) or 1", "wiring: J averaged over every group, not the kept ones"),
    # ---------------------------------------------------------------- cepo.py
    M("cepo.lambda-off-by-one", "cepo.py", "cepo_lambda", "(step - 1) / max(decay_steps, 1)",
      "step / max(decay_steps, 1)", "off-by-one: lambda starts one step into its decay"),
    M("cepo.lambda-min", "cepo.py", "cepo_lambda", "return max(0.0,", "return min(0.0,",
      "max -> min: lambda is never positive"),
    M("cepo.wrong-threshold", "cepo.py", "wrong_answers", "if rewards[i] < 0.5]", "if rewards[i] > 0.5]",
      "comparison swap: the wrong answer is taken from a correct rollout"),
    M("cepo.official-inverted", "cepo.py", "wrong_answers", "if not official:", "if official:",
      "negation: the paper's and the official fallback exchanged"),
    M("cepo.fallback-flag", "cepo.py", "wrong_answers", "falls_back.append(worst is None or not boxed[worst])",
      "falls_back.append(worst is None)", "dropped term: a box-less wrong answer is not counted as a fallback"),
    M("cepo.weight-no-sign", "cepo.py", "cepo_advantages", " * delta)  # (N, T)", ".abs() * delta)  # (N, T)",
      "dropped term: w is not flipped for negative advantages"),
    M("cepo.weight-clamp-swapped", "cepo.py", "cepo_advantages", "w.clamp(1 - eps_w, 1 + eps_w)",
      "w.clamp(1 + eps_w, 1 - eps_w)", "swapped clamp bounds: every weight becomes 1 - eps_w"),
    M("cepo.bracket-no-one-minus", "cepo.py", "cepo_advantages", "((1 - lam) + lam *", "(1 + lam *",
      "dropped term: the bracket is (1 + lam w) instead of (1 - lam) + lam w"),
    M("cepo.teacher-no-space", "cepo.py", "teacher_logps", "tokenizer(\" \" + (answers[i] or \"\"),",
      "tokenizer((answers[i] or \"\"),", "dropped term: the reference answer is glued to the prompt without a space"),
    M("cepo.teacher-order", "cepo.py", "teacher_logps",
      "prompts[i] + tokenizer(\" \" + (answers[i] or \"\"), add_special_tokens=False)[\"input_ids\"]",
      "tokenizer(\" \" + (answers[i] or \"\"), add_special_tokens=False)[\"input_ids\"] + prompts[i]",
      "swapped: the reference answer is put before the prompt"),
    M("cepo.delta-sign", "cepo.py", "evidence_delta", "return (plus - minus)", "return (minus - plus)",
      "sign flip: Delta = wrong-answer teacher minus right-answer teacher"),
    M("cepo.fallback-swapped", "cepo.py", "evidence_delta", "old_logps if rlsd_fallback else plus",
      "plus if rlsd_fallback else old_logps", "swapped: RLSD and the official fallback exchanged"),
    M("cepo.delta-all-rows", "cepo.py", "evidence_delta",
      "* completion_mask * torch.tensor(rows, device=plus.device).unsqueeze(1)", "* completion_mask",
      "dropped term: rows the teachers did not read get a Delta"),
    M("cepo.main-lambda-step", "cepo.py", "__main__", "lam = cepo_lambda(global_step,", "lam = cepo_lambda(global_step - 1,",
      "off-by-one: lambda of the 0-based step"),
    M("cepo.main-wrong-answer-index", "cepo.py", "__main__", "answers[i // args.group_size]",
      "answers[i % args.group_size]", "wiring: rollouts read another group's wrong answer"),
    M("cepo.main-delta-sign", "cepo.py", "__main__", "cepo_advantages(b_advantages, delta, lam,",
      "cepo_advantages(b_advantages, -delta, lam,", "wiring sign flip of Delta"),
    # ---------------------------------------------------------------- r2po.py
    M("r2po.head-zeroes-w1", "r2po.py", "RolloutHead.__init__", "torch.nn.init.zeros_(self.w2.weight)",
      "torch.nn.init.zeros_(self.w1.weight)", "wrong layer zeroed: the explorer does not start at the policy"),
    M("r2po.head-no-relu", "r2po.py", "RolloutHead.forward", "self.w2(torch.relu(self.w1(h)))", "self.w2(self.w1(h))",
      "dropped term: no ReLU in the head"),
    M("r2po.explorer-logps-no-relu", "r2po.py", "explorer_logps", "torch.relu(head.w1(hidden))", "head.w1(hidden)",
      "dropped term: the fused explorer log-probs skip the ReLU"),
    M("r2po.frequency-not-inverse", "r2po.py", "head_advantages", "scores = 1.0 / ", "scores = 1.0 * ",
      "the frequency instead of the inverse frequency: the common outcome scores high"),
    M("r2po.head-adv-sign", "r2po.py", "head_advantages", "(scores - scores.mean(dim=1, keepdim=True))",
      "(scores.mean(dim=1, keepdim=True) - scores)", "sign flip of the head's advantages"),
    M("r2po.head-adv-kind-inverted", "r2po.py", "head_advantages", "if kind == \"inverse-frequency\" else r  #",
      "if kind != \"inverse-frequency\" else r  #", "negation: --head-advantage reward and inverse-frequency exchanged"),
    M("r2po.main-stage-off-by-one", "r2po.py", "__main__", "(args.head_steps + args.policy_steps) < args.head_steps",
      "(args.head_steps + args.policy_steps) <= args.head_steps", "off-by-one: one head round too many per cycle"),
    M("r2po.main-swap-eps", "r2po.py", "__main__", "eps_low=args.eps_low, eps_high=args.eps_high",
      "eps_low=args.eps_high, eps_high=args.eps_low", "wiring: eps_low and eps_high swapped in the policy step"),
    # ---------------------------------------------------------------- common/logprobs.py
    M("logprobs.temperature-times", "common/logprobs.py", "_chunk_stats", "logits.float() / temperature",
      "logits.float() * temperature", "logits multiplied by the temperature instead of divided"),
    M("logprobs.logp-sign", "common/logprobs.py", "_chunk_stats", "index.unsqueeze(-1)).squeeze(-1) - lse",
      "index.unsqueeze(-1)).squeeze(-1) + lse", "sign flip: log p = x_y + lse"),
    M("logprobs.entropy-sign", "common/logprobs.py", "_chunk_stats", "ent = lse - (p", "ent = lse + (p",
      "sign flip in the entropy"),
    M("logprobs.plain-entropy-sign", "common/logprobs.py", "_plain", "ent = -(lsm.exp() * lsm)",
      "ent = (lsm.exp() * lsm)", "negation: the plain path's entropy is negative"),
    M("logprobs.auto-triton-on-cpu", "common/logprobs.py", "_use_triton", "return tensor.is_cuda and",
      "return tensor.is_cuda or", "and -> or: `auto` picks Triton on CPU tensors"),
    M("logprobs.ignored-not-zeroed", "common/logprobs.py", "_without_ignored", "logp = logp.masked_fill(~valid, 0.0)",
      "logp = logp", "dropped term: ignored (padding) rows keep a log-prob"),
    # ---------------------------------------------------------------- common/triton_logprobs.py (torch-facing code)
    M("triton.lse-sign", "common/triton_logprobs.py", "_Stats.finalize", "self.m + log_s", "self.m - log_s",
      "sign flip: lse = m - log s"),
    M("triton.entropy-sign", "common/triton_logprobs.py", "_Stats.finalize", "log_s - self.t / self.s",
      "log_s + self.t / self.s", "sign flip in the entropy"),
    M("triton.strides-swapped", "common/triton_logprobs.py", "_rows", "logits.stride(0), logits.stride(1)",
      "logits.stride(1), logits.stride(0)", "swapped arguments: a 3-D view's row strides exchanged"),
    M("triton.temperature", "common/triton_logprobs.py", "_LogitsLogprobs.forward",
      "stats.update(x, T, sb, st, idx, 0, V, 1.0 / temperature,", "stats.update(x, T, sb, st, idx, 0, V, temperature,",
      "constant tweak: the kernel scales logits by T instead of 1/T"),
    M("triton.grad-hidden-sign", "common/triton_logprobs.py", "_HeadLogprobs.backward", "g_hidden += g @ w",
      "g_hidden -= g @ w", "sign flip of the hidden states' gradient"),
    M("triton.needs-grad-off-by-one", "common/triton_logprobs.py", "_HeadLogprobs.backward",
      "ctx.needs_input_grad[:2]", "ctx.needs_input_grad[1:3]", "off-by-one slice: the weight's gradient is dropped"),
    # ---------------------------------------------------------------- common/reward.py (scoring and guards)
    M("reward.first-box", "common/reward.py", "extract_boxed", "for last in _BOX_RE.finditer(text):\n        pass",
      "last = _BOX_RE.search(text)", "the first \\boxed{} instead of the last"),
    M("reward.brace-depth-off-by-one", "common/reward.py", "extract_boxed", "if depth == 0:", "if depth == 1:",
      "off-by-one: the closing brace is matched one level too deep"),
    M("reward.keeps-open-brace", "common/reward.py", "extract_boxed", "text[start + 1 : m.start()]",
      "text[start : m.start()]", "off-by-one slice: the answer keeps its opening brace"),
    M("reward.depth-min", "common/reward.py", "_brace_depth", "deepest = max(deepest, depth)",
      "deepest = min(deepest, depth)", "max -> min: the nesting guard never fires"),
    M("reward.depth-cap-inclusive", "common/reward.py", "RewardChecker.score", "_brace_depth(pred) > MAX_BRACE_DEPTH",
      "_brace_depth(pred) >= MAX_BRACE_DEPTH", "comparison swap: answers at the nesting cap are rejected"),
    M("reward.length-guard-dropped", "common/reward.py", "RewardChecker.score",
      "len(pred) > MAX_ANSWER_CHARS or _brace_depth", "_brace_depth", "dropped term: no length guard"),
    M("reward.share-floor", "common/reward.py", "RewardChecker._check", "share = -(-len(items) // len(self._workers))",
      "share = len(items) // len(self._workers)", "ceil -> floor: the last items of a batch are never checked"),
    M("reward.item-clock-not-reset", "common/reward.py", "RewardChecker._check",
      "worker.deadline = now + self.timeout_s  # next item's clock starts now", "pass",
      "dropped: the timeout covers a worker's whole batch, not each item"),
    M("reward.verdict-negated", "common/reward.py", "_worker_main", "return [float(ok), \"ok\"]",
      "return [float(not ok), \"ok\"]", "negation of math-verify's verdict"),
    M("reward.eval-guard-prefix", "common/reward.py", "_restrict_string_eval", "_CALL_FREE_RE.fullmatch(s)",
      "_CALL_FREE_RE.match(s)", "match instead of fullmatch: code after a call-free prefix reaches eval"),
    M("reward.gsm8k-commas", "common/reward.py", "gsm8k_gold", "tail.strip().replace(\",\", \"\")", "tail.strip()",
      "dropped term: thousands commas stay in GSM8K golds"),
    # ---------------------------------------------------------------- common/checkpoint.py
    M("checkpoint.keep-off-by-one", "common/checkpoint.py", "save_checkpoint", "[:-keep_last]", "[: -keep_last + 1]",
      "off-by-one: one checkpoint fewer than --keep-last is kept"),
    M("checkpoint.resume-oldest", "common/checkpoint.py", "load_checkpoint", "ckpt = candidates[-1]",
      "ckpt = candidates[0]", "off-by-one index: resume from the oldest checkpoint"),
    M("checkpoint.torch-rng-not-restored", "common/checkpoint.py", "set_rng_state",
      "torch.set_rng_state(state[\"torch\"])", "pass", "dropped: torch's RNG is not restored on resume"),
    # ---------------------------------------------------------------- common/vllm_engine.py (weight naming, sync)
    M("vllm.named-parameters", "common/vllm_engine.py", "checkpoint_tensors", "model.state_dict().items()",
      "model.named_parameters()", "parameters only: persistent buffers and the tied lm_head.weight are not sent"),
    M("vllm.name-prefix-dropped", "common/vllm_engine.py", "checkpoint_tensors", "yield name, (tensor.full_tensor()",
      "yield name.removeprefix(\"model.\"), (tensor.full_tensor()", "weight names without HF's `model.` prefix"),
    M("vllm.stop-ids-dropped", "common/vllm_engine.py", "VLLMEngine.__init__",
      "model_eos_ids(model_dir) + list(stop_token_ids)", "model_eos_ids(model_dir)",
      "dropped term: extra stop ids are ignored"),
    M("vllm.prefix-cache-kept", "common/vllm_engine.py", "VLLMEngine.load_weights", "self.llm.reset_prefix_cache()",
      "pass", "dropped: cached prompt KV blocks of the old weights are reused"),
    M("vllm.finished-negated", "common/vllm_engine.py", "VLLMEngine.generate", "c.finish_reason == \"stop\"",
      "c.finish_reason != \"stop\"", "negation: `finished` flags inverted"),
    M("vllm.same-seed-per-prompt", "common/vllm_engine.py", "VLLMEngine.generate",
      "np.random.SeedSequence(seed).generate_state(len(prompt_ids))", "[seed] * len(prompt_ids)",
      "every prompt of a step shares one seed"),
    # ---------------------------------------------------------------- common/hf_engine.py (HF rollouts, R2PO's explorer)
    M("r2po.explorer-sign", "common/hf_engine.py", "HFEngine.generate", "logits + self.residual(inputs[0])",
      "logits - self.residual(inputs[0])", "sign flip: R2PO's explorer samples from lm_head(h) - head(h)"),
    M("hf_engine.stop-token-dropped", "common/hf_engine.py", "HFEngine.generate", "(i + 1 for i, t in enumerate(row)",
      "(i for i, t in enumerate(row)", "off-by-one slice: the stop token is cut off, never trained on"),
    # ---------------------------------------------------------------- common/run.py (resume, guards, checkpoints)
    M("run.metrics-truncation", "common/run.py", "Run.__init__", "json.loads(l)[\"step\"] <= self.step",
      "json.loads(l)[\"step\"] < self.step", "comparison swap: a resumed run drops its checkpoint step's metrics"),
    M("run.real-model-overrides-flags", "common/run.py", "Run.__init__", " if k not in given_flags(argv)}", "}",
      "dropped guard: a real model's settings override the flags given"),
    M("run.nan-guard", "common/run.py", "Run.check_grad_norm", "if not math.isfinite(float(grad_norm)):",
      "if math.isinf(float(grad_norm)):", "a NaN gradient norm passes the guard"),
    M("run.save-every-off-by-one", "common/run.py", "Run.should_save", "step % self.args.save_every == 0",
      "(step + 1) % self.args.save_every == 0", "off-by-one: checkpoints one step early"),
    # ---------------------------------------------------------------- common/data.py (gold answers, prompts, order)
    M("data.plain-not-stripped", "common/data.py", "gold_from_field", "return text.strip()", "return text",
      "dropped: plain gold answers keep surrounding whitespace"),
    M("data.bool-answers-accepted", "common/data.py", "gold_from_field",
      "or isinstance(value, bool)", "and isinstance(value, bool)", "or -> and: a boolean answer field is accepted"),
    M("data.boxed-not-extracted", "common/data.py", "gold_from_field", "        return boxed\n",
      "        return text\n", "the whole solution text becomes the gold of a boxed-format row"),
    M("data.tokenizer-trap", "common/data.py", "load_tokenizer", "tok = PreTrainedTokenizerFast.from_pretrained(path)",
      "tok = AutoTokenizer.from_pretrained(path)",
      "a local tokenizer.json is loaded with AutoTokenizer (the Qwen2 trap: its class rebuilds the pre-tokenizer)"),
    M("data.instruction-first", "common/data.py", "encode_prompts", "[q + instruction for q in questions]",
      "[instruction + q for q in questions]", "swapped: the instruction comes before the question"),
    M("data.order-ignores-seed", "common/data.py", "step_prompts", "default_rng([seed, epoch])",
      "default_rng([0, epoch])", "constant tweak: --seed does not change the data order"),
    M("data.long-prompt-inclusive", "common/data.py", "load_examples", "if len(ids) > max_prompt_len:",
      "if len(ids) >= max_prompt_len:", "comparison swap: a prompt of exactly --max-prompt-len tokens is skipped"),
]


# ---------------------------------------------------------------------------------------------------- applying
class StaleMutant(Exception):
    """The mutant's function or snippet is not (exactly once) where the list says."""


def _function_node(tree: ast.Module, name: str) -> ast.AST:
    if name == "__main__":
        for node in tree.body:
            if isinstance(node, ast.If) and "__name__" in ast.unparse(node.test) and "__main__" in ast.unparse(node.test):
                return node
        raise StaleMutant("no `if __name__ == \"__main__\":` block")
    body, node = tree.body, None
    for part in name.split("."):
        node = next((n for n in body if isinstance(n, (ast.FunctionDef, ast.ClassDef)) and n.name == part), None)
        if node is None:
            raise StaleMutant(f"no function {name}")
        body = node.body
    return node


@functools.lru_cache(maxsize=32)
def _parsed(source: str) -> tuple[ast.Module, list[int], frozenset[int]]:
    """(tree, offset of each line start, 1-based numbers of the lines inside `# ALGO LOGIC:` blocks), per file text."""
    offsets, inside, algo = [0], False, set()
    for number, line in enumerate(source.splitlines(keepends=True), 1):
        offsets.append(offsets[-1] + len(line))
        if MARKER.match(line):  # the block markers as tools/sync_shared.py reads them
            inside = "ALGO LOGIC" in line
        if inside:
            algo.add(number)
    return ast.parse(source), offsets, frozenset(algo)


def apply(mutant: Mutant, source: str) -> str:
    """The mutated source. Raises StaleMutant unless the snippet occurs exactly once in its function (in a script,
    inside an ALGO LOGIC block) and the result still compiles."""
    tree, offsets, algo_lines = _parsed(source)
    node = _function_node(tree, mutant.function)
    start, end = offsets[node.lineno - 1], offsets[node.end_lineno]
    count = source.count(mutant.original, start, end)
    if count != 1:
        raise StaleMutant(f"snippet found {count} times in {mutant.function}: {mutant.original!r}")
    at = source.index(mutant.original, start, end)
    if mutant.file in SCRIPTS:
        first = source.count("\n", 0, at) + 1
        last = first + mutant.original.count("\n")
        if not set(range(first, last + 1)) <= algo_lines:
            raise StaleMutant(f"lines {first}-{last} are outside the ALGO LOGIC blocks")
    mutated = source[:at] + mutant.replacement + source[at + len(mutant.original):]
    try:
        compile(mutated, mutant.file, "exec")
    except SyntaxError as e:
        raise StaleMutant(f"the mutated file does not compile: {e}") from None
    return mutated


# ---------------------------------------------------------------------------------------------------- test selection
def _module_file(name: str, root: Path) -> str | None:
    """The project file of an imported module name, searched as the tests see it (root and tests/ on sys.path)."""
    for base in (root, root / "tests"):
        for candidate in (base / (name.replace(".", "/") + ".py"), base / name.replace(".", "/") / "__init__.py"):
            if candidate.is_file():
                return candidate.relative_to(root).as_posix()
    return None


def references(path: Path, root: Path, project_files: list[str]) -> set[str]:
    """Project files a Python file imports (anywhere in it) or names in a string ("grpo.py", "benchmarks/x.py").

    A dynamic import (`importlib.import_module(name)`, `pytest.importorskip(name)`) with a computed name counts every
    string of the file that names a project module (`for name in ("grpo", "clipo")`) as imported."""
    refs, names, strings, dynamic = set(), [], [], False
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names += [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        elif (isinstance(node, ast.Call) and node.args and
              getattr(node.func, "attr", getattr(node.func, "id", None)) in ("importorskip", "import_module")):
            if isinstance(node.args[0], ast.Constant):
                names.append(str(node.args[0].value))  # pytest.importorskip("common.triton_logprobs")
            else:
                dynamic = True
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            strings.append(node.value)
            if node.value.endswith(".py"):
                refs.update(f for f in project_files if f == node.value or f.endswith("/" + node.value))
    if dynamic:
        names += [s for s in strings if re.fullmatch(r"[A-Za-z_][\w.]*", s)]
    refs.update(f for f in map(lambda name: _module_file(name, root), names) if f)
    refs.discard(path.relative_to(root).as_posix())
    return refs


@functools.lru_cache(maxsize=4)
def reference_graph(root: Path) -> dict[str, set[str]]:
    """Project .py file -> the project files it refers to (see `references`)."""
    files = []
    for folder, dirs, names in os.walk(root):
        dirs[:] = [d for d in dirs if not d.startswith(".") and d not in ("runs", "wandb", "__pycache__")]
        files += [(Path(folder) / n).relative_to(root).as_posix() for n in names if n.endswith(".py")]
    files.sort()
    return {f: references(root / f, root, files) for f in files}


def select_tests(target: str, root: Path, depth: int = 1) -> list[tuple[int, str]]:
    """(distance, test file) for the tests that reach `target` within `depth` references, nearest first."""
    graph = reference_graph(root)
    tests = [f for f in graph if re.fullmatch(r"tests/test_\w+\.py", f) and f != "tests/test_mutate.py"]
    selected = []
    for test in tests:
        frontier, seen = {test}, {test}
        for distance in range(1, depth + 1):
            frontier = {r for f in frontier for r in graph[f]} - seen
            if target in frontier:
                selected.append((distance, test))
                break
            seen |= frontier
    return sorted(selected)


# ---------------------------------------------------------------------------------------------------- running
@dataclass
class Outcome:
    status: str  # killed, survived, timeout (counted as killed), no tests (counted as survived), stale, not run
    by: str = ""  # the first failing test, or a note
    seconds: float = 0.0

    @property
    def killed(self) -> bool:
        return self.status in ("killed", "timeout")


def _node_id(case: ET.Element) -> str:
    file, name = case.get("file"), case.get("name", "")
    if file:
        return f"{file}::{name}"
    return f"{case.get('classname', '')} {name}".strip()  # a collection error: the module's dotted name


PRELOAD = ("numpy", "torch", "transformers", "tyro", "tqdm", "safetensors.torch", "sympy", "pytest")


STOP = threading.Event()  # set on Ctrl-C / SIGTERM: runs in flight are killed, no new one starts


def _wait_group(pid: int, timeout: float) -> int | None:
    """Wait for process `pid` (a group leader) up to `timeout` s; then kill what is left of its group (a timed-out
    run, or workers a run left behind). Returns its exit code, None on a timeout."""
    deadline, rc = time.time() + timeout, None
    while time.time() < deadline and not STOP.is_set():
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            rc = os.waitstatus_to_exitcode(status)
            break
        time.sleep(0.05)
    try:
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    if rc is None:
        os.waitpid(pid, 0)
    return rc


def serve() -> None:
    """`--serve`: a fork server, one per job. It imports the heavy third-party modules once (PRELOAD; never the
    project's own), then for each request line (JSON: cwd, pytest args, timeout) forks a child that runs pytest in
    `cwd` as `python -m pytest` would, in its own process group, and answers one line (JSON: rc, null on a timeout).
    This saves each mutant the ~5 CPU-seconds of importing torch and transformers."""
    import importlib

    import torch

    if not torch.cuda.is_available():  # as tests/conftest.py does, before anything imports triton
        os.environ.setdefault("TRITON_INTERPRET", "1")
    for name in PRELOAD:
        try:
            importlib.import_module(name)
        except Exception:  # noqa: BLE001  (a missing optional module only costs its import time later)
            pass
    import pytest

    own = {str(ROOT), str(ROOT / "tools")}
    signal.signal(signal.SIGTERM, lambda *_: STOP.set())  # the tool is stopping: end the run in flight, then exit
    for line in sys.stdin:
        request = json.loads(line)
        pid = os.fork()
        if pid == 0:  # the child: a fresh pytest session in the scratch copy
            rc = 70
            try:
                os.setsid()
                null = os.open(os.devnull, os.O_RDWR)
                for fd in (0, 1, 2):
                    os.dup2(null, fd)
                for name in [n for n in sys.modules if n == "tools" or n.startswith("tools.")]:
                    del sys.modules[name]  # tools.sync_shared from this tree: the copy's own is imported instead
                sys.path[:] = [request["cwd"]] + [p for p in sys.path if p not in own]
                sys.argv = [str(Path(pytest.__file__).with_name("__main__.py")), *request["args"]]  # as `-m pytest`
                os.chdir(request["cwd"])
                rc = int(pytest.main(request["args"]))
            finally:
                os._exit(rc)
        rc = _wait_group(pid, request["timeout"])
        if STOP.is_set():
            return
        print(json.dumps({"rc": rc}), flush=True)


class Runner:
    """Runs pytest in one scratch copy: through a fork server (default) or as a plain `python -m pytest`."""

    def __init__(self, copy: Path, fork: bool, env: dict):
        self.copy, self.env, self.server = copy, env, None
        if fork:
            self.server = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--serve"], cwd=copy, env=env,
                                           stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)

    def close(self):
        if self.server:
            if STOP.is_set():
                self.server.terminate()
            self.server.stdin.close()
            self.server.wait()

    def run(self, test_files: list[str], marker: str, deselect: list[str], timeout: float, first_failure: bool = True
            ) -> tuple[str, list[str], dict[str, float], float]:
        """(status: passed/failed/timeout/empty, failing node ids, seconds per test file, wall seconds)."""
        fd, xml = tempfile.mkstemp(prefix="mutate-", suffix=".xml")
        os.close(fd)
        xml = Path(xml)
        args = ["-q", "-m", marker, "-p", "no:cacheprovider", "--junitxml", str(xml), "-o", "junit_family=xunit1",
                *(["-x"] if first_failure else []), *test_files]
        for node in deselect:
            args += ["--deselect", node]
        start = time.time()
        if self.server:
            self.server.stdin.write(json.dumps({"cwd": str(self.copy), "args": args, "timeout": timeout}) + "\n")
            self.server.stdin.flush()
            answer = self.server.stdout.readline()
            if not answer:
                if STOP.is_set():
                    return "stopped", [], {}, time.time() - start
                raise RuntimeError("the fork server died; run again with --no-fork")
            rc = json.loads(answer)["rc"]
        else:
            proc = subprocess.Popen([sys.executable, "-m", "pytest", *args], cwd=self.copy, env=self.env,
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
            rc = _wait_group(proc.pid, timeout)
            proc.returncode = rc if rc is not None else -9  # reaped by _wait_group
        wall = time.time() - start
        failing, per_file = [], {}
        try:
            for case in ET.parse(xml).getroot().iter("testcase"):
                if case.find("failure") is not None or case.find("error") is not None:
                    failing.append(_node_id(case))
                if case.get("file"):
                    per_file[case.get("file")] = per_file.get(case.get("file"), 0.0) + float(case.get("time", 0))
        except (ET.ParseError, FileNotFoundError):  # empty when pytest was killed
            pass
        xml.unlink(missing_ok=True)
        if STOP.is_set():
            return "stopped", [], per_file, wall
        if rc is None:
            return "timeout", [], per_file, wall
        if rc == 5:
            return "empty", failing, per_file, wall
        if rc == 0:
            return "passed", failing, per_file, wall
        return "failed", failing or [f"pytest exit code {rc}"], per_file, wall


def run_env() -> dict:
    """The environment of every run: no bytecode written (a mutant and the original file could otherwise share a
    stale .pyc), and tests/conftest.py's settings made before the fork server imports anything (huggingface_hub
    reads its own at import; the server sets TRITON_INTERPRET once it knows whether CUDA is there)."""
    env = dict(os.environ, PYTHONDONTWRITEBYTECODE="1")
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("WANDB_MODE", "disabled")
    return env


def make_copy(root: Path) -> Path:
    """A scratch copy of the repository without git data, caches, runs and results."""
    def ignore(folder, names):
        rel = Path(folder).relative_to(root)
        return [n for n in names if n in SKIP_DIRS or (rel / n).as_posix() in SKIP_DIRS or n.endswith(".pyc")]

    copy = Path(tempfile.mkdtemp(prefix="minirlvr-mutate-"))
    shutil.copytree(root, copy, ignore=ignore, dirs_exist_ok=True)
    return copy


# ---------------------------------------------------------------------------------------------------- report
def rate(outcomes: list[Outcome]) -> str:
    counted = [o for o in outcomes if o.status not in ("stale", "not run")]
    killed = sum(o.killed for o in counted)
    return f"{killed}/{len(counted)} ({100 * killed / max(len(counted), 1):.0f}%)"


def summary(mutants: list[Mutant], outcomes: dict[str, Outcome]) -> list[str]:
    lines = ["| file | mutants | killed | survived | stale or not run | kill rate |", "|---|---|---|---|---|---|"]
    files = list(dict.fromkeys(m.file for m in mutants))
    for f in files + ["all"]:
        os_ = [outcomes[m.id] for m in mutants if f in ("all", m.file)]
        killed = sum(o.killed for o in os_)
        stale = sum(o.status in ("stale", "not run") for o in os_)
        lines.append(f"| {f} | {len(os_) - stale} | {killed} | {len(os_) - stale - killed} | {stale} | {rate(os_)} |")
    return lines


def write_report(path: Path, mutants, outcomes, header: list[str]) -> None:
    def cell(s: str) -> str:
        return s.replace("|", "\\|").replace("\n", " ")

    lines = ["# Mutation testing", "", *header, "", "## Kill rate", "", *summary(mutants, outcomes), "",
             "## Survivors", ""]
    survivors = [m for m in mutants if outcomes[m.id].status in ("survived", "no tests")]
    lines += [f"- `{m.id}` ({m.file}, {m.function}): {m.description}" for m in survivors] or ["none"]
    lines += ["", "## Every mutant", "", "| id | file | function | description | result | by | seconds |",
              "|---|---|---|---|---|---|---|"]
    for m in mutants:
        o = outcomes[m.id]
        lines.append(f"| {m.id} | {m.file} | {cell(m.function)} | {cell(m.description)} | {o.status} | "
                     f"{cell(o.by)} | {o.seconds:.1f} |")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")


# ---------------------------------------------------------------------------------------------------- main
def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--list", action="store_true", help="list the mutants and exit")
    p.add_argument("--only", nargs="+", metavar="ID", help="run these mutants only")
    p.add_argument("--files", nargs="+", metavar="FILE", help="run the mutants of these files only (grpo.py, common/reward.py)")
    p.add_argument("--report", default=DEFAULT_REPORT, help=f"markdown report (default: {DEFAULT_REPORT})")
    p.add_argument("--jobs", type=int, default=1, help="mutants run in parallel, one scratch copy each (default 1)")
    p.add_argument("--timeout", type=float, default=None,
                   help="seconds per mutant (default: 60 + 3 x the baseline time of its tests); past it: killed")
    p.add_argument("--marker", default="not slow", help="pytest -m expression of the tests to run (default: not slow)")
    p.add_argument("--depth", type=int, default=1, help="tests up to this many references from the file (default 1)")
    p.add_argument("--tests", nargs="+", metavar="TEST", help="run these test files or node ids for every mutant instead")
    p.add_argument("--deselect", nargs="+", default=[], metavar="NODE_ID",
                   help="tests (pytest node id prefixes) left out of every run, e.g. a tree whose slow tests are unmarked")
    p.add_argument("--no-baseline", action="store_true", help="skip the baseline run of the unmutated copy")
    p.add_argument("--fork", action=argparse.BooleanOptionalAction, default=True,
                   help="run pytest in children forked from a server that imported torch and transformers once "
                        "(default); --no-fork: a plain `python -m pytest` per run")
    p.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--skip-stale", action="store_true",
                   help="report mutants whose snippet is not in this tree as stale instead of stopping")
    args = p.parse_args(argv)
    if args.serve:
        serve()
        return 0

    mutants = MUTANTS
    if args.only:
        unknown = set(args.only) - {m.id for m in MUTANTS}
        if unknown:
            p.error(f"unknown mutant ids: {', '.join(sorted(unknown))} (see --list)")
        mutants = [m for m in mutants if m.id in args.only]
    if args.files:
        unknown = set(args.files) - {m.file for m in MUTANTS}
        if unknown:
            p.error(f"no mutants in {', '.join(sorted(unknown))}; files with mutants: "
                    f"{', '.join(dict.fromkeys(m.file for m in MUTANTS))}")
        mutants = [m for m in mutants if m.file in args.files]
    if args.list:
        for m in mutants:
            print(f"{m.id:34s} {m.file:26s} {m.function:24s} {m.description}")
        print(f"{len(mutants)} mutants")
        return 0

    outcomes: dict[str, Outcome] = {}
    mutated: dict[str, str] = {}
    stale = []
    for m in mutants:
        try:
            mutated[m.id] = apply(m, (ROOT / m.file).read_text())
        except StaleMutant as e:
            stale.append(f"{m.id}: {e}")
            outcomes[m.id] = Outcome("stale", str(e))
    if stale and not args.skip_stale:
        print("stale mutants (fix MUTANTS in tools/mutate.py, or run with --skip-stale):\n  " + "\n  ".join(stale))
        return 2
    runnable = [m for m in mutants if m.id in mutated]

    selections = {f: ([(0, t) for t in args.tests] if args.tests else select_tests(f, ROOT, args.depth))
                  for f in dict.fromkeys(m.file for m in runnable)}
    all_tests = sorted({t for sel in selections.values() for _, t in sel})
    t_start = time.time()
    env = run_env()
    copies = [make_copy(ROOT) for _ in range(max(1, min(args.jobs, len(runnable))))]
    runners = [Runner(c, args.fork, env) for c in copies]
    deselect, per_file, threads = list(args.deselect), {}, []
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # `kill` stops cleanly, as Ctrl-C does
    try:
        if not args.no_baseline and all_tests:
            print(f"baseline: {len(all_tests)} test files on the unmutated copy ...", flush=True)
            status, failing, per_file, wall = runners[0].run(all_tests, args.marker, deselect, 3600, False)
            if failing and args.fork:  # a test that fails only in a forked child: fall back to plain pytest runs
                plain = Runner(copies[0], False, env).run(all_tests, args.marker, deselect, 3600, False)
                if len(plain[1]) < len(failing):
                    print(f"baseline: {failing} fail only under the fork server: plain pytest runs from here on")
                    for r in runners:
                        r.close()
                    runners = [Runner(c, False, env) for c in copies]
                    status, failing, per_file, wall = plain
            deselect += [f for f in failing if "::" in f]
            broken = [f for f in failing if "::" not in f]
            print(f"baseline: {status} in {wall:.0f} s; deselected: {deselect or 'none'}", flush=True)
            if broken:
                print(f"baseline cannot run: {broken}")
                return 2

        def order(sel):  # nearest first, then quickest first
            return [t for _, t in sorted(sel, key=lambda dt: (dt[0], per_file.get(dt[1], 0.0)))]

        work: queue.Queue = queue.Queue()
        for m in runnable:
            work.put(m)
        lock, done = threading.Lock(), [0]

        def worker(runner: Runner):
            while not STOP.is_set():
                try:
                    m = work.get_nowait()
                except queue.Empty:
                    return
                tests = order(selections[m.file])
                timeout = args.timeout or 60 + 3 * sum(per_file.get(t, 10.0) for t in tests)
                target = runner.copy / m.file
                original = target.read_text()
                target.write_text(mutated[m.id])
                try:
                    if not tests:
                        o = Outcome("no tests", "no test file refers to this file")
                    else:
                        status, failing, _, wall = runner.run(tests, args.marker, deselect, timeout)
                        if status == "stopped":
                            return
                        o = {"failed": Outcome("killed", failing[0] if failing else ""),
                             "timeout": Outcome("timeout", f"no result within {timeout:.0f} s"),
                             "empty": Outcome("no tests", f"no test selected by -m {args.marker!r}"),
                             "passed": Outcome("survived")}[status]
                        o.seconds = wall
                finally:
                    target.write_text(original)
                with lock:
                    outcomes[m.id] = o
                    done[0] += 1
                    print(f"[{done[0]}/{len(runnable)}] {m.id:34s} {o.status:8s} {o.by} ({o.seconds:.1f} s)", flush=True)

        threads = [threading.Thread(target=worker, args=(r,)) for r in runners]
        for t in threads:
            t.start()
        for t in threads:
            while t.is_alive():
                t.join(0.2)  # a bare join() would not let Ctrl-C in
    except KeyboardInterrupt:
        STOP.set()
        print("interrupted: the runs in flight are stopped; the report holds the mutants that finished")
        for t in threads:
            t.join()
    finally:
        for r in runners:
            r.close()
        for c in copies:
            shutil.rmtree(c, ignore_errors=True)

    for m in runnable:
        outcomes.setdefault(m.id, Outcome("not run", "interrupted"))
    wall = time.time() - t_start
    try:
        tree = subprocess.run(["git", "-C", str(ROOT), "describe", "--always", "--dirty"], capture_output=True,
                              text=True).stdout.strip() or "not a git checkout"
    except OSError:
        tree = "git not found"
    header = [f"Tree: `{ROOT}` at `{tree}`; command: `python tools/mutate.py {' '.join(argv or sys.argv[1:])}`",
              f"Tests: `-m {args.marker!r}`, depth {args.depth}, `-x`, {len(copies)} job(s), "
              f"{'fork server' if runners[0].server else 'plain pytest'}; wall time {wall:.0f} s.",
              f"Deselected (--deselect, then the tests failing on the unmutated copy): {', '.join(deselect) or 'none'}.",
              "", "Test files per mutated file, in the order they run:", ""]
    header += [f"- {f}: {', '.join(t for _, t in sel) or 'none'}" for f, sel in selections.items()]
    report = (ROOT / args.report) if not Path(args.report).is_absolute() else Path(args.report)
    write_report(report, mutants, outcomes, header)
    print("\n".join(summary(mutants, outcomes)))
    survivors = [m.id for m in mutants if outcomes[m.id].status in ("survived", "no tests")]
    print(f"survivors: {', '.join(survivors) or 'none'}")
    print(f"kill rate {rate(list(outcomes.values()))} in {wall:.0f} s; report: {report}")
    return 130 if STOP.is_set() else 0


if __name__ == "__main__":
    sys.exit(main())

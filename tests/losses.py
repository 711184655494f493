"""The loss as the scripts' update loop computes it from a script's `grpo_loss` and `aggregate`, for the tests that
hand-work loss values, gradients and logged statistics."""


def scripts_loss(module, logps, old_logps, advantages, mask, *, agg, n_seqs, n_tokens, max_new_tokens, **kw):
    """module.grpo_loss's per-token loss reduced by module.aggregate per `agg`, as the update loop does, and its
    per-token statistics summed over the response tokens (the loop then divides them by the mini-batch's tokens).
    kw: grpo_loss's own keywords (eps_low, eps_high, beta, ref_logps, is_weights, dual_clip)."""
    per_token, stats = module.grpo_loss(logps, old_logps, advantages, **kw)
    loss = module.aggregate(per_token, mask, agg, n_seqs, n_tokens, max_new_tokens)
    return loss, {k: (v * mask).sum() for k, v in stats.items()}

"""cepo.py's evidence_delta: Delta is 0 on every row the teachers do not read, also where the RLSD fallback would
stand in for a missing wrong answer (Delta = right-answer teacher - pi_old on a row that is read).

The loop cannot show it: a row it does not teach has A = 0 or lambda = 0, so its Delta never reaches the loss (the
reason this bug survives every run of a script). It is `evidence_delta`'s own contract, "0 elsewhere", which a caller
that reads Delta on every row (a metric, another weighting) relies on.

Planted bug it was checked against: the `rows` factor dropped from evidence_delta's return (tools/mutate.py's
cepo.delta-all-rows), which gives an untaught row with no wrong answer Delta = -pi_old.
"""
import torch
from test_cepo import KW, batch, model, tokenizer  # noqa: F401  (the real tiny model, tokenizer and batch fixtures)

from cepo import evidence_delta


def test_untaught_rows_get_no_delta_even_under_the_rlsd_fallback(tokenizer, model, batch):  # noqa: F811
    prompts, completions, golds, completion_mask = batch
    old_logps = -completion_mask  # pi_old: log-prob -1 on every response token, nonzero where a fallback reads it
    wrong = ["7", None, None, "3"]  # rows 1 and 2: no usable wrong answer
    rows = [True, True, False, False]  # rows 2 and 3 are not taught
    delta = evidence_delta(model, tokenizer, prompts, completions, completion_mask, golds, wrong, old_logps, rows,
                           rlsd_fallback=True, pad_id=tokenizer.pad_token_id, **KW)
    m = completion_mask.bool()
    assert (delta[1][m[1]] != 0).any()  # a taught row without a wrong answer: the fallback's Delta
    assert torch.all(delta[2] == 0) and torch.all(delta[3] == 0)

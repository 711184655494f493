"""Greedy accuracy on held-out problems, through the run's rollout engine and reward checker."""
from __future__ import annotations

import time


def evaluate(engine, model, version, examples, tokenizer, checker, max_tokens: int,
             batch_size: int = 256) -> tuple[float, float]:
    """(share of `examples` whose greedy completion the checker accepts, seconds). `engine.rollout` loads the
    model's weights first when `version` (the trainer's step) is not the one it holds."""
    start, correct = time.time(), 0.0
    for s in range(0, len(examples), batch_size):
        chunk = examples[s : s + batch_size]
        out = engine.rollout(model, version, [e.prompt_ids for e in chunk], n=1, temperature=0.0, top_p=1.0,
                             max_tokens=max_tokens)
        texts = tokenizer.batch_decode(out.completion_ids, skip_special_tokens=True)
        correct += sum(checker.score(texts, [e.gold for e in chunk]))
    return correct / max(len(examples), 1), time.time() - start

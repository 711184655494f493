"""common/reward.py: --reward-timeout-s bounds each check, not a worker's whole batch.

A batch of honest answers that each take a fraction of the timeout, but together several times it, must be scored in
full with no timeout. The slow answers are real: a fraction nested MAX_BRACE_DEPTH deep (1/(1/(...(1/k)))), which
math-verify takes a measurable time to parse and compare; no test-only hook. The timeout is set from the time one such
check takes on this machine (10x it), so the test means the same on a fast and on a loaded machine.

Planted bug it was checked against: the per-item clock reset in RewardChecker._check removed (the worker's deadline
then runs from the batch's send), which scores the items after the first `timeout` seconds 0 as timeouts.
"""
import math
import statistics
import time

from common.reward import MAX_BRACE_DEPTH, RewardChecker


def _nested_fraction(k: int) -> str:
    """An answer equal to k: MAX_BRACE_DEPTH nested reciprocals (an even number of them) of k."""
    assert MAX_BRACE_DEPTH % 2 == 0
    return r"\boxed{" + r"\frac{1}{" * MAX_BRACE_DEPTH + str(k) + "}" * MAX_BRACE_DEPTH + "}"


def test_each_check_gets_the_whole_timeout_not_the_batch():
    with RewardChecker(timeout_s=60.0, num_workers=1) as checker:  # one worker: the whole batch is its queue
        assert checker.score([_nested_fraction(1000)], ["1000"]) == [1.0]  # the worker is up and warm
        times = []
        for k in (1001, 1002, 1003):  # distinct answers: nothing is cached
            t = time.perf_counter()
            assert checker.score([_nested_fraction(k)], [str(k)]) == [1.0]
            times.append(time.perf_counter() - t)
        item = statistics.median(times)
        checker.timeout_s = max(10 * item, 0.5)  # each check: a tenth of the timeout or less
        ks = range(2000, 2000 + math.ceil(2 * checker.timeout_s / item))  # the batch: about 2 timeouts' worth
        t = time.perf_counter()
        scores = checker.score([_nested_fraction(k) for k in ks], [str(k) for k in ks])
        elapsed = time.perf_counter() - t
        assert elapsed > checker.timeout_s, f"the batch took {elapsed:.2f} s, not more than one timeout"
        assert checker.stats["timeouts"] == 0 and scores == [1.0] * len(ks)

"""common/reward.py: extraction, judging, the cache, hostile completions, and all of MATH-500
and GSM8K test (tests/data/, see its README) as real positives and negatives.

Every check runs in real worker processes with the real math-verify; nothing is mocked. The
hanging input is a real one (`9^{9^{9^{9}}}` against 72 keeps sympy busy for minutes), no
test-only hook.
"""
import json
import os
import signal
import threading
import time
from pathlib import Path

import pytest
from sympy.parsing import sympy_parser

from common.reward import (
    MAX_ANSWER_CHARS,
    MAX_BRACE_DEPTH,
    RewardChecker,
    _restrict_string_eval,
    extract_boxed,
    gsm8k_gold,
    math_gold,
)

DATA = Path(__file__).parent / "data"
ATTACK_TIMEOUT_S = 1.0
HANG = r"\boxed{9^{9^{9^{9}}}}"  # against gold "72": numeric comparison of a power tower
RESTART_S = 30.0  # generous bound on a worker restart (measured ~1.5 s) on a shared machine


def _rows(name):
    with open(DATA / name) as f:
        return [json.loads(line) for line in f]


def _nested(depth, inner):
    return "{" * depth + inner + "}" * depth


@pytest.fixture(scope="module")
def checker():
    """For the attacks: a short timeout keeps the hang tests quick."""
    with RewardChecker(timeout_s=ATTACK_TIMEOUT_S, num_workers=2) as c:
        yield c


@pytest.fixture(scope="module")
def judge():
    """For the tests of verdicts. 30 s, not the 2 s default: the slowest MATH-500 item takes
    0.8 s alone but several times that when other jobs load the 2 cores."""
    with RewardChecker(timeout_s=30.0, num_workers=2) as c:
        yield c


_fresh = iter(range(1000, 10**6))


def _still_works(checker):
    """A never-seen item (no cache hit) scores 1.0: the workers are alive and answering."""
    n = next(_fresh)
    assert checker.score([rf"so \boxed{{{n}}}"], [str(n)]) == [1.0]


# ---------------------------------------------------------------- extraction and golds

@pytest.mark.parametrize("text, expected", [
    (r"\boxed{1} then \boxed{72}", "72"),
    (r"\boxed{\frac{1}{2}}.", r"\frac{1}{2}"),
    (r"$\boxed{\{1, 2\}}$", r"\{1, 2\}"),  # escaped braces do not count
    (r"\boxed{a\\}", "a\\\\"),  # `\\` is one escape, the brace after it closes
    (r"\fbox{7}", "7"),
    (r"\boxed {5}", "5"),
    (r"the answer is \boxed 42.", "42."),
    (r"\boxed 9$ done", "9"),
    (r"\boxed{\text{Evelyn}}", r"\text{Evelyn}"),
    ("no box here", None),
    (r"\boxedfoo{3}", None),  # another command, not a box
    (r"\boxed{72} and then \boxed{7", None),  # the last box is cut off
    (r"\boxed", None),
    ("", None),
])
def test_extract_boxed(text, expected):
    assert extract_boxed(text) == expected


def test_extract_boxed_is_linear():
    assert extract_boxed(rf"\boxed{{{_nested(10_000, 'x')}}}") == _nested(10_000, "x")
    texts = ("x" * 1_000_000 + r"\boxed{1}", r"\boxed{" + "{" * 1_000_000, r"\boxed " * 200_000)
    for text in texts:
        t = time.perf_counter()
        extract_boxed(text)
        assert time.perf_counter() - t < 5.0


def test_gsm8k_gold():
    assert gsm8k_gold("3 + 4 = <<3+4=7>>7\n#### 1,234") == "1234"
    assert gsm8k_gold("#### -5 ") == "-5"
    with pytest.raises(ValueError, match="####"):
        gsm8k_gold("The answer is 72.")
    with pytest.raises(ValueError, match="####"):
        gsm8k_gold("so\n#### ")


def test_math_gold():
    assert math_gold(r" \frac{1}{2} ") == r"\frac{1}{2}"
    assert math_gold(r"So $x = \boxed{3}$ and \boxed{\left( 3, \frac{\pi}{2} \right)}.") == (
        r"\left( 3, \frac{\pi}{2} \right)")
    with pytest.raises(ValueError):
        math_gold(r"cut off \boxed{3")
    with pytest.raises(ValueError):
        math_gold("  ")


# ---------------------------------------------------------------- judging

@pytest.mark.parametrize("completion, gold, expected", [
    (r"So the total is \boxed{72}.", "72", 1.0),
    (r"\boxed{73}", "72", 0.0),
    (r"\boxed{1/2}", "0.5", 1.0),
    (r"\boxed{\frac{1}{2}}", "0.5", 1.0),
    (r"\boxed{\frac12}", r"\frac{1}{2}", 1.0),
    (r"\boxed{1/3}", "0.5", 0.0),
    (r"\boxed{(3, \pi/2)}", r"\left( 3, \frac{\pi}{2} \right)", 1.0),
    (r"\boxed{\left( 3, \frac{\pi}{3} \right)}", r"\left( 3, \frac{\pi}{2} \right)", 0.0),
    (r"\boxed{\text{Evelyn}}", r"\text{Evelyn}", 1.0),
    (r"\boxed{Evelyn}", r"\text{Evelyn}", 1.0),
    (r"\boxed{\text{Evenly}}", r"\text{Evelyn}", 0.0),
    (r"\boxed{\text{(C)}}", r"\text{(C)}", 1.0),
    (r"\boxed{1,000}", "1000", 1.0),
    (r"\boxed{\$18}", "18", 1.0),
    (r"\boxed{x = 5}", "5", 1.0),
    (r"\boxed{x^2+1}", "1+x^2", 1.0),
    (r"\boxed{3.0000001}", "3", 0.0),
    (r"\boxed{#### 72}", "72", 0.0),  # GSM8K's marker inside a box is a format error
    ("#### 72", "72", 0.0),  # no box
    ("The answer is 72.", "72", 0.0),  # no box
])
def test_score_cases(judge, completion, gold, expected):
    assert judge.score([completion], [gold]) == [expected]


def test_score_batch_and_stats(judge):
    before = dict(judge.stats)
    scores = judge.score([r"\boxed{12}", "no box", r"\boxed{13}", r"\boxed{12}"], ["12"] * 4)
    assert scores == [1.0, 0.0, 0.0, 1.0]
    delta = {k: judge.stats[k] - before[k] for k in before}
    assert delta["calls"] == 4 and delta["no_answer"] == 1
    assert delta["cache_hits"] >= 1  # the repeated (12, 12) at least
    with pytest.raises(ValueError):
        judge.score(["a"], [])
    assert judge.score([], []) == []


def test_cache_hits_and_speed():
    golds = [str(n) for n in range(300)]
    completions = [rf"\boxed{{{n}}}" for n in range(300)]
    with RewardChecker(num_workers=1) as c:
        assert c.score([r"\boxed{-1}"], ["-1"]) == [1.0]  # the worker is up: time checks only
        t = time.perf_counter()
        assert c.score(completions, golds) == [1.0] * 300
        first = time.perf_counter() - t
        t = time.perf_counter()
        assert c.score(completions, golds) == [1.0] * 300
        second = time.perf_counter() - t
        assert c.stats["cache_hits"] == 300
        assert second < first / 10
    with RewardChecker(num_workers=1, cache=False) as c:
        assert c.score(completions[:5] * 2, golds[:5] * 2) == [1.0] * 10
        assert c.stats["cache_hits"] == 0


# ---------------------------------------------------------------- hostile completions

def _code_attacks(sentinel):
    cmd = f"__import__('os').system('touch {sentinel}')"
    return [
        rf"\boxed{{{cmd}}}",
        rf"\boxed{{1+{cmd}}}",
        rf'\boxed{{eval("{cmd}")}}',
        rf'\boxed{{exec("import os; os.system(\'touch {sentinel}\')")}}',
        rf"\boxed{{(lambda: {cmd})()}}",
        rf"\boxed{{\text{{{cmd}}}}}",
        rf"\boxed{{{cmd.replace('(', '{').replace(')', '}')}}}",
    ]


def test_code_in_answers_is_never_run(checker, tmp_path):
    sentinel = tmp_path / "SENTINEL"
    for attack in _code_attacks(sentinel):
        t = time.perf_counter()
        assert checker.score([attack], ["72"]) == [0.0]
        assert time.perf_counter() - t < ATTACK_TIMEOUT_S + RESTART_S
        assert not sentinel.exists(), attack
        # The gold is the same attack string: it must not run from that side either.
        checker.score([r"\boxed{1}"], [attack.removeprefix(r"\boxed{")[:-1]])
        assert not sentinel.exists(), attack
    _still_works(checker)


def test_restrict_string_eval(monkeypatch, tmp_path):
    """The worker's guard: sympy's `eval` of strings only sees call-free text."""
    import sympy

    monkeypatch.setattr(sympy_parser, "parse_expr", sympy_parser.parse_expr)  # restored after
    _restrict_string_eval()
    sentinel = tmp_path / "SENTINEL"
    with pytest.raises(ValueError, match="call-free"):
        sympy.sympify(f"__import__('os').system('touch {sentinel}')")
    assert not sentinel.exists()
    assert sympy.sympify("72") == 72 and sympy.Number("2.5") == 2.5


# A stand-in for a parser that hands the raw answer to sympy's string eval; see the test's docstring.
UNSAFE_PARSE = r"""
import json
import os

import math_verify
import sympy

_parse = math_verify.parse


def parse(text, *args, **kwargs):
    answer = text.removeprefix("\\boxed{").removesuffix("}")  # the worker parses "\boxed{" + answer + "}"
    try:
        sympy.sympify(answer)
        outcome = "evaluated"
    except Exception as e:
        outcome = f"refused: {e}"
    with open(os.environ["REWARD_TEST_EVAL_LOG"], "a") as f:
        f.write(json.dumps([answer, outcome]) + "\n")
    return _parse(text, *args, **kwargs)


math_verify.parse = parse
"""


def test_worker_installs_the_guard(monkeypatch, tmp_path):
    """The guard as the scripts get it: RewardChecker's real worker processes, started as the scripts start them,
    with answers that run code if sympy's string eval sees them unguarded.

    Stand-in, and why: no answer reaches sympy's eval with code through math-verify 0.9.0's LaTeX path (only number
    tokens get there, docs/reward.md), so with the real parser alone these answers score 0 with or without the guard.
    A `sitecustomize` on the workers' PYTHONPATH makes math_verify.parse first hand the raw answer to
    `sympy.sympify`, as a parser that reached the eval would (math-verify's own ExprExtractionConfig path calls
    `parse_expr` on raw text). The rest is real: the worker's startup, where the guard is installed, math-verify
    and the pipes. Without the guard five of the seven attacks run and the sentinel file appears."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(UNSAFE_PARSE)
    log = tmp_path / "eval.jsonl"
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(site), os.environ.get("PYTHONPATH")])))
    monkeypatch.setenv("REWARD_TEST_EVAL_LOG", str(log))
    sentinel = tmp_path / "SENTINEL"
    attacks = _code_attacks(sentinel)
    gold_attacks = [extract_boxed(a) for a in _code_attacks(tmp_path / "GOLD_SENTINEL")]  # other strings: no cache hit
    with RewardChecker(timeout_s=30.0) as c:
        assert c.score(attacks, ["72"] * len(attacks)) == [0.0] * len(attacks)
        assert c.score([r"\boxed{1}"] * len(gold_attacks), gold_attacks) == [0.0] * len(gold_attacks)
        assert c.score([r"\boxed{72}"], ["72"]) == [1.0]  # the stand-in leaves judging as it was
    assert not sentinel.exists() and not (tmp_path / "GOLD_SENTINEL").exists()
    outcomes = dict(json.loads(line) for line in log.read_text().splitlines())
    for answer in [extract_boxed(a) for a in attacks] + gold_attacks:  # each one reached sympify, which refused it
        assert "call-free" in outcomes[answer], answer


ODD_INPUTS = [  # (name, completion scored against gold "72", the counter it must raise)
    ("10,000-deep braces", rf"\boxed{{{_nested(10_000, '72')}}}", "rejected"),
    ("too deep, short", rf"\boxed{{{_nested(MAX_BRACE_DEPTH + 1, '72')}}}", "rejected"),
    ("1 MB answer", r"\boxed{" + "7" * 1_000_000 + "}", "rejected"),
    ("answer one char too long", r"\boxed{" + "1" * (MAX_ANSWER_CHARS + 1) + "}", "rejected"),
    ("1 MB of text, box cut off", "x" * 1_000_000 + r"\boxed{72", "no_answer"),
    ("1 MB of open braces", r"\boxed{" + "{" * 1_000_000, "no_answer"),
    ("RTL mark", "\\boxed{\u200f72}", None),
    ("RTL override in text", "\\boxed{\\text{\u202e27}}", None),
    ("zero-width joiner", "\\boxed{7\u200d2}", None),
    ("emoji", "\\boxed{\U0001F468\u200d\U0001F469\u200d\U0001F467}", None),
    ("NUL byte", "\\boxed{72\x00}", None),
    ("lone surrogate", "\\boxed{\ud800}", None),
]


@pytest.mark.parametrize("name, completion, counter", ODD_INPUTS, ids=[x[0] for x in ODD_INPUTS])
def test_odd_inputs(checker, name, completion, counter):
    before = dict(checker.stats)
    t = time.perf_counter()
    assert checker.score([completion], ["72"]) == [0.0], name
    assert time.perf_counter() - t < 10.0, name  # no timeout involved: bounded by the scans
    if counter:
        assert checker.stats[counter] == before[counter] + 1, name
    _still_works(checker)


def test_nesting_at_the_cap_is_still_judged(judge):
    # 1/(1/(.../2)) with MAX_BRACE_DEPTH nested fractions (an even number): 2. Fractions, not
    # bare braces, which math-verify parses in exponential time (0.6 s at the cap).
    assert MAX_BRACE_DEPTH % 2 == 0
    box = r"\boxed{" + r"\frac{1}{" * MAX_BRACE_DEPTH + "2" + "}" * MAX_BRACE_DEPTH + "}"
    assert judge.score([box], ["2"]) == [1.0]


@pytest.mark.parametrize("completion", [
    HANG,
    r"\boxed{10^{10^{10}}}",
    r"\boxed{1000000000!}",
    r"\boxed{(10^{100})!}",
])
def test_slow_sympy_is_cut_at_the_timeout(checker, completion):
    _still_works(checker)  # the worker is up, so the clock measures the item alone
    before = checker.stats["timeouts"]
    t = time.perf_counter()
    assert checker.score([completion], ["72"]) == [0.0]
    elapsed = time.perf_counter() - t
    assert ATTACK_TIMEOUT_S <= elapsed < ATTACK_TIMEOUT_S + 5.0  # kill + respawn: ~0.02 s unloaded
    assert checker.stats["timeouts"] == before + 1
    _still_works(checker)
    # Cached: the same hang costs nothing the second time.
    t = time.perf_counter()
    assert checker.score([completion], ["72"]) == [0.0]
    assert time.perf_counter() - t < 0.5


def test_hang_inside_a_batch_spares_the_rest(checker):
    _still_works(checker)
    n = next(_fresh)
    # 4 distinct checks (one repeat, one without a box), 2 per worker: the hang is the
    # first worker's first item, the second waits for its restart.
    completions = [r"\boxed{7^{7^{7^{7}}}}", rf"\boxed{{{n}}}", r"\boxed{5}", r"\boxed{6}",
                   rf"\boxed{{{n}}}", "x"]
    golds = ["72", str(n), "5", "6", str(n), "1"]
    before = dict(checker.stats)
    assert checker.score(completions, golds) == [0.0, 1.0, 1.0, 1.0, 1.0, 0.0]
    assert checker.stats["timeouts"] == before["timeouts"] + 1
    assert checker.stats["no_answer"] == before["no_answer"] + 1


def test_worker_killed_mid_item_counts_as_error(checker, monkeypatch):
    monkeypatch.setattr(checker, "timeout_s", 60.0)  # the kill, not the timeout, must end it
    _still_works(checker)
    pid = checker._workers[0].proc.pid
    threading.Timer(0.3, os.kill, (pid, signal.SIGKILL)).start()
    before = checker.stats["errors"]
    t = time.perf_counter()
    assert checker.score([r"\boxed{8^{8^{8^{8}}}}"], ["72"]) == [0.0]
    assert time.perf_counter() - t < 30.0
    assert checker.stats["errors"] == before + 1
    _still_works(checker)


def test_worker_killed_while_idle_is_replaced(checker):
    _still_works(checker)
    proc = checker._workers[0].proc
    proc.kill()
    proc.wait()
    _still_works(checker)


# ---------------------------------------------------------------- real data

# MATH-500 neighbours (row i's gold, row i+1's solution) whose answers are equal although
# their strings differ; decided by math-verify on the golds themselves.
MATH500_EQUAL_NEIGHBOURS = {22: "'5' and 'x=5': math-verify reads an assignment as its value"}


def _norm(s):
    return "".join(s.split())


def _neighbour_pairs(golds, completions, equal_by_verify):
    """(completion i+1, gold i) for every i, minus the pairs whose golds are equal."""
    n = len(golds)
    keep, excluded = [], []
    for i in range(n):
        j = (i + 1) % n
        same = _norm(golds[i]) == _norm(golds[j]) or i in equal_by_verify
        (excluded if same else keep).append((completions[j], golds[i]))
    return keep, excluded


def test_math500(judge):
    rows = _rows("math500_test.jsonl")
    assert len(rows) == 500
    golds = [math_gold(r["answer"]) for r in rows]
    solutions = [r["solution"] for r in rows]
    assert [math_gold(s) for s in solutions] == golds  # extraction agrees with the data set
    # Every solution is accepted against its own answer: no known exceptions.
    assert judge.score(solutions, golds) == [1.0] * 500
    keep, excluded = _neighbour_pairs(golds, solutions, MATH500_EQUAL_NEIGHBOURS)
    assert len(excluded) == 3  # 2 identical strings + the 1 listed above
    assert judge.score(*zip(*excluded)) == [1.0] * 3  # the exclusions are true equalities
    scores = judge.score(*zip(*keep))
    assert [p for p, s in zip(keep, scores) if s] == []
    assert judge.stats["timeouts"] == 0 and judge.stats["errors"] == 0


def test_gsm8k(judge):
    rows = _rows("gsm8k_test.jsonl")
    assert len(rows) == 1319
    golds = [gsm8k_gold(r["answer"]) for r in rows]
    # The full reference solution, its "#### N" line rewritten as the \boxed{N} we ask for
    # (N as written: "2,125" stays with its comma).
    completions = []
    for r in rows:
        body, _, number = r["answer"].rpartition("####")
        completions.append(body + rf"so the answer is \boxed{{{number.strip()}}}.")
    assert judge.score(completions, golds) == [1.0] * 1319
    keep, excluded = _neighbour_pairs(golds, completions, {})
    assert len(excluded) == 15  # neighbours with the same number
    scores = judge.score(*zip(*keep))
    assert [p[1] for p, s in zip(keep, scores) if s] == []
    assert judge.stats["timeouts"] == 0 and judge.stats["errors"] == 0

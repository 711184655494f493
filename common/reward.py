"""Verifiable reward: is the last `\\boxed{}` answer of a completion equal to the gold answer?

The algorithm scripts call `RewardChecker.score(completions, golds)` once per rollout batch and
get 1.0 (correct) or 0.0 per completion. Gold strings come from `gsm8k_gold` / `math_gold`.

Judging: take the last boxed answer of the completion (none -> 0.0), reject it if it is longer
than MAX_ANSWER_CHARS or nests braces deeper than MAX_BRACE_DEPTH, else wrap gold and answer
as `\\boxed{...}` and ask math-verify 0.9.0: `verify(parse(gold), parse(pred))`, extracting
with `LatexExtractionConfig` only. `ExprExtractionConfig` is left out on purpose: it is the one
math-verify path that feeds model text to sympy's `parse_expr`, i.e. Python `eval`; the
worker also restricts `parse_expr` to call-free strings (see `_restrict_string_eval`).

Bounded time: math-verify's own timeouts use `signal.alarm` (main thread only), so they are
switched off (`parsing_timeout=None, timeout_seconds=None`) and the checks run in worker
processes instead. The parent sends each worker its share of a batch in one message; the
worker answers item by item; an item that gets no answer within `timeout_s` has its worker
killed (SIGKILL) and restarted, scores 0.0 (counted in `stats["timeouts"]`), and the rest of
the batch goes on. Workers are started with `subprocess` (fork+exec of a fresh interpreter,
like multiprocessing's "spawn") rather than multiprocessing: spawn and forkserver re-import
the caller's `__main__` script (torch, transformers, vLLM) in every worker, seconds and
hundreds of MB per (re)start; fork of a process holding torch threads is unsafe.

docs/reward.md has the design, the measured costs and every attack input tried.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from collections import deque
from multiprocessing.connection import Connection, wait
from pathlib import Path

MAX_ANSWER_CHARS = 1000  # a longer boxed answer scores 0.0 without reaching math-verify
# MATH-500 answers nest braces at most 2 deep. math-verify's LaTeX parser is exponential in
# bare nesting: `{{...{72}...}}` takes 0.6 s at depth 6, 1.8 s at 10, 16 s at 14.
MAX_BRACE_DEPTH = 6
WORKER_START_TIMEOUT_S = 120.0  # import sympy + math-verify + warm-up, on a busy 2-core machine
WORKER_MEMORY_BYTES = 2 << 30  # RLIMIT_AS of a worker: a number bomb dies with MemoryError
CACHE_MAX_ENTRIES = 1 << 20  # oldest entries are dropped past this (dicts keep insertion order)

# `\boxed` / `\fbox` as whole commands (not `\boxedfoo`), plus the spaces after them.
_BOX_RE = re.compile(r"\\(?:boxed|fbox)(?![A-Za-z])\s*")
# Inside a box only braces and backslash escapes (`\{`, `\}`, `\\`) matter.
_BRACE_RE = re.compile(r"\\.|[{}]", re.DOTALL)
_WORD_RE = re.compile(r"[^\s$]+")
_CALL_FREE_RE = re.compile(r"[0-9A-Za-z.+\- ]*")  # see _restrict_string_eval
_PKG_ROOT = Path(__file__).resolve().parents[__name__.count(".")]  # the folder holding `common/`


def extract_boxed(text: str) -> str | None:
    """Content of the last `\\boxed{...}` / `\\fbox{...}` (or `\\boxed 42`) in `text`.

    Braces are matched with a counter (escaped `\\{` `\\}` skipped), so the cost is linear in
    len(text) and there is no recursion. None when there is no box or the last one is unbalanced
    (a completion cut off by the token limit).
    """
    last = None
    for last in _BOX_RE.finditer(text):
        pass
    if last is None:
        return None
    start = last.end()
    if start < len(text) and text[start] == "{":
        depth = 0
        for m in _BRACE_RE.finditer(text, start):
            c = m.group()
            if c == "{":
                depth += 1
            elif c == "}":
                depth -= 1
                if depth == 0:
                    return text[start + 1 : m.start()]
        return None
    # `\boxed 42`: LaTeX boxes one token; models mean the word up to a space or `$`.
    word = _WORD_RE.match(text, start)
    return word.group() if word else None


def _brace_depth(s: str) -> int:
    depth = deepest = 0
    for m in _BRACE_RE.finditer(s):
        c = m.group()
        if c == "{":
            depth += 1
            deepest = max(deepest, depth)
        elif c == "}":
            depth -= 1
    return deepest


def gsm8k_gold(answer_field: str) -> str:
    """GSM8K gold: the number after `####` in the `answer` field, thousands commas removed."""
    _, sep, tail = answer_field.rpartition("####")
    gold = tail.strip().replace(",", "")
    if not sep or not gold:
        raise ValueError(f"GSM8K answer has no '#### <number>' line: {answer_field[-200:]!r}")
    return gold


def math_gold(solution_or_answer: str) -> str:
    """MATH gold. Pass the `answer` field where the data set has one (MATH-500): it is returned
    stripped. A full `solution` (MATH train has no `answer` field) is recognised by its box and
    gives its last boxed content."""
    if _BOX_RE.search(solution_or_answer) is None:
        gold = solution_or_answer.strip()
    else:
        gold = (extract_boxed(solution_or_answer) or "").strip()
    if not gold:
        raise ValueError(f"no MATH answer in: {solution_or_answer[-200:]!r}")
    return gold


class RewardChecker:
    """Scores completions against gold answers: 1.0 correct, 0.0 otherwise. Use as
    `with RewardChecker() as checker: checker.score(completions, golds)`, or call close().

    timeout_s: wall-clock limit per checked item (see module docstring).
    num_workers: worker processes; a batch is split between them.
    cache: remember the score of each (extracted answer, gold) for the whole run.
    """

    def __init__(self, timeout_s: float = 2.0, num_workers: int = 1, cache: bool = True):
        if timeout_s <= 0 or num_workers < 1:
            raise ValueError("timeout_s must be > 0 and num_workers >= 1")
        self.timeout_s = timeout_s
        self.cache = cache
        # calls: completions scored; cache_hits: scored from the cache (or from a duplicate
        # in the same batch); no_answer: no boxed answer; rejected: answer over the length or
        # nesting cap; timeouts / errors: items that hung / raised or crashed their worker.
        self.stats = dict(calls=0, cache_hits=0, no_answer=0, rejected=0, timeouts=0, errors=0)
        self._cache: dict[tuple[str, str], float] = {}
        # Started now so their import overlaps with the caller's model loading.
        self._workers = [_Worker() for _ in range(num_workers)]

    def score(self, completions: list[str], golds: list[str]) -> list[float]:
        if len(completions) != len(golds):
            raise ValueError(f"{len(completions)} completions but {len(golds)} golds")
        self.stats["calls"] += len(completions)
        scores = [0.0] * len(completions)
        jobs: list[tuple[str, str]] = []  # distinct (answer, gold) pairs to check
        job_rows: list[list[int]] = []  # rows of `scores` each job fills
        job_of: dict[tuple[str, str], int] = {}
        for row, (completion, gold) in enumerate(zip(completions, golds)):
            pred = extract_boxed(completion)
            if pred is None:
                self.stats["no_answer"] += 1
                continue
            pred = pred.strip()
            if len(pred) > MAX_ANSWER_CHARS or _brace_depth(pred) > MAX_BRACE_DEPTH:
                self.stats["rejected"] += 1
                continue
            key = (pred, gold)
            if self.cache and key in self._cache:
                self.stats["cache_hits"] += 1
                scores[row] = self._cache[key]
            elif self.cache and key in job_of:
                self.stats["cache_hits"] += 1
                job_rows[job_of[key]].append(row)
            else:
                job_of[key] = len(jobs)
                jobs.append(key)
                job_rows.append([row])
        for key, rows, (score, status) in zip(jobs, job_rows, self._check(jobs)):
            if status != "ok":
                self.stats[{"timeout": "timeouts", "error": "errors"}[status]] += 1
            if self.cache:
                # Timeouts and errors are cached too: the same input would hang again.
                if len(self._cache) >= CACHE_MAX_ENTRIES:
                    del self._cache[next(iter(self._cache))]
                self._cache[key] = score
            for row in rows:
                scores[row] = score
        return scores

    def _check(self, items: list[tuple[str, str]]) -> list[tuple[float, str]]:
        """(score, status) per (answer, gold); status is "ok", "timeout" or "error"."""
        results: list[tuple[float, str] | None] = [None] * len(items)
        share = -(-len(items) // len(self._workers))  # ceil: contiguous chunks, one per worker
        busy = []
        for k, worker in enumerate(self._workers):
            worker.todo = deque(range(k * share, min((k + 1) * share, len(items))))
            worker.sent = False
            if worker.todo:
                busy.append(worker)
        while busy:
            for worker in busy:
                if worker.ready and not worker.sent:
                    try:
                        worker.send([items[i] for i in worker.todo], self.timeout_s)
                    except OSError:  # it died while idle (e.g. the OOM killer): start another
                        worker.restart()
            now = time.monotonic()
            first_deadline = min(w.deadline for w in busy)
            readable = wait([w.conn_in for w in busy], max(0.0, first_deadline - now))
            now = time.monotonic()
            for worker in busy:
                if worker.conn_in in readable:
                    try:
                        msg = worker.conn_in.recv_bytes()
                    except EOFError:  # crashed (segfault, killed from outside): blame the item
                        if not worker.ready:
                            raise RuntimeError("reward worker exited while starting (see stderr)")
                        results[worker.todo.popleft()] = (0.0, "error")
                        worker.restart()
                        continue
                    if not worker.ready:
                        worker.ready = msg == b"ready"
                        continue
                    score, status = json.loads(msg)
                    results[worker.todo.popleft()] = (score, status)
                    worker.deadline = now + self.timeout_s  # next item's clock starts now
                elif now >= worker.deadline:
                    if not worker.ready:
                        raise RuntimeError(f"reward worker not up after {WORKER_START_TIMEOUT_S} s")
                    results[worker.todo.popleft()] = (0.0, "timeout")
                    worker.restart()
            busy = [w for w in busy if w.todo]
        return results

    def close(self) -> None:
        for worker in self._workers:
            worker.stop()

    def __enter__(self) -> RewardChecker:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class _Worker:
    """Parent-side handle of one worker process and its two pipes."""

    def __init__(self):
        self.todo: deque[int] = deque()  # indices (into the current batch) not answered yet
        self._start()

    def _start(self) -> None:
        child_in, self_out = os.pipe()
        self_in, child_out = os.pipe()
        code = (f"import sys; sys.path.insert(0, {str(_PKG_ROOT)!r}); "
                f"from {__name__} import _worker_main; _worker_main({child_in}, {child_out})")
        self.proc = subprocess.Popen([sys.executable, "-c", code], pass_fds=(child_in, child_out),
                                     stdin=subprocess.DEVNULL)
        os.close(child_in)
        os.close(child_out)
        self.conn_in = Connection(self_in, writable=False)
        self.conn_out = Connection(self_out, readable=False)
        self.ready = False  # set by the worker's b"ready" once math-verify is imported and warm
        self.sent = False
        self.deadline = time.monotonic() + WORKER_START_TIMEOUT_S

    def send(self, items: list[tuple[str, str]], timeout_s: float) -> None:
        self.conn_out.send_bytes(json.dumps(items).encode())
        self.sent = True
        self.deadline = time.monotonic() + timeout_s

    def stop(self) -> None:
        self.conn_out.close()  # EOF: the worker exits by itself
        self.conn_in.close()
        try:
            self.proc.wait(timeout=1.0)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def restart(self) -> None:
        self.proc.kill()
        self.proc.wait()
        self.conn_out.close()
        self.conn_in.close()
        self._start()


def _restrict_string_eval() -> None:
    """Let sympy's string parser (`parse_expr`, a Python `eval`) see only call-free text.

    math-verify's LaTeX path does reach it: latex2sympy turns each number token into
    `sympy.Number(text)`, which sympifies the digits, and sympy.physics.units sympifies its
    prefix names ("kilo"). Letters, digits, `.`, `+`, `-` and spaces cannot call, index or
    import anything, so `eval` of them runs no code; anything else raises ValueError, which
    math-verify treats as "could not parse". Checked on all MATH-500 answers (tests)."""
    from sympy.parsing import sympy_parser

    parse_expr = sympy_parser.parse_expr

    def call_free_only(s, *args, **kwargs):
        if not (isinstance(s, str) and _CALL_FREE_RE.fullmatch(s)):
            raise ValueError("the reward worker evaluates only call-free strings")
        return parse_expr(s, *args, **kwargs)

    sympy_parser.parse_expr = call_free_only  # sympify() looks it up here at each call


def _worker_main(fd_in: int, fd_out: int) -> None:
    """Worker loop: read a batch (JSON list of [answer, gold]), answer each item with one
    JSON message [score, status], repeat until the parent closes the pipe."""
    import functools
    import logging
    import resource
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    resource.setrlimit(resource.RLIMIT_AS, (WORKER_MEMORY_BYTES, WORKER_MEMORY_BYTES))
    logging.disable(logging.WARNING)  # math-verify warns that its own timeouts are off
    from math_verify import LatexExtractionConfig, parse, verify

    _restrict_string_eval()
    config = [LatexExtractionConfig(boxed_match_priority=0)]

    @functools.lru_cache(maxsize=4096)  # a gold repeats for each of the group's completions
    def parsed(answer: str):
        return parse("\\boxed{" + answer + "}", extraction_config=config, parsing_timeout=None,
                     raise_on_error=True)

    def check(pred: str, gold: str) -> list:
        try:
            gold_parsed, pred_parsed = parsed(gold), parsed(pred)
        except Exception:  # MemoryError and RecursionError included
            return [0.0, "error"]
        try:
            ok = verify(gold_parsed, pred_parsed, timeout_seconds=None, raise_on_error=True)
            return [float(ok), "ok"]
        except Exception:
            # Counted as an error, then scored as math-verify does by default: the comparison
            # that raised is False, the other (gold, pred) candidate pairs still get their turn.
            return [float(verify(gold_parsed, pred_parsed, timeout_seconds=None)), "error"]

    conn_in = Connection(fd_in, writable=False)
    conn_out = Connection(fd_out, readable=False)
    check("\\frac{1}{2}", "0.5")  # warm-up: builds the LaTeX parser before the clock runs
    try:
        conn_out.send_bytes(b"ready")
        while True:
            batch = json.loads(conn_in.recv_bytes())
            for pred, gold in batch:
                conn_out.send_bytes(json.dumps(check(pred, gold)).encode())
    except (EOFError, BrokenPipeError):  # the parent closed the pipe or died (e.g. a run that stops on bad input)
        os._exit(0)  # quietly, and without interpreter teardown: freeing sympy's caches takes up to 1 s

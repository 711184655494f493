"""tools/mutate.py: its mutant list matches the code, it selects tests by reference, `--list` works, and a tiny real
run reports a planted bug killed and a bug no selected test can see survived.

The tiny run is the real tool on the real project: it copies the repository to a scratch folder, plants the bugs
there and runs one real test against each (no baseline), in children of one fork server: one torch import in all.
"""
import hashlib
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from tools.mutate import MUTANTS, Mutant, StaleMutant, apply, select_tests

ROOT = Path(__file__).resolve().parent.parent
K3_TEST = "tests/test_grpo_loss.py::test_k3_kl_by_hand_and_in_the_loss"


def test_every_mutant_applies_exactly_once_inside_its_function():
    """The list cannot rot silently: each original snippet is found once in its function (in a script, inside an
    ALGO LOGIC block), the mutated file compiles and differs from the original."""
    ids = [m.id for m in MUTANTS]
    assert len(ids) == len(set(ids)), "duplicate mutant ids"
    problems = []
    for m in MUTANTS:
        source = (ROOT / m.file).read_text()
        try:
            assert apply(m, source) != source
        except StaleMutant as e:
            problems.append(f"{m.id}: {e}")
        assert m.description and m.original != m.replacement
    assert not problems, "stale mutants in tools/mutate.py:\n" + "\n".join(problems)


def test_apply_refuses_what_the_list_must_not_hold():
    grpo = (ROOT / "grpo.py").read_text()
    k3 = next(m for m in MUTANTS if m.id == "grpo.k3-sign")
    assert "x = logps - ref_logps" in apply(k3, grpo)
    with pytest.raises(StaleMutant, match="0 times"):  # the snippet is not in the named function
        apply(replace(k3, function="compute_advantages"), grpo)
    with pytest.raises(StaleMutant, match="no function"):
        apply(replace(k3, function="no_such_function"), grpo)
    with pytest.raises(StaleMutant, match="times"):  # ambiguous: more than one place in the function
        apply(replace(k3, original="x"), grpo)
    shared = Mutant("x", "grpo.py", "build_batch", "attention_mask[i, : len(p) + len(c)] = 1",
                    "attention_mask[i, : len(p) + len(c) - 1] = 1", "in a TRY NOT TO MODIFY block")
    with pytest.raises(StaleMutant, match="outside the ALGO LOGIC"):  # test_house_rule would catch it, not a bug test
        apply(shared, grpo)
    with pytest.raises(StaleMutant, match="compile"):
        apply(replace(k3, replacement="x = = logps"), grpo)


def test_tests_are_selected_by_reference():
    for_grpo = [t for _, t in select_tests("grpo.py", ROOT)]
    assert "tests/test_grpo_loss.py" in for_grpo  # imports grpo
    assert "tests/test_grpo_run.py" in for_grpo  # runs "grpo.py" as a subprocess
    assert "tests/test_reward.py" not in for_grpo and "tests/test_mutate.py" not in for_grpo
    assert "tests/test_logprobs.py" in [t for _, t in select_tests("common/triton_logprobs.py", ROOT)]  # importorskip
    near, wide = select_tests("common/reward.py", ROOT), select_tests("common/reward.py", ROOT, depth=2)
    assert (1, "tests/test_reward.py") in near and all(d == 1 for d, _ in near) and set(near) < set(wide)


def test_computed_imports_count_the_module_names_of_the_file(tmp_path):
    """`importlib.import_module(name) for name in ("clipo", ...)`: the names are strings, not import statements."""
    (tmp_path / "tests").mkdir()
    for f in ("clipo.py", "r2po.py", "tests/test_loop.py", "tests/test_plain.py"):
        (tmp_path / f).write_text("")
    (tmp_path / "tests/test_loop.py").write_text(
        'import importlib\nSCRIPTS = [importlib.import_module(m) for m in ("clipo", "r2po")]\nNOTE = "not_a_module"\n')
    (tmp_path / "tests/test_plain.py").write_text('NAMES = ("clipo", "r2po")  # strings alone import nothing\n')
    assert select_tests("clipo.py", tmp_path) == select_tests("r2po.py", tmp_path) == [(1, "tests/test_loop.py")]


def test_list_prints_every_mutant():
    out = subprocess.run([sys.executable, "tools/mutate.py", "--list"], cwd=ROOT, capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    assert all(m.id in out.stdout for m in MUTANTS) and f"{len(MUTANTS)} mutants" in out.stdout
    out = subprocess.run([sys.executable, "tools/mutate.py", "--only", "no-such-id"], cwd=ROOT, capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 2 and "unknown mutant ids: no-such-id" in out.stderr


def test_a_tiny_run_reports_killed_and_survived(tmp_path):
    """grpo.k3-sign flips the KL estimator, which the k3 test checks by hand: killed. reward.gsm8k-commas lives in a
    file that test never imports: survived, which also proves that grpo.py was restored in the scratch copy before
    the second mutant ran (one job, one copy, list order). The project's own files are left untouched."""
    files = ("grpo.py", "common/reward.py")
    digest = [hashlib.sha256((ROOT / f).read_bytes()).hexdigest() for f in files]
    report = (tmp_path / "mutation").with_suffix(".md")  # a report under tmp_path
    out = subprocess.run([sys.executable, "tools/mutate.py", "--only", "grpo.k3-sign", "reward.gsm8k-commas",
                          "--tests", K3_TEST, "--no-baseline", "--jobs", "1", "--report", str(report)],
                         cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout + out.stderr
    rows = {line.split(" | ")[0].strip("| "): line for line in report.read_text().splitlines() if line.startswith("| ")}
    assert f"| killed | {K3_TEST} |" in rows["grpo.k3-sign"]
    assert "| survived |" in rows["reward.gsm8k-commas"]
    assert "| all | 2 | 1 | 1 | 0 | 1/2 (50%) |" in report.read_text()
    assert "survivors: reward.gsm8k-commas" in out.stdout and "kill rate 1/2 (50%)" in out.stdout
    assert [hashlib.sha256((ROOT / f).read_bytes()).hexdigest() for f in files] == digest

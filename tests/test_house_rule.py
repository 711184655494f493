"""The house rule (CONTRIBUTING.md): outside `# ALGO LOGIC:` blocks, every algorithm script equals grpo.py.

A script is cut into blocks at marker comments. Every `# TRY NOT TO MODIFY:` block of a variant must equal
grpo.py's block of the same name line for line, in the same order; a variant may only add lines that end
with `# new vs grpo.py`. What comes before the first marker (the docstring) and `# ALGO LOGIC:` blocks are free.
"""
from pathlib import Path

import pytest

from tools.sync_shared import NEW, VARIANTS, compare, shared_blocks  # one parser for the tool and the test

ROOT = Path(__file__).resolve().parent.parent


def test_grpo_has_shared_and_algo_blocks():
    blocks = shared_blocks((ROOT / "grpo.py").read_text())
    assert len(blocks) >= 8 and all(lines for _, lines in blocks)
    assert "# ALGO LOGIC:" in (ROOT / "grpo.py").read_text()


def test_the_checker_catches_a_drift():
    base = (ROOT / "grpo.py").read_text()
    assert compare(base, base) == []
    drifted = base.replace("def build_batch(", "def build_batch_renamed(", 1)
    assert compare(base, drifted) and "the batch layout" in compare(base, drifted)[0]
    added = base.replace("def build_batch(", f"x = 1  {NEW}\ndef build_batch(", 1)
    assert compare(base, added) == []
    unmarked = base.replace("def build_batch(", "x = 1\ndef build_batch(", 1)
    assert compare(base, unmarked)


@pytest.mark.parametrize("variant", [v for v in VARIANTS if (ROOT / v).exists()] or [pytest.param(None, marks=pytest.mark.skip("no variant yet"))])
def test_variant_matches_grpo_outside_algo_logic(variant):
    problems = compare((ROOT / "grpo.py").read_text(), (ROOT / variant).read_text())
    assert not problems, f"{variant} breaks the house rule:\n" + "\n".join(problems)


# A variant keeps grpo.py's default of every shared flag, so that `python X.py` vs `python grpo.py` compares the
# method alone; it changes one only where its method requires it, and says so in the flag's docstring. Settings of
# an official script that are not the method go in the variant's docstring as a command line instead.
METHOD_DEFAULTS = {("r2po.py", "beta"): "R2PO's objective has the KL term in both stages"}


@pytest.mark.parametrize("variant", VARIANTS)
def test_variants_keep_grpos_defaults_unless_the_method_requires_otherwise(variant):
    import dataclasses
    import importlib

    fields = lambda module: {f.name: f for f in dataclasses.fields(importlib.import_module(module).Args)}
    base, own = fields("grpo"), fields(variant[: -len(".py")])
    changed = {name for name in base.keys() & own.keys()
               if name != "exp_name" and base[name].default != own[name].default}
    assert changed == {name for v, name in METHOD_DEFAULTS if v == variant}, f"{variant} changes {sorted(changed)}"
    source = (ROOT / variant).read_text()
    for name in changed:  # the flag's docstring says why
        assert "so it changes grpo.py's default" in source.split(f"    {name}: ", 1)[1].split('"""', 2)[1], name

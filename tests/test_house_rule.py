"""The house rule (STYLE.md): outside `# ALGO LOGIC:` blocks, every algorithm script equals grpo.py.

A script is cut into blocks at marker comments. Every `# TRY NOT TO MODIFY:` block of a variant must equal
grpo.py's block of the same name line for line, in the same order; a variant may only add lines that end
with `# new vs grpo.py`. What comes before the first marker (the docstring) and `# ALGO LOGIC:` blocks are free.
"""
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
VARIANTS = ["clipo.py", "conspo.py", "cepo.py", "r2po.py"]
MARKER = re.compile(r"^\s*# (ALGO LOGIC|TRY NOT TO MODIFY):(.*)$")
NEW = "# new vs grpo.py"


def shared_blocks(text: str) -> list[tuple[str, list[str]]]:
    """(marker line, lines) of each TRY NOT TO MODIFY block, lines marked as new removed."""
    blocks, current = [], None
    for line in text.splitlines():
        m = MARKER.match(line)
        if m:
            current = None
            if m.group(1) == "TRY NOT TO MODIFY":
                current = (line.strip(), [])
                blocks.append(current)
        elif current is not None and not line.rstrip().endswith(NEW):
            current[1].append(line.rstrip())
    return blocks


def compare(base: str, variant: str) -> list[str]:
    """Human-readable differences between the shared blocks of two scripts (empty: they obey the rule)."""
    a, b = shared_blocks(base), shared_blocks(variant)
    problems = []
    if [m for m, _ in a] != [m for m, _ in b]:
        problems.append(f"shared block markers differ:\n  grpo.py: {[m for m, _ in a]}\n  variant: {[m for m, _ in b]}")
        return problems
    for (marker, la), (_, lb) in zip(a, b):
        if la != lb:
            first = next((i for i, (x, y) in enumerate(zip(la, lb)) if x != y), min(len(la), len(lb)))
            problems.append(f"{marker}: line {first + 1} of the block differs:\n"
                            f"  grpo.py: {la[first] if first < len(la) else '<end>'}\n"
                            f"  variant: {lb[first] if first < len(lb) else '<end>'}")
    return problems


def test_grpo_has_shared_and_algo_blocks():
    blocks = shared_blocks((ROOT / "grpo.py").read_text())
    assert len(blocks) >= 8 and all(lines for _, lines in blocks)
    assert "# ALGO LOGIC:" in (ROOT / "grpo.py").read_text()


def test_the_checker_catches_a_drift():
    base = (ROOT / "grpo.py").read_text()
    assert compare(base, base) == []
    drifted = base.replace("def build_batch(", "def build_batch_renamed(", 1)
    assert compare(base, drifted) and "rollouts, batching" in compare(base, drifted)[0]
    added = base.replace("def build_batch(", f"x = 1  {NEW}\ndef build_batch(", 1)
    assert compare(base, added) == []
    unmarked = base.replace("def build_batch(", "x = 1\ndef build_batch(", 1)
    assert compare(base, unmarked)


@pytest.mark.parametrize("variant", [v for v in VARIANTS if (ROOT / v).exists()] or [pytest.param(None, marks=pytest.mark.skip("no variant yet"))])
def test_variant_matches_grpo_outside_algo_logic(variant):
    problems = compare((ROOT / "grpo.py").read_text(), (ROOT / variant).read_text())
    assert not problems, f"{variant} breaks the house rule:\n" + "\n".join(problems)

"""Copy grpo.py's `# TRY NOT TO MODIFY:` blocks into the algorithm variants (the house rule of CONTRIBUTING.md).

    python tools/sync_shared.py            # rewrite clipo.py, conspo.py, cepo.py, r2po.py where present
    python tools/sync_shared.py --check    # exit 1 if a variant differs (tests/test_house_rule.py uses `compare`)

A variant's docstring and `# ALGO LOGIC:` blocks are kept, each after the shared block it follows; the shared
blocks are grpo.py's, so a block added to grpo.py arrives in every variant. A shared block of a variant that carries lines marked
`# new vs grpo.py` is left alone and reported: merge those by hand.
"""
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
VARIANTS = ["clipo.py", "conspo.py", "cepo.py", "r2po.py"]
MARKER = re.compile(r"^\s*# (ALGO LOGIC|TRY NOT TO MODIFY):")
NEW = "# new vs grpo.py"


def split_blocks(text: str) -> list[list[str]]:
    """Lines cut at marker comments: block 0 is the preamble, every other block starts with its marker."""
    blocks = [[]]
    for line in text.splitlines(keepends=True):
        if MARKER.match(line):
            blocks.append([])
        blocks[-1].append(line)
    return blocks


def is_shared(block: list[str]) -> bool:
    return bool(block) and "# TRY NOT TO MODIFY:" in block[0]


def shared_blocks(text: str) -> list[tuple[str, list[str]]]:
    """(marker line, lines) of each shared block, without the lines a variant marks `# new vs grpo.py`."""
    return [(block[0].strip(), [l.rstrip() for l in block[1:] if not l.rstrip().endswith(NEW)])
            for block in split_blocks(text)[1:] if is_shared(block)]


def compare(base: str, variant: str) -> list[str]:
    """Human-readable differences between the shared blocks of two scripts (empty: the variant obeys the rule)."""
    a, b = shared_blocks(base), shared_blocks(variant)
    if [m for m, _ in a] != [m for m, _ in b]:
        return [f"shared block markers differ:\n  grpo.py: {[m for m, _ in a]}\n  variant: {[m for m, _ in b]}"]
    problems = []
    for (marker, la), (_, lb) in zip(a, b):
        if la != lb:
            first = next((i for i, (x, y) in enumerate(zip(la, lb)) if x != y), min(len(la), len(lb)))
            problems.append(f"{marker}: line {first + 1} of the block differs:\n"
                            f"  grpo.py: {la[first] if first < len(la) else '<end>'}\n"
                            f"  variant: {lb[first] if first < len(lb) else '<end>'}")
    return problems


def segments(blocks: list[list[str]]) -> tuple[list[list[str]], list[tuple[list[str], list[list[str]]]]]:
    """(ALGO LOGIC blocks before the first shared block, [(shared block, the ALGO LOGIC blocks after it)])."""
    head, segs = [], []
    for block in blocks[1:]:
        if is_shared(block):
            segs.append((block, []))
        else:
            (segs[-1][1] if segs else head).append(block)
    return head, segs


def sync(base: str, variant: str) -> tuple[str, list[str]]:
    """The variant laid out on grpo.py's shared blocks.

    ALGO LOGIC blocks are anchored to the shared block they follow (their names may differ from grpo.py's):
    after each of grpo.py's shared blocks come the variant's ALGO LOGIC blocks that followed the same shared
    block, or grpo.py's own where the variant has no such shared block yet (a block new in grpo.py).
    """
    base_blocks, var_blocks = split_blocks(base), split_blocks(variant)
    base_head, base_segs = segments(base_blocks)
    var_head, var_segs = segments(var_blocks)
    var_after = {shared[0].strip(): (shared, algo) for shared, algo in var_segs}
    known = {shared[0].strip() for shared, _ in base_segs}
    notes = [f"{key!r} is not a block of grpo.py: its ALGO LOGIC blocks were dropped" for key in var_after
             if key not in known]
    out = list(var_blocks[0])
    for block in var_head:
        out.extend(block)
    for shared, algo in base_segs:
        key = shared[0].strip()
        if key in var_after:
            var_shared, algo = var_after[key]
            if any(l.rstrip().endswith(NEW) for l in var_shared):
                notes.append(f"kept {key!r}: it has lines marked {NEW!r}")
                shared = var_shared
        out.extend(shared)
        for block in algo:
            out.extend(block)
    return "".join(out), notes


if __name__ == "__main__":
    base = (ROOT / "grpo.py").read_text()
    changed = False
    for name in VARIANTS:
        path = ROOT / name
        if not path.exists():
            continue
        text = path.read_text()
        new, notes = sync(base, text)
        for note in notes:
            print(f"{name}: {note}")
        if new != text:
            changed = True
            print(f"{name}: {'differs' if '--check' in sys.argv else 'synced'}")
            if "--check" not in sys.argv:
                path.write_text(new)
    sys.exit(1 if changed and "--check" in sys.argv else 0)

"""Copy grpo.py's `# TRY NOT TO MODIFY:` blocks into the algorithm variants (STYLE.md's house rule).

    python tools/sync_shared.py            # rewrite clipo.py, conspo.py, cepo.py, r2po.py where present
    python tools/sync_shared.py --check    # exit 1 if a variant differs (tests/test_house_rule.py checks the same)

A variant's `# ALGO LOGIC:` blocks and its docstring are kept; each shared block is replaced by grpo.py's
block of the same marker. A shared block of a variant that carries lines marked `# new vs grpo.py` is left
alone and reported: merge those by hand.
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


def sync(base: str, variant: str) -> tuple[str, list[str]]:
    shared = {b[0].strip(): b for b in split_blocks(base)[1:] if is_shared(b)}
    out, notes = [], []
    for block in split_blocks(variant):
        key = block[0].strip() if block else ""
        if is_shared(block) and key in shared:
            if any(l.rstrip().endswith(NEW) for l in block):
                notes.append(f"kept {key!r}: it has lines marked {NEW!r}")
            else:
                block = shared[key]
        elif is_shared(block):
            notes.append(f"{key!r} is not a block of grpo.py")
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

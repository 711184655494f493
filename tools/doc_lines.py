"""Rewrite the line references of docs/<algo>.md after <algo>.py changed.

    python tools/doc_lines.py          # update "(`name`, lines A-B" in every docs page that has a script
    python tools/doc_lines.py --check  # exit 1 if a reference is stale (tests/test_citations.py checks the same)

A reference names the function or class it points at, so its lines are found again with `ast`: A is the `def` or
`class` line, B the last line of the body. References without a name (e.g. "loop lines 468-470") are not touched.
"""
import ast
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
NAMED_LINES = re.compile(r"\(`(\w+)`, lines? (\d+)(?:-(\d+))?")


def spans(script: Path) -> dict[str, tuple[int, int]]:
    """name -> (first, last) line of every top-level function and class."""
    tree = ast.parse(script.read_text(encoding="utf-8"))
    return {node.name: (node.lineno, node.end_lineno) for node in tree.body
            if isinstance(node, (ast.FunctionDef, ast.ClassDef))}


def update(page: Path, script: Path) -> str:
    where = spans(script)

    def fix(m: re.Match) -> str:
        if m.group(1) not in where:
            return m.group(0)
        first, last = where[m.group(1)]
        return f"(`{m.group(1)}`, lines {first}-{last}" if last > first else f"(`{m.group(1)}`, line {first}"

    return NAMED_LINES.sub(fix, page.read_text(encoding="utf-8"))


if __name__ == "__main__":
    stale = False
    for page in sorted((ROOT / "docs").glob("*.md")):
        script = ROOT / f"{page.stem}.py"
        if not script.exists():
            continue
        new = update(page, script)
        if new != page.read_text(encoding="utf-8"):
            stale = True
            print(f"{page.relative_to(ROOT)}: {'stale' if '--check' in sys.argv else 'updated'}")
            if "--check" not in sys.argv:
                page.write_text(new, encoding="utf-8")
    sys.exit(1 if stale and "--check" in sys.argv else 0)

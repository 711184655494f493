"""Every file or section the repo cites exists in the repo.

A user's clone holds only the repo: a script, doc or README that points to a file it does not ship (the team's
working notes, a renamed page) or to a heading that was renamed leaves the reader stranded. Checked:
- Markdown links `[text](relative/path#anchor)` in .md files: the file exists; the anchor is one of its headings
  (GitHub's slugs);
- `something.md` and `something.md#anchor` written in plain text in .py and .md files, resolved against the
  citing file's folder and the repo root.
"""
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SKIP_DIRS = {".git", "runs", "wandb", "__pycache__", ".pytest_cache", "results", "out"}
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
PLAIN = re.compile(r"(?<![\w/<.-])((?:\.\./|[\w-]+/)*[\w.-]+\.md)(#[\w-]+)?")


def files() -> list[Path]:
    out = []
    for path in ROOT.rglob("*"):
        if (path.suffix in (".py", ".md") and not SKIP_DIRS & set(path.relative_to(ROOT).parts[:-1])
                and path.name != Path(__file__).name):  # this file's own examples cite nothing
            out.append(path)
    return sorted(out)


def slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[`*_]", lambda m: "_" if m.group(0) == "_" else "", heading.strip().lower())
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(md: Path) -> set[str]:
    text = re.sub(r"```.*?```", "", md.read_text(encoding="utf-8"), flags=re.S)
    return {slug(m.group(1)) for m in re.finditer(r"^#{1,6}\s+(.+?)\s*$", text, flags=re.M)}


def ignored_outputs() -> tuple[str, ...]:
    """Folders .gitignore names (runs/, benchmarks/results/): what commands write there is cited by its path, not
    shipped."""
    lines = (ROOT / ".gitignore").read_text().splitlines() if (ROOT / ".gitignore").exists() else []
    return tuple(l.strip() for l in lines if l.strip().endswith("/") and not l.startswith("#"))


def resolve(citing: Path, target: str) -> Path | None:
    """A path against the citing file's folder, then the root; a bare file name anywhere in the repo (prose such
    as "writes compare.csv and compare.md" names files by their name alone)."""
    for base in (citing.parent, ROOT):
        candidate = (base / target).resolve()
        if candidate.exists() and ROOT in candidate.parents:
            return candidate
    if "/" not in target:
        return next((p for p in files() if p.name == target), None)
    return None


def problems_of(path: Path) -> list[str]:
    text = path.read_text(encoding="utf-8")
    cited = []
    if path.suffix == ".md":
        for m in LINK.finditer(text):
            target = m.group(1)
            if re.match(r"[a-z]+:", target) or target.startswith("#") and not target[1:]:
                continue  # a URL, or a bare '#'
            file, _, anchor = target.partition("#")
            cited.append((file or str(path.relative_to(ROOT)), anchor, m.group(0)))
    for m in PLAIN.finditer(LINK.sub("", text) if path.suffix == ".md" else text):  # links are checked above
        cited.append((m.group(1), (m.group(2) or "#")[1:], m.group(0)))
    out = []
    for file, anchor, quote in dict.fromkeys(cited):
        if file.startswith(ignored_outputs()):
            continue  # an output a command writes (e.g. benchmarks/results/mutation.md)
        target = resolve(path, file) if file != str(path.relative_to(ROOT)) else path
        if target is None:
            out.append(f"{path.relative_to(ROOT)}: {quote!r} names a file the repo does not have")
        elif anchor and target.suffix == ".md" and anchor not in anchors(target):
            out.append(f"{path.relative_to(ROOT)}: {quote!r}: {target.relative_to(ROOT)} has no heading #{anchor}")
    return out


def test_the_checker_finds_a_missing_file_and_a_missing_anchor(tmp_path, monkeypatch):
    monkeypatch.setattr(f"{__name__}.ROOT", tmp_path)
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "a.md").write_text("# Title\n## The objective (section 0)\ntext\n")
    good = tmp_path / "good.py"
    good.write_text('"""See docs/a.md#the-objective-section-0 and docs/a.md."""\n')
    assert problems_of(good) == []
    bad = tmp_path / "bad.md"
    bad.write_text("Spec: NOTES.md section 0; [x](docs/a.md#objective); [y](docs/b.md)\n")
    found = problems_of(bad)
    assert len(found) == 3, found
    assert [any(key in f for f in found) for key in ("NOTES.md", "#objective", "docs/b.md")] == [True] * 3


@pytest.mark.parametrize("path", files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_every_cited_file_and_section_exists(path):
    problems = problems_of(path)
    assert not problems, "\n".join(problems)


NAMED_LINES = re.compile(r"\(`(\w+)`, lines? (\d+)")


@pytest.mark.parametrize("page", sorted((ROOT / "docs").glob("*.md")), ids=lambda p: p.name)
def test_line_references_point_at_their_definitions(page):
    """docs/<algo>.md writes "(`name`, lines A-B": line A of <algo>.py defines `name` (a renamed or moved function
    shifts the numbers: `python tools/doc_lines.py` updates them)."""
    script = ROOT / f"{page.stem}.py"
    refs = NAMED_LINES.findall(page.read_text(encoding="utf-8"))
    if not refs or not script.exists():
        pytest.skip(f"{page.name} has no line references to {script.name}")
    lines = script.read_text(encoding="utf-8").splitlines()
    wrong = [f"`{name}` at line {n}: {lines[int(n) - 1].strip() if int(n) <= len(lines) else '<past the end>'!r}"
             for name, n in refs if not re.match(rf"\s*(def|class) {name}\b", lines[int(n) - 1] if int(n) <= len(lines) else "")]
    assert not wrong, f"{page.name} points at the wrong lines of {script.name}:\n" + "\n".join(wrong)

"""The repository explains itself: no tracked text file names a file that lives outside it, and every
relative link in the documentation (``docs/*.md``, ``README.md``) resolves to a file inside the repository.

The forbidden names are built by concatenation so that this file does not contain them literally.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

#: names of files that only exist outside this repository (and the identifiers derived from them)
FORBIDDEN = (
    "method" + ".md",
    "machine" + "-notes",
    "design" + ".md",
    ".." + "/shared",
    "method" + "_md",
    "machine" + "_notes",
)
_FORBIDDEN_RE = re.compile("|".join(re.escape(s) for s in FORBIDDEN), re.IGNORECASE)

#: inline links and images ``[text](target "title")`` and reference definitions ``[label]: target``
_INLINE_LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
_REFERENCE_LINK = re.compile(r"^\s{0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s+\"[^\"]*\")?\s*$", re.MULTILINE)
_EXTERNAL = re.compile(r"^(?:[a-zA-Z][a-zA-Z0-9+.-]*:|//|#)")  # http:, https:, mailto:, //host, #anchor
_SKIP_DIRS = {".git", ".venv", "venv", "__pycache__", ".pytest_cache", ".ruff_cache", ".hypothesis", "build",
              "dist", "verify_bounds_out"}


def tracked_files(root: Path = ROOT) -> list[Path]:
    """The files ``git ls-files`` lists under ``root``; outside a git checkout (e.g. an unpacked sdist), every
    file under ``root`` except caches, virtual environments and build output."""
    try:
        out = subprocess.run(["git", "ls-files", "-z"], cwd=root, capture_output=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return sorted(p for p in root.rglob("*")
                      if p.is_file() and not _SKIP_DIRS.intersection(p.relative_to(root).parts)
                      and not any(part.endswith(".egg-info") for part in p.relative_to(root).parts))
    names = [n for n in out.decode("utf-8", "surrogateescape").split("\0") if n]
    return [root / n for n in names if (root / n).is_file()]


def read_text(path: Path) -> str | None:
    """The file's text, or None for a binary file (a NUL byte in the first 8 KiB, or not UTF-8)."""
    data = path.read_bytes()
    if b"\0" in data[:8192]:
        return None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return None


def forbidden_mentions(text: str) -> list[tuple[int, str]]:
    """``(line number, line)`` of every line of ``text`` that names a forbidden file (case-insensitive)."""
    return [(i, line.strip()) for i, line in enumerate(text.splitlines(), 1) if _FORBIDDEN_RE.search(line)]


def link_targets(markdown: str) -> list[str]:
    """Every link target of a Markdown text: inline links, images and reference definitions, code spans and
    fenced code blocks excluded."""
    prose = re.sub(r"^(```|~~~).*?^\1[^\n]*$", "", markdown, flags=re.MULTILINE | re.DOTALL)
    prose = re.sub(r"`[^`\n]*`", "", prose)
    return _INLINE_LINK.findall(prose) + _REFERENCE_LINK.findall(prose)


def broken_links(md_file: Path, root: Path = ROOT) -> list[str]:
    """The relative link targets of ``md_file`` that do not resolve to an existing file or directory inside
    ``root`` (external URLs and in-page anchors are not checked)."""
    bad = []
    text = read_text(md_file) or ""
    for target in link_targets(text):
        if _EXTERNAL.match(target):
            continue
        path = target.split("#", 1)[0].split("?", 1)[0]
        if not path:
            continue
        resolved = (root / path.lstrip("/")) if path.startswith("/") else (md_file.parent / path)
        resolved = resolved.resolve()
        inside = resolved == root.resolve() or root.resolve() in resolved.parents
        if not inside or not resolved.exists():
            bad.append(target)
    return bad


def doc_files(root: Path = ROOT) -> list[Path]:
    """``README.md`` and ``docs/*.md``."""
    files = sorted((root / "docs").glob("*.md"))
    readme = root / "README.md"
    return ([readme] if readme.is_file() else []) + files


# --- the checks -------------------------------------------------------------------------------------------
def test_no_file_names_a_file_outside_the_repository():
    offenders = []
    for path in tracked_files():
        text = read_text(path)
        if text is None:
            continue
        rel = path.relative_to(ROOT).as_posix()
        offenders += [f"{rel}:{n}: {line[:100]}" for n, line in forbidden_mentions(text)]
    assert not offenders, (f"{len(offenders)} line(s) name a file outside the repository; cite the paper or "
                           "docs/ instead:\n" + "\n".join(offenders))


def test_every_relative_link_in_the_docs_resolves():
    docs = doc_files()
    assert (ROOT / "docs" / "index.md") in docs, "docs/index.md: the documentation map is missing"
    broken = [f"{p.relative_to(ROOT).as_posix()}: {target}" for p in docs for target in broken_links(p)]
    assert not broken, "broken relative links:\n" + "\n".join(broken)


def test_the_docs_map_links_every_page():
    """Every page under docs/ is reachable from docs/index.md."""
    index = ROOT / "docs" / "index.md"
    linked = {(index.parent / t.split("#", 1)[0]).resolve() for t in link_targets(index.read_text("utf-8"))
              if not _EXTERNAL.match(t)}
    missing = [p.name for p in sorted((ROOT / "docs").glob("*.md")) if p != index and p.resolve() not in linked]
    assert not missing, f"docs/index.md does not link: {missing}"


# --- the detectors themselves can fail --------------------------------------------------------------------
@pytest.mark.parametrize("name", FORBIDDEN)
def test_detector_flags_each_forbidden_name(name):
    text = f"clean line\nsee {name.upper() if name[0].isalpha() else name} for details\nclean again"
    assert forbidden_mentions(text) == [(2, text.splitlines()[1])]


def test_detector_passes_clean_text():
    assert forbidden_mentions("see docs/objective.md and docs/design-notes, Wang et al. 2025, Prop. 1") == []
    assert forbidden_mentions("methods.md, machine notes, ../share/x") == []


def test_link_checker_finds_broken_and_escaping_links(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "a.md").write_text("x")
    (tmp_path / "outside.md").write_text("x")
    page = tmp_path / "docs" / "index.md"
    page.write_text(
        "[ok](a.md) [ok anchor](a.md#part) ![img](a.md) [web](https://example.org/x.md) [here](#top)\n"
        "[missing](b.md) [up and out](../../elsewhere.md) `[code](nope.md)`\n"
        "```\n[fenced](nope2.md)\n```\n"
        "[ref]: missing-ref.md\n"
    )
    assert sorted(broken_links(page, tmp_path)) == ["../../elsewhere.md", "b.md", "missing-ref.md"]
    assert link_targets('[a](x.md "title") [b](<y.md>)') == ["x.md", "y.md"]


def test_binary_files_are_skipped(tmp_path):
    png = tmp_path / "f.png"
    png.write_bytes(b"\x89PNG\r\n\x1a\n\0\0\0" + ("method" + ".md").encode())
    latin = tmp_path / "f.bin"
    latin.write_bytes(b"\xff\xfe caf\xe9")
    assert read_text(png) is None and read_text(latin) is None
    text = tmp_path / "f.txt"
    text.write_text("plain")
    assert read_text(text) == "plain"

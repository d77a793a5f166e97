"""The docs' links hold: every relative link and image in README.md and docs/ names a file that
exists, every #anchor a heading of its page, and every raw file a current page mentions is there."""
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
CURRENT = [ROOT / "README.md", *sorted(DOCS.glob("*.md"))]
PAGES = CURRENT + sorted((DOCS / "archive").glob("*.md"))

LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
CODE_SPAN = re.compile(r"`[^`]*`")
# a raw file or plot named in prose or in a command: docs/results/x.json, results/x.json, img/x.png
RAW = re.compile(r"(?<![\w/.-])((?:docs/)?(?:results|img)/[\w.-]+\.(?:json|txt|png))")


def _prose(text):
    """The page's lines outside fenced code blocks."""
    fenced = False
    for line in text.splitlines():
        if line.lstrip().startswith(("```", "~~~")):
            fenced = not fenced
            continue
        if not fenced:
            yield line


def _links(path):
    for line in _prose(path.read_text()):
        yield from LINK.findall(CODE_SPAN.sub("", line))


def _anchors(path):
    """GitHub's heading ids: lower case, punctuation dropped, spaces as hyphens, -1, -2 for repeats."""
    seen, out = {}, set()
    for line in _prose(path.read_text()):
        m = re.match(r"#{1,6}\s+(.*?)\s*#*\s*$", line)
        if not m:
            continue
        slug = re.sub(r"[^\w\- ]", "", m.group(1).strip().lower()).replace(" ", "-")
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        out.add(slug if n == 0 else f"{slug}-{n}")
    return out


def test_benchmarks_md_keeps_the_headings_other_pages_link_to():
    page = ROOT / "docs" / "benchmarks.md"
    assert "h200-qwen25-coder-15b" in _anchors(page)
    assert "learned-drafters-h200" in _anchors(page)


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_and_image_resolves(page):
    broken = []
    for target in _links(page):
        if re.match(r"[a-z]+:", target):  # https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        if not dest.exists():
            broken.append(target)
        elif anchor and dest.suffix == ".md" and anchor not in _anchors(dest):
            broken.append(target + " (no such heading)")
    assert not broken, f"{page.relative_to(ROOT)}: {broken}"


@pytest.mark.parametrize("page", CURRENT, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_raw_file_a_current_page_names_exists(page):
    missing = []
    for name in RAW.findall(page.read_text()):
        base = ROOT if name.startswith("docs/") else page.parent
        if not (base / name).exists():
            missing.append(name)
    assert not missing, f"{page.relative_to(ROOT)}: {missing}"


def test_only_benchmarks_md_links_into_the_archive():
    into = {p.name: sum("archive/" in t for t in _links(p)) for p in CURRENT}
    assert into.pop("benchmarks.md") == 1
    assert not any(into.values()), into

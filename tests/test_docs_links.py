"""Every relative link in README.md and docs/*.md points at a file or folder that exists, and every
`#anchor` at a heading of the page it names (GitHub's heading ids). Text only: no TensorFlow, no
servers, well under a second."""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path
from urllib.parse import unquote

import pytest
from conftest import ROOT

PAGES = sorted([ROOT / "README.md", *(ROOT / "docs").glob("*.md")])
FENCE = re.compile(r"^\s*(```|~~~)")
CODE_SPAN = re.compile(r"(`+)(?:(?!\1).)+?\1")
# [text](target) or ![alt](target "title"); link text holds no "]" in these pages
LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
SCHEME = re.compile(r"^[a-z][a-z0-9+.-]*:", re.IGNORECASE)


def prose_lines(text: str, *, blank_code: bool = True) -> list[tuple[int, str]]:
    """Numbered lines outside fenced code blocks, with inline code spans blanked (a link there is
    text, not a link) unless told otherwise (a heading's id keeps the code's text)."""
    out, fenced = [], False
    for number, line in enumerate(text.splitlines(), 1):
        if FENCE.match(line):
            fenced = not fenced
            continue
        if not fenced:
            out.append((number, CODE_SPAN.sub("", line) if blank_code else line))
    return out


def slug(heading: str) -> str:
    """GitHub's id for a heading: links reduced to their text, lower case, punctuation other than
    `-` and `_` dropped, each space a hyphen."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading).replace("`", "")
    return re.sub(r"[^\w\- ]", "", text.strip().lower()).replace(" ", "-")


def anchors(page: Path) -> set[str]:
    """The ids of a page's headings; a repeated id gets -1, -2, ... as on GitHub."""
    seen: Counter[str] = Counter()
    ids = set()
    for _, line in prose_lines(page.read_text(), blank_code=False):
        heading = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if heading:
            base = slug(heading.group(1))
            ids.add(base if not seen[base] else f"{base}-{seen[base]}")
            seen[base] += 1
    return ids


def links(page: Path) -> list[tuple[int, str]]:
    return [
        (number, match.group(1))
        for number, line in prose_lines(page.read_text())
        for match in LINK.finditer(line)
    ]


def shown(path: Path) -> str:
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def broken(page: Path) -> list[str]:
    problems = []
    for number, target in links(page):
        if SCHEME.match(target):
            continue  # https:, mailto: ...: not ours to check offline
        path, _, anchor = target.partition("#")
        dest = (page.parent / unquote(path)).resolve() if path else page
        where = f"{shown(page)}:{number}: {target}"
        if not dest.exists():
            problems.append(f"{where}: no such file")
        elif anchor and dest.suffix == ".md" and unquote(anchor) not in anchors(dest):
            problems.append(f"{where}: no heading with id '{anchor}' in {shown(dest)}")
    return problems


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(page: Path) -> None:
    assert broken(page) == []


def test_the_checker_sees_links_and_anchors() -> None:
    """The parser finds the README's links to docs/ and GitHub's ids for tricky headings, so an
    empty list above means checked, not skipped."""
    readme = [target for _, target in links(ROOT / "README.md")]
    assert "docs/routing.md#when-a-model-cannot-be-served" in readme
    assert "python-modelmuxclient" in anchors(ROOT / "docs" / "clients.md")
    assert slug("`tensorflow_client.predict`") == "tensorflow_clientpredict"
    assert slug("Handlers — the contract") == "handlers--the-contract"
    assert slug("Large messages and glibc's allocator (`gateway.reuse_freed_memory`)") == (
        "large-messages-and-glibcs-allocator-gatewayreuse_freed_memory"
    )
    text = "see [a](x.md) and `[b](y.md)`\n```\n[c](z.md)\n```\n"
    assert [t for _, line in prose_lines(text) for t in LINK.findall(line)] == ["x.md"]


def test_the_checker_reports_what_is_broken(tmp_path: Path) -> None:
    page = tmp_path / "page.md"
    page.write_text(
        "# A page\n\n## Real `heading`\n\n[ok](#real-heading) [ok](page.md#a-page) [gone](gone.md)\n"
        "[bad](#nope) [web](https://example.org/x.md)\n"
    )
    assert broken(page) == [
        f"{page}:5: gone.md: no such file",
        f"{page}:6: #nope: no heading with id 'nope' in {page}",
    ]

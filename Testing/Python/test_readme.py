"""The README renders as written: code fences close, heading lines are headings, relative links resolve.

An unclosed fence does not fail any renderer: it silently turns the rest of the page into code (it once
swallowed the CaLID Training section). A CommonMark parser (markdown-it-py, GitHub's dialect with tables)
sees the page as GitHub does; these checks read its tokens.
"""

from __future__ import annotations

import re
from pathlib import Path

from markdown_it import MarkdownIt

REPO = Path(__file__).resolve().parents[2]
README = REPO / "README.md"
HEADING_LINE = re.compile(r"^(#{1,6})\s")
EXTERNAL = re.compile(r"^(https?:|mailto:)")


def parse(path: Path = README) -> tuple[list[str], list]:
    text = path.read_text(encoding="utf-8")
    return text.splitlines(), MarkdownIt("commonmark").enable("table").parse(text)


def github_anchor(title: str) -> str:
    """The id GitHub gives a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", title.lower()).replace(" ", "-")


def test_every_code_fence_closes_where_it_should():
    """Each fence ends on a closing line, and none holds a fence line: a forgotten close pairs every later
    fence with the wrong partner (the next bare fence closes it) and can still end the page evenly."""
    lines, tokens = parse()
    fences = [t for t in tokens if t.type == "fence"]
    assert len(fences) > 10
    for fence in fences:
        start, end = fence.map
        closing = lines[end - 1].strip() if end - 1 > start else ""
        assert closing.startswith(fence.markup) and set(closing) == {fence.markup[0]}, \
            f"README.md line {start + 1}: this fence is never closed (the rest of the page renders as code)"
        inner = [number + 1 for number in range(start + 1, end - 1) if lines[number].lstrip().startswith(fence.markup)]
        assert not inner, f"README.md line {start + 1}: this fence runs on over the fence line(s) {inner} (not closed?)"


def test_every_heading_line_is_a_heading():
    """A '#' line is a heading, or a one-'#' comment inside code; '##' and deeper lines are always headings."""
    lines, tokens = parse()
    headings = {t.map[0] for t in tokens if t.type == "heading_open"}
    in_code = {line for t in tokens if t.type in ("fence", "code_block") for line in range(*t.map)}
    for number, line in enumerate(lines):
        match = HEADING_LINE.match(line)
        if match and number not in headings:
            assert number in in_code and len(match.group(1)) == 1, \
                f"README.md line {number + 1} is not rendered as a heading: {line!r}"
    assert {"Quick start", "CaLIDTraining", "Performance"} <= {
        tokens[i + 1].content for i, t in enumerate(tokens) if t.type == "heading_open"}


def test_relative_links_and_images_point_to_files_and_anchors_that_exist():
    _, tokens = parse()
    anchors = {github_anchor(tokens[i + 1].content) for i, t in enumerate(tokens) if t.type == "heading_open"}
    targets = [child.attrGet("href") or child.attrGet("src") for t in tokens if t.type == "inline"
               for child in t.children or [] if child.type in ("link_open", "image")]
    assert "Resources/Screenshot01.png" in targets
    for target in targets:
        if EXTERNAL.match(target):
            continue
        if target.startswith("#"):
            assert target[1:] in anchors, f"README.md links to #{target[1:]}, which no heading defines"
        else:
            assert (README.parent / target.split("#")[0]).exists(), f"README.md links to a missing file: {target}"

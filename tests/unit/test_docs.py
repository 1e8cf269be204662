"""The README and docs/ keep their own references: every relative link finds
its file, and its #anchor a heading there (as GitHub makes anchors of
headings); every "see <Section>" names a section of its own page (a heading,
or a paragraph's bold title such as **Why the cache must be 0.**); every
stage of make bench is described in docs/benchmarks.md; the settings table of
docs/operations.md is the one voteflow/settings.py makes."""

from __future__ import annotations

import re

from tests.support import REPO

README = REPO / "README.md"
PAGES = [README, *sorted((REPO / "docs").glob("*.md"))]


def _prose(text: str) -> str:
    """The page without its fenced code blocks (a shell comment is no heading)."""
    return re.sub(r"^```.*?^```[^\n]*$", "", text, flags=re.M | re.S)


def _headings(text: str) -> list[str]:
    return [m.group(1).strip() for m in re.finditer(r"^#+ (.+)$", _prose(text), re.M)]


def _sections(text: str) -> set[str]:
    titles = {" ".join(m.group(1).split()) for m in re.finditer(r"\*\*([^*]+?)\.\*\*", text)}
    return set(_headings(text)) | titles


def anchors(text: str) -> set[str]:
    """The #anchors GitHub gives a page's headings: the heading's text (links
    and code marks dropped), lower case, punctuation removed, spaces as
    hyphens; a repeated one gets -1, -2..."""
    found: set[str] = set()
    for heading in _headings(text):
        plain = re.sub(r"\[([^]]*)\]\([^)]*\)", r"\1", heading).replace("`", "")
        slug = re.sub(r"[^\w\- ]", "", plain.lower()).replace(" ", "-")
        anchor, n = slug, 0
        while anchor in found:
            n += 1
            anchor = f"{slug}-{n}"
        found.add(anchor)
    return found


def test_anchors_are_github_s() -> None:
    text = "# Settings\n## `make bench`: stages 1-13\n## Compose: one Docker host\n## Settings\n"
    assert anchors(text) == {
        "settings",
        "settings-1",
        "make-bench-stages-1-13",
        "compose-one-docker-host",
    }


def test_every_relative_link_finds_its_file_and_anchor() -> None:
    missing = []
    for page in PAGES:
        for target in re.findall(r"\]\(([^)\s]+)\)", _prose(page.read_text())):
            if "://" in target or target.startswith("mailto:"):
                continue
            path, _, anchor = target.partition("#")
            file = (page.parent / path).resolve() if path else page
            if not file.exists():
                missing.append(f"{page.relative_to(REPO)}: {target}")
            elif anchor and file.suffix == ".md" and anchor not in anchors(file.read_text()):
                missing.append(f"{page.relative_to(REPO)}: {target} (no such heading)")
    assert missing == []


def test_every_section_a_page_points_to_is_there() -> None:
    unknown = set()
    for page in PAGES:
        text = _prose(page.read_text())
        sections = _sections(text)
        # "see Sizing connection pools", the words possibly across a line break.
        for reference in re.findall(r"\b[Ss]ee ([A-Z][\w-]*(?:\s+[A-Za-z][\w-]*)*)", text):
            words = reference.split()
            if not any(" ".join(words[:n]) in sections for n in range(len(words), 0, -1)):
                unknown.add(f"{page.relative_to(REPO)}: {' '.join(words)}")
    assert unknown == set(), f"sections named but not on the page (make them links): {unknown}"


def test_every_bench_stage_is_described_in_docs_benchmarks() -> None:
    from loadtest.bench.cli import STAGES

    text = (REPO / "docs" / "benchmarks.md").read_text()
    undescribed = [
        f"{n} {stage.name}" for n, stage in STAGES.items() if f"**{stage.name}**" not in text
    ]
    assert undescribed == [], "stages make bench runs that docs/benchmarks.md does not describe"


def test_the_settings_table_is_the_one_settings_py_makes() -> None:
    from voteflow import settingsdoc

    page = (REPO / "docs" / "operations.md").read_text()
    assert settingsdoc.rewrite(page) == page, (
        "docs/operations.md's settings table differs from voteflow/settings.py's "
        "declarations: run make docs"
    )


def test_every_setting_says_what_it_means() -> None:
    import dataclasses

    from voteflow import settingsdoc
    from voteflow.settings import Settings

    meanings = settingsdoc.meanings()
    assert [f.name for f in dataclasses.fields(Settings)] == list(meanings)
    assert all(meanings.values())

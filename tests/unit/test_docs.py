"""The README and docs/ keep their own references: every relative link finds
its file, and every "see <Section>" in the README names one of its sections
(a heading, or a paragraph's bold title such as **Redis memory.**)."""

from __future__ import annotations

import re

from tests.support import REPO

README = REPO / "README.md"
PAGES = [README, *sorted((REPO / "docs").glob("*.md"))]


def _sections(text: str) -> set[str]:
    headings = {m.group(1).strip() for m in re.finditer(r"^#+ (.+)$", text, re.M)}
    titles = {" ".join(m.group(1).split()) for m in re.finditer(r"\*\*([^*]+?)\.\*\*", text)}
    return headings | titles


def test_every_relative_link_finds_its_file() -> None:
    missing = []
    for page in PAGES:
        for target in re.findall(r"\]\(([^)\s#]+)(?:#[^)]*)?\)", page.read_text()):
            if "://" in target or target.startswith("mailto:"):
                continue
            if not (page.parent / target).exists():
                missing.append(f"{page.relative_to(REPO)}: {target}")
    assert missing == []


def test_every_section_the_readme_points_to_is_there() -> None:
    text = README.read_text()
    sections = _sections(text)
    # "see Sizing connection pools", the words possibly across a line break.
    pointed = re.findall(r"\b[Ss]ee ([A-Z][\w-]*(?:\s+[A-Za-z][\w-]*)*)", text)
    unknown = set()
    for reference in pointed:
        words = reference.split()
        if not any(" ".join(words[:n]) in sections for n in range(len(words), 0, -1)):
            unknown.add(" ".join(words))
    assert unknown == set(), f"sections the README names but does not have: {sorted(unknown)}"


def test_every_bench_stage_is_described_in_the_readme() -> None:
    from loadtest.bench.cli import STAGES

    text = README.read_text()
    benchmarks = text[
        text.index("## Benchmarks") : text.index("\n## ", text.index("## Benchmarks") + 3)
    ]
    undescribed = [
        f"{n} {stage.name}" for n, stage in STAGES.items() if f"**{stage.name}**" not in benchmarks
    ]
    assert undescribed == [], "stages make bench runs that README's Benchmarks does not describe"

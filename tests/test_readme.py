"""The README reads as a product on one screen: short, a results table of at most 12 one-line rows with figures only,
and every link it gives (to a file, or to a section of a docs page) leads somewhere."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
LINK = re.compile(r"\]\(([^)\s]+)\)")


def heading_anchor(heading: str) -> str:
    """GitHub's anchor for a Markdown heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^a-z0-9 _-]", "", heading.strip().lstrip("#").strip().lower()).replace(" ", "-")


def anchors(page: Path) -> set[str]:
    return {heading_anchor(line) for line in page.read_text().splitlines() if line.startswith("#")}


def test_the_readme_is_short() -> None:
    assert len(README.read_bytes()) < 9000, "the README is one screen and links out: move details to docs/"


def test_the_results_table_has_at_most_12_short_rows_each_linking_to_its_section() -> None:
    text = README.read_text()
    section = text.split("## Results", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("| ") and not line.startswith("| benchmark")]
    assert 0 < len(rows) <= 12
    for row in rows:
        assert len(row) < 260, row
        assert "docs/BENCHMARKS.md#" in row or "docs/RELIABILITY.md#" in row, row


def test_every_link_in_the_readme_and_the_docs_leads_somewhere() -> None:
    pages = [README, *sorted((ROOT / "docs").glob("*.md")), *sorted((ROOT / "docs" / "research").glob("*.md"))]
    broken = []
    for page in pages:
        for target in LINK.findall(page.read_text()):
            if target.startswith(("http://", "https://")):
                continue
            path, _, anchor = target.partition("#")
            dest = (page.parent / path).resolve() if path else page
            if not dest.exists():
                broken.append(f"{page.relative_to(ROOT)}: {target}")
            elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
                broken.append(f"{page.relative_to(ROOT)}: {target} (no such heading)")
    assert not broken, "\n".join(broken)


def test_heading_anchor_follows_github() -> None:
    assert heading_anchor("## The out-of-the-box loop (`python -m bench.loop`)") == (
        "the-out-of-the-box-loop-python--m-benchloop"
    )
    assert heading_anchor("## 4. Poisoning") == "4-poisoning"

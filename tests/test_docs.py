"""The front page and docs/ hold together: every relative link resolves (file and #anchor), and
docs/flags.md is what `scripts/flags_doc.py` renders from the flags' own definitions."""

import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
LINK = re.compile(r"\]\(([^)\s]+)\)")
FENCE = re.compile(r"^```.*?^```", re.S | re.M)


def anchor(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation but - and _ dropped, spaces to -."""
    text = heading.strip().lower().replace("`", "")
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(page: Path) -> set[str]:
    text = FENCE.sub("", page.read_text())
    return {anchor(line.lstrip("#")) for line in text.splitlines() if line.startswith("#")}


def relative_links(page: Path) -> list[str]:
    text = FENCE.sub("", page.read_text())
    return [target for target in LINK.findall(text)
            if not re.match(r"[a-z][a-z0-9+.-]*:", target)]  # http:, https:, mailto: ...


def broken_links(page: Path) -> list[str]:
    broken = []
    for target in relative_links(page):
        path, _, fragment = target.partition("#")
        resolved = (page.parent / path).resolve() if path else page
        if not resolved.exists():
            broken.append(f"{target}: no such file")
        elif fragment and resolved.suffix == ".md" and fragment not in anchors(resolved):
            broken.append(f"{target}: no heading with anchor #{fragment}")
    return broken


def test_anchor_follows_githubs_rule():
    assert anchor("Per-token loss (`calculate_per_token_loss`)") == \
        "per-token-loss-calculate_per_token_loss"
    assert anchor("Device-level balance, measured") == "device-level-balance-measured"


@pytest.mark.parametrize("page", PAGES, ids=lambda page: str(page.relative_to(ROOT)))
def test_every_relative_link_resolves(page):
    assert broken_links(page) == []


def test_a_broken_link_or_anchor_is_found(tmp_path):
    (tmp_path / "other.md").write_text("# Title\n\n## A section\n")
    page = tmp_path / "page.md"
    page.write_text("[ok](other.md#a-section) [file](missing.md) [anchor](other.md#nothing)\n"
                    "![img](other.md) [web](https://example.com/x) [self](#title)\n"
                    "```\n[in code](ignored.md)\n```\n# Title\n")
    assert broken_links(page) == ["missing.md: no such file",
                                  "other.md#nothing: no heading with anchor #nothing"]


def test_readme_stays_a_front_page():
    assert len((ROOT / "README.md").read_text().splitlines()) <= 300


def test_flags_page_is_the_code_s():
    sys.path.insert(0, str(ROOT / "scripts"))
    import flags_doc

    page = (ROOT / "docs" / "flags.md").read_text()
    assert page == flags_doc.render(), "docs/flags.md is stale: run python scripts/flags_doc.py"
    for action in flags_doc.flag_actions():  # every flag, with its default
        assert f"## `{action.option_strings[0]}`" in page

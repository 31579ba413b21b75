"""The README and the documentation site: a README a newcomer reads in five minutes, whose CLI
table names every command; pages that speak to users (no issue numbers, work-in-progress notes
or commit hashes); links from the README that lead somewhere. `make test` also builds the site
with `mkdocs build --strict`, which checks the links between the pages."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from vitscale.cli import build_parser

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
DOCS = ROOT / "docs"
PAGES = sorted(DOCS.glob("*.md"))

# What a user's page must not hold: the project's bookkeeping.
BOOKKEEPING = {
    "an issue number": re.compile(r"\bissues?\s*#?\d+|(?<![\w&/#])#\d+\b", re.IGNORECASE),
    "a commit hash": re.compile(r"\b[0-9a-f]{40}\b|\bcommit\s+[0-9a-f]{7,40}\b", re.IGNORECASE),
    "a work-in-progress note": re.compile(r"\bthis session\b|\bwork in progress\b|\bWIP\b|\bTODO\b|\bFIXME\b",
                                          re.IGNORECASE),
}


def _bookkeeping(text: str) -> list[str]:
    """'line N: what (the match)' for each piece of bookkeeping in `text`."""
    return [f"line {n}: {what} ({m.group(0)!r})"
            for n, line in enumerate(text.splitlines(), 1)
            for what, pattern in BOOKKEEPING.items() for m in pattern.finditer(line)]


def _commands_in_table(text: str) -> set[str]:
    """The subcommands a markdown table's rows name first: '| `vitscale NAME ...` | ...'."""
    return set(re.findall(r"^\|\s*`vitscale ([a-z][\w-]*)", text, re.MULTILINE))


def _subcommands() -> set[str]:
    parser = build_parser()
    (sub,) = [a for a in parser._actions if a.dest == "command"]  # the subparsers action
    return set(sub.choices)


def test_readme_is_short():
    lines = README.read_text(encoding="utf-8").splitlines()
    assert len(lines) <= 300, f"README.md has {len(lines)} lines; the manual belongs in docs/"


def test_readme_shows_your_own_data_on_its_first_screen():
    first = "\n".join(README.read_text(encoding="utf-8").splitlines()[:45])
    assert "## Your own data" in first
    for command in ("vitscale train ", "vitscale predict ", "vitscale study "):
        assert command in first, f"{command!r} is not on the README's first screen"
    assert "--data.name=image-folder" in first


@pytest.mark.parametrize("page", [README, *PAGES], ids=lambda p: p.name)
def test_no_bookkeeping(page: Path):
    found = _bookkeeping(page.read_text(encoding="utf-8"))
    assert not found, f"{page.name}: " + "; ".join(found)


def test_bookkeeping_patterns_catch_what_they_should():
    caught = ["as issue 13 asks", "see #12", "(commit b3f7b5d)", "0123456789abcdef0123456789abcdef01234567",
              "before this session's init", "TODO: measure"]
    clean = ["## Headings", "[x](study.md#the-law)", "`--top-k 5`", "a 2-core CPU", "commit to a length",
             "ckpt-00000160", "C#11"]
    assert all(_bookkeeping(text) for text in caught), [t for t in caught if not _bookkeeping(t)]
    assert not any(_bookkeeping(text) for text in clean), [t for t in clean if _bookkeeping(t)]


def test_readme_cli_table_names_every_command():
    text = README.read_text(encoding="utf-8")
    missing = _subcommands() - _commands_in_table(text)
    assert not missing, f"README.md's CLI table lacks: {', '.join(sorted(missing))}"
    assert "`vitscale --version`" in text


def test_cli_page_names_every_command():
    missing = _subcommands() - _commands_in_table((DOCS / "cli.md").read_text(encoding="utf-8"))
    assert not missing, f"docs/cli.md lacks: {', '.join(sorted(missing))}"


def test_readme_links_lead_to_files():
    text = README.read_text(encoding="utf-8")
    targets = re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text)
    local = [t for t in targets if "://" not in t]
    assert any(t.startswith("docs/") for t in local)
    broken = [t for t in local if not (ROOT / t).exists()]
    assert not broken, f"README.md links to missing files: {broken}"


def test_every_page_is_in_the_site_nav():
    nav = yaml.safe_load((ROOT / "mkdocs.yml").read_text(encoding="utf-8"))["nav"]
    listed = {page for entry in nav for page in entry.values()}
    assert listed == {p.name for p in PAGES}

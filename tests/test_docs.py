"""The README and the documentation site: a README a newcomer reads in five minutes, whose CLI
table names every command; pages that speak to users (no issue numbers, work-in-progress notes
or commit hashes); links from the README that lead somewhere. `make test` also builds the site
with `mkdocs build --strict`, which checks the links between the pages."""

from __future__ import annotations

import dataclasses
import functools
import re
import shlex
import typing
from pathlib import Path

import pytest
import yaml

from vitscale.cli.parser import build_parser
from vitscale.common.errors import UserError
from vitscale.train.config import RunConfig

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
    assert _commands_in_table(text) <= _subcommands(), "README.md's CLI table names a command there is not"
    assert "`vitscale --version`" in text


def test_cli_page_names_every_command():
    named = _commands_in_table((DOCS / "cli.md").read_text(encoding="utf-8"))
    commands = _subcommands()
    assert named == commands, f"docs/cli.md: missing {commands - named}, extra {named - commands}"


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


def _documented_commands(text: str) -> list[str]:
    """Every `vitscale ...` command line in the bash blocks of a markdown text (`python -m vitscale`
    and `torchrun ... -m vitscale` too), continuation lines joined, comments left out."""
    blocks = re.findall(r"```bash\n(.*?)```", text, re.DOTALL)
    lines = [line for block in blocks for line in block.replace("\\\n", " ").splitlines()]
    found = []
    for line in lines:
        tokens = shlex.split(line, comments=True)
        starts = [i + 1 for i, t in enumerate(tokens) if t == "vitscale"
                  and (i == 0 or tokens[i - 1] == "-m" or re.fullmatch(r"\w+=\S*", tokens[i - 1]))]
        if starts and "..." not in tokens:
            rest = tokens[starts[0]:]
            cut = next((i for i, t in enumerate(rest) if t in (">", "|", "&&", ";")), len(rest))
            found.append(" ".join(shlex.quote(t) for t in rest[:cut]))
    return found


def _config_fields() -> set[str]:
    """Every `section.key` of a run config."""
    hints = typing.get_type_hints(RunConfig)
    sections = [f.name for f in dataclasses.fields(RunConfig) if dataclasses.is_dataclass(hints[f.name])]
    return {f"{s}.{g.name}" for s in sections for g in dataclasses.fields(hints[s])}


@functools.cache
def _parser(command: str):
    """The parser cli.parser builds for `vitscale COMMAND ...` (with the command's config flags)."""
    return build_parser(fields_for=command)


@pytest.mark.parametrize("page", [README, *PAGES], ids=lambda p: p.name)
def test_documented_commands_parse(page: Path):
    """Each command the page shows is one the parser takes, and each --section.key=value it sets
    is a run-config field: a renamed flag or field fails here, not in a reader's shell."""
    commands = _documented_commands(page.read_text(encoding="utf-8"))
    fields, bad = _config_fields(), []
    for command in commands:
        argv = shlex.split(command)
        try:
            args, extra = _parser(argv[0]).parse_known_args(argv)
        except (UserError, SystemExit) as e:
            bad.append(f"{command}: {e}")
            continue
        unknown = [e for e in extra if not e.startswith("--") or e[2:].partition("=")[0] not in fields]
        if unknown:
            bad.append(f"{command}: not config fields: {unknown}")
    assert not bad, "\n".join(bad)


def test_documented_commands_are_found():
    sample = ("```bash\nvitscale train --x.y=1   # a comment\n"
              "torchrun --nproc_per_node 2 -m vitscale eval \\\n    runs/a\n"
              "vitscale config pretrain > mae.yaml\necho vitscale\nA=1 vitscale models\n```\n")
    assert _documented_commands(sample) == ["train --x.y=1", "eval runs/a", "config pretrain", "models"]


def test_layout_names_every_module():
    """docs/design.md's layout names each module and package of vitscale/, so it cannot drift from
    the tree (a file's name, or its path for the packages and their files)."""
    layout = (DOCS / "design.md").read_text(encoding="utf-8").split("## Layout", 1)[1]
    package = ROOT / "vitscale"
    names = [p.name for p in package.glob("*.py") if p.name != "__init__.py"]
    names += [f"vitscale/{p.name}/" for p in package.iterdir() if (p / "__init__.py").is_file()]
    missing = [n for n in names if not re.search(rf"(?<!\w){re.escape(n)}", layout)]
    assert not missing, f"docs/design.md's layout does not name: {missing}"


@pytest.mark.parametrize("page", [README, *PAGES], ids=lambda p: p.name)
def test_fields_named_are_config_fields(page: Path):
    """Each `section.key` a page names (data.val_path, train.ema, ...) is a run-config field."""
    fields = _config_fields()
    sections = "|".join(sorted({f.split(".")[0] for f in fields}))
    files = (".py", ".md", ".yaml", ".json", ".onnx", ".safetensors", ".pth", ".tar", ".png", ".csv", ".data")
    named = set(re.findall(rf"(?<![\w/.-])((?:{sections})\.[a-z_0-9]+)", page.read_text(encoding="utf-8")))
    unknown = sorted(n for n in named if n not in fields and not n.endswith(files))
    assert not unknown, f"{page.name} names fields there are not: {unknown}"

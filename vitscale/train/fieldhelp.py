"""Every config field's help, read from the comment beside the field in its dataclass's source,
and a config printed as YAML with that help beside each key (`vitscale config COMMAND`).

The source comments are the one copy of the help: a field's help is the comment on its line(s)
plus the comment-only lines right after it, joined; a field with no comment of its own takes the
block of comment-only lines right above it, which a blank line parts from the field before (else
the block continues that field's comment).

    print(commented_yaml(recipe("pretrain")))   # model:, data:, ... each key with its help
"""

from __future__ import annotations

import ast
import functools
import inspect
import io
import json
import shutil
import textwrap
import tokenize
import typing
from dataclasses import fields, is_dataclass

import yaml

COLUMN = 40  # comments start here (or two spaces after a longer key and value)


@functools.cache
def field_help(cls) -> dict[str, str]:
    """{field name: help} of dataclass `cls`, from the comments beside its fields in its source
    ("" for a field without one, or all "" where the source is not installed)."""
    names = {f.name for f in fields(cls)}
    try:
        source = textwrap.dedent(inspect.getsource(cls))
    except (OSError, TypeError):  # e.g. only .pyc files shipped
        return dict.fromkeys(sorted(names), "")
    comments: dict[int, tuple[str, bool]] = {}  # line -> (text, whether the line holds it alone)
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            comments[tok.start[0]] = (tok.string.lstrip("#").strip(), not tok.line[:tok.start[1]].strip())
    out, taken = dict.fromkeys(sorted(names), ""), set()
    for node in ast.parse(source).body[0].body:
        if not (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)
                and node.target.id in names):
            continue
        lines = list(range(node.lineno, node.end_lineno + 1))  # the statement, then lone comments
        while lines[-1] + 1 in comments and comments[lines[-1] + 1][1]:
            lines.append(lines[-1] + 1)
        if not any(n in comments for n in lines):  # none of its own: the block above it
            while lines[0] - 1 in comments and comments[lines[0] - 1][1] and lines[0] - 1 not in taken:
                lines.insert(0, lines[0] - 1)
        taken.update(lines)
        out[node.target.id] = " ".join(comments[n][0] for n in lines if n in comments and comments[n][0])
    return out


def all_help(cls, prefix: str = "") -> dict[str, str]:
    """{dotted key: help} of every field of `cls`, sections and the fields inside them."""
    hints, own = typing.get_type_hints(cls), field_help(cls)
    out = {}
    for f in fields(cls):
        out[prefix + f.name] = own[f.name]
        if is_dataclass(hints[f.name]):
            out |= all_help(hints[f.name], f"{prefix}{f.name}.")
    return out


def scalar(value) -> str:
    """One value as YAML on one line: 40, 'auto', [0.9, 0.95], ''."""
    text = yaml.safe_dump(list(value) if isinstance(value, tuple) else value, default_flow_style=True,
                          width=float("inf"), allow_unicode=True)
    return text.removesuffix("...\n").strip()


def commented_yaml(cfg, width: int = 0, leave_out: tuple[str, ...] = ()) -> str:
    """Config `cfg` (a dataclass) as YAML, each key followed by its help as a comment, wrapped to
    `width` columns (0 = the terminal's, at least 80), without the top-level fields `leave_out`.
    `load_yaml` reads it back to `cfg` (to its defaults where left out)."""
    rows: list[tuple[str, str, list[str]]] = []  # (key and value, help, lines of a long list)

    def walk(obj, indent: str) -> None:
        helps = field_help(type(obj))
        for f in fields(obj):
            if not indent and f.name in leave_out:
                continue
            value, key = getattr(obj, f.name), f"{indent}{f.name}:"
            if is_dataclass(value):
                rows.append((key, helps[f.name], []))
                walk(value, indent + "  ")
            elif isinstance(value, tuple) and len(f"{key} {scalar(value)}") > COLUMN - 2:
                rows.append((key, helps[f.name], [f"{indent}  - {scalar(v)}" for v in value]))
            else:
                rows.append((f"{key} {scalar(value)}", helps[f.name], []))

    walk(cfg, "")
    width = width or max(80, shutil.get_terminal_size().columns)
    column = min(COLUMN, max(len(key) for key, _, _ in rows) + 2)
    out = []
    for key, text, items in rows:
        wrapped = textwrap.wrap(text, max(30, width - column - 2), break_on_hyphens=False) or [""]
        out.append(f"{key.ljust(column - 2)}  # {wrapped[0]}".rstrip())
        out += [f"{' ' * column}# {more}" for more in wrapped[1:]] + items
    return "\n".join(out) + "\n"


def as_json(cfg) -> str:
    """Config `cfg` as JSON: {"config": nested values, "help": {dotted key: help}}."""
    from vitscale.common.records import to_dict

    return json.dumps({"config": to_dict(cfg), "help": all_help(type(cfg))}, indent=1)

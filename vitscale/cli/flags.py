"""Command-line flags generated from the config dataclasses, each with its field's help
(vitscale.train.fieldhelp) and default, so `vitscale CMD --help` lists every field:

    vitscale train --help       one group a run-config section: --train.epochs N  ... (default 40)
    vitscale study --help       one flag a study field: --sweep-length X  ... (default 0.5)

A flag keeps the text it was given; the config's own parsing types and checks it (config.typed,
as for a config file), so `--train.epochs=ten` fails with the same line from a flag or a file.
Both `--train.epochs=5` and `--train.epochs 5` work (argparse).
"""

from __future__ import annotations

import argparse
import typing
from dataclasses import fields

from vitscale.train.fieldhelp import field_help, scalar

SECTIONS = ("model", "data", "train", "mae", "distill")  # a RunConfig's sections, in --help's order
# study fields whose flag is not the field's name with dashes (a repeatable flag gives one item)
STUDY_FLAGS = {"strategies": "strategy", "recipes": "recipe", "launcher_args": "launcher-arg"}
REPEATED = ("recipes", "launcher_args")


def metavar(tp) -> str:
    """How --help names a value of type `tp`: N, X, BOOL, TEXT, LIST for a tuple, VALUE for a union."""
    if typing.get_origin(tp) is tuple:
        return "LIST"
    if typing.get_args(tp):
        return "VALUE"
    return {int: "N", float: "X", bool: "BOOL"}.get(tp, "TEXT")


def _help(text: str, default) -> str:
    """A field's help with its default as a flag takes it (a list comma-separated), escaped for
    argparse's %-formatting."""
    listed = ",".join(scalar(v) for v in default) if isinstance(default, tuple) else ""
    shown = listed or ("''" if default == () else scalar(default))
    return f"{text} (default {shown})".replace("%", "%%")


class _Override(argparse.Action):
    """Record `SECTION.KEY=TEXT` in namespace.overrides, in the order given (the last of a key wins)."""

    def __call__(self, parser, namespace, values, option_string=None):
        namespace.overrides = [*namespace.overrides, f"{self.dest}={values}"]


def add_run_fields(parser: argparse.ArgumentParser, cls, defaults: dict) -> None:
    """One argument group per section of run config `cls`, a `--SECTION.KEY VALUE` flag per field
    with its help and its value in `defaults` (a command's config.recipe_values)."""
    hints = typing.get_type_hints(cls)
    section_help = field_help(cls)
    parser.set_defaults(overrides=[])
    for section in SECTIONS:
        kind = hints[section]
        group = parser.add_argument_group(f"{section}: {section_help[section]}".replace("%", "%%"))
        helps, types = field_help(kind), typing.get_type_hints(kind)
        for f in fields(kind):
            group.add_argument(f"--{section}.{f.name}", dest=f"{section}.{f.name}", action=_Override,
                               metavar=metavar(types[f.name]),
                               help=_help(helps[f.name], defaults[section][f.name]))


class _Field(argparse.Action):
    """Record a study field's text in namespace.fields ({field: text, or [text, ...] if repeated})."""

    def __call__(self, parser, namespace, values, option_string=None):
        given = dict(namespace.fields)
        given[self.dest] = [*given.get(self.dest, []), values.strip()] if self.dest in REPEATED else values
        namespace.fields = given


def add_study_fields(parser: argparse.ArgumentParser, cls, leave_out: tuple[str, ...] = ()) -> None:
    """A flag per field of study config `cls` (`--sweep-length X`, repeatable for a list given one
    item at a time), its help and default from the dataclass."""
    hints, helps, default = typing.get_type_hints(cls), field_help(cls), cls()
    parser.set_defaults(fields={})
    group = parser.add_argument_group("study fields (a --config file's keys; a flag sets its field over "
                                      "the file's)")
    for f in fields(cls):
        if f.name in leave_out:
            continue
        flag = STUDY_FLAGS.get(f.name, f.name.replace("_", "-"))
        more = "; repeat the flag for more" if f.name in REPEATED else ""
        group.add_argument(f"--{flag}", dest=f.name, action=_Field,
                           metavar="TEXT" if f.name in REPEATED else metavar(hints[f.name]),
                           help=_help(helps[f.name] + more, getattr(default, f.name)))

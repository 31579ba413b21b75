"""Errors tell a mistake from a bug: UserError exits 2 in one line, anything else exits 1
with its traceback saved (issue 10, item 16)."""

import pytest

from vitscale import cli
from vitscale.cli import commands
from vitscale.common import errors


def _boom(message):
    def run(args, *extra):
        raise ValueError(message)  # as torch.cat would: not the user's mistake
    return run


def test_a_bare_value_error_is_a_bug_not_a_user_mistake(capsys, monkeypatch, tmp_path):
    monkeypatch.setattr(commands, "cmd_models", _boom("expected a non-empty list of Tensors"))
    errors.crash_dir(tmp_path)
    try:
        code = cli.main(["models"])
    finally:
        errors.crash_dir(None)
    err = capsys.readouterr().err
    assert code == errors.EXIT_BUG == 1
    assert err.count("\n") == 1 and "internal error" in err and "crash.txt" in err
    saved = (tmp_path / "crash.txt").read_text()
    assert "Traceback" in saved and "non-empty list of Tensors" in saved


def test_debug_shows_the_bug_itself(monkeypatch):
    monkeypatch.setattr(commands, "cmd_models", _boom("a bug"))
    with pytest.raises(ValueError, match="a bug"):
        cli.main(["--debug", "models"])


def test_a_user_error_is_one_line_and_exit_2(capsys):
    assert cli.main(["cost", "X/16"]) == errors.EXIT_USER == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("vitscale: error:")

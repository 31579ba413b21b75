"""The library logs through Python logging (vitscale.common.logs), never print: the CLI decides
where lines go (info on stdout, warnings on stderr; all on stderr where stdout carries data)."""

import ast
import logging
from pathlib import Path

import pytest

import vitscale
from vitscale.common import logs

PACKAGE = Path(vitscale.__file__).parent


@pytest.fixture
def restored():
    logger = logging.getLogger(logs.ROOT)
    handlers, level = logger.handlers[:], logger.level
    yield logger
    logger.handlers[:] = handlers
    logger.setLevel(level)


def test_no_library_module_prints():
    """print() belongs to the command line (vitscale/cli); everything under it logs."""
    found = []
    for path in PACKAGE.rglob("*.py"):
        if path.relative_to(PACKAGE).parts[0] == "cli":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "print":
                found.append(f"{path.relative_to(PACKAGE)}:{node.lineno}")
    assert not found, found


def test_info_goes_to_stdout_and_warnings_to_stderr(restored, capsys):
    logs.setup(rich=False)
    logging.getLogger("vitscale.train.engine").info("epoch 1: val_top1 0.5")
    logging.getLogger("vitscale.common.checkpoint").warning("ckpt-2 is damaged")
    out, err = capsys.readouterr()
    assert out == "epoch 1: val_top1 0.5\n" and err == "warning: ckpt-2 is damaged\n"


def test_where_stdout_carries_data_every_line_goes_to_stderr(restored, capsys):
    logs.setup(stderr=True, rich=False)
    logging.getLogger("vitscale.study").info("sweep: lr 1e-3 50%")
    logging.getLogger("vitscale.study").warning("edge")
    out, err = capsys.readouterr()
    assert out == "" and err == "sweep: lr 1e-3 50%\nwarning: edge\n"


def test_setup_again_replaces_its_handlers_and_keeps_others(restored, capsys):
    other = logging.NullHandler()
    restored.addHandler(other)
    logs.setup(rich=False)
    logs.setup(rich=False)
    logging.getLogger("vitscale.x").info("once")
    assert capsys.readouterr().out == "once\n" and other in restored.handlers


def test_quiet_keeps_only_errors_and_plain_restores_what_was_there(restored, capsys):
    logs.setup(rich=False)
    log = logging.getLogger("vitscale.x")
    with logs.quiet():
        log.info("rank 1 says this")
        log.warning("and this")
        log.error("but not this")
    with logs.quiet(False):
        log.info("rank 0 says this")
    before = restored.handlers[:]
    with logs.plain():
        log.info("a job's line")
    assert restored.handlers == before
    out, err = capsys.readouterr()
    assert out == "rank 0 says this\na job's line\n" and err == "error: but not this\n"

"""A run directory: what a run wrote, read back in one place.

    RUN/config.yaml      the resolved config (vitscale.common.rundir.RUN; `load_yaml` reads it)
    RUN/classes.json     the data's class names (vitscale.common.classnames)
    RUN/best/            the checkpoint validation chose; RUN/ckpt-STEP/ the others
    RUN/metrics.jsonl    RUN/final.json   what it measured

`RunDir(path).open()` is what is done with a run that has trained (eval, export, predict, soup)
starts from: its config, its newest good checkpoint (best/ first, each one passed over named in
a warning), its class names. What the directory lacks is refused in one line.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from vitscale.common import checkpoint, classnames
from vitscale.common.checkpoint import Checkpoint
from vitscale.common.errors import UserError
from vitscale.common.rundir import BEST, FINAL, METRICS, RUN
from vitscale.train.config import RunConfig, load_yaml


@dataclass(frozen=True)
class RunDir:
    """The files of one run directory (new, running or finished)."""

    path: Path  # (a str is taken as its Path)

    def __post_init__(self) -> None:
        object.__setattr__(self, "path", Path(self.path))

    @property
    def config_file(self) -> Path:
        return self.path / RUN

    @property
    def best(self) -> Path:
        return self.path / BEST

    @property
    def classes_file(self) -> Path:
        return self.path / classnames.FILE

    @property
    def metrics(self) -> Path:
        return self.path / METRICS

    @property
    def final(self) -> Path:
        return self.path / FINAL

    def is_run(self) -> bool:
        """Whether a run was started here (its config.yaml is there)."""
        return self.config_file.is_file()

    def config(self) -> RunConfig:
        """The run's config.yaml; a directory without one is refused in one line."""
        if not self.is_run():
            raise UserError(f"{str(self.path)!r} is not a run directory (no {RUN}); pass a directory that "
                            "`vitscale train` / pretrain / finetune wrote")
        return load_yaml(self.config_file)

    def checkpoint(self, shapes: dict[str, torch.Size] | None = None) -> Checkpoint | None:
        """The best checkpoint where it is whole, else the newest whole one (each one passed over named
        in a warning; `shapes`: the model's, checked); None where the run has none yet,
        checkpoint.Damaged where it has some and none is whole."""
        return checkpoint.newest_good(self.path, shapes, first=(self.best,))

    def classes(self, count: int) -> tuple[tuple[str, ...], bool]:
        """(the names of the run's `count` classes, whether it saved them): vitscale.common.classnames."""
        return classnames.read(self.path, count)

    def open(self, shapes: dict[str, torch.Size] | None = None) -> Run:
        """The run's config, newest good checkpoint (see `checkpoint`) and class names (those of its
        config's model.num_classes); a directory with no config or no checkpoint is refused."""
        cfg = self.config()
        found = self.checkpoint(shapes)
        if found is None:
            raise UserError(f"{str(self.path)!r} has no checkpoint yet; train it first")
        names, named = self.classes(cfg.model.num_classes)
        return Run(self, cfg, found, names, named)


@dataclass(frozen=True)
class Run:
    """A run directory opened: what it trained, from where, on which classes."""

    dir: RunDir  # the run directory
    config: RunConfig  # its config.yaml as saved
    checkpoint: Checkpoint  # its best checkpoint where that is whole, else its newest whole one
    classes: tuple[str, ...]  # the name of each of its data's classes, in class-id order
    named: bool  # whether `classes` are the run's own (classes.json), not ids made up for an old run

    @property
    def path(self) -> Path:
        return self.dir.path

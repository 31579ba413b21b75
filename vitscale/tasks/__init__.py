"""What the engine trains, one home per task (as pycls's builders): how its module is built,
what it needs to start, how it is evaluated, which metric ranks its checkpoints, and what its
checkpoints hold.

  supervised  classify.Classifier from scratch
  mae         pretrain.Pretrainer: MAE / VideoMAE masked reconstruction
  finetune    classify.Classifier from --init weights (tiny head, fresh fc_norm)
  linprobe    probe.LinearProbe: a frozen encoder's features into a linear head
  distill     distill.Distiller (logits) / FeatureDistiller (tokens): a student taught by a frozen teacher

A task module's forward(x, y) returns the loss; `encoder` names the ViT it trains and
`predict(x)` what evaluation scores. The engine, evaluation, the study and the weights
reader ask the task, never its name.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

from vitscale.common.errors import UserError
from vitscale.tasks import classify, distill, pretrain, probe
from vitscale.tasks.classify import Classifier, mix, soft_targets
from vitscale.tasks.evaluate import Context
from vitscale.tasks.pretrain import Pretrainer
from vitscale.tasks.probe import LinearProbe

__all__ = ["TASKS", "Classifier", "LinearProbe", "Pretrainer", "Task", "build", "get", "mix", "soft_targets"]


@dataclass(frozen=True)
class Task:
    name: str
    module: Callable[..., nn.Module]  # (RunConfig, the data's class count) -> the module trained
    metrics: Callable[[nn.Module, Context], dict]  # held-out metrics of the module (evaluate.evaluate)
    metric: str  # the metric that ranks checkpoints (best/) and a study's trials; higher is better
    needs_init: bool = False  # starts from weights (--init); refused without
    after_init: Callable[[nn.Module], list[str]] | None = None  # what changes once --init is loaded
    decoder: bool = False  # its checkpoints hold an MAE decoder, described by the run's `mae` section
    check: Callable[..., None] | None = None  # the task's own checks of a run config (RunConfig)
    multires: bool = False  # may vary its input shape step to step (train.resolutions, multigrid)
    student: bool = False  # its module wraps a student ViT (vit.*) with training-only parts; what is
    # deployed (vitscale export) is the student alone
    labelled: bool = True  # learns from class labels: data without 2 classes or more is refused before
    # the run directory is touched (pre-training needs none)

    def check_data(self, num_classes: int) -> None:
        """Refuse data this task cannot learn from (one line), before any work."""
        if self.labelled:
            classify.need_classes(self.name, num_classes)

    def score(self, result: dict) -> float | None:
        """Higher is better: the task's metric, else minus the validation loss (a pre-training run
        without labels); None with no validation data (then the latest checkpoint is the best)."""
        if self.metric in result:
            return result[self.metric]
        return -result["val_loss"] if "val_loss" in result else None


TASKS = {task.name: task for task in (
    Task("supervised", classify.build, classify.metrics, "val_top1", multires=True),
    Task("mae", pretrain.build, pretrain.metrics, "knn_top1", decoder=True, labelled=False),
    Task("finetune", classify.build, classify.metrics, "val_top1", needs_init=True,
         after_init=classify.start_fine_tuning, multires=True),
    Task("linprobe", probe.build, classify.metrics, "val_top1", needs_init=True),
    # the feature kind reports no val_top1: ranked by its feature loss (score's fallback)
    Task("distill", distill.build, distill.metrics, "val_top1", check=distill.check, student=True),
)}


def get(name: str) -> Task:
    if name not in TASKS:
        raise UserError(f"task must be one of {', '.join(TASKS)}, got {name!r}")
    return TASKS[name]


def build(cfg, num_classes: int) -> nn.Module:
    """The module a run config (`RunConfig`) trains, for data of `num_classes` classes."""
    return get(cfg.task).module(cfg, num_classes)

"""Distillation from a frozen teacher (`vitscale distill --teacher RUN_OR_WEIGHTS`).

  soft     DeiT / TinyViT logit distillation: (1 - alpha) CE(labels) + alpha KL(teacher || student) at
           temperature T, x T^2 (Hinton et al. 2015), summed over classes and averaged over samples
  hard     DeiT's hard distillation: (1 - alpha) CE(labels) + alpha CE(teacher's argmax)
  feature  G2SD's generic stage (Huang et al. 2023): the student's tokens, through a linear head from
           its width to the teacher's, match the teacher's last-block tokens layer-normed without
           affine (smooth-L1, beta 2, as G2SD's code); a run to start `vitscale finetune --init` from

The student is a vanilla ViT: one head takes both losses (DeiT's distillation token is not
built). The teacher is any weights vitscale reads (a run directory, a transformers directory, a
timm / MAE / VideoMAE / vitscale file): frozen, in eval mode always, fed the batch resized to its
own input size (bicubic). It is held outside the task module's parameters and state dict, so
checkpoints hold the student alone and a resumed run reloads the teacher from `distill.teacher`;
its forward runs inside the module's, so a FLOP count of the training step counts it.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vitscale import weights
from vitscale.common.errors import UserError
from vitscale.data.multires import resize
from vitscale.models.vit import ViT, ViTConfig
from vitscale.tasks import classify, evaluate, pretrain
from vitscale.tasks.classify import Classifier, mix, need_classes, soft_targets

KINDS = ("soft", "hard", "feature")
FEATURE_BETA = 2.0  # smooth-L1's switch from quadratic to linear (G2SD's engine_distill.py)


def soft_distillation(student: Tensor, teacher: Tensor, temperature: float) -> Tensor:
    """KL(softmax(teacher / T) || softmax(student / T)) x T^2: summed over classes, averaged over
    samples. The T^2 keeps the gradient's scale as T changes (Hinton et al. 2015). [B, K] logits."""
    log_p = F.log_softmax(teacher / temperature, dim=-1)  # [B, K] the teacher's softened distribution
    log_q = F.log_softmax(student / temperature, dim=-1)  # [B, K] the student's
    return (log_p.exp() * (log_p - log_q)).sum(-1).mean() * temperature**2


def hard_distillation(student: Tensor, teacher: Tensor) -> Tensor:
    """Cross-entropy of the student's [B, K] logits against the teacher's top class (DeiT)."""
    return F.cross_entropy(student, teacher.argmax(dim=-1))


def feature_distillation(predicted: Tensor, teacher_tokens: Tensor) -> Tensor:
    """Smooth-L1 between the student's projected tokens and the teacher's, layer-normed without
    affine (G2SD's target). [B, N, D_teacher] both."""
    target = F.layer_norm(teacher_tokens, teacher_tokens.shape[-1:], eps=1e-6)
    return F.smooth_l1_loss(predicted, target, beta=FEATURE_BETA)


class Teacher:
    """A frozen ViT held outside its student's module: in no parameters(), state_dict() or
    train(); moved along by the module's .to() (see Taught); shared, not copied, by deepcopy
    (an EMA of the student needs no second teacher)."""

    def __init__(self, model: ViT):
        self.model = model.eval().requires_grad_(False)

    def __deepcopy__(self, memo) -> Teacher:
        return self

    def sized(self, x: Tensor) -> Tensor:
        """The student's batch at the teacher's input size (bicubic, as the teacher's data would be)."""
        return resize(x, self.model.cfg.hw, "bicubic", antialias=False)

    @torch.no_grad()
    def logits(self, x: Tensor) -> Tensor:
        """[B, C, (T,) H, W] at the student's size -> [B, K] float logits of the teacher."""
        return self.model(self.sized(x)).float()

    @torch.no_grad()
    def tokens(self, x: Tensor) -> Tensor:
        """[B, C, (T,) H, W] -> [B, N, D] the last block's patch tokens (before the final norm)."""
        tokens = self.model.forward_features(self.sized(x), norm=False)
        return tokens[:, self.model.cfg.num_prefix :].float()


class Taught(nn.Module):
    """A task module with a `Teacher` in `_teacher`: moved with it, and in eval mode whatever the
    module's mode."""

    @property
    def teacher(self) -> ViT:
        return self._teacher.model

    def _apply(self, fn, recurse: bool = True):
        self._teacher.model._apply(fn, recurse)  # .to(device), .half(): the teacher goes along
        return super()._apply(fn, recurse)

    def train(self, mode: bool = True):
        super().train(mode)
        self.teacher.eval()  # frozen: no drop-path, ever
        return self


class Distiller(Taught, Classifier):
    """A classifier trained on (1 - alpha) x its label loss + alpha x a logit distillation loss."""

    def __init__(self, cfg: ViTConfig, teacher: ViT, kind: str = "soft", alpha: float = 0.5,
                 temperature: float = 1.0, label_smoothing: float = 0.0, mixup: float = 0.0,
                 cutmix: float = 0.0):
        super().__init__(cfg, label_smoothing, mixup, cutmix)
        self._teacher = Teacher(teacher)
        self.kind, self.alpha, self.temperature = kind, alpha, temperature

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        targets = soft_targets(y, self.vit.cfg.num_classes, self.smoothing)  # [B, K]
        if self.training:
            x, targets = mix(x, targets, self.mixup, self.cutmix)  # the teacher sees the mixed batch too
        logits = self.vit(x).float()  # [B, K]
        label_loss = F.cross_entropy(logits, targets)
        teacher = self._teacher.logits(x)  # [B, K]
        terms = {"soft": lambda: soft_distillation(logits, teacher, self.temperature),
                 "hard": lambda: hard_distillation(logits, teacher)}
        kinds = ("soft", "hard") if self.kind == "both" else (self.kind,)
        kd = sum(terms[k]() for k in kinds) / len(kinds)  # both: the mean of the two terms
        return (1 - self.alpha) * label_loss + self.alpha * kd


class FeatureDistiller(Taught):
    """G2SD's generic stage: a ViT's tokens, through a linear head to the teacher's width, predict
    the teacher's normalised tokens; no labels."""

    def __init__(self, cfg: ViTConfig, teacher: ViT):
        super().__init__()
        self.vit = ViT(cfg.replace(num_classes=0))
        # named `head`: a run used as --init drops it with any class head (weights: head_extras)
        self.head = nn.Linear(cfg.width, teacher.cfg.width)
        nn.init.xavier_uniform_(self.head.weight)
        nn.init.zeros_(self.head.bias)
        self._teacher = Teacher(teacher)

    @property
    def encoder(self) -> ViT:
        return self.vit

    def forward(self, x: Tensor, y: Tensor | None) -> Tensor:
        tokens = self.vit.forward_features(x)[:, self.vit.cfg.num_prefix :]  # [B, N, D_student]
        return feature_distillation(self.head(tokens).float(), self._teacher.tokens(x))

    def predict(self, x: Tensor) -> Tensor:
        """Pooled features (for k-NN accuracy)."""
        return self.vit(x)


def load_teacher(path: str) -> ViT:
    """The frozen ViT of weights vitscale reads (an MAE's encoder, its decoder left out), built
    without touching the global RNG (the student draws its initial weights as it would alone)."""
    with torch.random.fork_rng(devices=[]), weights.naming(Path(path)):
        source = weights.read(path)
        teacher = ViT(source.model)
        if not next(teacher.parameters()).is_meta:  # on meta (FLOP counting) there is nothing to load
            weights.load_into(teacher, source)
    return teacher.eval().requires_grad_(False)


def check(cfg) -> None:
    """A distillation run config (`RunConfig`) names its teacher."""
    if not cfg.distill.teacher:
        raise UserError("task 'distill' needs a teacher: pass --teacher RUN_DIR_OR_WEIGHTS "
                        "(distill.teacher)")


def build(cfg, num_classes: int) -> nn.Module:
    """The distillation module of a run config (`RunConfig`) for data of `num_classes` classes."""
    d, student = cfg.distill, cfg.model
    teacher = load_teacher(d.teacher)
    t = teacher.cfg
    where = f"distill.teacher {d.teacher!r}"
    if (t.in_chans, t.frames) != (student.in_chans, student.frames):
        raise UserError(f"{where} takes {t.in_chans} channels x {t.frames} frames, the data gives "
                         f"{student.in_chans} x {student.frames}; use a teacher of the same input kind")
    if d.kind == "feature":
        if t.grid != student.grid:
            raise UserError(f"{where} has a token grid of {t.grid}, the student {student.grid}; feature "
                             "distillation matches token for token: choose image sizes and patches that "
                             "give the same grid")
        return FeatureDistiller(student, teacher)
    need_classes(cfg.task, num_classes)
    if t.num_classes != num_classes:
        raise UserError(f"{where} has {t.num_classes or 'no'} class outputs, the data {num_classes} "
                         f"classes; logit distillation (distill.kind={d.kind}) needs a classifier of the "
                         "same classes (a train or finetune run; an MAE is for distill.kind=feature)")
    tr = cfg.train
    return Distiller(student.replace(num_classes=num_classes), teacher, d.kind, d.alpha, d.temperature,
                     tr.label_smoothing, tr.mixup, tr.cutmix)


def metrics(module: nn.Module, ctx: evaluate.Context) -> dict:
    """Logit kinds: the classifier's (val_top1 ...); feature: val_loss (the feature loss) and,
    with train.knn_k and labels, knn_top1, as MAE pre-training (no reconstructions drawn)."""
    if ctx.cfg.distill.kind == "feature":
        return pretrain.metrics(module, replace(ctx, picture=None))
    return classify.metrics(module, ctx)

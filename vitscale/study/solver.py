"""The law's fit, solved for many problems at once: every start of a fit, every bootstrap refit,
every leave-one-out fit as one batch of arrays.

    pred(s, N, D) = exp(le) + exp(la - alpha_s ln) + exp(lb - beta ld - gamma ln)
    theta         = (le, la, lb, beta, gamma, alpha_1 .. alpha_S),  ln = log N/n0,  ld = log D/d0

Each problem minimises the Huber loss of its residuals pred - y, or log pred - log y in log space
(Hoffmann et al.'s fit of a loss; `log`), weighted by a mask, so that
problems with fewer points pad theirs) inside box bounds. The method is Levenberg-Marquardt on the
Huber loss's reweighted Gauss-Newton model (IRLS: a residual's weight is 1 inside the band and
huber / |r| outside, the quadratic that touches the Huber loss from above), projected on the
bounds: a parameter at a bound that its gradient pushes against is held there for the step.

Why not scipy's L-BFGS-B: it solves one problem per call, and a study makes thousands of small
fits (seven parameters, tens of points): scipy's per-call and per-evaluation overhead was three
quarters of the time, the loss itself a quarter. Here a batch costs what one problem costs, and a
seven-parameter Gauss-Newton step converges in tens of iterations where L-BFGS-B takes a hundred
or more. tests/study/test_fits.py checks the solutions against L-BFGS-B's.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

MAX_ITER = 300
DAMPING = 1e-3  # the first step: nearly Gauss-Newton
MAX_DAMPING = 1e12
PRUNE = 1e-3  # a start this far (relative) above a converged start of its fit ...
CRAWL = 1e-4  # ... whose last step gained less than this (relative) stops: see `solve`
TOL = 1e-10  # relative loss change below which an accepted step counts as converged


@dataclass(frozen=True)
class Problems:
    """B fits' data: [B, P] arrays (a [1, P] row is shared by every problem); `which` indexes a
    point's strategy in theta's alphas, `mask` is 1 for a point and 0 for padding."""

    ln: np.ndarray
    ld: np.ndarray
    which: np.ndarray
    y: np.ndarray
    mask: np.ndarray


@dataclass(frozen=True)
class Solution:
    theta: np.ndarray  # [B, K]
    loss: np.ndarray  # [B]
    converged: np.ndarray  # [B] bool: stopped before MAX_ITER (settled, no step lowers the loss, or
    # pruned: then above another start's loss, so never a fit's answer)


class _Batch:
    """The problems' columns materialised at [B, P] once (the loop's cost is the count of array
    operations, not their size), with each point's strategy as a one-hot [B, P, S]."""

    def __init__(self, p: Problems, b: int, strategies: int, log: bool = False):
        self.log = log
        shape = np.broadcast_shapes(p.y.shape, (b, 1))
        self.ln, self.ld, self.y, self.mask = (np.ascontiguousarray(np.broadcast_to(v, shape))
                                               for v in (p.ln, p.ld, p.y, p.mask))
        self.onehot = np.eye(strategies)[np.broadcast_to(p.which, shape)]
        if log:  # padding (mask 0) holds y = 0: any positive value keeps its log finite
            self.y = np.log(np.where(self.mask > 0, self.y, 1.0))

    def loss(self, theta: np.ndarray, huber: float) -> tuple[np.ndarray, tuple]:
        """Each problem's Huber loss, and the terms its step reuses."""
        alpha = np.einsum("bps,bs->bp", self.onehot, theta[:, 5:])
        floor = np.exp(theta[:, 0:1])
        size = np.exp(theta[:, 1:2] - alpha * self.ln)
        length = np.exp(theta[:, 2:3] - theta[:, 3:4] * self.ld - theta[:, 4:5] * self.ln)
        pred = floor + size + length
        r = (np.log(pred) if self.log else pred) - self.y
        psi = np.clip(r, -huber, huber)  # d loss / d r
        # 0.5 r^2 inside the band, huber (|r| - huber / 2) outside: both are psi (r - psi / 2)
        return np.einsum("bp,bp->b", self.mask * psi, r - 0.5 * psi), (floor, size, length, r, psi)

    def jacobian(self, floor, size, length) -> np.ndarray:
        """d pred / d theta (d log pred / d theta in log space): [B, P, K]."""
        by_length = -length[..., None] * np.stack([self.ld, self.ln], axis=-1)
        by_size = -(size * self.ln)[..., None] * self.onehot
        coefficients = np.stack([np.broadcast_to(floor, size.shape), size, length], axis=-1)
        j = np.concatenate([coefficients, by_length, by_size], axis=-1)
        return j / (floor + size + length)[..., None] if self.log else j


def solve(
    p: Problems, theta: np.ndarray, bounds: np.ndarray, huber: float, group: np.ndarray | None = None,
    log: bool = False,
) -> Solution:
    """Minimise each problem's Huber loss from its start `theta` [B, K] within `bounds` [K, 2].
    `group` [B]: problems that are starts of one fit (same points); a start stops where it crawls
    (its last step lowered its loss by less than CRAWL) at a loss above one another start of its
    group converged to by more than PRUNE: it cannot be the answer unless it crosses that loss, and
    such starts, crawling along a valley, are the long tail of iteration counts a batch waits for."""
    lo, hi = bounds[:, 0], bounds[:, 1]
    theta = np.clip(np.array(theta, dtype=float), lo, hi)
    b, k = theta.shape
    batch = _Batch(p, b, k - 5, log)
    loss, parts = batch.loss(theta, huber)
    damping = np.full(b, DAMPING)
    done = np.zeros(b, dtype=bool)
    gain = np.ones(b)  # relative loss decrease of each problem's last accepted step
    eye = np.eye(k)
    for _ in range(MAX_ITER):
        floor, size, length, r, psi = parts
        j = batch.jacobian(floor, size, length)
        g = np.einsum("bpk,bp->bk", j, batch.mask * psi)
        # IRLS weights: 1 inside the band, huber / |r| outside (0 for padding)
        weight = batch.mask * np.where(np.abs(r) <= huber, 1.0, huber / np.maximum(np.abs(r), huber))
        h = np.einsum("bpk,bpl->bkl", j * weight[..., None], j)
        # hold a parameter at a bound its gradient pushes against (projected step)
        free = ~(((theta <= lo) & (g > 0)) | ((theta >= hi) & (g < 0)))
        diag = np.einsum("bkk->bk", h)
        floor_ = 1e-12 * diag.max(axis=1, keepdims=True) + 1e-300  # no curvature along a parameter
        a = h + (damping[:, None] * (diag + floor_))[:, :, None] * eye
        a = np.where(free[:, :, None] & free[:, None, :], a, eye)
        step = -np.linalg.solve(a, np.where(free, g, 0.0)[..., None])[..., 0]
        trial = np.clip(theta + step, lo, hi)
        new_loss, new_parts = batch.loss(trial, huber)
        better = (new_loss < loss) & ~done
        gain = np.where(better, (loss - new_loss) / np.maximum(loss, 1e-300), gain)
        settled = loss - new_loss <= TOL * loss  # an accepted step that hardly lowered the loss
        done |= (better & settled) | (~better & (damping >= MAX_DAMPING)) | ~free.any(axis=1)
        theta = np.where(better[:, None], trial, theta)
        loss = np.where(better, new_loss, loss)
        parts = tuple(np.where(better[:, None], n, o) for n, o in zip(new_parts, parts, strict=True))
        damping = np.clip(np.where(better, damping / 3, damping * 4), 1e-12, MAX_DAMPING)
        if group is not None:
            best = np.full(group.max() + 1, np.inf)
            np.minimum.at(best, group[done], loss[done])
            done |= (loss > best[group] * (1 + PRUNE)) & (gain < CRAWL)
        if done.all():
            break
    return Solution(theta, loss, done)

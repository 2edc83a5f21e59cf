"""L2 logistic regression with full-batch L-BFGS in torch, solving scikit-learn's problem.

scikit-learn's LogisticRegression(C) minimises C * sum_i CE_i + 0.5 * ||W||^2 (intercept not
penalised). We minimise the same objective divided by C*N, i.e. mean CE + ||W||^2 / (2*C*N), which
is what sklearn's lbfgs solver itself hands to scipy: same minimiser, O(1) loss values, so the
stopping rules mean the same thing. Multinomial softmax for single-label data; one binary
(sigmoid) classifier per column for multi-label data, optimised jointly: the objective is a sum of
independent per-class terms, so the minimiser is each class's own one.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from common.features import Progress

# PROTOCOLS C: C = 1/wd for wd in logspace(-6, 5, 45); "first best" means first in this order.
C_GRID: tuple[float, ...] = tuple(float(1.0 / wd) for wd in np.logspace(-6, 5, 45))
MAX_ITER = 1000
TOL = 1e-12  # sklearn's tol: scipy's gtol, max |gradient| <= tol
# sklearn passes ftol = 64 * float64 eps to scipy (relative loss decrease); torch's LBFGS test is
# absolute, which with loss values O(1) is the same order.
FTOL = 64 * float(np.finfo(np.float64).eps)
HISTORY = 10  # scipy's L-BFGS-B default memory (maxcor), which sklearn uses
MAX_EVAL = 15000  # scipy's default maxfun


def standardize(reference: torch.Tensor, *others: torch.Tensor) -> list[torch.Tensor]:
    """z-score every tensor with the mean/std of `reference` (StandardScaler: population std,
    constant features divided by 1)."""
    mean = reference.mean(0)
    std = reference.std(0, correction=0)
    std = torch.where(std == 0, torch.ones_like(std), std)
    return [(x - mean) / std for x in (reference, *others)]


def is_multilabel(targets: torch.Tensor) -> bool:
    return targets.ndim == 2


def objective(theta: torch.Tensor, x: torch.Tensor, targets: torch.Tensor, *, C: float) -> torch.Tensor:
    """mean CE + ||W||^2 / (2*C*N); theta is (D+1, K) with the intercept in the last row."""
    logits = x @ theta[:-1] + theta[-1]
    if is_multilabel(targets):
        data = F.binary_cross_entropy_with_logits(logits, targets.to(logits.dtype), reduction="sum") / len(x)
    else:
        data = F.cross_entropy(logits, targets)
    return data + theta[:-1].pow(2).sum() / (2 * C * len(x))


def sklearn_objective(theta: torch.Tensor, x: torch.Tensor, targets: torch.Tensor, *, C: float) -> float:
    """scikit-learn's own scale: C * sum CE + 0.5 * ||W||^2."""
    return float(objective(theta, x, targets, C=C)) * C * len(x)


def num_outputs(targets: torch.Tensor) -> int:
    return targets.shape[1] if is_multilabel(targets) else int(targets.max()) + 1


def fit(
    x: torch.Tensor,
    targets: torch.Tensor,
    C: float,
    *,
    num_classes: int | None = None,
    init: torch.Tensor | None = None,
    max_iter: int = MAX_ITER,
) -> torch.Tensor:
    """Minimise the objective at one C; returns theta (D+1, K) in float64 on x's device."""
    x = x.double()
    k = num_classes or num_outputs(targets)
    theta = torch.zeros(x.shape[1] + 1, k, dtype=torch.float64, device=x.device)
    if init is not None:
        theta.copy_(init)
    theta.requires_grad_(True)
    opt = torch.optim.LBFGS(
        [theta],
        lr=1,
        max_iter=max_iter,
        max_eval=MAX_EVAL,
        tolerance_grad=TOL,
        tolerance_change=FTOL,
        history_size=HISTORY,
        line_search_fn="strong_wolfe",
    )

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = objective(theta, x, targets, C=C)
        loss.backward()
        return loss

    opt.step(closure)
    return theta.detach()


def predict(theta: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Decision scores (N, K); argmax for classes, per-column ranking for multi-label."""
    return x.double() @ theta[:-1] + theta[-1]


@dataclass
class Sweep:
    best_C: float
    best_index: int
    val_score: float
    val_scores: list[float]


def first_best(scores: Sequence[float]) -> int:
    """Index of the first maximum: ties go to the earlier C of the grid."""
    best = max(scores)
    return next(i for i, s in enumerate(scores) if s == best)


def sweep(
    train: tuple[torch.Tensor, torch.Tensor],
    val: tuple[torch.Tensor, torch.Tensor],
    metric: Callable[[torch.Tensor, torch.Tensor], float],
    *,
    Cs: Sequence[float] = C_GRID,
    warm_start: bool = True,
    num_classes: int | None = None,
    max_iter: int = MAX_ITER,
    desc: str = "C sweep",
) -> Sweep:
    """Fit every C on `train`, score on `val`, pick the first best (in the order of `Cs`).

    With warm_start the fits run from the smallest C up, each started at the previous solution
    (a strictly convex problem has one minimiser, so only the iterations needed change).
    """
    (xt, yt), (xv, yv) = train, val
    k = num_classes or max(num_outputs(yt), num_outputs(yv))
    order = sorted(range(len(Cs)), key=lambda i: Cs[i]) if warm_start else list(range(len(Cs)))
    scores: list[float] = [float("nan")] * len(Cs)
    theta = None
    progress = Progress(desc, len(Cs), every=1)
    for done, i in enumerate(order, 1):
        theta = fit(xt, yt, Cs[i], num_classes=k, init=theta if warm_start else None, max_iter=max_iter)
        scores[i] = metric(predict(theta, xv).cpu(), yv.cpu())
        progress.step(done, extra=f"C={Cs[i]:.3g} val={scores[i]:.2f} ")
    best = first_best(scores)
    return Sweep(best_C=Cs[best], best_index=best, val_score=scores[best], val_scores=scores)

"""Times our torch L-BFGS logistic regression against scikit-learn's on one synthetic problem.

python -m fine_grained.benchmark [--device cuda] [--n 5000] [--dim 384] [--classes 100]
Same standardised float64 features, same C values, max_iter 1000, tol 1e-12 on both sides.
"""

from __future__ import annotations

import argparse
import platform
import sys
import time

import torch

from common.cli import ArgumentParser, MissingDependency, run
from common.distributed import resolve_device

from . import logreg
from .metrics import accuracy


def synthetic(n: int, dim: int, classes: int, *, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Gaussian class clusters that overlap (not separable), like real features of a hard dataset."""
    g = torch.Generator().manual_seed(seed)
    centers = 0.3 * torch.randn(classes, dim, generator=g)
    y = torch.randint(0, classes, (n,), generator=g)
    return centers[y] + torch.randn(n, dim, generator=g), y


def get_args_parser() -> argparse.ArgumentParser:
    p = ArgumentParser("fine-grained logistic regression benchmark")
    p.add_argument("--n", type=int, default=5000, help="samples (4/5 train, 1/5 test)")
    p.add_argument("--dim", type=int, default=384, help="feature width (ViT-S: 384)")
    p.add_argument("--classes", type=int, default=100, help="classes of the synthetic problem")
    p.add_argument("--C", default="0.001,0.1,10", help="comma-separated C values")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="where ours runs")
    p.add_argument(
        "--sweep",
        action="store_true",
        help="time the whole protocol instead: 45 C values selected on a val split (ours warm-started, "
        "scikit-learn refitting each C from scratch as the reference did)",
    )
    return p


def benchmark(args: argparse.Namespace) -> int:
    try:
        from sklearn.linear_model import LogisticRegression
    except ImportError:
        raise MissingDependency("the benchmark needs scikit-learn (pip install scikit-learn)") from None
    dev = resolve_device(args.device)
    x, y = synthetic(args.n, args.dim, args.classes)
    cut = args.n * 4 // 5
    xt, xs = (t.double() for t in logreg.standardize(x[:cut], x[cut:]))
    yt, ys = y[:cut], y[cut:]
    print(f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads, device {dev}")
    print(f"problem: {cut} train x {args.dim} features, {args.classes} classes")
    if dev.type == "cuda":  # CUDA context, library handles and lazy kernel loading stay out of the timings
        logreg.fit(xt[:256].to(dev), yt[:256].to(dev), 1.0)
    if args.sweep:
        return time_sweep(LogisticRegression, (xt, yt), (xs, ys), dev=dev)
    total_ours = total_sk = 0.0
    for C in (float(c) for c in args.C.split(",")):
        fit_x, fit_y = xt.to(dev), yt.to(dev)
        _sync(dev)
        t0 = time.perf_counter()
        theta = logreg.fit(fit_x, fit_y, C)
        _sync(dev)
        ours = time.perf_counter() - t0
        t0 = time.perf_counter()
        sk = LogisticRegression(C=C, max_iter=logreg.MAX_ITER, tol=logreg.TOL).fit(xt.numpy(), yt.numpy())
        sk_time = time.perf_counter() - t0
        acc_ours = accuracy(logreg.predict(theta.cpu(), xs), ys)
        acc_sk = 100 * float((sk.predict(xs.numpy()) == ys.numpy()).mean())
        print(
            f"C={C:g}: ours {ours:.2f}s (acc {acc_ours:.2f}), sklearn {sk_time:.2f}s (acc {acc_sk:.2f}, "
            f"{int(sk.n_iter_[0])} it), sklearn/ours {sk_time / ours:.2f}x",
            flush=True,
        )
        total_ours, total_sk = total_ours + ours, total_sk + sk_time
    print(f"total: ours {total_ours:.2f}s, sklearn {total_sk:.2f}s, sklearn/ours {total_sk / total_ours:.2f}x")
    return 0


def main(argv: list[str] | None = None) -> int:
    return run(benchmark, get_args_parser().parse_args(argv))


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def time_sweep(LogisticRegression, train, val, *, dev: torch.device) -> int:  # noqa: N803 - the sklearn class
    (xt, yt), (xv, yv) = train, val
    _sync(dev)
    t0 = time.perf_counter()
    ours = logreg.sweep((xt.to(dev), yt.to(dev)), (xv.to(dev), yv.to(dev)), accuracy, desc="ours")
    _sync(dev)
    t_ours = time.perf_counter() - t0
    t0 = time.perf_counter()
    scores = []
    for C in logreg.C_GRID:
        sk = LogisticRegression(C=C, max_iter=logreg.MAX_ITER, tol=logreg.TOL).fit(xt.numpy(), yt.numpy())
        scores.append(100 * float((sk.predict(xv.numpy()) == yv.numpy()).mean()))
    t_sk = time.perf_counter() - t0
    sk_best = logreg.first_best(scores)
    print(
        f"45-C sweep: ours {t_ours:.1f}s (best C {ours.best_C:.4g}, val {ours.val_score:.2f}), sklearn {t_sk:.1f}s "
        f"(best C {logreg.C_GRID[sk_best]:.4g}, val {scores[sk_best]:.2f}), sklearn/ours {t_sk / t_ours:.2f}x"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

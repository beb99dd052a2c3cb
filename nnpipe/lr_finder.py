"""Learning-rate range test (Smith, *Cyclical Learning Rates*, 2015; fast.ai's ``lr_find``).

One short run of a copy of the estimator raises the learning rate exponentially, batch after
batch, from ``start_lr`` to ``end_lr``, and records the training loss. The loss first stays flat
(the rate is too small to move the weights), then falls, then explodes; a good ``lr`` lies where
it falls fastest. The run goes through skorch's own training loop with the estimator's
optimizer, criterion, penalties, clipping, augmentation and freezing. skorch has no range test
of its own, but its :class:`~skorch.callbacks.LRScheduler` stepping torch's
:class:`~torch.optim.lr_scheduler.ExponentialLR` per batch is the sweep, and a small callback
stops the run the skorch way; nothing here is a second training loop.

What the copy changes: ``lr=start_lr``, no ``lr_schedule``, no ``early_stopping``, no
validation split (every row trains), ``verbose=0``, and the estimator's own ``callbacks``
(loggers, checkpoints) left out. The estimator passed in is never modified.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from numbers import Integral, Real
from typing import Any, Optional

import numpy as np
from sklearn.base import clone
from skorch.callbacks import Callback, LRScheduler
from torch.optim.lr_scheduler import ExponentialLR

from ._registry import invalid_value
from .callbacks import training_batches

__all__ = ["LRRangeResult", "lr_range_test"]

_EVENT = "range_test_lr"
_SUGGEST = ("steepest", "min_loss")
_MIN_POINTS = 3


@dataclass(frozen=True, eq=False)
class LRRangeResult:
    """The curve of a learning-rate range test and the learning rate it suggests.

    Attributes
    ----------
    lrs : ndarray of shape (n,)
        Learning rate of each batch (of the first parameter group), increasing.
    losses : ndarray of shape (n,)
        Smoothed training loss of each batch (bias-corrected exponential moving average).
    raw_losses : ndarray of shape (n,)
        Training loss of each batch as skorch recorded it.
    stop_reason : {"num_iter", "diverged", "non_finite"}
        Why the curve ends: all ``num_iter`` batches ran; the smoothed loss exceeded
        ``diverge_factor`` times its best; or the loss became NaN / infinite (that batch is
        not in the curve).
    start_lr, end_lr, num_iter, diverge_factor
        The arguments of the test.
    suggest : {"steepest", "min_loss"}
        Which rule :attr:`suggested_lr` follows.
    skip_start : int, default=10
        Batches left out at the start of the curve by :attr:`steepest_lr`.
    """

    lrs: np.ndarray
    losses: np.ndarray
    raw_losses: np.ndarray
    stop_reason: str
    start_lr: float
    end_lr: float
    num_iter: int
    diverge_factor: float
    suggest: str = "steepest"
    skip_start: int = field(default=10, repr=False)

    @property
    def steepest_lr(self) -> float:
        """The learning rate where the smoothed loss falls fastest against ``log(lr)``.

        The first ``skip_start`` batches (where the moving average is still settling) and the
        last one (where the test stopped) are left out when the curve is long enough.
        """
        lo, hi = self._window()
        slope = np.gradient(self.losses[lo:hi], np.log10(self.lrs[lo:hi]))
        return float(self.lrs[lo + int(np.argmin(slope))])

    @property
    def min_loss_lr(self) -> float:
        """The learning rate at the lowest smoothed loss (its tenth is fast.ai's ``lr_min``)."""
        return float(self.lrs[int(np.argmin(self.losses))])

    @property
    def suggested_lr(self) -> float:
        """``steepest_lr`` (``suggest="steepest"``) or ``min_loss_lr / 10`` (``"min_loss"``)."""
        return self.steepest_lr if self.suggest == "steepest" else self.min_loss_lr / 10

    def __repr__(self) -> str:
        return (f"LRRangeResult({len(self.lrs)} batches, lr {self.lrs[0]:.3g}..{self.lrs[-1]:.3g}"
                f", stop_reason={self.stop_reason!r}, suggested_lr={self.suggested_lr:.4g} "
                f"({self.suggest}), min_loss_lr={self.min_loss_lr:.4g})")

    def _window(self):
        n = len(self.lrs)
        lo, hi = self.skip_start, n - 1 if self.stop_reason == "diverged" else n
        if hi - lo < _MIN_POINTS:
            lo, hi = 0, n
        return lo, hi

    def plot(self, path: Optional[Any] = None):
        """Draw the smoothed loss against the learning rate (log scale), the suggestion marked.

        Parameters
        ----------
        path : str or path-like, optional
            Also write the figure there (the format follows the extension; parent folders are
            created).

        Returns
        -------
        matplotlib.figure.Figure
            Built without pyplot, so no figure is left open and the backend is untouched.
        """
        from .plots import _DPI, _figure, _target

        fig = _figure((6.5, 4.5))
        ax = fig.subplots()
        ax.plot(self.lrs, self.raw_losses, color="0.75", lw=0.8, label="batch loss")
        ax.plot(self.lrs, self.losses, color="C0", lw=1.8, label="smoothed loss")
        best = self.suggested_lr
        ax.axvline(best, color="C3", ls="--", lw=1.2,
                   label=f"suggested lr {best:.3g} ({self.suggest})")
        ax.plot([self.min_loss_lr], [float(np.min(self.losses))], "v", color="C2",
                label=f"min loss at lr {self.min_loss_lr:.3g}")
        ax.set_xscale("log")
        low = float(min(np.min(self.raw_losses), np.min(self.losses)))
        high = max(min(float(np.max(self.raw_losses)), self.losses[0] * self.diverge_factor),
                   float(np.max(self.losses)))
        pad = 0.05 * (high - low) or 0.1
        ax.set_ylim(low - pad, high + pad)  # batch-loss spikes past the divergence are clipped
        ax.set_xlabel("learning rate")
        ax.set_ylabel("training loss")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        ax.set_title(f"Learning-rate range test ({len(self.lrs)} batches, stopped: "
                     f"{self.stop_reason})", fontsize=10)
        if path is not None:
            fig.savefig(_target(path), dpi=_DPI)
        return fig


class _RangeStop(Callback):
    """Smooth the batch loss and stop (skorch's way: ``KeyboardInterrupt``) when it diverges."""

    def __init__(self, num_iter: int, smooth: float, diverge_factor: float):
        self.num_iter, self.smooth, self.diverge_factor = num_iter, smooth, diverge_factor

    def on_train_begin(self, net, **kwargs):
        self.avg_, self.best_, self.seen_, self.stop_reason_ = 0.0, math.inf, 0, None
        self.smoothed_ = []

    def on_batch_end(self, net, training=False, **kwargs):
        if not training:
            return
        loss = net.history[-1, "batches", -1, "train_loss"]
        self.seen_ += 1
        self.avg_ = self.smooth * self.avg_ + (1 - self.smooth) * loss
        smoothed = self.avg_ / (1 - self.smooth ** self.seen_)
        self.smoothed_.append(smoothed)
        if self.seen_ > 1 and smoothed > self.diverge_factor * self.best_:
            self.stop_reason_ = "diverged"
        self.best_ = min(self.best_, smoothed)
        if self.stop_reason_ is None and self.seen_ >= self.num_iter:
            self.stop_reason_ = "num_iter"
        if self.stop_reason_ is not None:
            raise KeyboardInterrupt


def _check(start_lr, end_lr, num_iter, smooth, diverge_factor, suggest) -> None:
    def number(name, value):
        if not (isinstance(value, Real) and not isinstance(value, bool) and math.isfinite(value)
                and value > 0):
            raise invalid_value(name, value, "a finite number > 0")

    number("start_lr", start_lr)
    number("end_lr", end_lr)
    if start_lr >= end_lr:
        raise ValueError(f"start_lr must be smaller than end_lr, got start_lr={start_lr!r} >= "
                         f"end_lr={end_lr!r}.")
    if not isinstance(num_iter, Integral) or isinstance(num_iter, bool) or num_iter < 2:
        raise invalid_value("num_iter", num_iter, "an int >= 2 (batches in the sweep)")
    if not (isinstance(smooth, Real) and not isinstance(smooth, bool) and 0 <= smooth < 1):
        raise invalid_value("smooth", smooth, "a number in [0, 1) (0: no smoothing)")
    if not (isinstance(diverge_factor, Real) and not isinstance(diverge_factor, bool)
            and diverge_factor > 1):
        raise invalid_value("diverge_factor", diverge_factor, "a number > 1")
    if suggest not in _SUGGEST:
        raise invalid_value("suggest", suggest, "'steepest' or 'min_loss'")


def _copy_without_callbacks(estimator):
    """A clone of ``estimator`` whose ``callbacks`` are None (they are never deep-copied)."""
    params = estimator.get_params(deep=False)
    params["callbacks"] = None
    return clone(type(estimator)(**params))


def lr_range_test(estimator, X, y, *, start_lr: float = 1e-7, end_lr: float = 10.0,
                  num_iter: int = 100, smooth: float = 0.98, diverge_factor: float = 4.0,
                  suggest: str = "steepest") -> LRRangeResult:
    """Run a learning-rate range test on a copy of ``estimator`` and suggest a learning rate.

    The learning rate of batch ``i`` is ``start_lr * (end_lr / start_lr) ** (i / (num_iter -
    1))``; the loss is smoothed as ``avg = smooth * avg + (1 - smooth) * loss`` and divided by
    ``1 - smooth ** (i + 1)`` (bias correction). The run stops after ``num_iter`` batches, when
    the smoothed loss exceeds ``diverge_factor`` times its lowest value so far, or when the loss
    becomes NaN or infinite. It takes as many epochs as ``num_iter`` batches need.

    Parameters
    ----------
    estimator : NNClassifier, NNRegressor, or a Pipeline ending in one
        Fitted or not: it is cloned, so the test starts from a fresh initialisation (seeded by
        its ``random_state``), as a new ``fit`` would; the earlier steps of a Pipeline are fitted
        on ``X`` first. ``estimator`` itself is left untouched.
    X, y : array-like
        Training data, as for ``fit``.
    start_lr, end_lr : float > 0, default=1e-7 and 10
        The sweep's range, ``start_lr < end_lr``.
    num_iter : int >= 2, default=100
        Number of batches in the sweep.
    smooth : float in [0, 1), default=0.98
        Weight of the past in the moving average of the loss.
    diverge_factor : float > 1, default=4
        Stop when the smoothed loss exceeds this multiple of its best value.
    suggest : {"steepest", "min_loss"}, default="steepest"
        Rule for :attr:`LRRangeResult.suggested_lr`: the steepest fall of the smoothed loss
        against ``log(lr)`` (Smith; Lightning's ``suggestion``), or a tenth of the learning rate
        at the lowest loss (fast.ai's ``lr_min``). Both are on the result either way.

    Returns
    -------
    LRRangeResult
        ``lrs``, smoothed ``losses``, ``suggested_lr``, ``plot(path)``.

    Raises
    ------
    ValueError
        For an invalid argument, or when the loss is NaN / diverges within the first batches:
        ``start_lr`` is then already too high (or the data holds NaN).

    Examples
    --------
    >>> from sklearn.datasets import load_digits
    >>> from nnpipe import NNClassifier
    >>> X, y = load_digits(return_X_y=True)
    >>> clf = NNClassifier(random_state=0)
    >>> result = lr_range_test(clf, X / 16, y, start_lr=1e-5, end_lr=10, num_iter=60)
    >>> result.stop_reason, 1e-5 < result.suggested_lr < 10
    ('diverged', True)
    >>> clf.lr  # the estimator itself is untouched
    0.001
    """
    _check(start_lr, end_lr, num_iter, smooth, diverge_factor, suggest)
    from .estimators import DivergenceError, _NNMixin

    last = estimator[-1] if hasattr(estimator, "steps") else estimator
    if not isinstance(last, _NNMixin):
        raise invalid_value("estimator", type(last).__name__,
                            "an NNClassifier, an NNRegressor or a Pipeline ending in one")
    if last is not estimator and len(estimator.steps) > 1:  # no preprocessing: X as it is
        X = clone(estimator[:-1]).fit_transform(X, y)
    net = _copy_without_callbacks(last)
    net.set_params(lr=start_lr, lr_schedule=None, early_stopping=None, train_split=None,
                   verbose=0, on_interrupt="stop")
    # the batches an epoch really runs (iterator_train__batch_size, drop_last count)
    per_epoch = max(1, training_batches(net, net.get_dataset(X)) or 1)
    gamma = (end_lr / start_lr) ** (1.0 / (num_iter - 1))
    stopper = _RangeStop(num_iter, smooth, diverge_factor)
    net.set_params(
        max_epochs=math.ceil(num_iter / per_epoch) + 1,
        callbacks=[("range_test_lr", LRScheduler(ExponentialLR, gamma=gamma, step_every="batch",
                                                 event_name=_EVENT)),
                   ("range_test_stop", stopper)])
    try:
        net.fit(X, y)
    except DivergenceError:
        stopper.stop_reason_ = "non_finite"
    else:
        if stopper.stop_reason_ is None and getattr(net, "interrupted_", False):
            raise KeyboardInterrupt("lr_range_test was interrupted")

    batches = [b for row in net.history for b in row["batches"] if _EVENT in b]
    lrs = np.array([b[_EVENT] for b in batches], dtype=float)
    raw = np.array([b["train_loss"] for b in batches], dtype=float)
    smoothed = np.array(stopper.smoothed_[:len(batches)], dtype=float)
    reason = stopper.stop_reason_ or "num_iter"
    if len(lrs) < _MIN_POINTS or not np.isfinite(raw[0]):
        what = "became NaN or infinite" if reason == "non_finite" else \
            f"exceeded {diverge_factor:g} times its best"
        raise ValueError(
            f"the loss {what} after {len(lrs)} batch(es) of the range test: start_lr="
            f"{start_lr!r} is already too high. Lower start_lr (e.g. {start_lr / 100:g}), or "
            "check the data for NaN / huge values.")
    return LRRangeResult(lrs, smoothed, raw, reason, float(start_lr), float(end_lr),
                         int(num_iter), float(diverge_factor), suggest)

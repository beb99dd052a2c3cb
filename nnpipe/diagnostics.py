"""Read a training history and say what went wrong, with what to try next.

:func:`diagnose` looks at the per-epoch ``train_loss`` / ``valid_loss`` of a run (a skorch
``net.history``, or any list of per-epoch dicts) and returns :class:`Finding` objects:

================== ======== ===================================================================
code               severity what it means, and the hint given
================== ======== ===================================================================
``non_finite_loss`` error   a loss is NaN or infinite: the learning rate is far too high (or the
                            data holds NaN)
``exploding_loss`` error    the training loss rose to ``explode_factor`` times its reference:
                            learning rate too high; lower it, clip gradients
``flat_loss``      warning  the training loss fell by less than ``flat_tol`` of its starting
                            value: learning rate too low (or nothing to learn, frozen layers)
``underfitting``   info     the training loss ends above ``underfit_level`` of its starting
                            value: train longer, a larger network, less regularisation
``overfitting``    warning  the validation loss rose ``overfit_rise`` above its best while the
                            training loss kept falling, or ends ``gap_frac`` (of the starting
                            loss) above the training loss: regularise, augment, stop early
================== ======== ===================================================================

The *starting loss* every threshold is relative to is the loss of the untrained network: the
``initial_loss`` argument, else the loss of the very first batch when the history records
batches (a skorch history does), else the first epoch's ``train_loss`` (which already includes
one epoch of learning). Relative thresholds work for any loss scale (cross-entropy, MSE, ...).
A run with exploding or non-finite losses is not also called flat or underfitting.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from numbers import Real
from typing import Any, List, Optional, Sequence

import numpy as np

from ._registry import invalid_value

__all__ = ["Finding", "diagnose", "format_findings"]

_ORDER = {"error": 0, "warning": 1, "info": 2}


@dataclass(frozen=True)
class Finding:
    """One problem seen in a training history.

    Attributes
    ----------
    code : str
        ``"non_finite_loss"``, ``"exploding_loss"``, ``"flat_loss"``, ``"underfitting"`` or
        ``"overfitting"``.
    severity : {"error", "warning", "info"}
    epoch : int or None
        The epoch where it shows (1-based, as in skorch), or None for the run as a whole.
    message : str
        What was measured and what to try.
    value : float
        The measured quantity the threshold was applied to (a ratio or a fraction).
    """

    code: str
    severity: str
    epoch: Optional[int]
    message: str
    value: float

    def __str__(self) -> str:
        where = f" at epoch {self.epoch}" if self.epoch is not None else ""
        return f"[{self.severity}] {self.code}{where}: {self.message}"


def _rows(history: Any) -> List[Mapping]:
    if hasattr(history, "history") and not isinstance(history, Mapping):
        history = history.history  # a fitted net
    if isinstance(history, (Mapping, str, bytes)) or not hasattr(history, "__iter__"):
        raise invalid_value("history", type(history).__name__,
                            "a skorch History, a fitted net or a list of per-epoch dicts")
    rows = list(history)
    for i, row in enumerate(rows):
        if not isinstance(row, Mapping):
            raise ValueError(f"history must be a list of per-epoch dicts, got "
                             f"{type(row).__name__} at position {i}.")
    return rows


def _column(rows: Sequence[Mapping], key: str):
    """``(values, present)``: NaN where ``key`` is missing or not a number, and where it is."""
    out, present = np.full(len(rows), np.nan), np.zeros(len(rows), dtype=bool)
    for i, row in enumerate(rows):
        value = row.get(key)
        if isinstance(value, Real) and not isinstance(value, bool):
            out[i], present[i] = float(value), True
    return out, present


def _first_batch_loss(rows: Sequence[Mapping]) -> Optional[float]:
    batches = rows[0].get("batches") if rows else None
    if batches and isinstance(batches[0], Mapping):
        value = batches[0].get("train_loss")
        if isinstance(value, Real) and math.isfinite(value):
            return float(value)
    return None


def _check(name: str, value: Any, low: float, high: float = math.inf) -> None:
    if not (isinstance(value, Real) and not isinstance(value, bool) and low < value < high):
        interval = f"> {low:g}" if high == math.inf else f"in ({low:g}, {high:g})"
        raise invalid_value(name, value, f"a number {interval}")


def diagnose(history: Any, *, initial_loss: Optional[float] = None,
             explode_factor: float = 3.0, flat_tol: float = 0.05,
             underfit_level: float = 0.5, overfit_rise: float = 0.1,
             gap_frac: float = 0.1, min_rise_frac: float = 0.01) -> List[Finding]:
    """Find exploding, flat, underfitting and overfitting losses in a training history.

    Parameters
    ----------
    history : skorch History, fitted skorch net, or list of dict
        One dict per epoch with ``train_loss`` and, when a validation split was used,
        ``valid_loss`` (``valid_acc`` is quoted when present). Rows without a loss are skipped.
    initial_loss : float, optional
        Loss of the untrained network (e.g. ``log(n_classes)`` for cross-entropy); by default
        the first recorded batch loss, else the first epoch's ``train_loss``.
    explode_factor : float > 1, default=3
        ``exploding_loss`` when an epoch's training loss exceeds this multiple of the lowest
        loss before it (the starting loss included).
    flat_tol : float in (0, 1), default=0.05
        ``flat_loss`` when the training loss never gets this fraction below the starting loss.
    underfit_level : float in (0, 1), default=0.5
        ``underfitting`` when the last training loss is above this fraction of the starting loss.
    overfit_rise : float > 0, default=0.1
        ``overfitting`` when the last validation loss is this fraction above its best, reached
        at an earlier epoch, and the training loss has fallen since.
    gap_frac : float > 0, default=0.1
        ``overfitting`` too when the last validation loss exceeds the last training loss by
        this fraction of the starting loss.
    min_rise_frac : float >= 0, default=0.01
        A validation-loss rise counts only when it is also at least this fraction of the
        starting loss: a near-perfect model whose validation loss moves from 0.0096 to 0.011
        (15%, but 0.07% of a starting loss of 2.3) is noise, not overfitting.

    Returns
    -------
    list of Finding
        Most severe first; empty for a healthy run.

    Examples
    --------
    >>> rows = [{"epoch": e, "train_loss": 2.0 / e, "valid_loss": 2.2 / e} for e in (1, 2, 3)]
    >>> diagnose(rows)
    []
    >>> rows = [{"epoch": e, "train_loss": t, "valid_loss": v} for e, t, v in
    ...         [(1, 1.0, 1.0), (2, 0.5, 0.6), (3, 0.2, 0.8), (4, 0.1, 1.1)]]
    >>> [(f.code, f.epoch) for f in diagnose(rows)]
    [('overfitting', 2)]
    """
    _check("explode_factor", explode_factor, 1.0)
    _check("flat_tol", flat_tol, 0.0, 1.0)
    _check("underfit_level", underfit_level, 0.0, 1.0)
    _check("overfit_rise", overfit_rise, 0.0)
    _check("gap_frac", gap_frac, 0.0)
    if not (isinstance(min_rise_frac, Real) and not isinstance(min_rise_frac, bool)
            and 0 <= min_rise_frac < math.inf):
        raise invalid_value("min_rise_frac", min_rise_frac, "a number >= 0")
    if initial_loss is not None:
        _check("initial_loss", initial_loss, 0.0)
    rows = _rows(history)
    train, done = _column(rows, "train_loss")  # an unfinished epoch has no train_loss
    valid, has_valid = _column(rows, "valid_loss")
    acc, epochs = _column(rows, "valid_acc")[0], _column(rows, "epoch")[0]
    epochs = np.where(np.isnan(epochs), np.arange(1, len(rows) + 1), epochs).astype(int)
    train, valid, acc, epochs = train[done], valid[done], acc[done], epochs[done]
    has_valid = has_valid[done]
    if len(train) == 0:
        return []
    start = initial_loss if initial_loss is not None else _first_batch_loss(rows)
    from_batch = start is not None
    if start is None:
        start = float(train[0]) if math.isfinite(train[0]) else math.nan
    findings: List[Finding] = []

    bad = np.flatnonzero(~np.isfinite(train) | (has_valid & ~np.isfinite(valid)))
    if bad.size:
        i = int(bad[0])
        findings.append(Finding(
            "non_finite_loss", "error", int(epochs[i]),
            f"the loss is {train[i] if not math.isfinite(train[i]) else valid[i]}: the "
            "learning rate is far too high (or the data holds NaN / huge values). Lower lr "
            "by 10x or more (nnpipe.lr_finder.lr_range_test suggests one), add clip_grad_norm.",
            float("nan")))
    low = start if from_batch or initial_loss is not None else math.inf
    for i, loss in enumerate(train):
        if not math.isfinite(loss):
            break
        if math.isfinite(low) and loss > explode_factor * low:
            findings.append(Finding(
                "exploding_loss", "error", int(epochs[i]),
                f"the training loss rose to {loss:.4g}, {loss / low:.3g}x its lowest value "
                f"before ({low:.4g}): the learning rate is too high. Lower lr (10x, or run "
                "nnpipe.lr_finder.lr_range_test), add clip_grad_norm or batch_norm.",
                float(loss / low)))
            break
        low = min(low, loss)
    exploded = any(f.severity == "error" for f in findings)

    finite = train[np.isfinite(train)]
    if not exploded and finite.size and math.isfinite(start) and start > 0:
        drop = (start - float(finite.min())) / start
        level = float(finite[-1]) / start
        if len(train) >= 2 and drop < flat_tol:
            findings.append(Finding(
                "flat_loss", "warning", None,
                (f"the training loss fell by only {drop:.1%} of its starting value "
                 if drop > 0 else "the training loss never fell below its starting value ")
                + f"{start:.4g} over {len(train)} epochs: the learning rate is probably too "
                "low. Raise lr "
                "(10x, or run nnpipe.lr_finder.lr_range_test); check that layers are not "
                "frozen and that the targets are learnable.", drop))
        elif level > underfit_level:
            findings.append(Finding(
                "underfitting", "info", int(epochs[-1]),
                f"the training loss ends at {level:.0%} of its starting value {start:.4g}: the "
                "model underfits. Train longer, raise lr, use a larger network or less "
                "regularisation (l2, dropout).", level))

    ok = np.isfinite(valid) & np.isfinite(train)
    if not exploded and ok.sum() >= 2:
        v, t, e = valid[ok], train[ok], epochs[ok]
        a = acc[ok]
        best = int(np.argmin(v))
        rise = (float(v[-1]) - float(v[best])) / float(v[best]) if v[best] > 0 else 0.0
        gap = float(v[-1] - t[-1])
        big = not math.isfinite(start) or v[-1] - v[best] >= min_rise_frac * start
        rising = best < len(v) - 1 and rise >= overfit_rise and t[-1] < t[best] and big
        wide = math.isfinite(start) and gap >= gap_frac * start
        if rising or wide:
            parts = []
            if rising:
                parts.append(f"the validation loss rose {rise:.0%} above its best "
                             f"({v[best]:.4g} at epoch {e[best]}) to {v[-1]:.4g} while the "
                             "training loss kept falling")
            if wide:
                parts.append(f"it ends {gap:.4g} above the training loss ({t[-1]:.4g}), "
                             f"{gap / start:.0%} of the starting loss")
            if np.isfinite(a).any():
                parts.append(f"valid_acc peaked at {np.nanmax(a):.4g} "
                             f"(epoch {e[int(np.nanargmax(a))]})")
            findings.append(Finding(
                "overfitting", "warning", int(e[best]) if rising else int(e[-1]),
                "; ".join(parts) + ". The model overfits: add regularisation (l2, dropout), "
                "augmentation or more data, use a smaller network, or early_stopping (which "
                "keeps the best epoch's weights).", rise if rising else gap / start))
    return sorted(findings, key=lambda f: _ORDER[f.severity])


def format_findings(findings: Sequence[Finding], prefix: str = "") -> str:
    """The findings as text, one per line (most severe first), for a log or a text artifact.

    Parameters
    ----------
    findings : list of Finding
        As returned by :func:`diagnose`.
    prefix : str, default=""
        Put before every line, e.g. ``"[train] "``.

    Returns
    -------
    str
        ``"<prefix>diagnostics: no problems found"`` when there are none.

    Examples
    --------
    >>> print(format_findings([Finding("flat_loss", "warning", None, "raise lr.", 0.01)],
    ...                       prefix="[train] "))
    [train] diagnostics: 1 finding
    [train]   [warning] flat_loss: raise lr.
    >>> format_findings([])
    'diagnostics: no problems found'
    """
    findings = list(findings)
    for i, f in enumerate(findings):
        if not isinstance(f, Finding):
            raise ValueError(f"findings must be a list of Finding, got {type(f).__name__} at "
                             f"position {i}.")
    if not findings:
        return f"{prefix}diagnostics: no problems found"
    head = f"{prefix}diagnostics: {len(findings)} finding{'s' if len(findings) > 1 else ''}"
    ordered = sorted(findings, key=lambda f: _ORDER.get(f.severity, 3))
    return "\n".join([head] + [f"{prefix}  {f}" for f in ordered])

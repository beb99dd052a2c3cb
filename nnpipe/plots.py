"""Evaluation plots (PNG, what ``dvc plots show`` displays) and the CSV tables behind them.

Every function writes one file, creates its parent folders, and returns the written path as a
``str``. Figures are built with :class:`matplotlib.figure.Figure` directly, never through
:mod:`matplotlib.pyplot`: rendering goes through the non-interactive Agg canvas whatever the
session's backend is, the global backend is left untouched (a notebook keeps its inline
plots), and no figure is registered with pyplot, so none is left open. matplotlib itself is
imported only when a plot is drawn; importing this module has no side effects.

The image format follows the file extension (``.png``, ``.svg``, ``.pdf``, ...).

* :func:`learning_curves` / :func:`learning_curves_table` -- train/valid loss per epoch;
* :func:`confusion_matrix_plot` / :func:`save_confusion_csv`;
* :func:`reliability_diagram` / :func:`save_calibration_csv` -- calibration, several models
  overlaid (e.g. the ensemble against its best member).
"""

from __future__ import annotations

import csv
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Sequence, Union

import numpy as np

from nnpipe._registry import invalid_value
from nnpipe.metrics import _as_1d, _check_labels, _encode, ece, reliability_curve

__all__ = [
    "learning_curves",
    "learning_curves_table",
    "confusion_matrix_plot",
    "reliability_diagram",
    "save_confusion_csv",
    "save_calibration_csv",
    "HISTORY_COLUMNS",
]

PathLike = Union[str, "os.PathLike[str]"]

#: Columns :func:`learning_curves_table` writes, in order, when present in the history.
HISTORY_COLUMNS = ("epoch", "train_loss", "valid_loss", "valid_acc", "lr")

_DPI = 100


# --------------------------------------------------------------------------- helpers


def _figure(figsize: tuple, **kwargs: Any):
    from matplotlib.figure import Figure

    return Figure(figsize=figsize, layout="constrained", **kwargs)


def _target(path: PathLike) -> Path:
    path = Path(os.fspath(path))
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def _save(fig: Any, path: PathLike) -> str:
    target = _target(path)
    fig.savefig(target, dpi=_DPI)
    fig.clear()
    return str(target)


def _fmt(value: Any) -> str:
    """A CSV cell: ints as ints, floats with 10 significant digits, missing as empty."""
    if value is None:
        return ""
    if isinstance(value, (bool, np.bool_)):
        return str(bool(value))
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    if isinstance(value, (float, np.floating)):
        return "" if math.isnan(value) else f"{float(value):.10g}"
    return str(value)


def _rows(history_rows: Any) -> List[Mapping]:
    if isinstance(history_rows, Mapping) or isinstance(history_rows, (str, bytes)):
        raise invalid_value("history_rows", type(history_rows).__name__,
                            "a list of per-epoch dicts (e.g. net.history)")
    rows = list(history_rows)
    if not rows:
        raise invalid_value("history_rows", rows, "a non-empty list of per-epoch dicts")
    for i, row in enumerate(rows):
        if not isinstance(row, Mapping):
            raise ValueError(f"history_rows must be a list of per-epoch dicts, got "
                             f"{type(row).__name__} at position {i}.")
    return rows


def _column(rows: Sequence[Mapping], key: str) -> np.ndarray:
    """Float column of ``key`` (NaN where missing, None or not a number)."""
    out = np.full(len(rows), np.nan)
    for i, row in enumerate(rows):
        value = row.get(key)
        if isinstance(value, (int, float, np.integer, np.floating)) \
                and not isinstance(value, (bool, np.bool_)):
            out[i] = float(value)
    return out


def _epochs(rows: Sequence[Mapping]) -> np.ndarray:
    epoch = _column(rows, "epoch")
    return np.where(np.isnan(epoch), np.arange(1, len(rows) + 1), epoch)


# --------------------------------------------------------------------------- learning curves


def learning_curves(history_rows: Iterable[Mapping], path: PathLike,
                    title: Optional[str] = None, findings: Optional[Sequence[Any]] = None) -> str:
    """Plot train and valid loss per epoch, valid accuracy on a twin axis, the gap marked.

    The area between the train and valid loss is shaded, and at the last epoch having both the
    gap ``valid_loss - train_loss`` is drawn as an arrow with its value; the largest gap, when
    it is elsewhere, is labelled too. ``valid_acc`` (when present) goes on a right-hand axis;
    ``lr`` (when present and not constant) on a small log-scale panel below. Missing keys or
    ``None`` values leave holes, not errors.

    Parameters
    ----------
    history_rows : list of dict
        One dict per epoch, e.g. a skorch ``net.history`` (keys ``epoch``, ``train_loss``,
        ``valid_loss``, ``valid_acc``, ``lr``; others are ignored). ``epoch`` defaults to
        ``1, 2, ...``.
    path : str or path-like
        Image file to write; parent folders are created.
    title : str, optional
        Figure title, default ``"Learning curves"``.
    findings : list of nnpipe.diagnostics.Finding, optional
        Marked on the plot: a dotted line labelled with the code at each finding's epoch
        (red for errors, orange for warnings, grey for info); findings of the whole run
        (``epoch=None``) are listed in the corner.

    Returns
    -------
    str
        ``path``.

    Examples
    --------
    >>> import os, tempfile
    >>> from nnpipe.diagnostics import diagnose
    >>> rows = [{"epoch": 1, "train_loss": 1.0, "valid_loss": 1.1, "valid_acc": 0.5},
    ...         {"epoch": 2, "train_loss": 0.5, "valid_loss": 0.7, "valid_acc": 0.7},
    ...         {"epoch": 3, "train_loss": 0.2, "valid_loss": 0.9, "valid_acc": 0.6}]
    >>> with tempfile.TemporaryDirectory() as tmp:
    ...     out = learning_curves(rows, os.path.join(tmp, "plots", "curves.png"),
    ...                           findings=diagnose(rows))
    ...     os.path.getsize(out) > 0
    True
    """
    rows = _rows(history_rows)
    epoch = _epochs(rows)
    train, valid = _column(rows, "train_loss"), _column(rows, "valid_loss")
    acc, lr = _column(rows, "valid_acc"), _column(rows, "lr")
    if np.isnan(train).all() and np.isnan(valid).all():
        keys = sorted({str(k) for row in rows for k in row})
        raise ValueError(f"history_rows must hold 'train_loss' or 'valid_loss' values, got keys "
                         f"{keys}.")
    finite_lr = lr[np.isfinite(lr)]
    show_lr = finite_lr.size > 1 and np.ptp(finite_lr) > 0

    if show_lr:
        fig = _figure((7, 6))
        ax, ax_lr = fig.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    else:
        fig = _figure((7, 4.5))
        ax, ax_lr = fig.subplots(), None
    marker = "o" if len(rows) <= 30 else None
    handles = []
    if not np.isnan(train).all():
        handles += ax.plot(epoch, train, marker=marker, ms=3, color="C0", label="train loss")
    if not np.isnan(valid).all():
        handles += ax.plot(epoch, valid, marker=marker, ms=3, color="C1", label="valid loss")
    both = np.isfinite(train) & np.isfinite(valid)
    if both.any():
        handles.append(ax.fill_between(epoch, train, valid, where=both, interpolate=True,
                                       color="C1", alpha=0.12, label="train-valid gap"))
        last = int(np.flatnonzero(both)[-1])
        gap = valid[last] - train[last]
        ax.annotate("", xy=(epoch[last], valid[last]), xytext=(epoch[last], train[last]),
                    arrowprops={"arrowstyle": "<->", "color": "0.25", "lw": 1.2})
        ax.annotate(f"gap {gap:+.3g}", xy=(epoch[last], (train[last] + valid[last]) / 2),
                    xytext=(-6, 0), textcoords="offset points", ha="right", va="center",
                    fontsize=9, color="0.25")
        gaps = np.where(both, valid - train, -np.inf)
        peak = int(np.argmax(gaps))
        if peak != last and gaps[peak] > max(gap, 0):
            ax.annotate("", xy=(epoch[peak], valid[peak]), xytext=(epoch[peak], train[peak]),
                        arrowprops={"arrowstyle": "<->", "color": "0.5", "lw": 0.8, "ls": "--"})
            ax.annotate(f"max gap {gaps[peak]:+.3g}",
                        xy=(epoch[peak], (train[peak] + valid[peak]) / 2), xytext=(-6, 0),
                        textcoords="offset points", ha="right", va="center", fontsize=8,
                        color="0.4")
    _mark_findings(ax, findings)
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    if not np.isnan(acc).all():
        ax_acc = ax.twinx()
        handles += ax_acc.plot(epoch, acc, marker=marker, ms=3, ls="--", color="C2",
                               label="valid accuracy")
        ax_acc.set_ylabel("valid accuracy")
    # Outside the axes, above them: "best" would not see the twin axis' curve.
    ax.legend(handles=handles, loc="lower center", bbox_to_anchor=(0.5, 1.0), ncol=len(handles),
              fontsize=8, frameon=False)
    fig.suptitle(title if title is not None else "Learning curves")
    if ax_lr is not None:
        ax_lr.plot(epoch, lr, color="C3", drawstyle="steps-mid")
        ax_lr.set_yscale("log")
        ax_lr.set_ylabel("lr")
        ax_lr.grid(alpha=0.3)
        ax_lr.set_xlabel("epoch")
    else:
        ax.set_xlabel("epoch")
    return _save(fig, path)


_SEVERITY_COLORS = {"error": "C3", "warning": "C1", "info": "0.45"}


def _mark_findings(ax: Any, findings: Optional[Sequence[Any]]) -> None:
    """Dotted lines at the findings' epochs, labelled with their codes; the rest in a corner."""
    if findings is None:
        return
    if isinstance(findings, (str, bytes, Mapping)):
        raise invalid_value("findings", findings, "a list of nnpipe.diagnostics.Finding")
    loose = []
    for i, f in enumerate(findings):
        if not all(hasattr(f, a) for a in ("code", "severity", "epoch")):
            raise ValueError(f"findings must be a list of nnpipe.diagnostics.Finding, got "
                             f"{type(f).__name__} at position {i}.")
        color = _SEVERITY_COLORS.get(f.severity, "0.45")
        if f.epoch is None:
            loose.append(f"{f.severity}: {f.code}")
            continue
        ax.axvline(f.epoch, color=color, ls=":", lw=1.5)
        ax.annotate(f.code, xy=(f.epoch, 0.0), xycoords=("data", "axes fraction"),
                    xytext=(3, 3), textcoords="offset points", rotation=90, ha="left",
                    va="bottom", fontsize=8, color=color)
    if loose:
        ax.text(0.99, 0.97, "\n".join(loose), transform=ax.transAxes, ha="right", va="top",
                fontsize=8, color="0.2", bbox={"boxstyle": "round", "fc": "white", "ec": "0.7",
                                               "alpha": 0.9})


def learning_curves_table(history_rows: Iterable[Mapping], path: PathLike) -> str:
    """Write the per-epoch history as CSV, the file ``dvc plots`` draws learning curves from.

    Columns are those of ``epoch, train_loss, valid_loss, valid_acc, lr`` that appear in at
    least one row, in that order; ``epoch`` is always written (``1, 2, ...`` when absent). A
    value missing from a row is an empty cell.

    Parameters
    ----------
    history_rows : list of dict
        One dict per epoch, e.g. a skorch ``net.history``.
    path : str or path-like
        CSV file to write; parent folders are created.

    Returns
    -------
    str
        ``path``.

    Examples
    --------
    >>> import os, tempfile
    >>> rows = [{"epoch": 1, "train_loss": 1.0, "valid_loss": 1.25, "dur": 0.1},
    ...         {"epoch": 2, "train_loss": 0.5, "valid_loss": 0.75, "dur": 0.1}]
    >>> with tempfile.TemporaryDirectory() as tmp:
    ...     out = learning_curves_table(rows, os.path.join(tmp, "history.csv"))
    ...     print(open(out).read(), end="")
    epoch,train_loss,valid_loss
    1,1,1.25
    2,0.5,0.75
    """
    rows = _rows(history_rows)
    present = {k for row in rows for k in row}
    columns = ["epoch"] + [c for c in HISTORY_COLUMNS[1:] if c in present]
    epochs = _epochs(rows)
    target = _target(path)
    with open(target, "w", newline="") as handle:
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow(columns)
        for row, epoch in zip(rows, epochs):
            writer.writerow([_fmt(int(epoch) if float(epoch).is_integer() else epoch)]
                            + [_fmt(row.get(c)) for c in columns[1:]])
    return str(target)


# --------------------------------------------------------------------------- confusion matrix


def confusion_matrix_plot(y_true: Any, y_pred: Any, classes: Sequence, path: PathLike,
                          normalize: bool = True) -> str:
    """Draw the confusion matrix (rows: actual class, columns: predicted class) as a heat map.

    Parameters
    ----------
    y_true, y_pred : array-like of shape (n_samples,)
        Actual and predicted labels, values of ``classes`` (strings allowed).
    classes : array-like of shape (n_classes,)
        All classes, in display order.
    path : str or path-like
        Image file to write; parent folders are created.
    normalize : bool, default=True
        Divide each row by its number of samples (the cells become recall fractions; a class
        without samples gets a row of zeros). ``False`` shows counts.

    Returns
    -------
    str
        ``path``. Cell values are written in the cells for up to 30 classes.

    Examples
    --------
    >>> import os, tempfile
    >>> with tempfile.TemporaryDirectory() as tmp:
    ...     out = confusion_matrix_plot(["cat", "dog", "dog"], ["cat", "dog", "cat"],
    ...                                 ["cat", "dog"], os.path.join(tmp, "cm.png"))
    ...     os.path.getsize(out) > 0
    True
    """
    from sklearn.metrics import confusion_matrix

    if not isinstance(normalize, (bool, np.bool_)):
        raise invalid_value("normalize", normalize, "True or False")
    labels = _check_labels(classes, "classes")
    yt, yp = _as_1d(y_true, "y_true"), _as_1d(y_pred, "y_pred")
    if len(yt) != len(yp):
        raise ValueError(f"y_pred must have the shape of y_true {yt.shape}, got shape {yp.shape}.")
    k = len(labels)
    it = _encode(yt, k, labels, "y_true", "classes")
    ip = _encode(yp, k, labels, "y_pred", "classes")
    cm = confusion_matrix(it, ip, labels=np.arange(k))
    accuracy = float(np.trace(cm) / max(cm.sum(), 1))
    if normalize:
        support = cm.sum(axis=1, keepdims=True)
        values = np.divide(cm, support, out=np.zeros(cm.shape), where=support > 0)
        vmax = 1.0
    else:
        values = cm.astype(np.float64)
        vmax = max(float(values.max()), 1.0)

    side = min(max(4.0, 0.45 * k + 2.5), 20.0)
    fig = _figure((side + 1.0, side))
    ax = fig.subplots()
    image = ax.imshow(values, cmap="Blues", vmin=0.0, vmax=vmax, interpolation="nearest")
    fig.colorbar(image, ax=ax, shrink=0.8,
                 label="fraction of the actual class" if normalize else "count")
    names = [str(c) for c in labels.tolist()]
    ax.set_xticks(np.arange(k), labels=names, rotation=45 if max(map(len, names)) > 3 else 0,
                  ha="right" if max(map(len, names)) > 3 else "center")
    ax.set_yticks(np.arange(k), labels=names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("actual")
    if k <= 30:
        size = 9 if k <= 12 else 7
        for i in range(k):
            for j in range(k):
                text = f"{values[i, j]:.2f}" if normalize else str(int(cm[i, j]))
                ax.text(j, i, text, ha="center", va="center", fontsize=size,
                        color="white" if values[i, j] > 0.5 * vmax else "black")
    kind = "row-normalised" if normalize else "counts"
    ax.set_title(f"Confusion matrix ({kind})\naccuracy {accuracy:.3f}, n = {int(cm.sum())}",
                 fontsize=10)
    return _save(fig, path)


def save_confusion_csv(y_true: Any, y_pred: Any, path: PathLike) -> str:
    """Write one ``actual,predicted`` row per sample, for ``dvc plots``' confusion template.

    Parameters
    ----------
    y_true, y_pred : array-like of shape (n_samples,)
        Actual and predicted labels (written with ``str``).
    path : str or path-like
        CSV file to write; parent folders are created.

    Returns
    -------
    str
        ``path``.

    Examples
    --------
    >>> import os, tempfile
    >>> with tempfile.TemporaryDirectory() as tmp:
    ...     out = save_confusion_csv(["a", "b"], ["a", "a"], os.path.join(tmp, "cm.csv"))
    ...     print(open(out).read(), end="")
    actual,predicted
    a,a
    b,a
    """
    yt, yp = _as_1d(y_true, "y_true"), _as_1d(y_pred, "y_pred")
    if len(yt) != len(yp):
        raise ValueError(f"y_pred must have the shape of y_true {yt.shape}, got shape {yp.shape}.")
    target = _target(path)
    with open(target, "w", newline="") as handle:
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow(["actual", "predicted"])
        writer.writerows(zip(map(_fmt, yt.tolist()), map(_fmt, yp.tolist())))
    return str(target)


# --------------------------------------------------------------------------- calibration


def reliability_diagram(y_true: Any, proba: Any, path: PathLike, n_bins: int = 15,
                        label: Optional[str] = None,
                        labels: Optional[Sequence] = None) -> str:
    """Draw accuracy per confidence bin against the diagonal, with the ECE in the title.

    Bins are those of :func:`nnpipe.metrics.reliability_curve` (equal widths on the max
    probability). For one model the gap between each bar and its bin's mean confidence is
    hatched in red (above the bar: over-confident). A lower panel shows the share of samples
    per bin. Several models are drawn side by side within each bin.

    Parameters
    ----------
    y_true : array-like of shape (n_samples,)
        True labels: values of ``labels``; with ``labels=None``, column indices (or the sorted
        labels of the columns, as in :mod:`nnpipe.metrics`).
    proba : array-like of shape (n_samples, n_classes), or dict of str to such arrays
        Predicted probabilities; a dict ``{name: proba}`` overlays several models (e.g.
        ``{"ensemble": p_ens, "best single": p_best}``), all scored against ``y_true``.
    path : str or path-like
        Image file to write; parent folders are created.
    n_bins : int, default=15
        Number of equal-width confidence bins.
    label : str, optional
        Legend name of a single model (with a dict, the keys are the names).
    labels : array-like of shape (n_classes,), optional
        Class of each ``proba`` column, as in :func:`nnpipe.metrics.nll`.

    Returns
    -------
    str
        ``path``.

    Examples
    --------
    >>> import os, tempfile
    >>> import numpy as np
    >>> rng = np.random.default_rng(0)
    >>> p = rng.dirichlet([1, 1, 1], size=100)
    >>> y = rng.integers(0, 3, size=100)
    >>> with tempfile.TemporaryDirectory() as tmp:
    ...     out = reliability_diagram(y, {"ensemble": p, "uniform": np.full((100, 3), 1 / 3)},
    ...                               os.path.join(tmp, "reliability.png"))
    ...     os.path.getsize(out) > 0
    True
    """
    if isinstance(proba, Mapping):
        if label is not None:
            raise invalid_value("label", label,
                                "None when proba is a dict (its keys name the models)")
        if not proba:
            raise invalid_value("proba", {}, "a probability array or a non-empty dict of them")
        models: Dict[str, Any] = {str(k): v for k, v in proba.items()}
    else:
        models = {str(label) if label is not None else "model": proba}
    curves, errors = {}, {}
    for name, p in models.items():
        try:
            curves[name] = reliability_curve(y_true, p, n_bins=n_bins, labels=labels)
            errors[name] = ece(y_true, p, n_bins=n_bins, labels=labels)
        except ValueError as exc:
            if len(models) == 1:
                raise
            raise ValueError(f"proba[{name!r}]: {exc}") from None

    n_bins = len(next(iter(curves.values())).count)
    width = 1.0 / n_bins
    m = len(models)
    bar = width / m
    lefts = np.arange(n_bins) * width

    fig = _figure((6, 6.5))
    ax, ax_n = fig.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    ax.plot([0, 1], [0, 1], ls="--", color="0.4", lw=1, label="perfect calibration")
    for i, (name, (conf, acc, count)) in enumerate(curves.items()):
        full = count > 0
        x = lefts + i * bar
        color = f"C{i}"
        ax.bar(x[full], acc[full], width=bar, align="edge", color=color, alpha=0.8,
               edgecolor="white", lw=0.5, label=f"{name} (ECE {errors[name]:.4f})")
        if m == 1:
            ax.bar(x[full], conf[full] - acc[full], bottom=acc[full], width=bar, align="edge",
                   facecolor="none", edgecolor="C3", hatch="//", lw=0.8, label="gap to confidence")
        ax_n.bar(x, count / max(count.sum(), 1), width=bar, align="edge", color=color,
                 alpha=0.8)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_ylabel("accuracy")
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left", fontsize=9)
    ax_n.set_xlabel("confidence (max probability)")
    ax_n.set_ylabel("share of samples")
    ax_n.grid(alpha=0.3)
    if m == 1:
        title = f"Reliability diagram, ECE = {next(iter(errors.values())):.4f}"
    else:
        title = "Reliability diagram, ECE: " + ", ".join(
            f"{name} {e:.4f}" for name, e in errors.items())
        if len(title) > 60:
            title = "Reliability diagram\nECE: " + ", ".join(
                f"{name} {e:.4f}" for name, e in errors.items())
    ax.set_title(title, fontsize=10)
    return _save(fig, path)


def save_calibration_csv(y_true: Any, proba: Any, path: PathLike, n_bins: int = 15,
                         labels: Optional[Sequence] = None) -> str:
    """Write ``confidence,accuracy,count`` per non-empty confidence bin, for ``dvc plots``.

    The numbers are those of :func:`nnpipe.metrics.reliability_curve` (mean max probability,
    accuracy and sample count per equal-width bin); empty bins are left out, so every row has
    numbers and a ``dvc plots`` scatter/linear template can draw the file as it is.

    Parameters
    ----------
    y_true, proba, labels
        As in :func:`nnpipe.metrics.reliability_curve` (``proba`` one array).
    path : str or path-like
        CSV file to write; parent folders are created.
    n_bins : int, default=15
        Number of equal-width confidence bins.

    Returns
    -------
    str
        ``path``.

    Examples
    --------
    >>> import os, tempfile
    >>> y, p = [0, 1, 1, 0], [[0.9, 0.1], [0.9, 0.1], [0.3, 0.7], [0.4, 0.6]]
    >>> with tempfile.TemporaryDirectory() as tmp:
    ...     out = save_calibration_csv(y, p, os.path.join(tmp, "calibration.csv"), n_bins=5)
    ...     print(open(out).read(), end="")
    confidence,accuracy,count
    0.6,0,1
    0.7,1,1
    0.9,0.5,2
    """
    conf, acc, count = reliability_curve(y_true, proba, n_bins=n_bins, labels=labels)
    target = _target(path)
    with open(target, "w", newline="") as handle:
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow(["confidence", "accuracy", "count"])
        for c, a, n in zip(conf, acc, count):
            if n > 0:
                writer.writerow([_fmt(c), _fmt(a), _fmt(n)])
    return str(target)

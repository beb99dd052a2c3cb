"""Evaluation metrics for probabilistic classifiers and regressors, calibration included.

Thin, validated wrappers around :mod:`sklearn.metrics` (``log_loss``, ``accuracy_score``,
``balanced_accuracy_score``, ``r2_score``, ``mean_squared_error``, ``mean_absolute_error``,
``classification_report``) plus what scikit-learn lacks for neural-network evaluation:

* :func:`brier` -- the *multi-class* Brier score (scikit-learn's is binary only);
* :func:`ece` and :func:`reliability_curve` -- expected calibration error and the per-bin
  numbers behind a reliability diagram, on the max ("confidence") probability;
* :func:`predictive_entropy` -- per-sample entropy of the predictive distribution;
* :func:`classification_metrics` / :func:`regression_metrics` -- one JSON-ready dict each;
* :func:`headline` -- the few of them a metrics file keeps (:data:`HEADLINE_METRICS`).

Conventions
-----------
``proba`` is an ``(n_samples, n_classes)`` matrix whose columns follow ``labels`` (or
``classes``), e.g. a classifier's ``predict_proba`` with ``classes_``. Rows must sum to 1
within ``1e-3`` (float32 softmax outputs pass) and are renormalised to sum to exactly 1 before
use. ``labels`` gives the class of each column, in column order; labels may be any hashable
values (strings included) and, unlike ``sklearn.metrics.log_loss``, need not be sorted. When
``labels`` is None, ``y_true`` holds column indices ``0, 1, ..., n_classes - 1`` if all its
values are such integers; otherwise the columns are taken to follow the sorted distinct values
of ``y_true`` (scikit-learn's convention, which needs every class present in ``y_true``) and
anything else is an error. Pass ``labels`` (e.g. ``classes_``) whenever they are known.
"""

from __future__ import annotations

from typing import Any, Dict, Mapping, NamedTuple, Optional, Sequence

import numpy as np
from sklearn.metrics import (
    accuracy_score,
    balanced_accuracy_score,
    classification_report,
    log_loss,
    mean_absolute_error,
    mean_squared_error,
    r2_score,
)

from nnpipe._registry import invalid_value

__all__ = [
    "nll",
    "brier",
    "ece",
    "reliability_curve",
    "ReliabilityCurve",
    "predictive_entropy",
    "classification_metrics",
    "regression_metrics",
    "per_class_report",
    "headline",
    "HEADLINE_METRICS",
    "CV_HEADLINE_METRICS",
    "ROW_SUM_TOL",
]

#: Largest accepted deviation of a ``proba`` row sum from 1.
ROW_SUM_TOL = 1e-3

#: The numbers a metrics file (``metrics/*.json``, shown by ``dvc metrics show`` and
#: ``dvc exp show``) keeps for one model: those compared across experiments. Details (per-class
#: report, each ensemble member, latencies, per fold) belong in a report file.
HEADLINE_METRICS = ("accuracy", "balanced_accuracy", "nll", "brier", "ece", "r2", "rmse", "mae")

#: The subset kept for cross-validation, as mean and standard deviation over the folds.
CV_HEADLINE_METRICS = ("accuracy", "nll", "ece", "r2", "rmse", "mae")


# --------------------------------------------------------------------------- validation


def _check_labels(labels: Any, argument: str = "labels") -> np.ndarray:
    labels = np.asarray(labels)
    if labels.ndim != 1 or len(labels) == 0:
        raise invalid_value(argument, labels.tolist() if labels.ndim else labels.item(),
                            "a non-empty 1-D sequence of class labels")
    uniq, counts = np.unique(labels, return_counts=True)
    if (counts > 1).any():
        raise invalid_value(argument, labels.tolist(),
                            f"a sequence of distinct class labels (repeated: "
                            f"{uniq[counts > 1].tolist()})")
    return labels


def _check_proba(proba: Any, n_classes: Optional[int] = None, n_samples: Optional[int] = None,
                 argument: str = "proba", context: str = "") -> np.ndarray:
    """Validate a probability matrix; return it as float64 with rows renormalised to sum 1."""
    try:
        p = np.asarray(proba, dtype=np.float64)
    except (TypeError, ValueError):
        raise invalid_value(argument, type(proba).__name__,
                            "a numeric array of shape (n_samples, n_classes)") from None
    expected = f"({n_samples if n_samples is not None else 'n_samples'}, " \
               f"{n_classes if n_classes is not None else 'n_classes'})"
    if p.ndim != 2 or p.shape[0] == 0 or p.shape[1] == 0 \
            or (n_classes is not None and p.shape[1] != n_classes) \
            or (n_samples is not None and p.shape[0] != n_samples):
        raise ValueError(f"{argument} must be an array of shape {expected}{context}, "
                         f"got shape {p.shape}.")
    if not np.isfinite(p).all():
        bad = int(np.flatnonzero(~np.isfinite(p).all(axis=1))[0])
        raise ValueError(f"{argument} must be finite, got {p[bad].tolist()} in row {bad}.")
    if (p < 0).any():
        bad = int(np.flatnonzero((p < 0).any(axis=1))[0])
        raise ValueError(f"{argument} must be non-negative, got {p[bad].tolist()} in row {bad}.")
    sums = p.sum(axis=1)
    off = np.abs(sums - 1.0) > ROW_SUM_TOL
    if off.any():
        bad = int(np.flatnonzero(off)[0])
        raise ValueError(f"{argument} rows must sum to 1 (within {ROW_SUM_TOL:g}), got row {bad} "
                         f"summing to {sums[bad]:.6g} ({int(off.sum())} of {len(p)} rows off).")
    return p / sums[:, None]


def _as_1d(y: Any, argument: str) -> np.ndarray:
    y = np.asarray(y)
    if y.ndim == 2 and y.shape[1] == 1:
        y = y[:, 0]
    if y.ndim != 1:
        raise ValueError(f"{argument} must be 1-D of shape (n_samples,), got shape {y.shape}.")
    return y


def _encode(y_true: Any, n_classes: int, labels: Any = None, argument: str = "y_true",
            labels_name: str = "labels") -> np.ndarray:
    """Map ``y_true`` to column indices ``0..n_classes-1``."""
    y = _as_1d(y_true, argument)
    if labels is None:
        if y.dtype.kind in "iub" or (y.dtype.kind == "f" and np.all(np.mod(y, 1) == 0)):
            idx = y.astype(np.int64)
            outside = (idx < 0) | (idx >= n_classes)
            if not outside.any():
                return idx
        try:
            distinct = np.unique(y)
        except TypeError:  # mixed, unorderable objects
            distinct = None
        if distinct is None or len(distinct) != n_classes:
            shown = (sorted(map(str, set(y.tolist()))) if distinct is None
                     else distinct.tolist())
            raise invalid_value(
                argument, shown[:10],
                f"column indices in [0, {n_classes}), or hold exactly {n_classes} distinct "
                f"values (read as the sorted labels of the columns), when {labels_name} is "
                f"None; pass {labels_name}=<the class of each proba column> otherwise")
        labels = distinct  # scikit-learn's convention: columns follow the sorted labels
    labels = _check_labels(labels, labels_name)
    try:
        uniq, inverse = np.unique(y, return_inverse=True)
    except TypeError:  # mixed, unorderable objects
        uniq, inverse = np.asarray(list(dict.fromkeys(y.tolist())), dtype=object), None
    position = {lab: i for i, lab in enumerate(labels.tolist())}
    unknown = [u for u in uniq.tolist() if u not in position]
    if unknown:
        raise invalid_value(argument, unknown[:10],
                            f"values from {labels_name} {labels.tolist()}")
    if inverse is None:
        return np.array([position[v] for v in y.tolist()], dtype=np.int64)
    lookup = np.array([position[u] for u in uniq.tolist()], dtype=np.int64)
    return lookup[inverse.ravel()]


def _prepare(y_true: Any, proba: Any, labels: Any, labels_name: str = "labels") -> tuple:
    """Validated ``(column indices, float64 proba)`` for the probabilistic metrics."""
    y = _as_1d(y_true, "y_true")
    n_classes = None if labels is None else len(_check_labels(labels, labels_name))
    context = f" (one row per y_true entry, len(y_true)={len(y)}" + \
        ("" if labels is None else f"; one column per class, len({labels_name})={n_classes}") + ")"
    p = _check_proba(proba, n_classes=n_classes, n_samples=len(y), context=context)
    return _encode(y, p.shape[1], labels, labels_name=labels_name), p


def _check_n_bins(n_bins: Any) -> int:
    if isinstance(n_bins, (bool, np.bool_)) or not isinstance(n_bins, (int, np.integer)) \
            or n_bins < 1:
        raise invalid_value("n_bins", n_bins, "a positive integer")
    return int(n_bins)


# --------------------------------------------------------------------------- metrics


def nll(y_true: Any, proba: Any, labels: Optional[Sequence] = None) -> float:
    """Mean negative log-likelihood (cross-entropy, natural log) of the true class.

    Equal to :func:`sklearn.metrics.log_loss`, which clips probabilities to
    ``[eps, 1 - eps]`` (``eps`` of float64), so a zero probability costs about 36, not inf.

    Parameters
    ----------
    y_true : array-like of shape (n_samples,)
        True labels: values of ``labels``, or column indices when ``labels`` is None (see
        the module notes for other values with ``labels=None``).
    proba : array-like of shape (n_samples, n_classes)
        Predicted probabilities, columns in the order of ``labels``.
    labels : array-like of shape (n_classes,), optional
        Class of each ``proba`` column (any order, strings allowed).

    Returns
    -------
    float

    Examples
    --------
    >>> round(nll([0, 1], [[0.8, 0.2], [0.4, 0.6]]), 6)  # -(log 0.8 + log 0.6) / 2
    0.366985
    >>> round(nll(["dog", "cat"], [[0.8, 0.2], [0.4, 0.6]], labels=["dog", "cat"]), 6)
    0.366985
    """
    idx, p = _prepare(y_true, proba, labels)
    return float(log_loss(idx, p, labels=np.arange(p.shape[1])))


def brier(y_true: Any, proba: Any, labels: Optional[Sequence] = None) -> float:
    """Multi-class Brier score: mean over samples of ``sum_k (p_k - onehot_k)^2``.

    Ranges from 0 (certain and right) to 2 (certain and wrong); uniform predictions over
    ``K`` classes score ``(K - 1) / K``. For two classes it is twice scikit-learn's binary
    :func:`~sklearn.metrics.brier_score_loss`.

    Parameters
    ----------
    y_true, proba, labels
        As in :func:`nll`.

    Returns
    -------
    float

    Examples
    --------
    >>> brier([0, 1], [[1.0, 0.0], [0.5, 0.5]])  # (0 + (0.25 + 0.25)) / 2
    0.25
    """
    idx, p = _prepare(y_true, proba, labels)
    onehot = np.zeros_like(p)
    onehot[np.arange(len(idx)), idx] = 1.0
    return float(np.mean(np.sum((p - onehot) ** 2, axis=1)))


class ReliabilityCurve(NamedTuple):
    """Per-bin numbers of a reliability diagram (arrays of length ``n_bins``).

    Bin ``b`` covers confidences ``(b / n_bins, (b + 1) / n_bins]``; bin 0 also holds 0.
    Empty bins have ``count`` 0 and NaN ``confidence`` and ``accuracy``.
    """

    confidence: np.ndarray  #: mean max-probability of the samples in each bin
    accuracy: np.ndarray  #: fraction of those samples whose argmax is the true class
    count: np.ndarray  #: number of samples in each bin (int64)


#: Confidences this close (in units of a bin width) to a bin edge count as on the edge.
_EDGE_TOL = 1e-9


def _bin_index(conf: np.ndarray, n_bins: int) -> np.ndarray:
    # Bin b is (b/n, (b+1)/n]: ceil(conf * n) - 1, with bin 0 also holding 0. The tolerance
    # keeps a confidence that is an edge up to float rounding (e.g. a uniform row over 15
    # classes, 1/15) in the bin the edge closes.
    b = np.ceil(conf * n_bins - _EDGE_TOL).astype(np.int64) - 1
    return np.clip(b, 0, n_bins - 1)


def reliability_curve(y_true: Any, proba: Any, n_bins: int = 15,
                      labels: Optional[Sequence] = None) -> ReliabilityCurve:
    """Mean confidence, accuracy and sample count per equal-width confidence bin.

    The confidence of a sample is its largest probability and its prediction that column
    (the first one on ties). The ``n_bins`` bins split [0, 1] into equal widths:
    ``[0, 1/n_bins], (1/n_bins, 2/n_bins], ..., ((n_bins-1)/n_bins, 1]``, i.e. bin
    ``ceil(confidence * n_bins) - 1`` (bin 0 for a confidence of 0). A confidence within
    ``1e-9`` bin widths of an edge counts as on the edge, so float rounding (``1/15`` after
    renormalisation) does not move it to the next bin.

    Parameters
    ----------
    y_true, proba, labels
        As in :func:`nll`.
    n_bins : int, default=15
        Number of bins.

    Returns
    -------
    ReliabilityCurve
        Named tuple ``(confidence, accuracy, count)`` of arrays of length ``n_bins``;
        empty bins hold NaN, NaN, 0.

    Examples
    --------
    >>> y = [0, 1, 1, 0]
    >>> p = [[0.9, 0.1], [0.9, 0.1], [0.3, 0.7], [0.4, 0.6]]
    >>> conf, acc, count = reliability_curve(y, p, n_bins=5)  # 0.6 is in (0.4, 0.6]
    >>> count
    array([0, 0, 1, 1, 2])
    >>> conf[2:], acc[2:]
    (array([0.6, 0.7, 0.9]), array([0. , 1. , 0.5]))
    """
    n_bins = _check_n_bins(n_bins)
    idx, p = _prepare(y_true, proba, labels)
    pred = p.argmax(axis=1)
    conf = p[np.arange(len(p)), pred]
    correct = (pred == idx).astype(np.float64)
    b = _bin_index(conf, n_bins)
    count = np.bincount(b, minlength=n_bins).astype(np.int64)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_conf = np.bincount(b, weights=conf, minlength=n_bins) / count
        acc = np.bincount(b, weights=correct, minlength=n_bins) / count
    return ReliabilityCurve(mean_conf, acc, count)


def ece(y_true: Any, proba: Any, n_bins: int = 15, labels: Optional[Sequence] = None) -> float:
    """Expected calibration error of the max probability: ``sum_b |B|/n * |acc(B) - conf(B)|``.

    Uses the ``n_bins`` equal-width bins of :func:`reliability_curve`:
    ``[0, 1/n_bins], (1/n_bins, 2/n_bins], ..., ((n_bins-1)/n_bins, 1]`` (so with 15 bins a
    confidence of exactly 1/15 is in the first bin). ``acc(B)`` is the fraction of the bin's
    samples whose argmax is the true class, ``conf(B)`` their mean max probability; empty bins
    contribute 0. Ranges from 0 (perfectly calibrated) to 1.

    Parameters
    ----------
    y_true, proba, labels
        As in :func:`nll`.
    n_bins : int, default=15
        Number of bins.

    Returns
    -------
    float

    Examples
    --------
    >>> y = [0, 1, 1, 0]
    >>> p = [[0.9, 0.1], [0.9, 0.1], [0.3, 0.7], [0.4, 0.6]]
    >>> round(ece(y, p, n_bins=5), 6)  # (|0 - 0.6| + |1 - 0.7| + 2 * |0.5 - 0.9|) / 4
    0.425
    """
    conf, acc, count = reliability_curve(y_true, proba, n_bins=n_bins, labels=labels)
    full = count > 0
    return float(np.sum(count[full] * np.abs(acc[full] - conf[full])) / count.sum())


def predictive_entropy(proba: Any) -> np.ndarray:
    """Entropy ``-sum_k p_k log p_k`` (natural log, ``0 log 0 = 0``) of each row.

    0 for a one-hot row, ``log K`` for a uniform row over ``K`` classes.

    Parameters
    ----------
    proba : array-like of shape (n_samples, n_classes)
        Rows summing to 1 (within 1e-3).

    Returns
    -------
    ndarray of shape (n_samples,), float64

    Examples
    --------
    >>> predictive_entropy([[1.0, 0.0], [0.5, 0.5]]).round(6)
    array([0.      , 0.693147])
    """
    p = _check_proba(proba)
    logp = np.log(np.where(p > 0, p, 1.0))
    return 0.0 - np.sum(p * logp, axis=1)  # 0.0 - x: no "-0." for one-hot rows


def classification_metrics(y_true: Any, proba: Any, classes: Sequence) -> Dict[str, float]:
    """Accuracy, balanced accuracy, NLL, Brier score and ECE in one JSON-ready dict.

    The prediction is the class of the largest probability (the first one on ties).

    Parameters
    ----------
    y_true : array-like of shape (n_samples,)
        True labels, values of ``classes`` (strings allowed).
    proba : array-like of shape (n_samples, n_classes)
        Predicted probabilities, columns in the order of ``classes`` (e.g. ``classes_``).
    classes : array-like of shape (n_classes,)
        Class of each ``proba`` column.

    Returns
    -------
    dict
        Plain Python floats under ``accuracy``, ``balanced_accuracy``, ``nll``, ``brier``,
        ``ece`` (15 bins).

    Examples
    --------
    >>> m = classification_metrics(["a", "b", "b"], [[0.7, 0.3], [0.2, 0.8], [0.6, 0.4]],
    ...                            classes=["a", "b"])
    >>> {k: round(v, 4) for k, v in m.items()}
    {'accuracy': 0.6667, 'balanced_accuracy': 0.75, 'nll': 0.4987, 'brier': 0.3267, 'ece': 0.3667}
    """
    idx, p = _prepare(y_true, proba, classes, "classes")
    pred = p.argmax(axis=1)
    columns = np.arange(p.shape[1])
    return {
        "accuracy": float(accuracy_score(idx, pred)),
        "balanced_accuracy": float(balanced_accuracy_score(idx, pred)),
        "nll": float(log_loss(idx, p, labels=columns)),
        "brier": brier(idx, p),
        "ece": ece(idx, p),
    }


def regression_metrics(y_true: Any, y_pred: Any) -> Dict[str, float]:
    """R², RMSE and MAE in one JSON-ready dict (multi-output: averaged over outputs).

    Parameters
    ----------
    y_true, y_pred : array-like of shape (n_samples,) or (n_samples, n_outputs)
        Targets and predictions, same shape.

    Returns
    -------
    dict
        Plain Python floats under ``r2``, ``rmse`` and ``mae``. ``rmse`` is the square root
        of the mean squared error over all outputs.

    Examples
    --------
    >>> m = regression_metrics([1.0, 2.0, 3.0, 4.0], [1.0, 2.0, 3.0, 6.0])
    >>> {k: round(v, 6) for k, v in m.items()}
    {'r2': 0.2, 'rmse': 1.0, 'mae': 0.5}
    """
    t = np.asarray(y_true, dtype=np.float64)
    p = np.asarray(y_pred, dtype=np.float64)
    if t.ndim == 2 and t.shape[1] == 1:
        t = t[:, 0]
    if p.ndim == 2 and p.shape[1] == 1:
        p = p[:, 0]
    if t.ndim not in (1, 2) or len(t) == 0:
        raise ValueError(f"y_true must be of shape (n_samples,) or (n_samples, n_outputs), "
                         f"got shape {t.shape}.")
    if p.shape != t.shape:
        raise ValueError(f"y_pred must have the shape of y_true {t.shape}, got shape {p.shape}.")
    for name, a in (("y_true", t), ("y_pred", p)):
        if not np.isfinite(a).all():
            raise invalid_value(name, "non-finite values", "finite")
    return {
        "r2": float(r2_score(t, p)),
        "rmse": float(np.sqrt(mean_squared_error(t, p))),
        "mae": float(mean_absolute_error(t, p)),
    }


def _plain(value: Any, key: str = "") -> Any:
    if isinstance(value, dict):
        return {str(k): _plain(v, str(k)) for k, v in value.items()}
    return int(value) if key == "support" else float(value)


def per_class_report(y_true: Any, y_pred: Any, classes: Sequence) -> Dict[str, Any]:
    """scikit-learn's ``classification_report`` as a dict with string keys and plain numbers.

    Parameters
    ----------
    y_true, y_pred : array-like of shape (n_samples,)
        True and predicted labels, values of ``classes``.
    classes : array-like of shape (n_classes,)
        All classes, in report order; every class gets a row even without samples
        (its precision/recall/F1 are then 0, not a warning).

    Returns
    -------
    dict
        ``{str(class): {"precision", "recall", "f1-score", "support"}, "accuracy": float,
        "macro avg": {...}, "weighted avg": {...}}``; ``support`` values are ints, the rest
        floats.

    Examples
    --------
    >>> r = per_class_report([0, 1, 1], [0, 1, 0], classes=[0, 1])
    >>> r["1"]
    {'precision': 1.0, 'recall': 0.5, 'f1-score': 0.6666666666666666, 'support': 2}
    >>> r["accuracy"]
    0.6666666666666666
    """
    labels = _check_labels(classes, "classes")
    yt = _as_1d(y_true, "y_true")
    yp = _as_1d(y_pred, "y_pred")
    if len(yt) != len(yp):
        raise ValueError(f"y_pred must have the shape of y_true {yt.shape}, got shape {yp.shape}.")
    _encode(yt, len(labels), labels, "y_true", "classes")
    _encode(yp, len(labels), labels, "y_pred", "classes")
    report = classification_report(yt, yp, labels=labels, target_names=[str(c) for c in labels],
                                   output_dict=True, zero_division=0)
    return _plain(report)


def headline(metrics: Mapping[str, Any],
             keys: Sequence[str] = HEADLINE_METRICS) -> Dict[str, float]:
    """The entries of ``metrics`` named in ``keys``, in that order, as plain floats.

    Parameters
    ----------
    metrics : mapping
        A result such as :func:`classification_metrics` returns, possibly with more keys
        (nested reports are left out unless named).
    keys : sequence of str, default=HEADLINE_METRICS
        The names to keep; a name ``metrics`` lacks (a regression metric for a classifier) is
        skipped.

    Returns
    -------
    dict

    Raises
    ------
    ValueError
        A kept entry is not a number.

    Examples
    --------
    >>> headline({"nll": 0.3, "accuracy": 0.9, "per_class": {"0": {"recall": 1.0}}})
    {'accuracy': 0.9, 'nll': 0.3}
    >>> headline({"accuracy": None})
    Traceback (most recent call last):
    ...
    ValueError: headline: metrics['accuracy'] must be a number, got None.
    """
    out = {}
    for key in keys:
        if key not in metrics:
            continue
        value = metrics[key]
        if isinstance(value, bool) or not isinstance(value, (int, float, np.number)):
            raise invalid_value(f"headline: metrics[{key!r}]", value, "a number")
        out[key] = float(value)
    return out

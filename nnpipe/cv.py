"""k-fold cross-validation of a whole pipeline (preprocessing + network), fitted per fold.

Every statistic (preprocessing, augmentation, the validation split inside the network) is fitted
on the training folds only: each fold gets a fresh ``sklearn.base.clone`` of the pipeline.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional

import numpy as np
from sklearn.base import clone
from sklearn.model_selection import KFold, RepeatedKFold, RepeatedStratifiedKFold, StratifiedKFold

__all__ = ["CVResult", "make_folds", "cross_validate_model"]


@dataclass
class CVResult:
    """Per-fold metrics, their mean and std, and out-of-fold predictions.

    ``oof`` holds, for every training row, the prediction of the model that did not see it
    (class probabilities for classifiers, averaged over repeats); ``folds`` the row indices.
    """

    fold_metrics: List[Dict[str, float]]
    oof: np.ndarray
    folds: List[Dict[str, np.ndarray]] = field(default_factory=list)
    histories: List[list] = field(default_factory=list)

    @property
    def mean(self) -> Dict[str, float]:
        return {k: float(np.mean([m[k] for m in self.fold_metrics])) for k in self.fold_metrics[0]}

    @property
    def std(self) -> Dict[str, float]:
        return {k: float(np.std([m[k] for m in self.fold_metrics])) for k in self.fold_metrics[0]}

    def summary(self) -> Dict[str, Any]:
        return {"mean": self.mean, "std": self.std, "folds": self.fold_metrics}


def make_folds(y, task: str = "classification", folds: int = 5, repeats: int = 1,
               shuffle: bool = True, random_state: Optional[int] = 0):
    """The splitter: stratified for classification, repeated when ``repeats > 1``."""
    if not isinstance(folds, int) or folds < 2:
        raise ValueError(f"cv.folds must be an int >= 2, got {folds!r}.")
    if not isinstance(repeats, int) or repeats < 1:
        raise ValueError(f"cv.repeats must be an int >= 1, got {repeats!r}.")
    classification = task == "classification"
    if classification:
        _, counts = np.unique(y, return_counts=True)
        if counts.min() < folds:
            raise ValueError(f"cv.folds={folds} is more than the {counts.min()} samples of the "
                             "smallest class; lower cv.folds.")
    if repeats > 1:
        cls = RepeatedStratifiedKFold if classification else RepeatedKFold
        return cls(n_splits=folds, n_repeats=repeats, random_state=random_state)
    cls = StratifiedKFold if classification else KFold
    return cls(n_splits=folds, shuffle=shuffle, random_state=random_state if shuffle else None)


def cross_validate_model(estimator, X, y, *, task: str = "classification", folds: int = 5,
                         repeats: int = 1, shuffle: bool = True, random_state: Optional[int] = 0,
                         on_fold: Optional[Callable[[int, Any, Dict[str, float]], None]] = None,
                         ) -> CVResult:
    """Fit a clone of ``estimator`` on each training fold and score it on the held-out fold.

    Parameters
    ----------
    estimator : sklearn estimator or Pipeline ending in an nnpipe network
    X, y : arrays
    task : {"classification", "regression"}
    folds, repeats, shuffle, random_state
        The splitter (:func:`make_folds`).
    on_fold : callable, optional
        ``on_fold(i, fitted_estimator, metrics)`` after each fold (logging, progress).
    """
    from .metrics import classification_metrics, regression_metrics

    X, y = np.asarray(X), np.asarray(y)
    splitter = make_folds(y, task, folds, repeats, shuffle, random_state)
    classes = np.unique(y) if task == "classification" else None
    width = len(classes) if classes is not None else (1 if y.ndim == 1 else y.shape[1])
    oof_sum = np.zeros((len(y), width))
    oof_n = np.zeros(len(y))
    result = CVResult([], np.empty(0))
    for i, (train, test) in enumerate(splitter.split(X, y)):
        model = clone(estimator).fit(X[train], y[train])
        if classes is not None:
            proba = _aligned_proba(model, X[test], classes)
            metrics = classification_metrics(y[test], proba, classes)
            oof_sum[test] += proba
        else:
            pred = np.asarray(model.predict(X[test]), dtype=float)
            metrics = regression_metrics(y[test], pred)
            oof_sum[test] += pred.reshape(len(test), -1)
        oof_n[test] += 1
        result.fold_metrics.append(metrics)
        result.folds.append({"train": train, "test": test})
        net = model[-1] if hasattr(model, "steps") else model
        result.histories.append(net.history.to_list() if hasattr(net, "history") else [])
        if on_fold is not None:
            on_fold(i, model, metrics)
    oof = oof_sum / np.maximum(oof_n, 1)[:, None]
    result.oof = oof if classes is not None or width > 1 else oof[:, 0]
    return result


def _aligned_proba(model, X, classes) -> np.ndarray:
    """Probabilities with one column per class of the full data (a fold may lack a class)."""
    proba = model.predict_proba(X)
    fitted = list(model.classes_)
    if fitted == list(classes):
        return proba
    out = np.zeros((len(X), len(classes)))
    for j, c in enumerate(fitted):
        out[:, list(classes).index(c)] = proba[:, j]
    return out

"""Sparse networks: magnitude pruning of fitted estimators, and how sparse a network is.

:func:`prune` zeroes the smallest-magnitude weights (``torch.nn.utils.prune``'s L1 unstructured
pruning), optionally fine-tunes with the pruning masks in force, then makes the pruning permanent:
the weights hold exact zeros, with no mask buffers or hooks left, so :func:`nnpipe.save` /
:func:`nnpipe.load` keep them as they are. :func:`sparsity_report` counts the zeros.

"Weights" are the weight matrices and kernels of the ``Linear`` / ``Conv`` layers, as for the
``l1`` / ``l2`` penalties; biases and batch-norm parameters are never pruned or counted.
"""

from __future__ import annotations

import copy
import math
from numbers import Integral, Real
from typing import Any, Dict, List, Optional, Tuple

import torch
from sklearn.utils.validation import check_is_fitted
from torch import nn
from torch.nn.utils import prune as torch_prune

from ._registry import invalid_value

__all__ = ["prune", "sparsity_report"]

_WEIGHTED = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


def _split(model: Any) -> Tuple[Any, Any]:
    """``(pipeline or None, network estimator)``; raise NotFittedError on an unfitted one."""
    from sklearn.pipeline import Pipeline

    if isinstance(model, Pipeline):
        net = model.steps[-1][1]
        check_is_fitted(net, "module_")
        return model, net
    if not hasattr(model, "module_") and not hasattr(model, "_own_module"):
        raise TypeError("expected an NNClassifier, NNRegressor or a Pipeline ending in one, got "
                        f"{type(model).__name__}.")
    check_is_fitted(model, "module_")
    return None, model


def _weighted_layers(module: nn.Module) -> List[Tuple[str, nn.Module]]:
    return [(name, m) for name, m in module.named_modules() if isinstance(m, _WEIGHTED)]


def sparsity_report(model: Any, *, threshold: float = 0.0) -> Dict[str, Any]:
    """How many weights of a fitted network are zero, overall and per layer.

    Parameters
    ----------
    model : NNClassifier, NNRegressor, sklearn Pipeline ending in one, or nn.Module
    threshold : float >= 0, default=0.0
        A weight counts as zero when ``|w| <= threshold``. The default counts exact zeros only,
        the ones a sparse format or kernel can skip. A small threshold (e.g. 1e-3) shows how many
        weights a penalty such as ``l1`` merely drove *near* zero: with Adam or SGD, L1 rarely
        makes a weight exactly 0.

    Returns
    -------
    dict
        ``sparsity`` (fraction of zero weights overall), ``zeros``, ``weights``, ``threshold`` and
        ``layers``: ``{layer path: {"zeros", "weights", "sparsity"}}``.

    Examples
    --------
    >>> net = nn.Sequential(nn.Linear(4, 2))
    >>> with torch.no_grad():
    ...     _ = net[0].weight.copy_(torch.tensor([[0.0, 1.0, 0.0, 2.0], [3.0, 0.0, 1e-4, 4.0]]))
    ...     _ = net[0].bias.zero_()  # biases are not counted
    >>> sparsity_report(net)["sparsity"]
    0.375
    >>> sparsity_report(net, threshold=1e-3)["layers"]["0"]
    {'zeros': 4, 'weights': 8, 'sparsity': 0.5}
    """
    if not (isinstance(threshold, Real) and not isinstance(threshold, bool)
            and math.isfinite(threshold) and threshold >= 0):
        raise invalid_value("threshold", threshold, "a finite float >= 0")
    module = model if isinstance(model, nn.Module) else _split(model)[1].module_
    layers, zeros, total = {}, 0, 0
    with torch.no_grad():
        for name, layer in _weighted_layers(module):
            w = layer.weight  # the masked weight while pruning masks are in force
            z = int((w.abs() <= threshold).sum()) if threshold else int((w == 0).sum())
            layers[name] = {"zeros": z, "weights": w.numel(), "sparsity": z / max(1, w.numel())}
            zeros, total = zeros + z, total + w.numel()
    return {"sparsity": zeros / total if total else 0.0, "zeros": zeros, "weights": total,
            "threshold": float(threshold), "layers": layers}


def _check_prune_args(sparsity, scope, fine_tune_epochs, fine_tune_lr, X, y) -> None:
    if not (isinstance(sparsity, Real) and not isinstance(sparsity, bool)
            and math.isfinite(sparsity) and 0 <= sparsity < 1):
        raise invalid_value("sparsity", sparsity,
                            "a fraction of the weights to zero, a float in [0, 1)")
    if scope not in ("global", "layer"):
        raise invalid_value("scope", scope, "'global' (one magnitude threshold for all layers) "
                            "or 'layer' (the same fraction in each layer)")
    if not isinstance(fine_tune_epochs, Integral) or isinstance(fine_tune_epochs, bool) \
            or fine_tune_epochs < 0:
        raise invalid_value("fine_tune_epochs", fine_tune_epochs, "an int >= 0")
    if fine_tune_lr is not None and not (
            isinstance(fine_tune_lr, Real) and not isinstance(fine_tune_lr, bool)
            and math.isfinite(fine_tune_lr) and fine_tune_lr > 0):
        raise invalid_value("fine_tune_lr", fine_tune_lr, "a float > 0, or None for the "
                            "estimator's lr")
    if fine_tune_epochs and (X is None or y is None):
        raise ValueError(f"fine_tune_epochs={fine_tune_epochs} needs the training data: pass X "
                         "and y (or fine_tune_epochs=0 to prune without fine-tuning).")


def _fine_tune(net, X, y, epochs: int, lr: Optional[float]) -> None:
    """``epochs`` more epochs of the estimator's own training, masks in force."""
    saved = net.max_epochs, net.lr
    net.max_epochs, net.lr = int(epochs), net.lr if lr is None else lr
    try:
        net.initialize_optimizer()  # fresh state, over weight_orig (the masked parameters)
        seed = getattr(net, "seed_", None)
        with torch.random.fork_rng(devices=[]):
            if seed is not None:
                torch.manual_seed(seed)
            net.partial_fit(X, y)
    finally:
        net.max_epochs, net.lr = saved


def prune(model: Any, sparsity: float, *, scope: str = "global", X: Any = None, y: Any = None,
          fine_tune_epochs: int = 0, fine_tune_lr: Optional[float] = None) -> Any:
    """Return a copy of a fitted network with the smallest-magnitude weights set to exactly zero.

    Parameters
    ----------
    model : NNClassifier, NNRegressor or sklearn Pipeline ending in one
        Left untouched: the result is a deep copy.
    sparsity : float in [0, 1)
        Fraction of the weights to zero (``round(sparsity * n)`` of them). Weights that are zero
        already count towards it.
    scope : {"global", "layer"}, default="global"
        "global" ranks all weights together (layers end up unequally sparse); "layer" zeroes the
        same fraction in every layer.
    X, y : array-like, optional
        Training data, needed when ``fine_tune_epochs > 0`` (raw data for a pipeline: its
        preprocessing steps transform ``X`` first).
    fine_tune_epochs : int >= 0, default=0
        Epochs of further training with the pruning masks in force (the zeros stay zero), using
        the estimator's own optimizer, schedule, augmentation and validation split, seeded by its
        ``random_state``; the history records them after the original epochs.
    fine_tune_lr : float > 0, optional
        Learning rate for fine-tuning; None uses the estimator's ``lr``.

    Returns
    -------
    The same kind of object, with pruning made permanent: its weights contain the zeros, and
    nothing else (no masks) is added, so it saves, loads and clones like any model.

    Raises
    ------
    ValueError
        If ``sparsity`` is outside [0, 1), ``scope`` is unknown, or fine-tuning lacks data.
    sklearn.exceptions.NotFittedError
        If the estimator is not fitted.

    Notes
    -----
    During fine-tuning the ``l1`` / ``l2`` penalties and ``max_norm`` do not reach the pruned
    layers' weights (PyTorch's pruning renames them ``weight_orig``).

    Examples
    --------
    >>> import numpy as np
    >>> from nnpipe import NNClassifier
    >>> X = np.random.RandomState(0).normal(size=(100, 8)).astype("float32"); y = X[:, 0] > 0
    >>> clf = NNClassifier(module__hidden_sizes=[16], max_epochs=5, random_state=0).fit(X, y)
    >>> sparse = prune(clf, 0.5, X=X, y=y, fine_tune_epochs=2)
    >>> sparsity_report(sparse)["sparsity"], sparsity_report(clf)["sparsity"]
    (0.5, 0.0)
    """
    _check_prune_args(sparsity, scope, fine_tune_epochs, fine_tune_lr, X, y)
    pipeline, _ = _split(model)
    new = copy.deepcopy(model)
    net = new.steps[-1][1] if pipeline is not None else new
    targets = [(layer, "weight") for _, layer in _weighted_layers(net.module_)]
    orders = [list(layer._parameters) for layer, _ in targets]
    if not targets:
        raise ValueError(f"{type(net.module_).__name__} has no Linear or Conv weights to prune.")
    if scope == "global":
        torch_prune.global_unstructured(targets, pruning_method=torch_prune.L1Unstructured,
                                        amount=float(sparsity))
    else:
        for layer, name in targets:
            torch_prune.l1_unstructured(layer, name, amount=float(sparsity))
    try:
        if fine_tune_epochs:
            if pipeline is not None and len(new.steps) > 1:
                X = new[:-1].transform(X)
            _fine_tune(net, X, y, fine_tune_epochs, fine_tune_lr)
    finally:
        for (layer, name), order in zip(targets, orders):
            torch_prune.remove(layer, name)  # weight = weight_orig * mask, for good
            for key in order:  # remove() re-registers the weight last: keep the state-dict order
                layer._parameters[key] = layer._parameters.pop(key)
    if hasattr(net, "optimizer_"):
        net.initialize_optimizer()
    return new

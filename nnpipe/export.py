"""Inference-time rewrites of fitted networks: batch-norm folding.

:func:`fold_batchnorm` merges every foldable ``BatchNorm1d`` / ``BatchNorm2d`` into the
``Linear`` / ``Conv1d`` / ``Conv2d`` next to it, using the running statistics (eval mode), so that
prediction runs fewer layers and gives the same outputs (to float32 rounding).

For batch norm *before* the activation (``batch_norm=True`` / ``"before"``, the default) the layer
``z = s * (W x + b - mean) + beta`` with ``s = gamma / sqrt(var + eps)`` becomes the single layer
``(s W) x + s (b - mean) + beta``. For batch norm *after* the activation the affine map
``s * a + t`` is folded into the *next* layer instead: ``W' = W diag(s)``, ``b' = b + W t``. That is
exact when only dropout (identity at predict time), ``Flatten`` or, when every ``s >= 0``, max
pooling (which commutes with a non-negative per-channel scale) lie in between, and the next layer is
a ``Linear`` or an unpadded convolution. It is *not* exact into a zero-padded convolution (the
padded border would see ``0`` instead of ``t``), so in a CNN with ``batch_norm="after"`` the batch
norms between two convolutions stay, and a :class:`FoldingWarning` names them.
"""

from __future__ import annotations

import copy
import warnings
from typing import Any, List, Optional, Sequence, Tuple

import torch
from sklearn.utils.validation import check_is_fitted
from torch import nn

from .models import MLP, _CNN

__all__ = ["fold_batchnorm", "replace_with_identity", "FoldingWarning"]

_BN = (nn.BatchNorm1d, nn.BatchNorm2d)
_CONV = (nn.Conv1d, nn.Conv2d)
_DROPOUT = (nn.Dropout, nn.AlphaDropout, nn.Identity)
_POOL = (nn.MaxPool1d, nn.MaxPool2d)


class FoldingWarning(UserWarning):
    """Some (or all) batch-norm layers could not be folded; the model still predicts correctly."""


# --------------------------------------------------------------------------- the arithmetic


def _bn_affine(bn: nn.Module) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(s, t)`` with ``bn(x) == s * x + t`` per channel in eval mode (float64)."""
    mean, var = bn.running_mean.double(), bn.running_var.double()
    gamma = bn.weight.double() if bn.weight is not None else torch.ones_like(mean)
    beta = bn.bias.double() if bn.bias is not None else torch.zeros_like(mean)
    s = gamma / torch.sqrt(var + bn.eps)
    return s, beta - mean * s


def _set(layer: nn.Module, weight: torch.Tensor, bias: torch.Tensor) -> None:
    with torch.no_grad():
        layer.weight.copy_(weight.to(layer.weight.dtype))
        if layer.bias is None:
            layer.bias = nn.Parameter(bias.to(layer.weight))
        else:
            layer.bias.copy_(bias.to(layer.bias.dtype))


def _bias(layer: nn.Module) -> torch.Tensor:
    if layer.bias is None:
        return torch.zeros(layer.weight.shape[0], dtype=torch.float64, device=layer.weight.device)
    return layer.bias.detach().double()


def _fold_into_previous(layer: nn.Module, s: torch.Tensor, t: torch.Tensor) -> None:
    w = layer.weight.detach().double()
    shape = (-1,) + (1,) * (w.dim() - 1)
    _set(layer, w * s.view(shape), _bias(layer) * s + t)


def _fold_into_next(layer: nn.Module, s: torch.Tensor, t: torch.Tensor) -> None:
    w = layer.weight.detach().double()
    shape = (1, -1) + (1,) * (w.dim() - 2)
    shift = (w * t.view(shape)).sum(dim=tuple(range(1, w.dim())))
    _set(layer, w * s.view(shape), _bias(layer) + shift)


# --------------------------------------------------------------------------- finding the pairs


def _chains(module: nn.Module) -> List[List[Tuple[str, nn.Module]]]:
    """Runs of layers known to execute one after the other, as ``(path, layer)`` lists.

    nnpipe's own networks run ``hidden``/``features``, ``dense`` and ``output`` in sequence, so each
    is one chain; anywhere else only the children of an ``nn.Sequential`` are known to be in order.
    """
    def leaves(path: str, mod: nn.Module) -> List[Tuple[str, nn.Module]]:
        if isinstance(mod, nn.Sequential):
            return [leaf for name, child in mod.named_children()
                    for leaf in leaves(f"{path}.{name}" if path else name, child)]
        return [(path, mod)]

    own = (type(module).forward is MLP.forward and isinstance(module, MLP)) or (
        type(module).forward is _CNN.forward and isinstance(module, _CNN))
    if own:
        parts = ("hidden", "output") if isinstance(module, MLP) else ("features", "dense", "output")
        return [[leaf for p in parts for leaf in leaves(p, getattr(module, p))]]
    return [[(f"{path}.{name}" if path else name, child) for name, child in seq.named_children()]
            for path, seq in module.named_modules() if isinstance(seq, nn.Sequential)]


def _producer(chain, i) -> Optional[nn.Module]:
    """The nearest Linear / Conv before position ``i`` (what the batch norm normalises)."""
    for _, layer in reversed(chain[:i]):
        if isinstance(layer, (nn.Linear,) + _CONV):
            return layer
    return None


def _fold_one(chain, i) -> Optional[str]:
    """Fold the batch norm at ``chain[i]``; return ``None`` on success, else the reason it stays."""
    _, bn = chain[i]
    if bn.running_mean is None or bn.running_var is None:
        return "it keeps no running statistics (track_running_stats=False)"
    s, t = _bn_affine(bn)
    n = bn.num_features
    prev = chain[i - 1][1] if i > 0 else None
    if isinstance(prev, nn.Linear) and isinstance(bn, nn.BatchNorm1d) and prev.out_features == n \
            or isinstance(prev, nn.Conv1d) and isinstance(bn, nn.BatchNorm1d) \
            and prev.out_channels == n \
            or isinstance(prev, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d) \
            and prev.out_channels == n:
        _fold_into_previous(prev, s, t)
        return None
    spatial = not isinstance(_producer(chain, i), nn.Linear)  # (N, C, ...) rather than (N, C)
    flattened = False
    for _, layer in chain[i + 1:]:
        if isinstance(layer, _DROPOUT):
            continue
        if isinstance(layer, _POOL):
            if not bool((s >= 0).all()):
                return "a max pooling follows and some of its scales are negative"
            continue
        if isinstance(layer, nn.Flatten) and layer.start_dim == 1 and layer.end_dim == -1:
            flattened = True
            continue
        if isinstance(layer, nn.Linear):
            if spatial and not flattened:
                return "the next Linear layer does not act on its channels"
            if layer.in_features % n:
                return "the next Linear layer's width is not a multiple of its channels"
            repeat = layer.in_features // n
            _fold_into_next(layer, s.repeat_interleave(repeat), t.repeat_interleave(repeat))
            return None
        if isinstance(layer, _CONV) and not flattened and layer.in_channels == n \
                and layer.groups == 1:
            pad = layer.padding
            if pad == "valid" or (not isinstance(pad, str) and all(p == 0 for p in pad)):
                _fold_into_next(layer, s, t)
                return None
            return f"the next layer, {type(layer).__name__}, zero-pads its input"
        break
    return "no Linear or Conv layer next to it can absorb it"


def _fold_module(module: nn.Module) -> Tuple[List[str], List[str], int]:
    """Fold in place; return (folded paths, 'path: reason' for those kept, number of BNs)."""
    n_bn = sum(isinstance(m, _BN) for m in module.modules())
    folded, kept = [], []
    for chain in _chains(module):
        for i, (path, layer) in enumerate(chain):
            if isinstance(layer, _BN):
                reason = _fold_one(chain, i)
                if reason is None:
                    folded.append(path)
                else:
                    kept.append(f"{path}: {reason}")
    replace_with_identity(module, folded)
    kept += [f"{name}: not in a sequence nnpipe can follow" for name, m in module.named_modules()
             if isinstance(m, _BN) and not any(k.startswith(name + ":") for k in kept)]
    return folded, kept, n_bn


def replace_with_identity(module: nn.Module, paths: Sequence[str]) -> nn.Module:
    """Replace the submodules at the dotted ``paths`` (``"hidden.2"``) by ``nn.Identity``.

    Used to rebuild the structure of a partly folded network before loading its weights.

    Examples
    --------
    >>> net = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2))
    >>> replace_with_identity(net, ["1"])
    Sequential(
      (0): Linear(in_features=2, out_features=2, bias=True)
      (1): Identity()
    )
    """
    for path in paths:
        parent_path, _, name = str(path).rpartition(".")
        parent = module.get_submodule(parent_path) if parent_path else module
        setattr(parent, name, nn.Identity())
    return module


# --------------------------------------------------------------------------- estimators


def _stateful_leaves(module: nn.Module) -> List[nn.Module]:
    return [m for m in module.modules() if not list(m.children())
            and (list(m.parameters(recurse=False)) or list(m.buffers(recurse=False)))]


def _rebuild_without_bn(est) -> Optional[nn.Module]:
    """The ``batch_norm=None`` network of ``est`` carrying the folded weights, or None."""
    try:
        with torch.random.fork_rng(devices=[]):  # building must not draw from the global RNG
            fresh = est._build_module(est.n_features_in_, est.n_outputs_)
    except (AttributeError, TypeError, ValueError):
        return None
    old, new = _stateful_leaves(est.module_), _stateful_leaves(fresh)
    if len(old) != len(new) or any(type(a) is not type(b) for a, b in zip(old, new)):
        return None
    try:
        for a, b in zip(old, new):
            b.load_state_dict(a.state_dict())
    except RuntimeError:
        return None
    device = next(est.module_.parameters()).device
    return fresh.to(device).train(est.module_.training)


def _fold_estimator(est):
    check_is_fitted(est, "module_")
    folded, kept, n_bn = _fold_module(est.module_)
    if n_bn == 0:
        warnings.warn(f"{type(est).__name__} has no batch-norm layers: nothing to fold, returning "
                      "an unchanged copy.", FoldingWarning, stacklevel=3)
        return est
    if kept:
        warnings.warn(f"fold_batchnorm kept {len(kept)} of {n_bn} batch-norm layers: "
                      + "; ".join(kept) + ".", FoldingWarning, stacklevel=3)
    fresh = None
    if folded and not kept and est._own_module() and est.batch_norm is not None:
        saved, est.batch_norm = est.batch_norm, None
        fresh = _rebuild_without_bn(est)
        if fresh is None:
            est.batch_norm = saved
        else:
            est.module_ = fresh
    if fresh is None and folded:
        est.folded_bn_paths_ = list(folded)  # what nnpipe.load must turn into nn.Identity again
    if hasattr(est, "optimizer_"):
        est.initialize_optimizer()  # the old optimizer points at the pre-folding parameters
    return est


def fold_batchnorm(model: Any) -> Any:
    """Return a copy of a fitted network with its batch norms folded into the adjacent layers.

    Parameters
    ----------
    model : NNClassifier, NNRegressor, sklearn Pipeline ending in one, or nn.Module
        Left untouched: the result is a deep copy.

    Returns
    -------
    The same kind of object, predicting what ``model`` predicts (eval mode) within float32
    rounding. For an nnpipe estimator whose batch norms all fold, the copy has
    ``batch_norm=None`` and exactly the network that setting builds, so :func:`nnpipe.save` /
    :func:`nnpipe.load` round-trip it as any model; refitting it trains without batch norm. When
    some stay (``batch_norm="after"`` in a CNN), the folded ones become ``nn.Identity``, the
    parameters are unchanged and ``folded_bn_paths_`` lists the replaced layers.

    Warns
    -----
    FoldingWarning
        When the model has no batch norm (the copy is returned unchanged) or some cannot be folded
        (each is named, with the reason).

    Raises
    ------
    sklearn.exceptions.NotFittedError
        If the estimator is not fitted.

    Notes
    -----
    Folding uses the running statistics: train-mode batch statistics are gone afterwards. A batch
    norm *after* the activation folds through dropout into the next layer; that is exact at
    predict time, but not under Monte Carlo dropout (the folded shift is no longer dropped).

    Examples
    --------
    >>> import numpy as np
    >>> from nnpipe import NNClassifier
    >>> X = np.random.RandomState(0).normal(size=(80, 6)).astype("float32"); y = X[:, 0] > 0
    >>> clf = NNClassifier(batch_norm=True, max_epochs=3, random_state=0).fit(X, y)
    >>> fast = fold_batchnorm(clf)
    >>> fast.batch_norm, any(isinstance(m, nn.BatchNorm1d) for m in fast.module_.modules())
    (None, False)
    >>> bool(np.abs(fast.predict_proba(X) - clf.predict_proba(X)).max() < 1e-5)
    True
    """
    from sklearn.pipeline import Pipeline

    if isinstance(model, nn.Module):
        module = copy.deepcopy(model)
        folded, kept, n_bn = _fold_module(module)
        if n_bn == 0:
            warnings.warn("the module has no batch-norm layers: nothing to fold, returning an "
                          "unchanged copy.", FoldingWarning, stacklevel=2)
        elif kept:
            warnings.warn(f"fold_batchnorm kept {len(kept)} of {n_bn} batch-norm layers: "
                          + "; ".join(kept) + ".", FoldingWarning, stacklevel=2)
        return module
    if isinstance(model, Pipeline):
        check_is_fitted(model.steps[-1][1], "module_")
        pipe = copy.deepcopy(model)
        name, final = pipe.steps[-1]
        pipe.steps[-1] = (name, _fold_estimator(final))
        return pipe
    if not hasattr(model, "_own_module"):
        raise TypeError("fold_batchnorm takes an NNClassifier, NNRegressor, a Pipeline ending in "
                        f"one, or an nn.Module, got {type(model).__name__}.")
    check_is_fitted(model, "module_")
    return _fold_estimator(copy.deepcopy(model))

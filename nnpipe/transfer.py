"""Transfer learning: copy layers from a saved or fitted nnpipe model into a new network, and
train them at their own pace (per-layer-group learning rates)."""

from __future__ import annotations

import fnmatch
import math
import os
from numbers import Real
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

from torch import nn

__all__ = ["transfer_weights", "check_lr_multipliers", "lr_multiplier_groups"]


def _source_state(source: Any):
    if isinstance(source, (str, os.PathLike)):
        from .persist import load

        source = load(source)
    module = getattr(source, "module_", source)
    if not isinstance(module, nn.Module):
        raise ValueError(f"transfer_from must be a saved nnpipe model directory or a fitted "
                         f"estimator, got {source!r}.")
    return module.state_dict()


def transfer_weights(module: nn.Module, source: Any,
                     layers: Optional[Iterable[str]] = None) -> List[str]:
    """Copy parameters (and buffers, e.g. batch-norm statistics) from ``source`` into ``module``.

    Parameters
    ----------
    module : nn.Module
        The freshly initialised network.
    source : path, fitted estimator or nn.Module
        Where the trained layers come from.
    layers : list of str, optional
        fnmatch patterns of state-dict names to copy (``["hidden.*"]``). By default every entry
        except the output layer (``output.*``) whose name and shape match.

    Returns
    -------
    list of str
        The names copied, so a caller can freeze exactly those.
    """
    src = _source_state(source)
    dst = module.state_dict()
    if layers is None:
        names = [k for k in dst if not k.startswith("output.") and k in src
                 and src[k].shape == dst[k].shape]
    else:
        patterns = [layers] if isinstance(layers, str) else list(layers)
        names = [k for k in dst if any(fnmatch.fnmatch(k, p) for p in patterns)]
        unmatched = [p for p in patterns if not any(fnmatch.fnmatch(k, p) for k in dst)]
        if unmatched:
            raise ValueError(f"transfer_layers patterns {unmatched} match no layer of the new "
                             f"network; its layers are {sorted(dst)}.")
        bad = [k for k in names if k not in src or src[k].shape != dst[k].shape]
        if bad:
            raise ValueError(
                "transfer_layers names layers that the source model lacks or that differ in "
                "shape: " + ", ".join(
                    f"{k} (new {tuple(dst[k].shape)}, source "
                    f"{tuple(src[k].shape) if k in src else 'missing'})" for k in bad))
    if not names:
        raise ValueError("transfer_from: no layer of the source model matches the new network "
                         "by name and shape; check module__* sizes or set transfer_layers.")
    dst.update({k: src[k].to(dst[k].device) for k in names})
    module.load_state_dict(dst)
    return names


# --------------------------------------------------------------------------- per-group lr


def check_lr_multipliers(multipliers: Any, names: Optional[Sequence[str]] = None) -> None:
    """Check ``lr_multipliers``: a mapping of fnmatch patterns to finite factors >= 0.

    With ``names`` (the network's parameter names) every pattern must match one of them.

    Examples
    --------
    >>> check_lr_multipliers({"hidden.*": 0.1}, ["hidden.1.weight", "output.weight"])
    >>> check_lr_multipliers({"hiden.*": 0.1}, ["hidden.1.weight", "output.weight"])
    Traceback (most recent call last):
    ...
    ValueError: lr_multipliers pattern 'hiden.*' matches no parameter of the network; its parameters are ['hidden.1.weight', 'output.weight'].
    """
    if multipliers is None:
        return
    if not isinstance(multipliers, Mapping) or not multipliers:
        raise ValueError(f"lr_multipliers must be None or a non-empty mapping of parameter-name "
                         f"patterns to factors, e.g. {{'hidden.*': 0.1}}, got {multipliers!r}.")
    for pattern, factor in multipliers.items():
        if not isinstance(pattern, str):
            raise ValueError(f"lr_multipliers keys must be parameter-name patterns (str), got "
                             f"{pattern!r}.")
        ok = isinstance(factor, Real) and not isinstance(factor, bool)
        try:
            ok = ok and math.isfinite(factor) and factor >= 0
        except OverflowError:
            ok = False
        if not ok:
            raise ValueError(f"lr_multipliers: the factor for {pattern!r} must be a finite "
                             f"number >= 0 (it multiplies lr), got {factor!r}.")
        if names is not None and not any(fnmatch.fnmatch(n, pattern) for n in names):
            raise ValueError(f"lr_multipliers pattern {pattern!r} matches no parameter of the "
                             f"network; its parameters are {list(names)}.")


def lr_multiplier_groups(groups: List[Dict[str, Any]], named_parameters: Iterable[Tuple[str, Any]],
                         multipliers: Mapping[str, float], lr: float) -> List[Dict[str, Any]]:
    """Split optimizer parameter groups so each parameter trains at its group's lr x factor.

    A parameter takes the factor of the first pattern (in ``multipliers`` order) its name
    matches, 1 otherwise. Every resulting group records its factor as ``"lr_multiplier"``; torch
    schedulers act per group (``base_lrs``), so a schedule keeps the ratios between groups.

    Parameters
    ----------
    groups : list of dict
        The groups skorch built (``optimizer__param_groups`` applied), each with ``"params"``
        and possibly its own ``"lr"``.
    named_parameters : iterable of (name, parameter)
    multipliers : mapping of str to float
    lr : float
        The optimizer's lr, for groups that set none.

    Examples
    --------
    >>> from torch import nn
    >>> net = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 1))
    >>> out = lr_multiplier_groups([{"params": list(net.parameters())}],
    ...                            net.named_parameters(), {"0.*": 0.1}, lr=0.01)
    >>> [(len(g["params"]), g["lr"], g["lr_multiplier"]) for g in out]
    [(2, 0.01, 1.0), (2, 0.001, 0.1)]
    """
    check_lr_multipliers(multipliers)
    names = {id(p): n for n, p in named_parameters}
    patterns = list(multipliers.items())
    out = []
    for group in groups:
        base = group.get("lr", lr)
        by_factor: Dict[float, list] = {}
        for param in group["params"]:
            name = names.get(id(param), "")
            factor = next((float(f) for pat, f in patterns if fnmatch.fnmatch(name, pat)), 1.0)
            by_factor.setdefault(factor, []).append(param)
        # the unscaled group first: schedules and the history read param_groups[0]["lr"]
        for factor in sorted(by_factor, key=lambda f: f != 1.0):
            out.append({**group, "params": by_factor[factor], "lr": base * factor,
                        "lr_multiplier": factor})
    return out

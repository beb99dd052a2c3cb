"""Transfer learning: copy layers from a saved or fitted nnpipe model into a new network."""

from __future__ import annotations

import fnmatch
import os
from typing import Any, Iterable, List, Optional

from torch import nn

__all__ = ["transfer_weights"]


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

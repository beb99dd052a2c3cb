"""MLflow "models from code" entry point for nnpipe models.

:meth:`nnpipe.tracking.Tracker.log_model` logs this file as the model's code and the nnpipe model
directory (written by :func:`nnpipe.save`) as the artifact ``"model"``. MLflow runs this file when
the model is loaded: nothing is pickled, the weights are read by :func:`nnpipe.load` (safetensors,
checksummed), so a model logged with one version of torch or nnpipe loads with another.

This module imports mlflow at the top on purpose: it is only ever run by MLflow, and
``nnpipe/__init__.py`` does not import it.

Examples
--------
The model is loaded and served like any pyfunc model::

    model = mlflow.pyfunc.load_model(model_uri)
    model.predict(X)            # a float32 array or a DataFrame of features

A model logged with its training input (``Tracker.log_model(..., X_train=X)``, as the train stage
does) has a signature, which MLflow enforces before :meth:`NNPipeModel.predict` runs (the number
of columns, the dtype), and the training value range in its artifact ``serving``
(``serving.json``), which ``predict`` enforces: non-finite values and values beyond
``range_factor`` times the largest training magnitude are refused with a message naming both
ranges. Another factor (or 0: no range check) is an inference parameter::

    model.predict(X, params={"range_factor": 10})   # or 0: no range check
"""

from __future__ import annotations

import json
from typing import Any, Dict, Optional, Sequence

import mlflow
import numpy as np
from mlflow.pyfunc import PythonModel

__all__ = ["NNPipeModel", "check_input"]


def _check_finite(X: np.ndarray) -> None:
    bad = ~np.isfinite(X)
    if bad.any():
        where = np.argwhere(bad)[0]
        raise ValueError(f"the model input has {int(bad.sum())} non-finite value(s) (NaN or "
                         f"inf), the first at index {tuple(int(i) for i in where)}: the model "
                         "accepts finite numbers only.")


def check_input(X: np.ndarray, input_range: Optional[Sequence[float]] = None,
                range_factor: Optional[float] = None) -> None:
    """Refuse input the model cannot have been meant for: non-finite values, or (given the
    training range ``input_range = [lo, hi]`` and ``range_factor``) values beyond
    ``range_factor * max(|lo|, |hi|)``.

    Examples
    --------
    >>> check_input(np.array([[0.0, 0.5, 1.0]]), [0.0, 1.0], 4.0)
    >>> check_input(np.array([[0.0, 16.0]]), [0.0, 1.0], 4.0)  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    ValueError: the model input's values span [0, 16], far outside the range the model was ...
    """
    _check_finite(X)
    if input_range is None or not range_factor or X.size == 0:
        return
    lo, hi = (float(v) for v in input_range)
    scale = max(abs(lo), abs(hi)) or 1.0
    bound = float(range_factor) * scale
    seen_lo, seen_hi = float(X.min()), float(X.max())
    if max(abs(seen_lo), abs(seen_hi)) > bound:
        raise ValueError(
            f"the model input's values span [{seen_lo:g}, {seen_hi:g}], far outside the range "
            f"the model was trained on, [{lo:g}, {hi:g}]: it accepts values within "
            f"[{-bound:g}, {bound:g}] (range_factor {float(range_factor):g} x the largest "
            f"training magnitude {scale:g}). Is the input prepared as the training data was "
            "(e.g. pixels scaled to [0, 1], not raw 0-16 values)? To accept it anyway, load the "
            "predict with params={'range_factor': 0} (no range check), or a larger factor.")


class NNPipeModel(PythonModel):
    """A pyfunc wrapper around a saved nnpipe estimator (or pipeline).

    The estimator is loaded from ``context.artifacts["model"]`` with :func:`nnpipe.load`;
    :meth:`predict` checks the input (:func:`check_input`, with the ``input_range`` and
    ``range_factor`` of the artifact ``"serving"`` when it has one; a ``range_factor`` in
    ``predict``'s ``params`` overrides the logged one) and returns the estimator's
    ``predict`` on it as a float32 array.
    """

    def load_context(self, context) -> None:
        """Load the estimator from the artifact ``"model"`` (an :func:`nnpipe.save` directory)."""
        import nnpipe

        try:
            directory = context.artifacts["model"]
        except (KeyError, TypeError):
            raise ValueError("the MLflow model has no artifact 'model': it must be logged with "
                             "artifacts={'model': <nnpipe model directory>}, as "
                             "nnpipe.tracking.Tracker.log_model does.") from None
        self.model = nnpipe.load(directory)
        config = {}
        serving = (context.artifacts or {}).get("serving")
        if serving:  # the training range, written by Tracker.log_model(X_train=...)
            with open(serving, encoding="utf-8") as fh:
                config = json.load(fh)
        self.input_range = config.get("input_range")
        self.range_factor = config.get("range_factor")

    def predict(self, context, model_input: np.ndarray,
                params: Optional[Dict[str, Any]] = None) -> np.ndarray:
        """Return ``estimator.predict(np.asarray(model_input, dtype=np.float32))`` once the
        input passed :func:`check_input`.

        Parameters
        ----------
        context : mlflow.pyfunc.PythonModelContext
        model_input : pandas.DataFrame or array-like of shape (n_samples, n_features)
        params : dict, optional
            ``{"range_factor": x}``: refuse values beyond ``x`` times the largest training
            magnitude instead of the logged factor; 0 checks no range.

        Notes
        -----
        The ``np.ndarray`` annotation tells MLflow not to infer a schema from the type hint (it
        validates nothing); DataFrames are accepted as well.
        """
        X = np.asarray(model_input, dtype=np.float32)
        factor = dict(params or {}).get("range_factor", getattr(self, "range_factor", None))
        if factor is not None and (isinstance(factor, bool) or not isinstance(factor, (int, float))
                                   or not 0 <= factor < float("inf")):
            raise ValueError(f"params['range_factor'] must be a finite number >= 0 (0: no range "
                             f"check), got {factor!r}.")
        check_input(X, getattr(self, "input_range", None), factor)
        return self.model.predict(X)


mlflow.models.set_model(NNPipeModel())

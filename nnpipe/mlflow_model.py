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
    model.predict(X)            # a float32-convertible array or a DataFrame of features
"""

from __future__ import annotations

from typing import Any, Dict, Optional

import mlflow
import numpy as np
from mlflow.pyfunc import PythonModel

__all__ = ["NNPipeModel"]


class NNPipeModel(PythonModel):
    """A pyfunc wrapper around a saved nnpipe estimator (or pipeline).

    The estimator is loaded from ``context.artifacts["model"]`` with :func:`nnpipe.load`;
    :meth:`predict` returns the estimator's ``predict`` on the input as a float32 array.
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

    def predict(self, context, model_input: np.ndarray,
                params: Optional[Dict[str, Any]] = None) -> np.ndarray:
        """Return ``estimator.predict(np.asarray(model_input, dtype=np.float32))``.

        Parameters
        ----------
        context : mlflow.pyfunc.PythonModelContext
        model_input : pandas.DataFrame or array-like of shape (n_samples, n_features)
        params : dict, optional
            Accepted for the pyfunc interface; nnpipe models take no inference parameters.

        Notes
        -----
        The ``np.ndarray`` annotation tells MLflow not to infer a schema from the type hint (it
        validates nothing); DataFrames are accepted as well.
        """
        X = np.asarray(model_input, dtype=np.float32)
        return self.model.predict(X)


mlflow.models.set_model(NNPipeModel())

"""nnpipe: declarative experiment pipelines for neural networks, with ensembles built in.

Importing nnpipe has no side effects: no I/O, no tracking run, no logging configuration.
Optional heavy pieces (optuna, mlflow, dvc, kornia) are imported where they are used.
"""

from .ensemble import EnsembleClassifier, EnsembleRegressor
from .estimators import DivergenceError, NNClassifier, NNRegressor
from .persist import load, save

__version__ = "0.1.0"

__all__ = ["NNClassifier", "NNRegressor", "EnsembleClassifier", "EnsembleRegressor",
           "DivergenceError", "save", "load", "__version__"]

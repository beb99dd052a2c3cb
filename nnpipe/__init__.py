"""nnpipe: declarative experiment pipelines for neural networks, with ensembles built in.

Importing nnpipe has no side effects: no I/O, no tracking run, no logging configuration.
Optional heavy pieces (optuna, mlflow, dvc, kornia) are imported where they are used.
"""

from .diagnostics import diagnose, format_findings
from .ensemble import EnsembleClassifier, EnsembleRegressor
from .estimators import DivergenceError, NNClassifier, NNRegressor
from .export import fold_batchnorm
from .lr_finder import lr_range_test
from .persist import load, save
from .pretrain import Pretrainer, fine_tune_params
from .sparsity import sparsity_report

__version__ = "0.1.0"

__all__ = ["NNClassifier", "NNRegressor", "EnsembleClassifier", "EnsembleRegressor",
           "DivergenceError", "save", "load", "fold_batchnorm", "sparsity_report", "lr_range_test",
           "diagnose", "format_findings", "Pretrainer", "fine_tune_params", "__version__"]

"""Predictive uncertainty: MC dropout, the entropy decomposition, temperature scaling.

* :func:`mc_dropout_proba` -- ``n_samples`` stochastic forward passes of a fitted
  :class:`~nnpipe.NNClassifier` with only its dropout layers active (Gal & Ghahramani, 2016);
  :func:`dropout_only` is the context manager behind it.
* :func:`predictive_entropy` of the mean, :func:`expected_entropy`, :func:`mutual_information`
  and :func:`disagreement` -- the total / aleatoric / epistemic split of a stack of
  probabilities from ensemble members or MC-dropout samples; :func:`uncertainty_report` gives
  all four at once.
* :class:`TemperatureScaler` -- post-hoc calibration by one temperature (Guo et al., 2017).

A *stack* ``P`` has shape ``(n_members, n_samples, n_classes)``: ``P[m]`` is one member's (or one
MC sample's) ``predict_proba``. Entropies use the natural log, so they are in nats.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from numbers import Integral, Real
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch
from sklearn.base import BaseEstimator
from sklearn.utils import check_random_state
from sklearn.utils.validation import check_is_fitted
from torch import nn

from ._registry import invalid_value
from .metrics import _check_proba, _encode, predictive_entropy

__all__ = [
    "mc_dropout_proba",
    "dropout_only",
    "DROPOUT_LAYERS",
    "predictive_entropy",
    "expected_entropy",
    "mutual_information",
    "disagreement",
    "uncertainty_report",
    "TemperatureScaler",
]

#: The layer types :func:`dropout_only` switches to train mode.
DROPOUT_LAYERS: Tuple[type, ...] = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d,
                                    nn.AlphaDropout, nn.FeatureAlphaDropout)

#: Probabilities are clipped to at least this before taking logs (temperature scaling).
PROBA_FLOOR = 1e-12


# --------------------------------------------------------------------------- MC dropout


@contextlib.contextmanager
def dropout_only(module: nn.Module) -> Iterator[List[nn.Module]]:
    """Put ``module`` in eval mode except its dropout layers; restore every mode on exit.

    Inside the block every submodule is in eval mode (BatchNorm uses, and never updates, its
    running statistics) except the layers of :data:`DROPOUT_LAYERS` (subclasses included),
    which are in train mode and so drop units. On exit -- normally or by an exception -- each
    submodule gets back the ``training`` flag it had on entry.

    Parameters
    ----------
    module : torch.nn.Module

    Yields
    ------
    list of nn.Module
        The dropout layers that were switched on (empty when the module has none).

    Examples
    --------
    >>> net = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Dropout(0.5)).eval()
    >>> with dropout_only(net) as active:
    ...     [m.training for m in net], len(active)
    ([False, False, True], 1)
    >>> [m.training for m in net]
    [False, False, False]
    """
    if not isinstance(module, nn.Module):
        raise invalid_value("module", type(module).__name__, "a torch.nn.Module")
    saved = [(m, m.training) for m in module.modules()]
    try:
        module.eval()
        active = [m for m in module.modules() if isinstance(m, DROPOUT_LAYERS)]
        for m in active:
            m.train()
        yield active
    finally:
        for m, training in saved:
            m.training = training


def _final_classifier(estimator: Any) -> Tuple[Any, list]:
    """``(NNClassifier, steps before it)`` from a classifier or a Pipeline ending with one."""
    from sklearn.pipeline import Pipeline

    from .estimators import NNClassifier

    if isinstance(estimator, Pipeline):
        net = estimator.steps[-1][1]
        if not isinstance(net, NNClassifier):
            raise invalid_value("estimator", f"Pipeline ending with {type(net).__name__}",
                                "a fitted NNClassifier or a Pipeline whose last step is one")
        return net, [step for _, step in estimator.steps[:-1]
                     if step is not None and step != "passthrough"]
    if not isinstance(estimator, NNClassifier):
        raise invalid_value("estimator", type(estimator).__name__,
                            "a fitted NNClassifier or a Pipeline whose last step is one")
    return estimator, []


def _check_positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, Integral) or value < 1:
        raise invalid_value(name, value, "an int >= 1")
    return int(value)


def _torch_seed(random_state: Any) -> Optional[int]:
    if random_state is None:
        return None
    if isinstance(random_state, bool) or not isinstance(
            random_state, (Integral, np.random.RandomState)):
        raise invalid_value("random_state", random_state,
                            "None, an int or a numpy RandomState")
    if isinstance(random_state, Integral):
        if random_state < 0:
            raise invalid_value("random_state", random_state, "None, an int >= 0 or a RandomState")
        return int(random_state)
    return int(check_random_state(random_state).randint(0, 2**31 - 1))


@contextlib.contextmanager
def _seeded(seed: Optional[int], device: torch.device) -> Iterator[None]:
    """Seed the generator of ``device`` (and the CPU's) for the block, then restore them."""
    if seed is None:  # draw from torch's global RNG, as training does
        yield
        return
    cuda = device.type == "cuda"
    index = (device.index if device.index is not None else torch.cuda.current_device()) \
        if cuda else None
    with torch.random.fork_rng(devices=[index] if cuda else []):
        torch.default_generator.manual_seed(seed)
        if cuda:
            torch.cuda.default_generators[index].manual_seed(seed)
        yield


def mc_dropout_proba(estimator: Any, X: Any, n_samples: int = 30,
                     random_state: Any = None, *, batch_size: int = 1024) -> np.ndarray:
    """Class probabilities from ``n_samples`` forward passes with dropout left on.

    Each pass runs the fitted network with only its dropout layers in train mode (see
    :func:`dropout_only`); batch normalisation and everything else stay in eval mode, so no
    running statistic moves and the estimator is left exactly as it was. The network's outputs
    become probabilities as in ``predict_proba``: softmax, or ``exp`` when the criterion is
    ``nn.NLLLoss`` (whose network outputs log-probabilities). Test-time augmentation (``tta``)
    is not applied: each pass sees the rows as given. Feed the result to
    :func:`uncertainty_report`; its mean over axis 0 is the MC-dropout prediction.

    Parameters
    ----------
    estimator : NNClassifier or sklearn Pipeline
        A fitted classifier with dropout (``dropout > 0``), or a fitted Pipeline whose last
        step is one (``X`` then goes through the earlier steps' ``transform`` first).
    X : array-like or torch.Tensor of shape (n_rows, n_features)
        Validated like ``predict_proba``'s input.
    n_samples : int >= 1, default=30
        Number of stochastic passes.
    random_state : int, RandomState or None, default=None
        Seeds the dropout masks; the same value gives identical samples, and torch's global
        RNG is left untouched (the seeding happens in a :func:`torch.random.fork_rng` block).
        None draws the masks from torch's global RNG (so ``torch.manual_seed`` controls them).
    batch_size : int >= 1, default=1024
        Rows per forward pass.

    Returns
    -------
    ndarray of shape (n_samples, n_rows, n_classes), float32
        Columns in ``classes_`` order; every ``[t, i, :]`` sums to 1.

    Raises
    ------
    ValueError
        When the network has no dropout layer with a rate > 0.

    Examples
    --------
    >>> import numpy as np
    >>> from nnpipe import NNClassifier
    >>> rng = np.random.RandomState(0)
    >>> X = rng.normal(size=(60, 4)).astype("float32"); y = (X[:, 0] > 0).astype(int)
    >>> clf = NNClassifier(module__hidden_sizes=[16], dropout=0.3, max_epochs=2,
    ...                    random_state=0).fit(X, y)
    >>> P = mc_dropout_proba(clf, X[:5], n_samples=8, random_state=0)
    >>> P.shape
    (8, 5, 2)
    >>> np.allclose(P.sum(-1), 1), bool(P.std(0).max() > 0)
    (True, True)
    """
    net, before = _final_classifier(estimator)
    n_samples = _check_positive_int("n_samples", n_samples)
    batch_size = _check_positive_int("batch_size", batch_size)
    seed = _torch_seed(random_state)
    net.check_is_fitted()
    module = net.module_
    active = [m for m in module.modules()
              if isinstance(m, DROPOUT_LAYERS) and getattr(m, "p", 0) > 0]
    if not active:
        raise ValueError(f"MC dropout needs dropout > 0, but the network of {type(net).__name__} "
                         "has no dropout layer with a positive rate (dropout="
                         f"{getattr(net, 'dropout', None)!r}); refit it with e.g. dropout=0.2.")
    for step in before:
        X = step.transform(X)
    Xp = net._prepare_X(X)
    if not (torch.is_tensor(Xp) or isinstance(Xp, np.ndarray)):
        raise invalid_value("X", type(Xp).__name__, "an array-like or a torch.Tensor of rows")
    device = torch.device(net.device)
    Xt = torch.as_tensor(Xp, dtype=torch.float32, device=device)
    log_proba = isinstance(getattr(net, "criterion_", None), nn.NLLLoss)
    n_classes = len(net.classes_)
    out = np.empty((n_samples, len(Xt), n_classes), dtype=np.float32)
    with torch.no_grad(), dropout_only(module), _seeded(seed, device):
        for t in range(n_samples):
            for start in range(0, len(Xt), batch_size):
                scores = module(Xt[start:start + batch_size])
                if isinstance(scores, (tuple, list)):  # skorch's convention: first output
                    scores = scores[0]
                proba = scores.exp() if log_proba else torch.softmax(scores, dim=-1)
                out[t, start:start + batch_size] = proba.float().cpu().numpy()
    return out


# --------------------------------------------------------------------------- decomposition


def _check_stack(P: Any, argument: str = "P") -> np.ndarray:
    """Validate a ``(n_members, n_samples, n_classes)`` stack; float64, rows renormalised."""
    try:
        arr = np.asarray(P, dtype=np.float64)
    except (TypeError, ValueError):
        raise invalid_value(argument, type(P).__name__,
                            "a numeric array of shape (n_members, n_samples, n_classes)") from None
    if arr.ndim != 3 or 0 in arr.shape:
        hint = " (one model's (n_samples, n_classes) proba: use P[None])" if arr.ndim == 2 else ""
        raise ValueError(f"{argument} must be an array of shape (n_members, n_samples, "
                         f"n_classes), got shape {arr.shape}{hint}.")
    flat = _check_proba(arr.reshape(-1, arr.shape[2]), argument=f"{argument} (as rows)")
    return flat.reshape(arr.shape)


def _entropy_rows(p: np.ndarray) -> np.ndarray:
    # predictive_entropy over the last axis of an already validated stack
    return predictive_entropy(p.reshape(-1, p.shape[-1])).reshape(p.shape[:-1])


def _decompose(P: np.ndarray) -> Dict[str, np.ndarray]:
    mean = P.mean(axis=0)
    total = predictive_entropy(mean)
    aleatoric = _entropy_rows(P).mean(axis=0)
    epistemic = np.clip(total - aleatoric, 0.0, None)
    votes = P.argmax(axis=2)
    disagree = (votes != mean.argmax(axis=1)[None, :]).mean(axis=0)
    return {"predictive_entropy": total, "expected_entropy": aleatoric,
            "mutual_information": epistemic, "disagreement": disagree}


def expected_entropy(P: Any) -> np.ndarray:
    """Aleatoric uncertainty: the mean over members of each member's predictive entropy.

    Parameters
    ----------
    P : array-like of shape (n_members, n_samples, n_classes)
        Stacked probabilities (ensemble members or MC-dropout samples).

    Returns
    -------
    ndarray of shape (n_samples,), float64
        In nats; between 0 and ``log(n_classes)``.

    Examples
    --------
    >>> P = [[[0.5, 0.5], [1.0, 0.0]], [[0.5, 0.5], [0.0, 1.0]]]
    >>> expected_entropy(P).round(6)
    array([0.693147, 0.      ])
    """
    return _entropy_rows(_check_stack(P)).mean(axis=0)


def mutual_information(P: Any) -> np.ndarray:
    """Epistemic uncertainty: entropy of the mean minus the mean entropy (BALD).

    ``predictive_entropy(P.mean(0)) - expected_entropy(P)``, the mutual information between the
    prediction and the choice of member; 0 when all members agree, ``log 2`` for two confident
    members that contradict each other. Rounding below 0 is clipped to 0.

    Parameters
    ----------
    P : array-like of shape (n_members, n_samples, n_classes)

    Returns
    -------
    ndarray of shape (n_samples,), float64, >= 0

    Examples
    --------
    >>> P = [[[0.5, 0.5], [1.0, 0.0]], [[0.5, 0.5], [0.0, 1.0]]]
    >>> mutual_information(P).round(6)
    array([0.      , 0.693147])
    """
    return _decompose(_check_stack(P))["mutual_information"]


def disagreement(P: Any) -> np.ndarray:
    """Fraction of members whose predicted class differs from the ensemble's.

    The ensemble's prediction is the argmax of ``P.mean(0)``; ties go to the first class, as
    in ``predict``.

    Parameters
    ----------
    P : array-like of shape (n_members, n_samples, n_classes)

    Returns
    -------
    ndarray of shape (n_samples,), float64 in [0, 1)

    Examples
    --------
    >>> P = [[[0.9, 0.1]], [[0.8, 0.2]], [[0.3, 0.7]]]  # the mean favours class 0
    >>> disagreement(P).round(4)
    array([0.3333])
    """
    return _decompose(_check_stack(P))["disagreement"]


def uncertainty_report(P: Any) -> Dict[str, np.ndarray]:
    """All four per-sample uncertainties of a stack of probabilities.

    Parameters
    ----------
    P : array-like of shape (n_members, n_samples, n_classes)
        E.g. :func:`mc_dropout_proba`'s output or the members' ``predict_proba`` stacked.

    Returns
    -------
    dict of str to ndarray of shape (n_samples,)
        ``predictive_entropy`` (total: entropy of ``P.mean(0)``), ``expected_entropy``
        (aleatoric), ``mutual_information`` (epistemic, total - aleatoric, clipped at 0) and
        ``disagreement``.

    Examples
    --------
    >>> P = [[[1.0, 0.0], [0.5, 0.5]], [[0.0, 1.0], [0.5, 0.5]]]
    >>> for name, values in uncertainty_report(P).items():
    ...     print(name, values.round(4))
    predictive_entropy [0.6931 0.6931]
    expected_entropy [0.     0.6931]
    mutual_information [0.6931 0.    ]
    disagreement [0.5 0. ]
    """
    return _decompose(_check_stack(P))


# --------------------------------------------------------------------------- temperature


def _log_softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=1, keepdims=True))


class TemperatureScaler(BaseEstimator):
    """Calibrate probabilities with one temperature: ``softmax(log(p) / T)``.

    ``fit`` finds the ``T`` that minimises the negative log-likelihood of the scaled
    probabilities on held-out data (Guo et al., "On Calibration of Modern Neural Networks",
    2017). ``T > 1`` softens overconfident predictions, ``T < 1`` sharpens underconfident ones;
    the argmax of each row never changes, so accuracy does not either. The input may be
    probabilities (e.g. ``predict_proba``; logits ``log(max(p, 1e-12))`` are used) or raw
    logits (``inputs="logits"``).

    The NLL is convex in ``1/T``, so the bounded 1-D search over ``log T`` (scipy's
    ``minimize_scalar``) finds the global minimum within ``bounds``; a minimum on a bound
    triggers a warning.

    Parameters
    ----------
    bounds : (float, float), default=(0.05, 20.0)
        Range searched for ``T``, ``0 < low < high``.
    inputs : {"proba", "logits"}, default="proba"
        What ``fit`` and ``transform`` receive: probability rows summing to 1, or logits.

    Attributes
    ----------
    temperature_ : float
        The fitted temperature.
    n_features_in_ : int
        Number of classes (columns) seen in ``fit``.
    nll_before_, nll_after_ : float
        NLL of the fit data before and after scaling.

    Examples
    --------
    >>> import numpy as np
    >>> p = np.array([[0.99, 0.01], [0.98, 0.02], [0.03, 0.97], [0.95, 0.05]])
    >>> ts = TemperatureScaler().fit(p, ["a", "a", "b", "b"], classes=["a", "b"])
    >>> round(ts.temperature_, 2) > 1  # one confident mistake: soften
    True
    >>> ts.transform(p).argmax(1)
    array([0, 0, 1, 0])
    """

    def __init__(self, bounds: Sequence[float] = (0.05, 20.0), inputs: str = "proba"):
        self.bounds = bounds
        self.inputs = inputs

    # ----------------------------------------------------------------- validation

    def _check_bounds(self) -> Tuple[float, float]:
        b = self.bounds
        ok = isinstance(b, (tuple, list, np.ndarray)) and len(b) == 2 and all(
            isinstance(v, Real) and not isinstance(v, bool) and math.isfinite(v) for v in b)
        if not ok or not 0 < b[0] < b[1]:
            raise invalid_value("bounds", b, "a pair (low, high) of finite numbers with "
                                "0 < low < high")
        return float(b[0]), float(b[1])

    def _logits(self, X: Any, n_samples: Optional[int] = None,
                n_classes: Optional[int] = None, context: str = "") -> np.ndarray:
        if self.inputs not in ("proba", "logits"):
            raise invalid_value("inputs", self.inputs, "'proba' or 'logits'")
        if self.inputs == "proba":
            p = _check_proba(X, n_classes=n_classes, n_samples=n_samples, argument="proba",
                             context=context)
            return np.log(np.clip(p, PROBA_FLOOR, None))
        try:
            z = np.asarray(X, dtype=np.float64)
        except (TypeError, ValueError):
            raise invalid_value("logits", type(X).__name__,
                                "a numeric array of shape (n_samples, n_classes)") from None
        if z.ndim != 2 or 0 in z.shape or (n_classes is not None and z.shape[1] != n_classes) \
                or (n_samples is not None and z.shape[0] != n_samples):
            expected = f"({n_samples if n_samples is not None else 'n_samples'}, " \
                       f"{n_classes if n_classes is not None else 'n_classes'})"
            raise ValueError(f"logits must be an array of shape {expected}{context}, "
                             f"got shape {z.shape}.")
        if not np.isfinite(z).all():
            raise invalid_value("logits", "non-finite values", "finite")
        return z

    # ----------------------------------------------------------------- sklearn API

    def fit(self, proba_or_logits: Any, y: Any, classes: Optional[Sequence] = None
            ) -> "TemperatureScaler":
        """Learn ``temperature_`` on held-out predictions and their true labels.

        Parameters
        ----------
        proba_or_logits : array-like of shape (n_samples, n_classes)
            Probabilities (``inputs="proba"``) or logits (``inputs="logits"``), columns in the
            order of ``classes``.
        y : array-like of shape (n_samples,)
            True labels: values of ``classes``, or column indices when ``classes`` is None
            (other values are then read as the sorted labels, as in :mod:`nnpipe.metrics`).
        classes : array-like of shape (n_classes,), optional
            Class of each column (strings allowed), e.g. the classifier's ``classes_``.

        Returns
        -------
        self
        """
        from scipy.optimize import minimize_scalar

        low, high = self._check_bounds()
        y_arr = np.asarray(y)
        if y_arr.ndim == 2 and y_arr.shape[1] == 1:
            y_arr = y_arr[:, 0]
        if y_arr.ndim != 1:
            raise ValueError(f"y must be 1-D of shape (n_samples,), got shape {y_arr.shape}.")
        n_classes = None
        if classes is not None:
            n_classes = len(np.asarray(classes).reshape(-1))
        context = f" (one row per y entry, len(y)={len(y_arr)}" + (
            "" if classes is None else f"; one column per class, len(classes)={n_classes}") + ")"
        z = self._logits(proba_or_logits, n_samples=len(y_arr), n_classes=n_classes,
                         context=context)
        if z.shape[1] < 2:
            raise ValueError(f"{self.inputs} must have at least 2 columns (classes) to scale, "
                             f"got shape {z.shape}.")
        idx = _encode(y_arr, z.shape[1], classes, argument="y", labels_name="classes")
        present = np.unique(idx)
        if len(present) < 2:
            raise ValueError("y must hold at least 2 distinct classes to fit a temperature, got "
                             f"1 class: {np.unique(y_arr).tolist()}.")
        rows = np.arange(len(idx))

        def nll_at(log_t: float) -> float:
            return float(-_log_softmax(z / math.exp(log_t))[rows, idx].mean())

        result = minimize_scalar(nll_at, bounds=(math.log(low), math.log(high)),
                                 method="bounded", options={"xatol": 1e-6})
        log_t, best = float(result.x), float(result.fun)
        # Brent's bounded search never evaluates the bounds themselves: check them, so that a
        # minimum on a bound (or a loss flat to rounding towards it) is reported as such
        for edge in (math.log(low), math.log(high)):
            value = nll_at(edge)
            if value <= best:
                log_t, best = edge, value
        t = float(math.exp(log_t))
        if log_t in (math.log(low), math.log(high)):
            warnings.warn(f"TemperatureScaler: the best temperature is at the edge of bounds="
                          f"{(low, high)} (T={t:.4g}); widen bounds if this is not expected.",
                          UserWarning, stacklevel=2)
        self.temperature_ = t
        self.n_features_in_ = int(z.shape[1])
        self.nll_before_ = nll_at(0.0)
        self.nll_after_ = best
        return self

    def transform(self, proba_or_logits: Any) -> np.ndarray:
        """Calibrated probabilities ``softmax(logits / temperature_)``.

        Parameters
        ----------
        proba_or_logits : array-like of shape (n_samples, n_classes)
            As in ``fit`` (same kind, same number of columns).

        Returns
        -------
        ndarray of shape (n_samples, n_classes), float64
            Rows sum to 1; each row's argmax is unchanged.
        """
        check_is_fitted(self, "temperature_")
        z = self._logits(proba_or_logits, n_classes=self.n_features_in_,
                         context=f" (fitted on {self.n_features_in_} classes)")
        return np.exp(_log_softmax(z / self.temperature_))

    def fit_transform(self, proba_or_logits: Any, y: Any,
                      classes: Optional[Sequence] = None) -> np.ndarray:
        """``fit(proba_or_logits, y, classes)`` then ``transform(proba_or_logits)``."""
        return self.fit(proba_or_logits, y, classes=classes).transform(proba_or_logits)

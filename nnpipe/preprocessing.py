"""Input preprocessing for neural networks: the transformers scikit-learn lacks.

Feature-wise standardization, feature-wise min-max scaling and PCA whitening already exist in
scikit-learn (:class:`~sklearn.preprocessing.StandardScaler`,
:class:`~sklearn.preprocessing.MinMaxScaler`, :class:`~sklearn.decomposition.PCA` with
``whiten=True``) and are only *named* here, through :func:`make_preprocessor`. This module adds:

* :class:`Centerer` -- feature-wise, global (one scalar, as for grey images) or per-sample
  mean subtraction;
* :class:`Standardizer` -- global or per-sample standardization;
* :class:`ZCAWhitener` -- ZCA ("Mahalanobis") whitening, which keeps the number of features and
  so keeps images as images.

All transformers take flat ``(n_samples, n_features)`` matrices (images are flattened rows),
compute in float64 and return the input's floating dtype (float32 stays float32, float64 stays
float64; integer input becomes float64).
"""

from __future__ import annotations

import numbers
from functools import partial
from typing import Any, Optional

import numpy as np
from sklearn.base import BaseEstimator, OneToOneFeatureMixin, TransformerMixin, clone
from sklearn.decomposition import PCA
from sklearn.preprocessing import MinMaxScaler, StandardScaler
from sklearn.utils.metaestimators import available_if
from sklearn.utils.validation import FLOAT_DTYPES, check_is_fitted, validate_data

from nnpipe._registry import Registry, did_you_mean, invalid_value

__all__ = [
    "Centerer",
    "Standardizer",
    "ZCAWhitener",
    "make_preprocessor",
    "PREPROCESSOR_REGISTRY",
    "PREPROCESSORS",
]


def _check_mode(owner: str, mode: Any, allowed: tuple, hint: str = "") -> None:
    if isinstance(mode, str) and mode in allowed:
        return
    choices = ", ".join(repr(m) for m in allowed)
    err = invalid_value(f"{owner}: mode", mode, f"one of {choices}")
    raise ValueError(str(err) + did_you_mean(mode, allowed) + hint)


def _too_large(owner: str, X: np.ndarray) -> ValueError:
    big = float(np.max(np.abs(X))) if X.size else 0.0
    return ValueError(f"{owner}: X has values too large for float64 arithmetic (max |x| = "
                      f"{big:.3g}): the statistics overflow to inf. Scale X down first.")


def _finite_stats(owner: str, X: np.ndarray, *stats) -> None:
    """Raise if a statistic computed from ``X`` overflowed (values near the float64 limit)."""
    if not all(np.isfinite(s).all() for s in stats):
        raise _too_large(owner, X)


def _output(owner: str, out: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """``out`` in ``dtype``; a result beyond that dtype's range raises instead of becoming inf."""
    if np.isfinite(out).all():
        with np.errstate(over="ignore"):
            cast = out.astype(dtype, copy=False)
        if cast is out or np.isfinite(cast).all():
            return cast
    big = float(np.nanmax(np.abs(out))) if out.size else 0.0
    raise ValueError(f"{owner}: the result has values too large for {np.dtype(dtype).name} "
                     f"(max |value| = {big:.3g}): pass X as float64, or scale X down.")


def _safe_std(X: np.ndarray, axis: Optional[int] = None, owner: str = "Standardizer") -> tuple:
    """Mean and std of float64 ``X``; a (numerically) constant slice gets std 1, never 0.

    A slice counts as constant when its variance is within floating-point noise of zero (the
    criterion of scikit-learn's ``StandardScaler``), so constant data maps to 0, not to noise.
    """
    n = X.size if axis is None else X.shape[axis]
    keep = axis is not None
    with np.errstate(over="ignore", invalid="ignore"):
        mean = X.mean(axis=axis, keepdims=keep)
        var = ((X - mean) ** 2).mean(axis=axis, keepdims=keep)
    _finite_stats(owner, X, mean, var)
    eps = np.finfo(np.float64).eps
    sd = np.sqrt(var)
    # var <= n*eps*var + (n*mean*eps)**2, in a form that cannot overflow for huge means
    constant = sd <= np.hypot(np.sqrt(n * eps) * sd, n * eps * np.abs(mean))
    std = np.where(constant, 1.0, sd)
    return mean, std


class _Base(OneToOneFeatureMixin, TransformerMixin, BaseEstimator):
    """Shared plumbing: dtype-preserving validation (float64 compute, input float dtype out)."""

    def _validate(self, X: Any, reset: bool, copy: bool = False) -> np.ndarray:
        # scikit-learn's finiteness check sums X first, which may overflow (and warn) for
        # finite values near the float64 limit before it checks them one by one
        with np.errstate(over="ignore", invalid="ignore"):
            X = validate_data(self, X, reset=reset, dtype=FLOAT_DTYPES, copy=copy)
        return X if X.flags.writeable else X.copy()  # read-only input is never written to

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.transformer_tags.preserves_dtype = ["float64", "float32"]
        return tags


class Centerer(_Base):
    """Subtract a mean: per feature, one global scalar, or each sample's own mean.

    Parameters
    ----------
    mode : {"feature", "global", "sample"}, default="feature"
        ``"feature"`` subtracts each column's training mean; ``"global"`` subtracts the single
        scalar training mean (grey images); ``"sample"`` subtracts each row's own mean and is
        stateless (``fit`` only records ``n_features_in_``).

    Attributes
    ----------
    mean_ : ndarray of shape (n_features,) or float
        Training mean (``"feature"``: per column, ``"global"``: scalar). Absent for ``"sample"``.
    n_features_in_ : int
        Number of features seen during ``fit``.

    Examples
    --------
    >>> import numpy as np
    >>> X = np.array([[0.0, 2.0], [2.0, 6.0]])
    >>> Centerer().fit_transform(X)
    array([[-1., -2.],
           [ 1.,  2.]])
    >>> Centerer(mode="global").fit(X).transform([[2.5, 2.5]])
    array([[0., 0.]])
    >>> Centerer(mode="sample").fit_transform(X)
    array([[-1.,  1.],
           [-2.,  2.]])
    """

    _MODES = ("feature", "global", "sample")

    def __init__(self, mode: str = "feature"):
        self.mode = mode

    def fit(self, X: Any, y: Any = None) -> "Centerer":
        """Learn the mean (nothing but ``n_features_in_`` for ``mode="sample"``)."""
        _check_mode("Centerer", self.mode, self._MODES)
        X = self._validate(X, reset=True).astype(np.float64, copy=False)
        with np.errstate(over="ignore", invalid="ignore"):
            if self.mode == "feature":
                self.mean_ = X.mean(axis=0)
            elif self.mode == "global":
                self.mean_ = float(X.mean())
        _finite_stats("Centerer", X, getattr(self, "mean_", 0.0))
        return self

    def transform(self, X: Any) -> np.ndarray:
        """Subtract the mean; same shape and floating dtype as ``X``."""
        check_is_fitted(self)
        X = self._validate(X, reset=False)
        X64 = X.astype(np.float64, copy=False)
        with np.errstate(over="ignore", invalid="ignore"):
            if self.mode == "sample":
                mean = X64.mean(axis=1, keepdims=True)
                _finite_stats("Centerer", X64, mean)
                out = X64 - mean
            else:
                out = X64 - self.mean_
        return _output("Centerer", out, X.dtype)

    @available_if(lambda self: self.mode in ("feature", "global"))
    def inverse_transform(self, X: Any) -> np.ndarray:
        """Add the training mean back (``mode`` "feature" or "global" only)."""
        check_is_fitted(self)
        X = self._validate(X, reset=False)
        with np.errstate(over="ignore", invalid="ignore"):
            out = X.astype(np.float64, copy=False) + self.mean_
        return _output("Centerer", out, X.dtype)


class Standardizer(_Base):
    """Standardize with one global mean/std, or each sample with its own mean/std.

    Feature-wise standardization is :class:`sklearn.preprocessing.StandardScaler`
    (``make_preprocessor("standardize")``) and is deliberately not duplicated here.

    Parameters
    ----------
    mode : {"global", "sample"}, default="global"
        ``"global"``: ``(X - mean) / std`` with the scalar training mean and (population) std;
        ``"sample"``: each row ``(x - x.mean()) / x.std()``, stateless. A zero std (constant
        data or constant row) is treated as 1, so the output is 0 there, never inf/NaN.

    Attributes
    ----------
    mean_ : float
        Scalar training mean (``"global"`` only).
    scale_ : float
        Scalar training std, 1.0 where the training data is constant (``"global"`` only).
    n_features_in_ : int
        Number of features seen during ``fit``.

    Examples
    --------
    >>> import numpy as np
    >>> X = np.array([[0.0, 2.0], [4.0, 6.0]])
    >>> s = Standardizer().fit(X)
    >>> print(s.mean_, round(s.scale_, 4))
    3.0 2.2361
    >>> Standardizer(mode="sample").fit_transform(X)
    array([[-1.,  1.],
           [-1.,  1.]])
    """

    _MODES = ("global", "sample")

    def __init__(self, mode: str = "global"):
        self.mode = mode

    def fit(self, X: Any, y: Any = None) -> "Standardizer":
        """Learn the global mean and std (nothing but ``n_features_in_`` for "sample")."""
        hint = (
            " For feature-wise standardization use sklearn.preprocessing.StandardScaler"
            " (make_preprocessor('standardize'))."
            if self.mode == "feature"
            else ""
        )
        _check_mode("Standardizer", self.mode, self._MODES, hint)
        X = self._validate(X, reset=True).astype(np.float64, copy=False)
        if self.mode == "global":
            mean, std = _safe_std(X)
            self.mean_, self.scale_ = float(mean), float(std)
        return self

    def transform(self, X: Any) -> np.ndarray:
        """Standardize; same shape and floating dtype as ``X``."""
        check_is_fitted(self)
        X = self._validate(X, reset=False)
        X64 = X.astype(np.float64, copy=False)
        with np.errstate(over="ignore", invalid="ignore"):
            if self.mode == "sample":
                mean, std = _safe_std(X64, axis=1)
                out = (X64 - mean) / std
            else:
                out = (X64 - self.mean_) / self.scale_
        return _output("Standardizer", out, X.dtype)

    @available_if(lambda self: self.mode == "global")
    def inverse_transform(self, X: Any) -> np.ndarray:
        """Undo global standardization (``mode="global"`` only)."""
        check_is_fitted(self)
        X = self._validate(X, reset=False)
        with np.errstate(over="ignore", invalid="ignore"):
            out = X.astype(np.float64, copy=False) * self.scale_ + self.mean_
        return _output("Standardizer", out, X.dtype)


class ZCAWhitener(_Base):
    """ZCA (zero-phase, Mahalanobis) whitening: decorrelate features, keep their layout.

    ``fit`` centres the data, computes its covariance (``ddof=1``, as
    :class:`~sklearn.decomposition.PCA` does), takes ``Sigma = U diag(lambda) U^T`` with
    :func:`numpy.linalg.eigh` and stores ``W = U diag(1 / sqrt(lambda + epsilon)) U^T``;
    ``transform`` returns ``(X - mean_) @ W``. Negative round-off eigenvalues are clipped to 0
    before ``epsilon`` is added, so zero-variance directions (constant or duplicated columns)
    are scaled by ``1 / sqrt(epsilon)`` instead of divided by zero.

    Among all whitening transforms, ZCA's output is the one closest (in mean squared distance)
    to the centred input, and it has as many features as the input: a whitened image is still
    an image, usable by a CNN. PCA whitening (``make_preprocessor("pca_whiten")``) rotates into
    the principal axes, may drop components and destroys the spatial layout, so after it only
    an MLP makes sense.

    Parameters
    ----------
    epsilon : float, default=1e-5
        Smoothing added to every eigenvalue; must be > 0. Larger values amplify low-variance
        (often noise) directions less: their output variance is ``lambda / (lambda + epsilon)``.
        Scale it to the data (e.g. ~0.1 for pixels in [0, 1]).
    copy : bool, default=True
        If False, float64 input may be centred in place by ``fit``/``transform``.

    Attributes
    ----------
    mean_ : ndarray of shape (n_features,)
        Training mean.
    whitening_ : ndarray of shape (n_features, n_features)
        Symmetric whitening matrix ``W``.
    components_ : ndarray of shape (n_features, n_features)
        Alias of ``whitening_``.
    dewhitening_ : ndarray of shape (n_features, n_features)
        ``U diag(sqrt(lambda + epsilon)) U^T``, the inverse of ``W``.
    eigenvalues_ : ndarray of shape (n_features,)
        Clipped covariance eigenvalues, ascending.
    n_features_in_ : int
        Number of features seen during ``fit``.

    Examples
    --------
    >>> import numpy as np
    >>> rng = np.random.default_rng(0)
    >>> X = rng.normal(size=(500, 3)) @ np.array([[2.0, 1.0, 0.0], [0.0, 1.0, 0.5], [0, 0, 0.1]])
    >>> Z = ZCAWhitener(epsilon=1e-8).fit_transform(X)
    >>> Z.shape
    (500, 3)
    >>> np.allclose(np.cov(Z, rowvar=False), np.eye(3), atol=1e-6)
    True
    """

    def __init__(self, epsilon: float = 1e-5, copy: bool = True):
        self.epsilon = epsilon
        self.copy = copy

    def fit(self, X: Any, y: Any = None) -> "ZCAWhitener":
        """Learn ``mean_``, ``whitening_`` and ``dewhitening_`` from ``X``."""
        eps = self.epsilon
        if (
            not isinstance(eps, numbers.Real)
            or isinstance(eps, bool)
            or not np.isfinite(eps)
            or eps <= 0
        ):
            raise invalid_value(
                "ZCAWhitener: epsilon",
                eps,
                "a finite float > 0 (it keeps zero-variance directions finite)",
            )
        X = self._validate(X, reset=True, copy=self.copy).astype(np.float64, copy=False)
        with np.errstate(over="ignore", invalid="ignore"):
            mean = X.mean(axis=0)
            _finite_stats("ZCAWhitener", X, mean)
            X -= mean
            cov = (X.T @ X) / max(X.shape[0] - 1, 1)
        _finite_stats("ZCAWhitener", X, cov)  # eigh would fail on inf / NaN
        self.mean_ = mean
        lam, U = np.linalg.eigh((cov + cov.T) / 2)
        lam = np.clip(lam, 0.0, None)
        self.eigenvalues_ = lam
        self.whitening_ = (U / np.sqrt(lam + eps)) @ U.T
        self.dewhitening_ = (U * np.sqrt(lam + eps)) @ U.T
        self.components_ = self.whitening_
        return self

    def transform(self, X: Any) -> np.ndarray:
        """Whiten: ``(X - mean_) @ whitening_``; same shape and floating dtype as ``X``."""
        check_is_fitted(self)
        X = self._validate(X, reset=False, copy=self.copy)
        X64 = X.astype(np.float64, copy=False)
        with np.errstate(over="ignore", invalid="ignore"):
            X64 -= self.mean_
            out = X64 @ self.whitening_
        return _output("ZCAWhitener", out, X.dtype)

    def inverse_transform(self, X: Any) -> np.ndarray:
        """Map whitened data back: ``X @ dewhitening_ + mean_``."""
        check_is_fitted(self)
        X = self._validate(X, reset=False)
        with np.errstate(over="ignore", invalid="ignore"):
            out = X.astype(np.float64, copy=False) @ self.dewhitening_ + self.mean_
        return _output("ZCAWhitener", out, X.dtype)


PREPROCESSOR_REGISTRY = Registry("make_preprocessor: name", "a scikit-learn transformer instance")
"""Names accepted by :func:`make_preprocessor`, each mapped to a factory of a fresh estimator."""

_FACTORIES: dict = {
    "center": partial(Centerer, mode="feature"),
    "global_center": partial(Centerer, mode="global"),
    "sample_center": partial(Centerer, mode="sample"),
    "standardize": StandardScaler,
    "global_standardize": partial(Standardizer, mode="global"),
    "sample_standardize": partial(Standardizer, mode="sample"),
    "minmax": partial(MinMaxScaler, feature_range=(-1, 1)),
    "pca_whiten": partial(PCA, whiten=True),
    "zca": ZCAWhitener,
}
for _name, _factory in _FACTORIES.items():
    PREPROCESSOR_REGISTRY.register(_name, _factory)

PREPROCESSORS: tuple = tuple(PREPROCESSOR_REGISTRY.names())
"""The valid preprocessor names, sorted."""


def _is_transformer(obj: Any) -> bool:
    return isinstance(obj, BaseEstimator) and hasattr(obj, "fit") and hasattr(obj, "transform")


def make_preprocessor(name: Any, **params: Any) -> BaseEstimator:
    """Build a fresh, unfitted preprocessing transformer from its registry name.

    ========================  ====================================================  ==========
    name                      estimator                                             features
    ========================  ====================================================  ==========
    ``"center"``              ``Centerer(mode="feature")``                          kept
    ``"global_center"``       ``Centerer(mode="global")``                           kept
    ``"sample_center"``       ``Centerer(mode="sample")``                           kept
    ``"standardize"``         ``sklearn.preprocessing.StandardScaler()``            kept
    ``"global_standardize"``  ``Standardizer(mode="global")``                       kept
    ``"sample_standardize"``  ``Standardizer(mode="sample")``                       kept
    ``"minmax"``              ``MinMaxScaler(feature_range=(-1, 1))``               kept
    ``"pca_whiten"``          ``sklearn.decomposition.PCA(whiten=True)``            reduced
    ``"zca"``                 ``ZCAWhitener()``                                     kept
    ========================  ====================================================  ==========

    PCA whitening rotates onto principal axes and (with ``n_components``) drops some: the
    output is no longer an image, so only an MLP makes sense after it. ZCA whitening keeps one
    output per input pixel in the original layout, so images stay images (CNN-ready).

    Parameters
    ----------
    name : str or transformer
        A name from :data:`PREPROCESSORS` (case-insensitive), or a scikit-learn transformer
        instance, which is cloned.
    **params
        Estimator parameters set on top of the defaults (e.g. ``n_components=0.99`` for
        ``"pca_whiten"``, ``epsilon=0.1`` for ``"zca"``).

    Returns
    -------
    estimator : BaseEstimator
        A new unfitted transformer.

    Raises
    ------
    ValueError
        Unknown name (the message lists the valid ones and the closest match) or a parameter
        the estimator does not have.

    Examples
    --------
    >>> make_preprocessor("pca_whiten", n_components=0.95)
    PCA(n_components=0.95, whiten=True)
    >>> make_preprocessor("zca", epsilon=0.1)
    ZCAWhitener(epsilon=0.1)
    >>> make_preprocessor("zcaa")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    ValueError: make_preprocessor: name must be one of ... got 'zcaa'. Did you mean 'zca'?
    """
    found: Any = PREPROCESSOR_REGISTRY.get(name, accept=_is_transformer)
    estimator = clone(found) if _is_transformer(found) else found()
    return estimator.set_params(**params) if params else estimator

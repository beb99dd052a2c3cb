"""Ensembles of nnpipe networks: member strategies and combiners, as sklearn estimators.

Members come from several independent runs (``seeds``, ``topk``, ``bagging``; trained in
parallel with joblib, on a Dask cluster through joblib's dask backend) or from one run
(``snapshot``, ``checkpoints``, ``swa``). Combiners that learn (``weighted``, ``greedy``,
``stacking``) and temperature scaling fit on a validation split held out of the training data
before any member trains: the selection never sees the test set, nor rows the members saw.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
import os
from numbers import Integral, Real
from typing import Any, Dict, Iterator, List, Optional

import numpy as np
import torch
from sklearn.base import BaseEstimator, ClassifierMixin, RegressorMixin, clone
from sklearn.model_selection import train_test_split
from sklearn.utils.validation import check_is_fitted, validate_data

from ._registry import Registry, invalid_value

__all__ = ["EnsembleClassifier", "EnsembleRegressor", "KINDS", "COMBINERS"]

logger = logging.getLogger(__name__)

KINDS = Registry("ensemble.kind", "a member strategy")
for _k in ("seeds", "topk", "bagging", "snapshot", "checkpoints", "swa"):
    KINDS.register(_k, _k)
COMBINERS = Registry("ensemble.combine", "a combiner")
for _c in ("mean", "vote", "weighted", "greedy", "stacking"):
    COMBINERS.register(_c, _c)
_NEEDS_VALIDATION = ("weighted", "greedy", "stacking")


def _net(est):
    """The nnpipe network inside an estimator or a Pipeline."""
    return est[-1] if hasattr(est, "steps") else est


def _prefix(est) -> str:
    return f"{est.steps[-1][0]}__" if hasattr(est, "steps") else ""


def _int(value) -> bool:
    return isinstance(value, Integral) and not isinstance(value, bool)


@contextlib.contextmanager
def _torch_threads(threads: int) -> Iterator[None]:
    """Run the block with ``threads`` torch threads, then restore the count found before."""
    previous = torch.get_num_threads()
    if threads != previous:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        if torch.get_num_threads() != previous:
            torch.set_num_threads(previous)


def _fit_member(est, X, y, seed: int, threads: int, caller=None):
    """Fit one member (in a joblib worker): one torch thread by default, no oversubscription.

    ``caller`` is ``(pid, torch threads)`` of the process that started the ensemble. In a worker
    *thread* of that process (threading backend, an in-process dask cluster) the members take
    turns (nnpipe trains one network at a time per process), so each uses the caller's thread
    count. The count found before is restored afterwards: ``torch.set_num_threads`` is
    process-wide (it sets the count every later thread starts with, and the count changes CPU
    kernels' float results), and a reused worker process runs other code after this member.
    """
    if caller is not None and caller[0] == os.getpid():
        threads = caller[1]
    with _torch_threads(threads):
        return est.fit(X, y), seed


def _fit_with_retry(est, X, y, seed, threads, spare_seed, max_retries, caller=None):
    """Fit a member; a diverging one is retried with a new seed, then the fit fails loudly."""
    from .estimators import DivergenceError

    attempts = []
    for attempt in range(max_retries + 1):
        try:
            return _fit_member(est, X, y, seed, threads, caller)
        except DivergenceError as exc:
            attempts.append(f"seed {seed}: {exc}")
            failed, seed = seed, spare_seed + 1000 * (attempt + 1)
            if attempt < max_retries:
                logger.info("ensemble member with seed %d diverged (%s); retrying with seed %d",
                            failed, exc, seed)
            est.set_params(**{_prefix(est) + "random_state": seed})
    raise RuntimeError("ensemble member diverged and was not dropped from the average: "
                       + " | ".join(attempts) + ". Lower lr or set clip_grad_norm.")


class _Snapshots:
    """skorch callback keeping copies of the module's weights at chosen epochs."""

    def __new__(cls, epochs):
        from skorch.callbacks import Callback

        class Snapshots(Callback):
            def __init__(self, epochs):
                self.epochs = set(epochs)

            def initialize(self):
                self.states_ = {}
                return self

            def on_epoch_end(self, net, **kwargs):
                epoch = len(net.history)
                if epoch in self.epochs:
                    self.states_[epoch] = copy.deepcopy(net.module_.state_dict())

        return Snapshots(epochs)


class _SWA:
    """skorch callback: stochastic weight averaging from epoch ``start`` on (Izmailov 2018)."""

    def __new__(cls, start):
        from skorch.callbacks import Callback

        class SWA(Callback):
            def __init__(self, start):
                self.start = start

            def initialize(self):
                self.averaged_ = None
                return self

            def on_epoch_end(self, net, **kwargs):
                if len(net.history) >= self.start:
                    if self.averaged_ is None:
                        self.averaged_ = torch.optim.swa_utils.AveragedModel(net.module_)
                    self.averaged_.update_parameters(net.module_)  # the first call counts too

        return SWA(start)


class _BaseEnsemble(BaseEstimator):
    def __init__(self, estimator=None, *, kind: str = "seeds", n_members: int = 5,
                 combine: str = "mean", configs: Optional[List[Dict[str, Any]]] = None,
                 validation_fraction: Optional[float] = None, temperature: bool = False,
                 swa_start: float = 0.75, n_jobs: Optional[int] = 1, backend: Optional[str] = None,
                 meta_estimator=None, random_state: Optional[int] = 0, max_retries: int = 1):
        self.estimator = estimator
        self.kind = kind
        self.n_members = n_members
        self.combine = combine
        self.configs = configs
        self.validation_fraction = validation_fraction
        self.temperature = temperature
        self.swa_start = swa_start
        self.n_jobs = n_jobs
        self.backend = backend
        self.meta_estimator = meta_estimator
        self.random_state = random_state
        self.max_retries = max_retries

    # ----------------------------------------------------------------- checks

    def _check(self):
        KINDS.get(self.kind)
        COMBINERS.get(self.combine)
        n = self.n_members
        if not isinstance(n, Integral) or isinstance(n, bool) or n < 1:
            raise invalid_value("ensemble.n_members", n, "an int >= 1")
        if self.kind == "topk" and not self.configs:
            raise ValueError("ensemble.kind='topk' needs configs: the top trials of a finished "
                             "search (run the search stage with search.enabled: true first).")
        vf = self.validation_fraction
        if vf is not None and (not isinstance(vf, Real) or not 0 < vf < 1):
            raise invalid_value("ensemble.validation_fraction", vf, "a fraction in (0, 1) or None")
        if (self.combine in _NEEDS_VALIDATION or self.temperature) and vf is None:
            what = f"combine={self.combine!r}" if self.combine in _NEEDS_VALIDATION \
                else "temperature scaling"
            raise ValueError(f"ensemble: {what} is fitted on validation data, but "
                             "validation_fraction is None; set it (e.g. 0.2).")
        swa = self.swa_start
        if not (isinstance(swa, Real) and not isinstance(swa, bool) and 0 < swa < 1):
            raise invalid_value("ensemble.swa_start", swa, "a fraction in (0, 1)")
        for name, value, allowed, ok in (
                ("n_jobs", self.n_jobs, "None or a non-zero int (-1: all cores)",
                 self.n_jobs is None or _int(self.n_jobs) and self.n_jobs != 0),
                ("max_retries", self.max_retries, "an int >= 0",
                 _int(self.max_retries) and self.max_retries >= 0),
                ("random_state", self.random_state, "None or an int >= 0",
                 self.random_state is None or _int(self.random_state) and self.random_state >= 0),
                ("temperature", self.temperature, "true or false",
                 isinstance(self.temperature, (bool, np.bool_)))):
            if not ok:
                raise invalid_value(f"ensemble.{name}", value, allowed)
        if self.backend not in (None, "loky", "threading", "multiprocessing", "dask"):
            raise invalid_value("ensemble.backend", self.backend,
                                "None (loky), 'threading', 'multiprocessing' or 'dask'")

    def _base(self):
        from .estimators import NNClassifier, NNRegressor

        if self.estimator is not None:
            return self.estimator
        return NNClassifier() if isinstance(self, ClassifierMixin) else NNRegressor()

    def _split(self, X, y):
        if self.validation_fraction is None:
            return X, y, None, None
        strat = y if isinstance(self, ClassifierMixin) else None
        Xt, Xv, yt, yv = train_test_split(X, y, test_size=self.validation_fraction,
                                          stratify=strat, random_state=self.random_state)
        return Xt, yt, Xv, yv

    # ----------------------------------------------------------------- training members

    def _independent(self, X, y):
        """seeds / topk / bagging: independent runs, in parallel."""
        from joblib import Parallel, delayed

        base, seed0 = self._base(), int(self.random_state or 0)
        rng = np.random.RandomState(seed0)
        jobs = []
        n = len(self.configs) if self.kind == "topk" else self.n_members
        for i in range(n):
            est = clone(base)
            if self.kind == "topk":
                est.set_params(**self.configs[i])
            est.set_params(**{_prefix(est) + "random_state": seed0 + i})
            rows = rng.randint(0, len(X), len(X)) if self.kind == "bagging" else slice(None)
            jobs.append((est, rows, seed0 + i))
        n_jobs = self.n_jobs or 1
        threads = 1 if n_jobs != 1 else torch.get_num_threads()
        from joblib import parallel_config

        caller = (os.getpid(), torch.get_num_threads())
        tasks = (delayed(_fit_with_retry)(est, X[rows], y[rows], seed, threads, n + i,
                                          self.max_retries, caller)
                 for i, (est, rows, seed) in enumerate(jobs))
        # the dask backend registers itself through parallel_config; the others are passed to
        # Parallel directly so that joblib reuses its warm worker processes between ensembles
        if self.backend == "dask":
            with parallel_config(backend="dask"):
                results = Parallel(n_jobs=n_jobs)(tasks)
        else:
            results = Parallel(n_jobs=n_jobs, backend=self.backend)(tasks)
        self.members_ = [m for m, _ in results]
        self.member_seeds_ = [s for _, s in results]

    def _single_run(self, X, y):
        """snapshot / checkpoints / swa: members from one training run."""
        base = clone(self._base())
        net = _net(base)
        epochs, m = int(net.max_epochs), self.n_members
        p = _prefix(base)
        if self.kind == "snapshot":
            if m > epochs:
                raise ValueError(f"ensemble.kind='snapshot' with n_members={m} cycles but "
                                 f"max_epochs={epochs}: each cycle needs at least one epoch.")
            cycle = epochs // m
            base.set_params(**{p + "lr_schedule": "cosine_restarts",
                               p + "lr_schedule__cycle_epochs": cycle})
            keep = [cycle * (i + 1) for i in range(m)]
        elif self.kind == "checkpoints":
            if m > epochs:
                raise ValueError(f"ensemble.kind='checkpoints' with n_members={m} but "
                                 f"max_epochs={epochs}.")
            keep = list(range(epochs - m + 1, epochs + 1))
        else:
            keep = []
        if self.kind == "swa":
            cb = ("swa", _SWA(max(1, int(math.floor(self.swa_start * epochs)))))
        else:
            cb = ("snapshots", _Snapshots(keep))
        callbacks = list(net.callbacks or []) + [cb]
        base.set_params(**{p + "callbacks": callbacks})
        seed = int(self.random_state or 0)
        base.set_params(**{p + "random_state": _net(base).random_state or seed})
        fitted = _fit_with_retry(base, X, y, seed, torch.get_num_threads(), seed + 1,
                                 self.max_retries)[0]
        fnet = _net(fitted)
        state = dict(fnet.callbacks_)[cb[0]]
        if self.kind == "swa":
            members = [self._swa_member(fitted, state.averaged_, X)]
        else:
            members = []
            for epoch in sorted(state.states_):
                member = copy.deepcopy(fitted)
                _net(member).module_.load_state_dict(state.states_[epoch])
                members.append(member)
        for member in members:  # the callbacks hold weights: drop them from the members
            _net(member).callbacks = None
            _net(member).callbacks_ = [c for c in _net(member).callbacks_ if c[0] != cb[0]]
        self.members_ = members
        self.member_seeds_ = [seed] * len(members)

    def _swa_member(self, fitted, averaged, X):
        member = copy.deepcopy(fitted)
        net = _net(member)
        net.module_.load_state_dict(averaged.module.state_dict())
        has_bn = any(isinstance(mod, torch.nn.modules.batchnorm._BatchNorm)
                     for mod in net.module_.modules())
        if has_bn:  # recompute the batch-norm statistics for the averaged weights
            Xt = member[:-1].transform(X) if hasattr(member, "steps") else X
            data = torch.as_tensor(np.asarray(Xt, dtype=np.float32), device=net.device)
            loader = [data[i:i + 256] for i in range(0, len(data), 256)]
            torch.optim.swa_utils.update_bn(loader, net.module_)
            net.module_.eval()
        return member

    # ----------------------------------------------------------------- fit

    def fit(self, X, y):
        """Train the members (and fit the combiner on the validation split); returns self."""
        self._check()
        X, y = validate_data(self, X, y, reset=True, dtype=np.float32,
                             multi_output=not isinstance(self, ClassifierMixin),
                             y_numeric=not isinstance(self, ClassifierMixin))
        Xt, yt, Xv, yv = self._split(X, y)
        if self.kind in ("seeds", "topk", "bagging"):
            self._independent(Xt, yt)
        else:
            self._single_run(Xt, yt)
        self._after_members(Xt, yt)
        self._fit_combiner(Xv, yv)
        return self

    def _after_members(self, X, y):
        pass

    def member_outputs(self, X) -> np.ndarray:
        """Every member's prediction, stacked: (n_members, n_rows, n_outputs)."""
        check_is_fitted(self, "members_")
        X = validate_data(self, X, reset=False, dtype=np.float32)
        return np.stack([self._member_output(m, X) for m in self.members_])


class EnsembleClassifier(ClassifierMixin, _BaseEnsemble):
    """An ensemble of nnpipe classifiers (or Pipelines ending in one).

    Parameters
    ----------
    estimator : NNClassifier or Pipeline, default NNClassifier()
        The member configuration.
    kind : {"seeds", "topk", "bagging", "snapshot", "checkpoints", "swa"}
        How members are made: different ``random_state`` (deep ensembles); the ``configs`` of the
        best search trials; bootstrap resamples; one run with a cyclic cosine schedule and a
        member at the end of each cycle (snapshot ensembles); the last ``n_members`` epochs of one
        run; stochastic weight averaging into one model (batch-norm statistics recomputed).
    n_members : int >= 1
    combine : {"mean", "vote", "weighted", "greedy", "stacking"}
        Soft vote; hard vote; weights fitted on the validation split (minimum NLL); Caruana et
        al. (2004) greedy selection with replacement on the validation split; a meta-estimator
        (``meta_estimator``, default logistic regression) on the members' validation
        probabilities.
    configs : list of dict, optional
        Parameter sets for ``kind="topk"`` (``set_params`` keys of ``estimator``).
    validation_fraction : float, optional
        Held out of the training data (stratified) before any member trains; needed by the
        learned combiners and ``temperature``.
    temperature : bool
        Temperature-scale the combined probabilities on the validation split.
    swa_start : float
        For ``kind="swa"``: average the weights from this fraction of the epochs on.
    n_jobs : int, backend : {None, "threading", "dask"}
        Parallel member training with joblib (one torch thread per worker); ``"dask"`` runs on
        the active ``dask.distributed`` client.
    random_state : int
        Member ``i`` gets ``random_state + i``; also seeds bagging and the validation split.
    max_retries : int
        A member whose training diverges is retried with a new seed this many times; then the
        fit fails loudly (a member is never silently dropped).

    Examples
    --------
    >>> from sklearn.datasets import load_digits
    >>> from nnpipe import NNClassifier
    >>> X, y = load_digits(return_X_y=True)
    >>> ens = EnsembleClassifier(NNClassifier(max_epochs=3), n_members=2).fit(X[:500] / 16, y[:500])
    >>> ens.member_outputs(X[:3] / 16).shape
    (2, 3, 10)
    """

    def _member_output(self, member, X):
        proba = member.predict_proba(X)
        if list(member.classes_) == list(self.classes_):
            return proba
        raise ValueError(f"ensemble members disagree on the classes: {list(member.classes_)} vs "
                         f"{list(self.classes_)}; give every member all classes.")

    def _after_members(self, X, y):
        self.classes_ = np.asarray(self.members_[0].classes_)
        for m in self.members_[1:]:
            if list(m.classes_) != list(self.classes_):
                raise ValueError(f"ensemble members disagree on the classes: {list(m.classes_)} "
                                 f"vs {list(self.classes_)} (bootstrap samples missing a class?)")

    def _fit_combiner(self, Xv, yv):
        m = len(self.members_)
        self.weights_ = np.full(m, 1.0 / m)
        self.meta_ = None
        self.temperature_ = None
        if Xv is None:
            return
        P = self.member_outputs(Xv)
        yi = np.searchsorted(self.classes_, yv)
        if self.combine == "weighted":
            self.weights_ = _fit_weights(P, yi)
        elif self.combine == "greedy":
            self.weights_ = _greedy(P, yi, rounds=max(10, 2 * m))
        elif self.combine == "stacking":
            from sklearn.linear_model import LogisticRegression

            meta = clone(self.meta_estimator) if self.meta_estimator is not None \
                else LogisticRegression(max_iter=1000)
            self.meta_ = meta.fit(_stack_features(P), yi)
        if self.temperature:
            from .uncertainty import TemperatureScaler

            self.temperature_ = TemperatureScaler().fit(self._combine(P), yi).temperature_

    def _combine(self, P):
        if self.combine == "vote":
            votes = P.argmax(-1)
            out = np.stack([(votes == k).mean(0) for k in range(P.shape[-1])], axis=-1)
            return out
        if self.combine == "stacking" and getattr(self, "meta_", None) is not None:
            proba = self.meta_.predict_proba(_stack_features(P))
            full = np.zeros((P.shape[1], P.shape[2]))
            full[:, self.meta_.classes_] = proba
            return full
        return _weighted(self.weights_, P)

    def predict_proba(self, X):
        """Combined class probabilities (temperature-scaled when ``temperature=True``)."""
        proba = self._combine(self.member_outputs(X))
        t = getattr(self, "temperature_", None)
        if t:
            logits = np.log(np.clip(proba, 1e-12, 1)) / t
            logits -= logits.max(1, keepdims=True)
            proba = np.exp(logits)
            proba /= proba.sum(1, keepdims=True)
        return proba

    def predict(self, X):
        proba = self.predict_proba(X)
        return self.classes_[proba.argmax(1)]

    def uncertainty(self, X) -> Dict[str, np.ndarray]:
        """Per-sample predictive entropy, expected entropy, mutual information, disagreement."""
        from .uncertainty import uncertainty_report

        return uncertainty_report(self.member_outputs(X))


class EnsembleRegressor(RegressorMixin, _BaseEnsemble):
    """An ensemble of nnpipe regressors; same parameters as :class:`EnsembleClassifier`
    (``combine`` in mean, weighted, greedy, stacking; ``predict(X, return_std=True)`` gives the
    spread of the members as an uncertainty)."""

    def _check(self):
        super()._check()
        if self.combine == "vote":
            raise invalid_value("ensemble.combine", "vote", "mean, weighted, greedy or stacking "
                                "for regression")
        if self.temperature:
            raise ValueError("ensemble.temperature scales probabilities: classification only.")

    def _member_output(self, member, X):
        out = np.asarray(member.predict(X), dtype=np.float64)
        return out.reshape(len(X), -1)

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.target_tags.multi_output = True
        return tags

    def _fit_combiner(self, Xv, yv):
        m = len(self.members_)
        self.weights_ = np.full(m, 1.0 / m)
        self.meta_ = None
        if Xv is None:
            return
        P = self.member_outputs(Xv)
        target = np.asarray(yv, dtype=np.float64).reshape(len(yv), -1)
        if self.combine == "weighted":
            self.weights_ = _fit_weights(P, target, regression=True)
        elif self.combine == "greedy":
            self.weights_ = _greedy(P, target, rounds=max(10, 2 * m), regression=True)
        elif self.combine == "stacking":
            from sklearn.linear_model import LinearRegression

            meta = clone(self.meta_estimator) if self.meta_estimator is not None \
                else LinearRegression()
            self.meta_ = meta.fit(_stack_features(P), target)

    def predict(self, X, return_std: bool = False):
        P = self.member_outputs(X)
        if getattr(self, "meta_", None) is not None:
            mean = np.asarray(self.meta_.predict(_stack_features(P))).reshape(P.shape[1], -1)
        else:
            mean = _weighted(self.weights_, P)
        squeeze = getattr(self.members_[0][-1] if hasattr(self.members_[0], "steps")
                          else self.members_[0], "y_ndim_", 2) == 1
        std = P.std(0)
        if squeeze:
            mean, std = mean[:, 0], std[:, 0]
        return (mean, std) if return_std else mean


# --------------------------------------------------------------------------- combiner fits


def _weighted(weights, P):
    """Weighted average over members, row by row (BLAS blocking would make a row's result
    depend on the other rows in the batch)."""
    return (np.asarray(weights, dtype=np.float64)[:, None, None] * P).sum(0)


def _stack_features(P):
    return np.transpose(P, (1, 0, 2)).reshape(P.shape[1], -1)


def _loss(avg, target, regression):
    if regression:
        return float(np.mean((avg - target) ** 2))
    return float(-np.mean(np.log(np.clip(avg[np.arange(len(target)), target], 1e-12, 1))))


def _fit_weights(P, target, regression=False):
    """Simplex weights minimising validation NLL (MSE for regression)."""
    from scipy.optimize import minimize

    m = P.shape[0]

    def objective(z):
        w = np.exp(z - z.max())
        w /= w.sum()
        return _loss(np.tensordot(w, P, axes=1), target, regression)

    res = minimize(objective, np.zeros(m), method="Nelder-Mead" if m <= 3 else "L-BFGS-B")
    w = np.exp(res.x - res.x.max())
    return w / w.sum()


def _greedy(P, target, rounds, regression=False):
    """Caruana et al. (2004): forward selection with replacement, on validation loss."""
    m = P.shape[0]
    counts = np.zeros(m)
    total = np.zeros_like(P[0])
    for r in range(rounds):
        losses = [_loss((total + P[i]) / (r + 1), target, regression) for i in range(m)]
        best = int(np.argmin(losses))
        counts[best] += 1
        total += P[best]
    return counts / counts.sum()

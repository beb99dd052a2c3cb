"""Optuna hyperparameter search over the knobs declared in params.yaml.

The search space names params.yaml paths (``train.lr``, ``model.dropout``,
``augment.rotation.degrees``): every knob a section exposes can be searched, and a trial's
configuration is params.yaml with the sampled values set, validated like any other.

**Pruning with cross-validation.** A trial's score is the mean over its folds, but folds run one
after the other, so per-epoch reports of a later fold would not be comparable with those of an
earlier one. nnpipe prunes on the first fold and confirms on the rest: fold 0 reports its
held-out score after every epoch (``trial.report(score, epoch)``) and the pruner may stop the trial
there; a trial that survives fold 0 trains the remaining folds in full. Every trial's fold 0 uses
the same split, so intermediate values are comparable across trials, and a bad configuration
costs at most one fold. (Running folds in lockstep would prune on the mean over folds, but needs
every fold's model in memory at once and ``k`` times the work before the first decision.)
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import hashlib
import json
import logging
import math
import os
import re
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

import numpy as np

from ._registry import Registry, invalid_value
from .exceptions import NnpipeError, check_server_client
from .reliability import LEASE_ATTR, RETRY_ATTR, WorkerLease, fail_orphaned_trials

__all__ = ["SAMPLERS", "PRUNERS", "METRICS", "parse_space", "suggest", "apply_overrides",
           "make_study", "run_search", "trials_table", "top_trials", "save_plots",
           "storage_from_url", "SearchSettings", "SearchError", "fingerprint",
           "fixed_by_params", "study_name_for", "FINGERPRINT_ATTR"]

logger = logging.getLogger(__name__)

#: the study user attribute holding the fingerprint of the data and trial settings
FINGERPRINT_ATTR = "nnpipe_fingerprint"


class SearchError(NnpipeError, RuntimeError):
    """The search stopped because its configuration, not one trial's values, is broken."""

# --------------------------------------------------------------------------- registries

SAMPLERS = Registry("search.sampler", "an optuna sampler instance")
PRUNERS = Registry("search.pruner", "an optuna pruner instance")


def _grid(space: Dict[str, dict]) -> Dict[str, list]:
    """The grid a ``grid`` sampler visits: every choice of each categorical / int entry."""
    grid = {}
    for key, spec in space.items():
        if spec["type"] == "categorical":
            grid[key] = list(spec["choices"])
        elif spec["type"] == "int":
            grid[key] = list(range(int(spec["low"]), int(spec["high"]) + 1,
                                   int(spec.get("step") or 1)))
        elif spec["type"] == "float":
            raise ValueError(f"search.sampler='grid' needs finite choices, but search.space."
                             f"{key} is a float range; make it categorical or int.")
    return grid


def _sampler(name: str, seed: Optional[int], space: Dict[str, dict]):
    import optuna

    if name == "grid":
        return _GridSampler(_grid(space), seed=seed)
    factory = {"tpe": lambda: optuna.samplers.TPESampler(seed=seed),
               "random": lambda: optuna.samplers.RandomSampler(seed=seed),
               "cmaes": lambda: optuna.samplers.CmaEsSampler(seed=seed),
               "qmc": lambda: optuna.samplers.QMCSampler(seed=seed)}[name]
    return factory()


def _grid_sampler_class():
    import optuna

    class GridSampler(optuna.samplers.GridSampler):
        """Optuna's grid sampler without ``study.stop()`` in ``after_trial`` (which only works
        inside ``study.optimize``); nnpipe's budget already stops at the grid's size."""

        def after_trial(self, study, trial, state, values):
            return None

    return GridSampler


def _GridSampler(grid, seed=None):  # noqa: N802 - a factory standing in for a class
    return _grid_sampler_class()(grid, seed=seed)


for _name in ("tpe", "random", "cmaes", "grid", "qmc"):
    SAMPLERS.register(_name, _name)
for _name in ("median", "successive_halving", "hyperband", "none"):
    PRUNERS.register(_name, _name)


def _pruner(name: str):
    import optuna

    return {"median": lambda: optuna.pruners.MedianPruner(n_startup_trials=3, n_warmup_steps=2),
            "successive_halving": lambda: optuna.pruners.SuccessiveHalvingPruner(),
            "hyperband": lambda: optuna.pruners.HyperbandPruner(),
            "none": lambda: optuna.pruners.NopPruner()}[name]()


def _acc(y, proba, classes):
    from .metrics import classification_metrics
    return classification_metrics(y, proba, classes)


#: metric name -> (direction, task, key in nnpipe.metrics' dicts)
METRICS: Dict[str, Tuple[str, str, str]] = {
    "accuracy": ("maximize", "classification", "accuracy"),
    "balanced_accuracy": ("maximize", "classification", "balanced_accuracy"),
    "neg_log_loss": ("maximize", "classification", "nll"),
    "nll": ("minimize", "classification", "nll"),
    "brier": ("minimize", "classification", "brier"),
    "ece": ("minimize", "classification", "ece"),
    "r2": ("maximize", "regression", "r2"),
    "rmse": ("minimize", "regression", "rmse"),
    "mae": ("minimize", "regression", "mae"),
}


def score(metric: str, estimator, X, y, classes=None) -> float:
    """``metric`` of a fitted estimator on ``(X, y)`` (``neg_log_loss`` is ``-nll``)."""
    from .metrics import classification_metrics, regression_metrics

    _, task, key = METRICS[metric]
    if task == "classification":
        value = classification_metrics(y, estimator.predict_proba(X), classes)[key]
    else:
        value = regression_metrics(y, estimator.predict(X))[key]
    return -value if metric == "neg_log_loss" else value


# --------------------------------------------------------------------------- the space


def _number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


#: the params.yaml sections a search trial builds its pipeline from
TRIAL_SECTIONS = ("preprocess", "augment", "model", "train")


def parse_space(space: Dict[str, Any]) -> Dict[str, dict]:
    """Normalise and check the declared space; a plain value is a fixed entry.

    Entries: ``{type: float, low, high, log}``, ``{type: int, low, high, step, log}``,
    ``{type: categorical, choices}``, ``{type: fixed, value}``; each may have
    ``condition: {other.path: value or [values]}``.
    """
    out = {}
    for key, spec in (space or {}).items():
        where = f"search.space.{key}"
        root = str(key).split(".", 1)[0]
        if root not in TRIAL_SECTIONS:
            why = (" (trials train from scratch: they do not run the pretrain stage)"
                   if root == "pretrain" else "")
            raise ValueError(f"{where}: a trial builds its pipeline from "
                             f"{', '.join(TRIAL_SECTIONS)} only, so a {root!r} key would have no "
                             f"effect on it{why}; got {key!r}.")
        if not isinstance(spec, dict) or "type" not in spec:
            spec = {"type": "fixed", "value": spec}
        spec = dict(spec)
        kind = spec.get("type")
        if kind in ("float", "int"):
            low, high = spec.get("low"), spec.get("high")
            if not (_number(low) and _number(high)) or low >= high:
                raise ValueError(f"{where}: low must be < high (numbers), got low={low!r}, "
                                 f"high={high!r}.")
            if spec.get("log") and low <= 0:
                raise ValueError(f"{where}: log=true needs low > 0, got low={low!r}.")
            if kind == "int" and not (float(low).is_integer() and float(high).is_integer()):
                raise ValueError(f"{where}: an int range needs whole numbers, got {low!r}..{high!r}.")
            step = spec.get("step")
            if step is not None and (not _number(step) or step <= 0):
                raise ValueError(f"{where}: step must be a number > 0, got {step!r}.")
            if step is not None and spec.get("log"):
                raise ValueError(f"{where}: step and log=true cannot be combined (Optuna).")
        elif kind == "categorical":
            if not isinstance(spec.get("choices"), list) or not spec["choices"]:
                raise ValueError(f"{where}: categorical needs a non-empty list of choices, got "
                                 f"{spec.get('choices')!r}.")
        elif kind != "fixed":
            raise invalid_value(f"{where}.type", kind, "one of 'float', 'int', 'categorical', "
                                "'fixed'")
        allowed = {"float": {"low", "high", "log", "step"}, "int": {"low", "high", "log", "step"},
                   "categorical": {"choices"}, "fixed": {"value"}}[kind] | {"type", "condition"}
        unknown = set(spec) - allowed
        if unknown:
            raise ValueError(f"{where}: unknown keys {sorted(unknown)} for type {kind!r}; "
                             f"allowed: {sorted(allowed)}.")
        cond = spec.get("condition")
        if cond is not None and not isinstance(cond, dict):
            raise invalid_value(f"{where}.condition", cond, "a mapping {other.path: value}")
        out[key] = spec
    return out


def _condition_holds(cond: Optional[dict], values: Dict[str, Any], raw: Dict[str, Any]) -> bool:
    for path, wanted in (cond or {}).items():
        value = values[path] if path in values else _get(raw, path)
        allowed = wanted if isinstance(wanted, list) else [wanted]
        if value not in allowed:
            return False
    return True


def suggest(trial, space: Dict[str, dict], raw: Dict[str, Any]) -> Dict[str, Any]:
    """Sample one configuration (dotted path -> value) from ``trial``, honouring conditions."""
    values: Dict[str, Any] = {}
    for key, spec in space.items():
        if not _condition_holds(spec.get("condition"), values, raw):
            continue
        kind = spec["type"]
        if kind == "float":
            values[key] = trial.suggest_float(key, spec["low"], spec["high"],
                                              log=bool(spec.get("log")), step=spec.get("step"))
        elif kind == "int":
            values[key] = trial.suggest_int(key, int(spec["low"]), int(spec["high"]),
                                            step=int(spec.get("step") or 1),
                                            log=bool(spec.get("log")))
        elif kind == "categorical":
            choices = [_hashable(c) for c in spec["choices"]]
            picked = trial.suggest_categorical(key, choices)
            values[key] = list(picked) if isinstance(picked, tuple) else picked
        else:
            values[key] = spec["value"]
    return values


def _hashable(choice):
    # Optuna stores categorical choices as JSON-able scalars; lists become their JSON text
    if isinstance(choice, (list, dict)):
        import json
        return json.dumps(choice)
    return choice


def _unhash(value, spec):
    if spec["type"] == "categorical" and isinstance(value, str):
        for c in spec["choices"]:
            if isinstance(c, (list, dict)) and _hashable(c) == value:
                return c
    return value


def _get(raw: Dict[str, Any], path: str) -> Any:
    """The value at a dotted path, ``None`` when a part is absent."""
    value = _lookup(raw, path)
    return None if value is _MISSING else value


def apply_overrides(raw: Dict[str, Any], overrides: Dict[str, Any],
                    space: Optional[Dict[str, dict]] = None) -> Dict[str, Any]:
    """A deep copy of params with each dotted path set (``augment.rotation.degrees: 5``)."""
    out = copy.deepcopy(raw)
    for path, value in overrides.items():
        if space and path in space:
            value = _unhash(value, space[path])
        parts = path.split(".")
        node = out
        for part in parts[:-1]:
            if not isinstance(node.get(part), dict):
                node[part] = {}
            node = node[part]
        node[parts[-1]] = value
    return out


_MISSING = object()


def _lookup(raw: Dict[str, Any], path: str) -> Any:
    """The value at a dotted path, or ``_MISSING`` when a part is absent (``None`` is a value)."""
    node: Any = raw
    for part in path.split("."):
        if not isinstance(node, dict) or part not in node:
            return _MISSING
        node = node[part]
    return node


def fixed_by_params(raw: Dict[str, Any], space: Dict[str, dict]) -> Dict[str, Any]:
    """The searched keys that params.yaml also sets explicitly in their own section.

    The explicit value wins: such a key is not sampled, every trial uses the value and the
    search's best parameters leave it alone (so ``dvc exp run -S train.lr=0.003`` means 0.003).

    Examples
    --------
    >>> space = parse_space({"train.lr": {"type": "float", "low": 1e-3, "high": 1e-1},
    ...                      "model.dropout": {"type": "float", "low": 0.0, "high": 0.5}})
    >>> fixed_by_params({"train": {"lr": 0.003}, "model": {}}, space)
    {'train.lr': 0.003}
    """
    fixed = {}
    for key, spec in space.items():
        value = _lookup(raw, key)
        if spec["type"] != "fixed" and value is not _MISSING:
            fixed[key] = value
    return fixed


def _describe(value: Any) -> str:
    return json.dumps(value) if isinstance(value, (list, dict)) else str(value)


def without_fixed_keys(raw: Dict[str, Any], settings: "SearchSettings") -> "SearchSettings":
    """``settings`` whose space leaves out the keys params.yaml fixes (:func:`fixed_by_params`);
    logs one line per such key."""
    fixed = fixed_by_params(raw, settings.space)
    for key, value in fixed.items():
        logger.info("[search] %s: fixed at %s by params.yaml, not searched; remove it from "
                    "`%s` to search it", key, _describe(value), key.rsplit(".", 1)[0])
    if not fixed:
        return settings
    space = {k: spec for k, spec in settings.space.items() if k not in fixed}
    return dataclasses.replace(settings, space=space)


# --------------------------------------------------------------------------- settings and storage

from dataclasses import asdict, dataclass, field  # noqa: E402


@dataclass
class SearchSettings:
    """The ``search`` section; these defaults are the only ones (params.yaml may omit any key)."""

    enabled: bool = False
    n_trials: int = 20
    timeout: Optional[float] = None
    n_jobs: int = 1
    sampler: str = "tpe"
    pruner: str = "median"
    metric: Optional[str] = None  # accuracy (classification) / r2 (regression)
    direction: Optional[str] = None  # from the metric
    folds: int = 3
    holdout: Optional[float] = None  # a single stratified split instead of folds
    storage: Optional[str] = None  # None: an Optuna journal file beside the outputs
    study_name: str = "nnpipe"
    random_state: Optional[int] = 0
    top_k: int = 5
    space: Dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_section(cls, section: Optional[Dict[str, Any]], task: Optional[str] = None):
        section = dict(section or {})
        known = set(cls.__dataclass_fields__)
        unknown = set(section) - known
        if unknown:
            from ._registry import did_you_mean
            key = sorted(unknown)[0]
            raise ValueError(f"search.{key}: unknown key." + (did_you_mean(key, known) or
                                                             f" Allowed: {sorted(known)}."))
        s = cls(**section)
        for name in ("n_trials", "n_jobs", "folds", "top_k"):
            value = getattr(s, name)
            low = 2 if name == "folds" else 1
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise invalid_value(f"search.{name}", value, f"an int >= {low}")
        if s.timeout is not None and (not _number(s.timeout) or s.timeout <= 0):
            raise invalid_value("search.timeout", s.timeout, "a number of seconds > 0 or null")
        if s.holdout is not None and (not _number(s.holdout) or not 0 < s.holdout < 1):
            raise invalid_value("search.holdout", s.holdout, "a fraction in (0, 1) or null")
        SAMPLERS.get(s.sampler)
        PRUNERS.get(s.pruner)
        s.sampler, s.pruner = s.sampler.lower(), s.pruner.lower()
        if s.metric is None:
            s.metric = "r2" if task == "regression" else "accuracy"
        if s.metric not in METRICS:
            from ._registry import did_you_mean
            raise ValueError(f"search.metric must be one of {sorted(METRICS)}, got {s.metric!r}."
                             + did_you_mean(s.metric, METRICS))
        if task is not None and METRICS[s.metric][1] != task:
            raise ValueError(f"search.metric={s.metric!r} scores {METRICS[s.metric][1]}, but the "
                             f"data is {task}.")
        if s.direction is None:
            s.direction = METRICS[s.metric][0]
        if s.direction not in ("maximize", "minimize"):
            raise invalid_value("search.direction", s.direction, "'maximize' or 'minimize'")
        if s.storage and s.storage.startswith("sqlite") and s.n_jobs > 1:
            raise ValueError(
                f"search.storage={s.storage!r} with search.n_jobs={s.n_jobs}: SQLite is not safe "
                "for parallel workers (database locks, lost trials). Leave storage unset for the "
                "Optuna journal file (safe for several local processes), or use a database "
                "server (postgresql://...) for many machines.")
        s.space = parse_space(s.space)
        if s.sampler == "grid":
            _sampler("grid", None, s.space)
        return s

    def to_dict(self) -> Dict[str, Any]:
        return asdict(self)


@contextlib.contextmanager
def _optuna_quiet() -> Iterator[None]:
    """Optuna's own INFO lines off while nnpipe works (it logs one line per trial itself); the
    caller's verbosity is restored afterwards."""
    import optuna

    previous = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(max(previous, optuna.logging.WARNING))
    try:
        yield
    finally:
        optuna.logging.set_verbosity(previous)


def storage_from_url(url: Optional[str], journal: os.PathLike):
    """An Optuna storage: the journal file by default, else an RDB URL (checked reachable)."""
    from optuna.storages import JournalStorage, RDBStorage
    from optuna.storages.journal import JournalFileBackend

    if not url or url.startswith("journal:"):
        path = url[len("journal:"):] if url else os.fspath(journal)
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        from .reliability import check_journal

        check_journal(path)
        return JournalStorage(JournalFileBackend(path))
    check_server_client(url, "search.storage")
    kwargs: Dict[str, Any] = {}
    if url.startswith("postgresql"):
        # no Optuna heartbeat: nnpipe's workers hold leases (reliability.WorkerLease) instead
        kwargs["engine_kwargs"] = {"connect_args": {"connect_timeout": 5}, "pool_pre_ping": True}
    import time

    for attempt in range(3):
        try:
            with _optuna_quiet():
                return RDBStorage(url, **kwargs)
        except Exception as exc:  # sqlalchemy raises many kinds
            # workers starting together race to create Optuna's tables: retry those errors,
            # but not a server that cannot be reached
            unreachable = "OperationalError" in type(exc).__name__ or attempt == 2
            if unreachable:
                raise ValueError(f"search.storage={url!r} cannot be reached: "
                                 f"{type(exc).__name__}: {str(exc).splitlines()[0]}") from None
            time.sleep(0.5 + attempt)


def study_name_for(settings: SearchSettings, fingerprint: Optional[str] = None) -> str:
    """``<search.study_name>-<fingerprint[:10]>``, or ``search.study_name`` without one."""
    return settings.study_name if fingerprint is None else \
        f"{settings.study_name}-{fingerprint[:10]}"


def make_study(settings: SearchSettings, journal: os.PathLike, worker: int = 0,
               fingerprint: Optional[str] = None, storage=None):
    """Create or load the study (named by :func:`study_name_for`) in ``storage`` (by default
    the one ``settings.storage`` / ``journal`` names); the sampler is seeded per worker."""
    import optuna

    if storage is None:
        storage = storage_from_url(settings.storage, journal)
    seed = None if settings.random_state is None else settings.random_state + worker
    with _optuna_quiet():
        study = optuna.create_study(
            storage=storage, study_name=study_name_for(settings, fingerprint),
            direction=settings.direction, sampler=_sampler(settings.sampler, seed, settings.space),
            pruner=_pruner(settings.pruner), load_if_exists=True)
    if fingerprint is not None and study.user_attrs.get(FINGERPRINT_ATTR) != fingerprint:
        study.set_user_attr(FINGERPRINT_ATTR, fingerprint)
    return study


# --------------------------------------------------------------------------- study identity

#: the search settings a trial reads (n_trials, timeout, n_jobs, storage, top_k: it does not)
_TRIAL_SETTINGS = ("space", "metric", "direction", "random_state", "sampler", "pruner")


def _hash_array(h, name: str, values) -> None:
    a = np.asarray(values)
    h.update(f"{name}:{a.dtype.str}:{a.shape};".encode())
    if a.dtype == object:  # pointers, not contents: hash the values' text
        h.update(json.dumps(a.tolist(), default=str).encode())
        return
    if a.ndim == 0 or a.size == 0:
        h.update(a.tobytes())
        return
    rows = max(1, (1 << 24) // max(1, a[0].nbytes))  # ~16 MB at a time (memory-mapped data)
    for start in range(0, len(a), rows):
        h.update(np.ascontiguousarray(a[start:start + rows]).tobytes())


def fingerprint(raw: Dict[str, Any], X, y, task: str, input_shape,
                settings: SearchSettings) -> str:
    """sha256 of everything a trial's score depends on: the training data (bytes, dtype, shape),
    the task and input shape, the ``preprocess`` / ``augment`` / ``model`` / ``train`` sections
    and the search settings trials read (space, metric, folds or holdout, seed, sampler, pruner).

    ``n_trials``, ``timeout``, ``n_jobs`` and ``storage`` are left out, so raising the budget
    resumes the same study; any other change starts a new one.
    """
    h = hashlib.sha256()
    _hash_array(h, "X", X)
    _hash_array(h, "y", y)
    trial_settings = {k: getattr(settings, k) for k in _TRIAL_SETTINGS}
    trial_settings["split"] = ({"holdout": settings.holdout} if settings.holdout is not None
                               else {"folds": settings.folds})
    h.update(json.dumps({
        "task": task, "input_shape": None if input_shape is None else list(input_shape),
        "sections": {s: raw.get(s) for s in TRIAL_SECTIONS}, "search": trial_settings,
    }, sort_keys=True, default=str).encode())
    return h.hexdigest()


def _previous_study(storage, settings: SearchSettings, current: str) -> Optional[str]:
    """The latest other study of ``search.study_name`` in the storage (its trials started last)."""
    import datetime

    import optuna

    ours = [s for s in optuna.get_all_study_summaries(storage, include_best_trial=False)
            if s.study_name != current and (s.study_name == settings.study_name
                                            or s.study_name.startswith(settings.study_name + "-"))]
    if not ours:
        return None
    oldest = datetime.datetime.min
    return max(ours, key=lambda s: s.datetime_start or oldest).study_name


def open_study(raw: Dict[str, Any], X, y, task: str, input_shape, settings: SearchSettings,
               journal: os.PathLike):
    """Resume the study of this data and these trial settings (:func:`fingerprint`), or start a
    new one beside the others in the storage; log which. Returns ``(study, storage, fp)``."""
    import optuna

    storage = storage_from_url(settings.storage, journal)
    fp = fingerprint(raw, X, y, task, input_shape, settings)
    name = study_name_for(settings, fp)
    existed = name in optuna.get_all_study_names(storage)
    previous = None if existed else _previous_study(storage, settings, name)
    study = make_study(settings, journal, fingerprint=fp, storage=storage)
    if existed:
        finished, _ = _counts(study, include_failed=settings.sampler == "grid")
        logger.info("[search] resuming study %s: %d of %d trials done", name, finished,
                    _budget(settings))
    elif previous is not None:
        where = "journal" if not settings.storage or settings.storage.startswith("journal:") \
            else "storage"
        logger.info("[search] new study %s: data or trial settings changed since study %s "
                    "(kept in the %s)", name, previous, where)
    else:
        logger.info("[search] new study %s", name)
    return study, storage, fp


# --------------------------------------------------------------------------- the objective


def _fold_splits(y, task, settings: SearchSettings):
    from sklearn.model_selection import train_test_split

    from .cv import make_folds

    idx = np.arange(len(y))
    if settings.holdout is not None:
        strat = y if task == "classification" else None
        tr, va = train_test_split(idx, test_size=settings.holdout, stratify=strat,
                                  random_state=settings.random_state)
        return [(tr, va)]
    splitter = make_folds(y, task, settings.folds, 1, True, settings.random_state)
    return list(splitter.split(np.zeros(len(y)), y))


class _EpochReporter:
    """skorch callback: held-out score after each epoch; reports and prunes on fold 0."""

    def __new__(cls, *args, **kwargs):
        from skorch.callbacks import Callback

        class EpochReporter(Callback):
            def __init__(self, trial, X, y, metric, classes, prune, epochs_before):
                self.trial, self.X, self.y, self.metric = trial, X, y, metric
                self.classes, self.prune, self.epochs_before = classes, prune, epochs_before

            def on_epoch_end(self, net, **kw):
                import optuna

                from .estimators import DivergenceError

                epoch = len(net.history)
                try:
                    value = score(self.metric, net, self.X, self.y, self.classes)
                except ValueError as exc:
                    if "finite" not in str(exc):
                        raise
                    # finite weights so large that the outputs overflow
                    raise DivergenceError(epoch, len(net.history[-1]["batches"]),
                                          float("nan")) from None
                net.history.record(f"search_{self.metric}", value)
                self.trial.set_user_attr("epochs", self.epochs_before + epoch)
                if not self.prune:
                    return
                self.trial.report(value, epoch)
                if self.trial.should_prune():
                    raise optuna.TrialPruned(
                        f"pruned at epoch {epoch} of fold 0: {self.metric}={value:.4f}")

        return EpochReporter(*args, **kwargs)


def _fit_fold(cfg, task: str, input_shape, X, y, tr, va, reporter, max_epochs=None):
    """Fit ``cfg``'s pipeline on rows ``tr`` (preprocessing fitted there only), with the search
    callback ``reporter(X_va, y_va)`` scoring rows ``va`` after each epoch; return the net."""
    from sklearn.pipeline import Pipeline

    pipe = cfg.build_pipeline(task, input_shape, on_interrupt="raise", verbose=0)
    pre, net = Pipeline(pipe.steps[:-1]) if len(pipe.steps) > 1 else None, pipe[-1]
    X_tr = pre.fit_transform(X[tr]) if pre is not None else X[tr]
    X_va = pre.transform(X[va]) if pre is not None else X[va]
    net.set_params(callbacks=[("search", reporter(X_va, y[va]))])
    if max_epochs is not None:
        net.set_params(max_epochs=max_epochs)
    net.fit(X_tr, y[tr])
    return net


def make_objective(raw: Dict[str, Any], X, y, task: str, input_shape, settings: SearchSettings):
    """``objective(trial)``: mean held-out ``settings.metric`` over the folds of a sampled config."""
    from .config import validate_config
    from .estimators import DivergenceError

    splits = _fold_splits(y, task, settings)
    classes = list(np.unique(y)) if task == "classification" else None

    def objective(trial) -> float:
        overrides = suggest(trial, settings.space, raw)
        trial.set_user_attr("overrides", {k: _unhash(v, settings.space[k])
                                          for k, v in overrides.items()})
        cfg = validate_config(apply_overrides(raw, overrides, settings.space))
        scores, epochs = [], 0
        for i, (tr, va) in enumerate(splits):
            def reporter(X_va, y_va, i=i, epochs=epochs):
                return _EpochReporter(trial, X_va, y_va, settings.metric, classes, i == 0, epochs)

            try:
                net = _fit_fold(cfg, task, input_shape, X, y, tr, va, reporter)
            except DivergenceError as exc:
                trial.set_user_attr("fail_reason", str(exc))
                trial.set_user_attr("fail_kind", "divergence")
                raise
            epochs += len(net.history)
            scores.append(net.history[-1, f"search_{settings.metric}"])
            trial.set_user_attr("fold_scores", scores)
        trial.set_user_attr("epochs", epochs)
        return float(np.mean(scores))

    return objective


def _first_value(spec: dict) -> Any:
    """A value from a searched entry for the preflight: its first choice, or its low end."""
    if spec["type"] == "categorical":
        return _hashable(spec["choices"][0])
    return int(spec["low"]) if spec["type"] == "int" else float(spec["low"])


def _preflight_rows(y, task: str, seed: Optional[int]) -> Tuple[np.ndarray, np.ndarray]:
    """A seeded handful of training rows (every class several times), split 3:1."""
    from sklearn.model_selection import train_test_split

    n_classes = len(np.unique(y)) if task == "classification" else 1
    n = min(len(y), max(128, 40 * n_classes))
    idx = np.arange(len(y))
    strat = y if task == "classification" else None
    try:
        rows = idx if n == len(y) else train_test_split(idx, train_size=n, stratify=strat,
                                                        random_state=seed)[0]
        return train_test_split(rows, test_size=0.25, random_state=seed,
                                stratify=None if strat is None else y[rows])
    except ValueError:  # a class too small to stratify: plain seeded rows
        rows = np.random.RandomState(seed).permutation(idx)[:n]
        return rows[: 3 * n // 4], rows[3 * n // 4:]


def preflight(raw: Dict[str, Any], X, y, task: str, input_shape,
              settings: SearchSettings) -> None:
    """Fail at once when the configuration cannot train whatever the sampled values are.

    Builds a trial's pipeline from params.yaml with each searched key at a value of its space
    (the first choice, or the low end) and fits it for one epoch on a seeded handful of training
    rows. Anything but a divergence or running out of memory (which depend on the values) raises
    :class:`SearchError` naming the error: every trial would fail the same way.
    """
    import optuna

    from .config import validate_config

    params = {k: _first_value(spec) for k, spec in settings.space.items()
              if spec["type"] != "fixed"}
    trial = optuna.trial.FixedTrial(params)
    overrides = suggest(trial, settings.space, raw)
    tr, va = _preflight_rows(y, task, settings.random_state)
    classes = list(np.unique(y)) if task == "classification" else None

    def reporter(X_va, y_va):
        return _EpochReporter(trial, X_va, y_va, settings.metric, classes, False, 0)

    try:
        cfg = validate_config(apply_overrides(raw, overrides, settings.space))
        _fit_fold(cfg, task, input_shape, X, y, tr, va, reporter, max_epochs=1)
    except Exception as exc:  # noqa: BLE001 - judged below, re-raised with the reason
        if _failure_kind(exc) != "error":
            return
        tried = ", ".join(f"{k}={_describe(_unhash(v, settings.space[k]))}"
                          for k, v in overrides.items() if k in params)
        raise SearchError(
            f"search: the configuration fails before any trial: {type(exc).__name__}: {exc} "
            f"(params.yaml{' with ' + tried if tried else ''}, 1 epoch on {len(tr)} training "
            "rows; every trial would fail the same way)") from exc


def _failure_kind(exc: BaseException) -> str:
    """'divergence', 'oom' (both depend on the sampled values) or 'error'."""
    from .estimators import DivergenceError

    if isinstance(exc, DivergenceError):
        return "divergence"
    if isinstance(exc, MemoryError) or type(exc).__name__ == "OutOfMemoryError" \
            or "out of memory" in str(exc).lower():
        return "oom"
    return "error"


def validate_space(raw: Dict[str, Any], settings: SearchSettings) -> None:
    """Fail before the first trial when an entry names a parameter that does not exist, or a
    choice / bound is not a valid value for it."""
    from .config import ConfigError, validate_config

    for key, spec in settings.space.items():
        if spec["type"] in ("float", "int"):
            candidates = [spec["low"], spec["high"]]
            if spec["type"] == "int":
                candidates = [int(c) for c in candidates]
        elif spec["type"] == "categorical":
            candidates = spec["choices"]
        else:
            candidates = [spec["value"]]
        for value in candidates:
            try:
                validate_config(apply_overrides(raw, {key: value}))
            except ConfigError as exc:
                detail = "; ".join(f"{p}: {m}" for p, m in exc.problems)
                raise ValueError(f"search.space.{key}={value!r} is not a valid setting: "
                                 f"{detail}") from None


# --------------------------------------------------------------------------- running


def _counts(study, include_failed: bool = False) -> Tuple[int, int]:
    from optuna.trial import TrialState

    trials = study.get_trials(deepcopy=False)
    done = (TrialState.COMPLETE, TrialState.PRUNED) + ((TrialState.FAIL,) if include_failed else ())
    retried = {t.user_attrs.get(RETRY_ATTR) for t in trials}  # a killed trial's retry stands in
    finished = sum(t.state in done and t.number not in retried for t in trials)
    running = sum(t.state == TrialState.RUNNING for t in trials)
    return finished, running


class _BudgetLock:
    """Serialises "count the finished trials, then ask for a new one" across workers, so that
    parallel workers stop at exactly ``n_trials``: a file lock beside a journal (one host), a
    PostgreSQL advisory lock for a database server (many hosts), nothing for one process."""

    def __init__(self, settings: SearchSettings, journal: os.PathLike, study_name: str):
        self.url, self.journal = settings.storage, os.fspath(journal)
        import zlib

        self.key = zlib.crc32(study_name.encode()) % (2**31)  # stable across processes
        self._fh = self._conn = None

    def __enter__(self):
        if not self.url or self.url.startswith("journal:"):
            import fcntl

            path = (self.url[len("journal:"):] if self.url else self.journal) + ".budget-lock"
            self._fh = open(path, "a")
            fcntl.flock(self._fh, fcntl.LOCK_EX)
        elif self.url.startswith("postgresql"):
            import sqlalchemy

            self._engine = sqlalchemy.create_engine(self.url, poolclass=sqlalchemy.pool.NullPool)
            self._conn = self._engine.connect()
            self._conn.execute(sqlalchemy.text(f"SELECT pg_advisory_lock({self.key})"))
        return self

    def __exit__(self, *exc):
        if self._fh is not None:
            import fcntl

            fcntl.flock(self._fh, fcntl.LOCK_UN)
            self._fh.close()
        if self._conn is not None:
            import sqlalchemy

            self._conn.execute(sqlalchemy.text(f"SELECT pg_advisory_unlock({self.key})"))
            self._conn.close()
            self._engine.dispose()
        return False


def _budget(settings: SearchSettings) -> int:
    if settings.sampler != "grid":
        return settings.n_trials
    return min(settings.n_trials, math.prod(len(v) for v in _grid(settings.space).values()))


def optimize(study, objective: Callable, settings: SearchSettings, journal: os.PathLike = "",
             progress: Optional[Callable[[Any], None]] = None, max_failures: int = 5,
             storage=None) -> None:
    """Run trials until ``n_trials`` have finished (COMPLETE or PRUNED; resumed ones count) or
    ``timeout`` passes. A trial that diverges or raises ends FAIL with the reason in its
    ``fail_reason`` attribute and the study goes on, unless the failure cannot depend on the
    sampled values: ``max_failures`` failures in a row, or two trials in a row failing with the
    same error (numbers aside; divergence and out-of-memory excepted), stop it with
    :class:`SearchError`.

    The worker holds a :class:`~nnpipe.reliability.WorkerLease` while it runs; before each new
    trial, trials left RUNNING by a worker that died (``kill -9``, a lost machine) end FAIL and
    are retried once with the same parameters, so the budget still counts finished trials.
    ``storage`` is the study's storage (opened from ``settings`` / ``journal`` when omitted)."""
    import time

    if storage is None:
        storage = storage_from_url(settings.storage, journal)
    deadline = None if settings.timeout is None else time.monotonic() + settings.timeout
    with WorkerLease(settings.storage, journal) as lease, _optuna_quiet():
        _optimize(study, objective, settings, journal, progress, max_failures, deadline, lease,
                  storage)


def _same_error(reason: str) -> str:
    return re.sub(r"\d+(?:\.\d+)?(?:e[-+]?\d+)?", "#", reason)


def _optimize(study, objective, settings, journal, progress, max_failures, deadline, lease,
              storage):
    import time

    from optuna.trial import TrialState

    budget, failures = _budget(settings), 0
    last_error: Optional[Tuple[str, int]] = None
    while deadline is None or time.monotonic() < deadline:
        with _BudgetLock(settings, journal, study.study_name):
            fail_orphaned_trials(study, lease, storage)  # trials of killed workers: FAIL, retried
            # a grid visits each point once, failed or not
            finished, running = _counts(study, include_failed=settings.sampler == "grid")
            if finished + running >= budget:
                return
            trial = study.ask()
            trial.set_user_attr(LEASE_ATTR, lease.id)
        try:
            frozen = _run_trial(study, trial, objective)
        except Exception:
            mine = study.get_trials(deepcopy=False)
            if not any(t.number == trial.number and t.state.is_finished() for t in mine):
                raise
            # another worker judged this one dead (its lease was lost, e.g. the database
            # restarted) and failed the trial; its retry runs elsewhere
            logger.warning("[search] trial %d: taken over by another worker (this worker's "
                           "lease was lost); going on", trial.number)
            continue
        failures = failures + 1 if frozen.state == TrialState.FAIL else 0
        if progress is not None:
            progress(frozen)
        reason = frozen.user_attrs.get("fail_reason")
        if failures >= max_failures:
            raise SearchError(f"search: {failures} trials failed in a row; the last one: "
                              f"{reason}")
        error = (_same_error(reason) if frozen.state == TrialState.FAIL
                 and frozen.user_attrs.get("fail_kind") == "error" else None)
        if error is not None and last_error is not None and error == last_error[0]:
            raise SearchError(f"search: trials {last_error[1]} and {frozen.number} failed with "
                              "the same error, so it does not depend on the sampled values; "
                              f"stopped: {reason}")
        last_error = None if error is None else (error, frozen.number)


def _run_trial(study, trial, objective):
    """Run one trial and tell the storage how it ended; return the frozen trial."""
    import optuna
    from optuna.trial import TrialState

    try:
        value = objective(trial)
    except optuna.TrialPruned as exc:
        trial.set_user_attr("prune_reason", str(exc))
        return _tell(study, trial, state=TrialState.PRUNED)
    except Exception as exc:  # noqa: BLE001 - recorded on the trial, the study goes on
        if "fail_reason" not in trial.user_attrs:
            trial.set_user_attr("fail_reason", f"{type(exc).__name__}: {exc}")
        if "fail_kind" not in trial.user_attrs:
            trial.set_user_attr("fail_kind", _failure_kind(exc))
        return _tell(study, trial, state=TrialState.FAIL)
    except BaseException:
        trial.set_user_attr("fail_reason", "interrupted")
        _tell(study, trial, state=TrialState.FAIL)
        raise
    return _tell(study, trial, value)


def _tell(study, trial, value=None, state=None):
    """``study.tell``; a trial another worker has finished meanwhile is left as it is."""
    return study.tell(trial, value, state=state, skip_if_finished=True)


def _log_trial(trial) -> None:
    value = "-" if trial.value is None else f"{trial.value:.4f}"
    why = trial.user_attrs.get("fail_reason", trial.user_attrs.get("prune_reason", ""))
    logger.info(f"[search] trial {trial.number}: {trial.state.name.lower()} value={value} "
                f"epochs={trial.user_attrs.get('epochs', '-')} {why}".rstrip())


class _Forward:
    """A queue listener's handler: a record from a spawned worker goes through this process's
    logger of the same name (so its handlers, caplog included, see it)."""

    def handle(self, record: logging.LogRecord) -> None:
        logging.getLogger(record.name).handle(record)


def _worker_logging(queue, level: int) -> None:
    """In a spawned worker: send nnpipe's records to the parent process (which shows them)."""
    from logging.handlers import QueueHandler

    root = logging.getLogger("nnpipe")
    root.addHandler(QueueHandler(queue))
    root.setLevel(level)
    root.propagate = False


def _worker(raw, data, settings_dict, journal, worker, threads, fp):
    """One search process (spawned): its own torch threads, sampler seed and objective."""
    import torch

    torch.set_num_threads(threads)
    settings = SearchSettings(**settings_dict)
    X, y, task, shape = data
    storage = storage_from_url(settings.storage, journal)
    study = make_study(settings, journal, worker, fingerprint=fp, storage=storage)
    optimize(study, make_objective(raw, X, y, task, shape, settings), settings, journal,
             _log_trial, storage=storage)


def run_search(raw: Dict[str, Any], X, y, task: str, input_shape=None, *,
               settings: Optional[SearchSettings] = None, journal: os.PathLike = "search.journal"):
    """Run (or resume) the study declared in ``raw["search"]`` on ``(X, y)``; return it.

    A study is resumed only when the data and every setting a trial reads are unchanged
    (:func:`fingerprint`); otherwise a new one starts beside the old in the storage. Searched
    keys that params.yaml sets explicitly are fixed at that value (:func:`fixed_by_params`).
    Before the first trial, :func:`preflight` stops a configuration that cannot train at all.

    ``n_jobs > 1`` runs that many workers against the same storage (this process and
    ``n_jobs - 1`` spawned ones), each with ``cpu_count // n_jobs`` torch threads so they do not
    oversubscribe the cores. Progress goes to the ``nnpipe.search`` logger.
    """
    settings = settings or SearchSettings.from_section(raw.get("search"), task)
    validate_space(raw, settings)
    settings = without_fixed_keys(raw, settings)
    with _optuna_quiet():
        study, storage, fp = open_study(raw, X, y, task, input_shape, settings, journal)
        finished, _ = _counts(study, include_failed=settings.sampler == "grid")
        if finished < _budget(settings):
            preflight(raw, X, y, task, input_shape, settings)
        if settings.n_jobs == 1:
            optimize(study, make_objective(raw, X, y, task, input_shape, settings), settings,
                     journal, _log_trial, storage=storage)
            return study
        _run_parallel(raw, (X, y, task, input_shape), settings, journal, fp, storage)
        return make_study(settings, journal, fingerprint=fp, storage=storage)


def _run_parallel(raw, data, settings: SearchSettings, journal, fp: str, storage) -> None:
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor
    from logging.handlers import QueueListener

    import torch

    X, y, task, input_shape = data
    threads = max(1, (os.cpu_count() or 1) // settings.n_jobs)
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    listener = QueueListener(queue, _Forward())
    listener.start()
    # n_jobs - 1 spawned workers, and one in this process: it starts at once, hiding the
    # others' start-up (importing torch & co. takes seconds)
    previous = torch.get_num_threads()
    try:
        with ProcessPoolExecutor(settings.n_jobs - 1, mp_context=ctx, initializer=_worker_logging,
                                 initargs=(queue, logger.getEffectiveLevel())) as pool:
            futures = [pool.submit(_worker, raw, data, settings.to_dict(), os.fspath(journal),
                                   w, threads, fp) for w in range(1, settings.n_jobs)]
            try:
                torch.set_num_threads(threads)
                optimize(make_study(settings, journal, 0, fingerprint=fp, storage=storage),
                         make_objective(raw, X, y, task, input_shape, settings), settings,
                         journal, _log_trial, storage=storage)
            finally:
                torch.set_num_threads(previous)
            for f in futures:
                f.result()
    finally:
        listener.stop()


# --------------------------------------------------------------------------- results


def best_overrides(study, space: Optional[Dict[str, dict]] = None) -> Dict[str, Any]:
    """The best trial's configuration as dotted params.yaml paths; with ``space`` (the current
    search space), only its keys: a value params.yaml fixes, or a key no longer searched, is
    never returned."""
    best = dict(study.best_trial.user_attrs.get("overrides", {}))
    return best if space is None else {k: v for k, v in best.items() if k in space}


def top_trials(study, k: int) -> List[Dict[str, Any]]:
    """The ``k`` best completed trials: number, value and configuration (for ensembles)."""
    from optuna.trial import TrialState

    done = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))]
    done.sort(key=lambda t: t.value, reverse=study.direction.name == "MAXIMIZE")
    return [{"number": t.number, "value": t.value, "overrides": t.user_attrs.get("overrides", {})}
            for t in done[:k]]


def trials_table(study) -> List[Dict[str, Any]]:
    """One row per trial: number, state, value, duration, epochs run, reason, parameters."""
    rows = []
    for t in study.get_trials(deepcopy=False):
        duration = (t.datetime_complete - t.datetime_start).total_seconds() \
            if t.datetime_complete and t.datetime_start else None
        rows.append({"number": t.number, "state": t.state.name, "value": t.value,
                     "duration_s": duration, "epochs": t.user_attrs.get("epochs"),
                     "reason": t.user_attrs.get("fail_reason", ""),
                     "retry_of": t.user_attrs.get(RETRY_ATTR),
                     **{f"params.{k}": v for k, v in t.params.items()}})
    return rows


def save_plots(study, directory: os.PathLike) -> List[str]:
    """Optimisation history, parameter importances, parallel coordinates and intermediate values
    as PNG (matplotlib) and HTML (plotly, with plotly.js written once beside them)."""
    import warnings

    import optuna.visualization as vis
    import optuna.visualization.matplotlib as vmpl

    directory = os.fspath(directory)
    os.makedirs(directory, exist_ok=True)
    written = []
    for name in ("optimization_history", "param_importances", "parallel_coordinate",
                 "intermediate_values"):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                ax = getattr(vmpl, f"plot_{name}")(study)
                fig = getattr(ax, "figure", None) or ax.flat[0].figure
                fig.set_size_inches(8, 5)
                fig.tight_layout()
                fig.savefig(os.path.join(directory, f"{name}.png"), dpi=100)
                import matplotlib.pyplot as plt

                plt.close(fig)
                getattr(vis, f"plot_{name}")(study).write_html(
                    os.path.join(directory, f"{name}.html"), include_plotlyjs="directory")
            written.append(name)
        except (ValueError, RuntimeError, ZeroDivisionError) as exc:
            with open(os.path.join(directory, f"{name}.txt"), "w") as fh:
                fh.write(f"not drawn: {exc}\n")
    return written

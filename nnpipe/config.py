"""params.yaml: the one place where YAML meets code.

``load_config`` reads and validates the whole file before any work starts and returns a
:class:`Config` whose builders turn sections into sklearn objects. Defaults live once, in the
library's signatures: a key left out of params.yaml is simply not passed, so the schema here
types and range-checks values but never restates a default.

Every problem is reported at once, each naming its key path, the value and what is allowed::

    params.yaml: 2 problems
      train.lr: must be a finite number > 0, got 'fast'
      model.activaton: unknown key. Did you mean 'activation'?
"""

from __future__ import annotations

import copy
import functools
import inspect
import math
import re
import sys
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Literal, Optional, Tuple, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ._datashape import (DIGITS_SHAPE, DataShape, DataShapeError, prepared_shape,
                         source_shape)
from ._registry import did_you_mean
from .exceptions import NnpipeError

__all__ = ["Config", "ConfigError", "load_config", "validate_config", "with_overrides",
           "check_against_data", "data_shape", "json_schema", "DataShape",
           "MODEL_KEYS", "SECTIONS"]


class ConfigError(NnpipeError, ValueError):
    """params.yaml is invalid; ``problems`` lists ``(key path, message)`` pairs."""

    def __init__(self, source: str, problems: List[Tuple[str, str]]):
        self.source, self.problems = source, problems
        lines = [f"  {path}: {msg}" if path else f"  {msg}" for path, msg in problems]
        n = len(problems)
        super().__init__(f"{source}: {n} problem{'s' if n > 1 else ''}\n" + "\n".join(lines))


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class DataSection(_Section):
    """Where the data comes from (:func:`nnpipe.data.load_dataset`)."""

    source: Optional[str] = None
    path: Optional[str] = None
    target: Optional[str] = None
    task: Optional[Literal["classification", "regression"]] = None
    test_size: Optional[float] = Field(None, gt=0, lt=1)
    random_state: Optional[int] = None
    stratify: Optional[bool] = None
    image_size: Optional[Tuple[int, int]] = None
    grayscale: Optional[bool] = None
    label_fraction: Optional[float] = Field(None, gt=0, le=1)


class CVSection(_Section):
    """k-fold cross-validation of the configured pipeline (:func:`nnpipe.cv.cross_validate_model`)."""

    folds: Optional[int] = Field(None, ge=2)
    repeats: Optional[int] = Field(None, ge=1)
    shuffle: Optional[bool] = None
    random_state: Optional[int] = None


class PruneSection(_Section):
    """Magnitude pruning reported by the evaluate stage (:func:`nnpipe.sparsity.prune`); the
    defaults live in ``prune``'s signature."""

    sparsity: float = Field(..., ge=0, lt=1)
    scope: Optional[Literal["global", "layer"]] = None
    fine_tune_epochs: Optional[int] = Field(None, ge=0)
    fine_tune_lr: Optional[float] = Field(None, gt=0)


class EvaluateSection(_Section):
    """Test-set evaluation."""

    ece_bins: Optional[int] = Field(None, ge=2, le=100)
    prune: Optional[PruneSection] = None
    fold_batchnorm: bool = False


class TrackingSection(_Section):
    """MLflow tracking (:mod:`nnpipe.tracking`)."""

    enabled: bool = True
    experiment: Optional[str] = None
    uri: Optional[str] = None


class PretrainSection(_Section):
    """Unsupervised pretraining (:mod:`nnpipe.pretrain`): the ``pretrain`` stage fits a
    ``Pretrainer`` with ``model``'s architecture on every training row, labeled or not; ``train``
    then starts from its encoder. Keys left out take the library's defaults: the Pretrainer's
    for pretraining, :func:`nnpipe.pretrain.fine_tune_params`' for ``freeze``,
    ``unfreeze_after`` and ``lr_multiplier`` (the reused layers' lr factor in ``train``)."""

    enabled: bool = False
    noise: Optional[Literal["gaussian", "mask"]] = None
    noise_level: Optional[float] = Field(None, gt=0)
    max_epochs: Optional[int] = Field(None, ge=1)
    lr: Optional[float] = Field(None, gt=0)
    batch_size: Optional[int] = None
    optimizer: Optional[str] = None
    lr_schedule: Optional[str] = None
    l2: Optional[float] = Field(None, ge=0)
    train_split: Optional[float] = Field(None, gt=0, lt=1)
    random_state: Optional[int] = None
    freeze: Optional[bool] = None
    unfreeze_after: Optional[int] = Field(None, ge=0)
    lr_multiplier: Optional[float] = Field(None, ge=0)


_FINE_TUNE_KEYS = ("freeze", "unfreeze_after", "lr_multiplier")


class _Root(_Section):
    data: DataSection = DataSection()
    preprocess: List[Union[str, Dict[str, Optional[Dict[str, Any]]]]] = []
    augment: Optional[Dict[str, Optional[Dict[str, Any]]]] = None
    model: Dict[str, Any] = {}
    train: Dict[str, Any] = {}
    cv: CVSection = CVSection()
    evaluate: EvaluateSection = EvaluateSection()
    tracking: TrackingSection = TrackingSection()
    pretrain: Optional[PretrainSection] = None


SECTIONS = tuple(_Root.model_fields)

#: estimator parameters that belong in ``model`` (architecture); the rest belong in ``train``.
MODEL_KEYS = ("module", "input_shape", "activation", "init", "batch_norm", "dropout")
_MODEL_PREFIXES = ("module__", "activation__")
_NOT_IN_YAML = ("callbacks", "augment", "iterator_train", "iterator_valid", "dataset",
                "predict_nonlinearity", "warm_start", "compile", "use_caching",
                "torch_load_kwargs", "classes")


def _estimator_class(task: Optional[str]):
    from .estimators import NNClassifier, NNRegressor

    return NNRegressor if task == "regression" else NNClassifier


def _estimator_keys(task: Optional[str]) -> List[str]:
    cls = _estimator_class(task)
    names = [k for k in inspect.signature(cls.__init__).parameters if k not in ("self", "kwargs")]
    return [k for k in names if k not in _NOT_IN_YAML]


_ROUTED = ("module__", "criterion__", "optimizer__", "lr_schedule__", "early_stopping__",
           "activation__", "iterator_train__", "iterator_valid__")


@dataclass
class Config:
    """A validated params.yaml. Sections are typed; ``model`` / ``train`` are estimator params."""

    source: str
    raw: Dict[str, Any]
    data: DataSection
    preprocess: list
    augment: Optional[Dict[str, Any]]
    model: Dict[str, Any]
    train: Dict[str, Any]
    cv: CVSection
    evaluate: EvaluateSection
    tracking: TrackingSection
    extra: Dict[str, Any] = field(default_factory=dict)
    search: Any = None  # nnpipe.search.SearchSettings when params.yaml has a search section
    pretrain: Optional[PretrainSection] = None

    @property
    def task(self) -> Optional[str]:
        return self.data.task

    def data_kwargs(self) -> Dict[str, Any]:
        return self.data.model_dump(exclude_unset=True)

    def estimator_params(self, input_shape: Optional[Tuple[int, ...]] = None) -> Dict[str, Any]:
        """``model`` + ``train`` (+ ``augment``) as estimator keyword arguments.

        ``input_shape`` (the data's) is used when ``model`` sets none and the network or the
        augmentation needs one (CNNs, image ops).
        """
        params = {**self.model, **self.train}
        if self.augment:
            params["augment"] = self.augment
        needs_shape = str(params.get("module", "mlp")) in ("cnn1d", "cnn2d") or self.augment \
            or params.get("tta")
        if "input_shape" not in params and input_shape is not None and needs_shape:
            params["input_shape"] = list(input_shape)
        return params

    def build_estimator(self, task: Optional[str] = None, input_shape=None, **overrides):
        """The configured ``NNClassifier`` / ``NNRegressor`` (``overrides`` win)."""
        cls = _estimator_class(task or self.task)
        return cls(**{**self.estimator_params(input_shape), **overrides})

    @property
    def pretrain_enabled(self) -> bool:
        return self.pretrain is not None and self.pretrain.enabled

    def build_pretrainer(self, input_shape=None, **overrides):
        """A ``Pretrainer`` with ``model``'s architecture and ``pretrain``'s training keys."""
        from .pretrain import Pretrainer

        arch = {k: v for k, v in self.estimator_params(input_shape).items()
                if k in MODEL_KEYS or k.startswith(_MODEL_PREFIXES)}
        section = {} if self.pretrain is None else self.pretrain.model_dump(
            exclude_none=True, exclude={"enabled", *_FINE_TUNE_KEYS})
        return Pretrainer(**{**arch, **section, **overrides})

    def fine_tune_kwargs(self) -> Dict[str, Any]:
        """``pretrain``'s fine-tuning keys for :func:`nnpipe.pretrain.fine_tune_params`."""
        if self.pretrain is None:
            return {}
        return self.pretrain.model_dump(exclude_none=True, include=set(_FINE_TUNE_KEYS))

    def build_preprocessing(self) -> list:
        """The ``preprocess`` steps as ``(name, transformer)`` pairs."""
        from .preprocessing import make_preprocessor

        steps = []
        for i, step in enumerate(self.preprocess):
            name, params = _step(step)
            steps.append((f"{i}_{name}", make_preprocessor(name, **(params or {}))))
        return steps

    def build_pipeline(self, task: Optional[str] = None, input_shape=None, **overrides):
        """Preprocessing + network as one sklearn ``Pipeline`` (fitted per fold in CV)."""
        from sklearn.pipeline import Pipeline

        est = self.build_estimator(task, input_shape, **overrides)
        return Pipeline(self.build_preprocessing() + [("model", est)])


def _key(key: Any) -> str:
    """A key as a path component; an empty one or one with outer spaces is quoted."""
    key = str(key)
    return key if key and key.strip() == key else repr(key)


def _pydantic_problems(exc: ValidationError, fields_of) -> List[Tuple[str, str]]:
    problems = []
    for err in exc.errors():
        loc = [str(p) for p in err["loc"]]
        path = ".".join(_key(p) for p in loc)
        value = err.get("input")
        if err["type"] == "extra_forbidden":
            parent = fields_of(loc[:-1])
            problems.append((path, "unknown key." + (did_you_mean(loc[-1], parent) or
                                                    f" Allowed: {sorted(parent)}.")))
        else:
            problems.append((path, f"{err['msg'].lower()}, got {value!r}"))
    return problems


def _fields_of(loc: List[str]) -> List[str]:
    if not loc:
        return list(_Root.model_fields)
    model = _Root.model_fields.get(loc[0])
    ann = getattr(model, "annotation", None)
    for candidate in (ann, *typing.get_args(ann)):  # Optional[Section] too
        if hasattr(candidate, "model_fields"):
            return list(candidate.model_fields)
    return []


Problems = List[Tuple[str, str]]


def _retry_dropping(check: Callable[[], None], locate: Callable[[str], Tuple[str, str]],
                    drop: Callable[[str], bool], problems: Problems, rounds: int,
                    errors: Tuple[type, ...] = (ValueError,)) -> None:
    """Run ``check`` until it passes, so that a check that stops at its first error still
    reports every problem: each error is located (``locate``: message -> (key path, message)),
    recorded, and its key dropped (``drop``: key path -> whether anything was dropped) before
    the next of at most ``rounds`` rounds."""
    for _ in range(rounds):
        try:
            check()
            return
        except errors as exc:
            problem = locate(str(exc))
            if problem not in problems:
                problems.append(problem)
            if not drop(problem[0]):
                return


def _misplaced(section: str, key: str, keys: List[str]) -> Optional[str]:
    """Why ``key`` does not belong in ``section`` (``model`` / ``train``), or None."""
    if not key.startswith(_ROUTED) and key not in keys:
        return "unknown key." + (did_you_mean(key, keys) or f" Allowed: {sorted(keys)}.")
    in_model = key in MODEL_KEYS or key.startswith(_MODEL_PREFIXES)
    if section == "model" and not in_model:
        return "is a training setting: move it to train."
    if section == "train" and in_model:
        return "is an architecture setting: move it to model."
    return None


def _config_shape(cfg: Config) -> Optional[Tuple[int, ...]]:
    """The sample shape known without the data: ``model.input_shape`` when it is a valid one,
    else (1, 8, 8) for the embedded digits; None when only the data can tell."""
    shape = cfg.model.get("input_shape")
    if shape is None and cfg.data.source in (None, "digits"):
        return DIGITS_SHAPE
    valid = isinstance(shape, (list, tuple)) and shape and all(
        isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in shape)
    return tuple(shape) if valid else None


def _drop_estimator_key(cfg: Config, path: str) -> bool:
    """Drop ``model.<key>`` / ``train.<key>`` and the parameters routed to it (``<key>__*``)."""
    section, _, key = path.partition(".")
    if section not in ("model", "train") or not key:
        return False
    dropped = False
    for params in (cfg.model, cfg.train):
        for name in [k for k in params if k == key or k.startswith(key + "__")]:
            del params[name]
            dropped = True
    return dropped


def _check_estimator_sections(cfg: Config, problems: Problems) -> None:
    keys = _estimator_keys(cfg.task)
    for section in ("model", "train"):
        params = getattr(cfg, section)
        for key in list(params):
            why = _misplaced(section, key, keys)
            if why:
                problems.append((f"{section}.{_key(key)}", why))
                del params[key]
    shape = _config_shape(cfg)
    # augment is checked op by op (_check_augment); without a known sample shape (it comes with
    # the data: check_against_data) the CNN sizes and tta are checked later
    overrides = {"augment": None, **({} if shape is not None else {"tta": None})}

    def check() -> None:
        est = cfg.build_estimator(input_shape=shape, **overrides)
        try:
            n_features = math.prod(est.input_shape) if est.input_shape is not None else None
        except TypeError:
            n_features = None  # validate_params says what is wrong with input_shape
        est.validate_params(n_features=n_features)

    _retry_dropping(check, lambda msg: _locate(msg, cfg),
                    lambda path: _drop_estimator_key(cfg, path), problems,
                    rounds=len(cfg.model) + len(cfg.train) + 1)


def _augment_problems(augment: Dict[str, Any], shape: Optional[Tuple[int, ...]],
                      check_shape: bool, context: str = "") -> Problems:
    """Each op of an ``augment`` mapping built on its own and, with ``check_shape``, checked
    against the sample shape by the same :meth:`Augmenter.check_shape` that ``fit`` calls."""
    from .augment import Augmenter

    problems = []
    for name, params in augment.items():
        try:
            aug = Augmenter.from_config({name: params})
            if check_shape:
                aug.check_shape(shape)
        except ValueError as exc:
            problems.append((f"augment.{_key(name)}", f"{context}{exc}"))
    return problems


def _check_augment(cfg: Config, problems: Problems) -> None:
    if not cfg.augment:
        return
    shape = _config_shape(cfg)
    found = _augment_problems(cfg.augment, shape, check_shape=shape is not None)
    problems.extend(found)
    bad = {path for path, _ in found}
    cfg.augment = {k: v for k, v in cfg.augment.items() if f"augment.{_key(k)}" not in bad}


def _check_pretrain(cfg: Config, problems: Problems) -> None:
    pre = cfg.pretrain
    if pre is None or not pre.enabled:
        return
    start = len(problems)
    why = "conflicts with pretrain.enabled, which sets it for the reused layers; remove one"
    for key in ("transfer_from", "transfer_layers"):
        if key in cfg.train:
            problems.append((f"train.{key}", "conflicts with pretrain.enabled: train starts "
                                             "from the pretrain stage's encoder; remove it"))
    for ours, theirs in (("freeze", "freeze"), ("unfreeze_after", "unfreeze_after"),
                         ("lr_multiplier", "lr_multipliers")):
        if getattr(pre, ours) not in (None, False) and theirs in cfg.train:
            problems.append((f"train.{theirs}", f"{why} (pretrain.{ours})"))
    if pre.unfreeze_after is not None and not pre.freeze:
        problems.append(("pretrain.unfreeze_after", "needs pretrain.freeze: true (only frozen "
                                                    "layers can be unfrozen)"))
    if pre.noise_level is not None and pre.noise is None:
        problems.append(("pretrain.noise_level", "has no effect without pretrain.noise "
                                                 "('gaussian' or 'mask')"))
    if len(problems) > start:
        return
    shape = _config_shape(cfg)
    try:
        est = cfg.build_pretrainer(input_shape=shape)
        est.validate_params(n_features=math.prod(est.input_shape) if est.input_shape else None)
    except ValueError as exc:
        msg = str(exc)
        head = msg.split(" ", 1)[0].rstrip(":")
        fields = set(PretrainSection.model_fields)
        problems.append((f"pretrain.{head}", msg.split(" ", 1)[1]) if head in fields
                        else ("pretrain", msg))


def _locate(message: str, cfg: Config) -> Tuple[str, str]:
    """Turn an estimator error ('lr must be ...') into ('train.lr', 'must be ...')."""
    head = message.split(" ", 1)[0].rstrip(":")
    for section in ("model", "train"):
        if head in getattr(cfg, section):
            return f"{section}.{head}", message.split(" ", 1)[1]
    if head.startswith("augment"):
        return "augment", message
    return "model/train", message


def _malformed(value: Any, path: str = "") -> List[Tuple[str, str]]:
    """Problems no schema check should meet: keys that are not text (YAML reads ``1:``,
    ``null:``, ``true:`` as an int, None, a bool) and integers beyond the float range (YAML
    reads ``1000...000`` as one; comparing it with a float raises ``OverflowError``)."""
    if isinstance(value, dict):
        problems = []
        for k, v in value.items():
            where = f"{path}.{_key(k)}" if path else _key(k)
            if not isinstance(k, str):
                problems.append((where, f"keys must be text, got {k!r} ({type(k).__name__}); "
                                        "quote it if it is meant as a name"))
            else:
                problems += _malformed(v, where)
        return problems
    if isinstance(value, list):
        return [p for i, v in enumerate(value) for p in _malformed(v, f"{path}[{i}]")]
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) > sys.float_info.max:
        return [(path, f"must be a number within the float range (|x| <= "
                       f"{sys.float_info.max:.4g}), got an integer of {len(str(abs(value)))} "
                       "digits")]
    return []


def _prune(tree: Dict[str, Any], loc: Tuple[Any, ...]) -> bool:
    """Delete the deepest mapping entry on a pydantic error location; whether one was found."""
    node, last = tree, None
    for part in loc:
        if not (isinstance(node, dict) and part in node):
            break
        last, node = (node, part), node[part]
    if last is None:
        return False
    del last[0][last[1]]
    return True


def _validate_root(body: Dict[str, Any], problems: Problems) -> Tuple[_Root, Dict[str, Any]]:
    """The typed sections, and ``body`` without the values pydantic refused (their problems
    are recorded), so that the other checks still run on everything else."""
    body = copy.deepcopy(body)
    for attempt in range(_MAX_PRUNE_ROUNDS):
        try:
            return _Root.model_validate(body), body
        except ValidationError as exc:
            if attempt == 0:  # pydantic reports every error at once; later rounds only prune
                problems.extend(_pydantic_problems(exc, _fields_of))
            if not any([_prune(body, tuple(err["loc"])) for err in exc.errors()]):
                break
    return _Root(), {}


_MAX_PRUNE_ROUNDS = 20


def _section_of(path: str) -> str:
    return re.split(r"[.\[/]", path, maxsplit=1)[0]


def validate_config(raw: Any, source: str = "params.yaml", data: Any = None) -> Config:
    """Validate a parsed params mapping; raise :class:`ConfigError` listing every problem.

    Parameters
    ----------
    raw : mapping
        The parsed params.yaml.
    source : str
        Its name in messages.
    data : DataShape, path, True or None
        Also check what the data's shape decides (:func:`check_against_data`): a
        :class:`DataShape`; the prepare stage's folder (its shape is read); ``True``: the shape
        of the source that the ``data`` section names, read cheaply; None: no data check.
    """
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(source, [("", f"the file must be a mapping of sections "
                                        f"{list(SECTIONS)}, got {type(raw).__name__}")])
    malformed = _malformed(raw)
    if malformed:
        raise ConfigError(source, malformed)
    extra = {k: raw[k] for k in raw if k in ("search", "ensemble")}  # checked below
    problems: Problems = []
    root, clean = _validate_root({k: v for k, v in raw.items() if k not in extra}, problems)
    augment = None if root.augment is None else dict(root.augment)
    cfg = Config(source, raw, root.data, list(root.preprocess), augment, dict(root.model),
                 dict(root.train), root.cv, root.evaluate, root.tracking, extra,
                 pretrain=root.pretrain)
    # each check records its problems and drops the values it refused from ``cfg`` (which is
    # returned only when there are none), so that later checks see only what passed
    checks = [("preprocess", _check_preprocess), ("augment", _check_augment),
              ("model/train", _check_estimator_sections), ("pretrain", _check_pretrain),
              ("ensemble", lambda c, p: _check_ensemble(raw, c, p)),
              ("search", lambda c, p: _check_search(raw, c, p, clean)),
              ("data", lambda c, p: _check_data(c, p, data))]
    cause = None
    for stage, check in checks:
        try:
            check(cfg, problems)
        except (TypeError, AttributeError, LookupError, ArithmeticError, StopIteration) as exc:
            # a value of a form no check foresaw: still a ConfigError naming the section, never
            # a traceback (``__cause__`` keeps the original; the fuzz tests treat it as a bug)
            cause = cause or exc
            problems.append((stage, f"a value has a type or form that could not be checked: "
                                    f"{type(exc).__name__}: {exc}"))
    if problems:
        raise ConfigError(source, problems) from cause
    return cfg


def _check_preprocess(cfg: Config, problems: Problems) -> None:
    from .preprocessing import make_preprocessor

    kept = []
    for i, step in enumerate(cfg.preprocess):
        if isinstance(step, dict) and len(step) != 1:
            problems.append((f"preprocess[{i}]", "each step must be a name or a mapping with one "
                                                 f"name: {{name: {{param: value}}}}, got {step!r}"))
            continue
        name, params = _step(step)
        try:
            make_preprocessor(name, **(params or {}))
        except ValueError as exc:
            problems.append((f"preprocess[{i}]", str(exc)))
            continue
        kept.append(step)
    cfg.preprocess = kept


def _step(step: Any) -> Tuple[str, Optional[Dict[str, Any]]]:
    """A ``preprocess`` entry as ``(name, params)``."""
    return (step, {}) if isinstance(step, str) else next(iter(step.items()))


@functools.lru_cache(maxsize=1)
def _search_types():
    """A strict pydantic model of SearchSettings' field types (no defaults restated: a key left
    out is not checked here, and SearchSettings keeps the defaults)."""
    import typing

    from pydantic import create_model

    from .search import SearchSettings

    hints = typing.get_type_hints(SearchSettings)
    return create_model("search", __config__=ConfigDict(strict=True, extra="ignore"),
                        **{k: (t, None) for k, t in hints.items()})


def _check_search(raw: Dict[str, Any], cfg: Config, problems: Problems,
                  clean: Optional[Dict[str, Any]] = None) -> None:
    from dataclasses import replace

    from .search import SearchSettings, validate_space

    if "search" not in raw:
        return
    section = raw.get("search")
    if section is not None and not isinstance(section, dict):
        problems.append(("search", f"must be a mapping of search settings, got {section!r}"))
        return
    start, section = len(problems), dict(section or {})
    try:
        _search_types().model_validate(section)
    except ValidationError as exc:
        for err in exc.errors():
            problems.append(("search." + ".".join(str(p) for p in err["loc"]),
                             f"{err['msg'].lower()}, got {err.get('input')!r}"))
            section.pop(err["loc"][0], None)
    task = cfg.task or ("classification" if cfg.data.source in (None, "digits") else None)
    found: List[Any] = []

    def check() -> None:
        found[:] = [SearchSettings.from_section(section, task)]

    def drop(path: str) -> bool:
        parts = path.split(".")
        if len(parts) < 2 or parts[1] not in section:
            return False
        del section[parts[1]]
        return True

    _retry_dropping(check, lambda msg: _split_path(msg, "search"), drop, problems,
                    rounds=len(section) + 1)
    if len(problems) > start or not found:
        return
    settings = found[0]
    base = _space_base(raw, cfg, problems, clean) if settings.enabled else None
    if base is not None:
        for key, spec in settings.space.items():  # each entry on its own: every bad one is named
            try:
                validate_space(base, replace(settings, space={key: spec}))
            except ValueError as exc:
                problems.append(_split_path(str(exc), "search"))
    cfg.search = settings


def _space_base(raw: Dict[str, Any], cfg: Config, problems: Problems,
                clean: Optional[Dict[str, Any]]) -> Optional[Dict[str, Any]]:
    """The file a search-space entry is checked against (each entry's value set in it): the
    file itself when nothing else had a problem; else the file without the values refused
    (the checks dropped them), if that validates; else None (the space is not checked)."""
    if not problems:
        return {k: v for k, v in raw.items() if k != "search"}
    base = {**(clean or {}), "model": cfg.model, "train": cfg.train, "augment": cfg.augment,
            "preprocess": cfg.preprocess}
    if "ensemble" in raw and not any(_section_of(p) == "ensemble" for p, _ in problems):
        base["ensemble"] = raw["ensemble"]
    try:
        validate_config(base, cfg.source)
    except ConfigError:
        return None
    return base


def _split_path(msg: str, default: str) -> Tuple[str, str]:
    """'search.sampler must be ...' -> ('search.sampler', 'must be ...')."""
    match = re.match(r"(search(?:\.[A-Za-z0-9_]+)*)([:= ])", msg)
    if not match:
        return default, msg
    head, sep = match.groups()
    rest = msg[match.end():].strip() if sep != "=" else msg
    return head, rest


_ENSEMBLE_KEYS = ("enabled", "kind", "n_members", "combine", "validation_fraction", "temperature",
                  "swa_start", "n_jobs", "backend", "random_state", "max_retries")


def ensemble_kwargs(raw: Dict[str, Any]) -> Dict[str, Any]:
    """The ``ensemble`` section as EnsembleClassifier / EnsembleRegressor keyword arguments."""
    return {k: v for k, v in (raw.get("ensemble") or {}).items() if k != "enabled"}


def _check_ensemble(raw: Dict[str, Any], cfg: Config, problems: Problems) -> None:
    if "ensemble" not in raw:
        return
    section = raw.get("ensemble") or {}
    if not isinstance(section, dict):
        problems.append(("ensemble", f"must be a mapping, got {section!r}"))
        return
    for key in section:
        if key not in _ENSEMBLE_KEYS:
            problems.append((f"ensemble.{_key(key)}", "unknown key." + (
                did_you_mean(key, _ENSEMBLE_KEYS) or f" Allowed: {list(_ENSEMBLE_KEYS)}.")))
    if not isinstance(section.get("enabled", False), bool):
        problems.append(("ensemble.enabled", f"must be true or false, got "
                                             f"{section['enabled']!r}"))
        return
    if not section.get("enabled", False):
        return
    from .ensemble import EnsembleClassifier, EnsembleRegressor

    cls = EnsembleRegressor if cfg.task == "regression" else EnsembleClassifier
    kwargs = {k: v for k, v in ensemble_kwargs(raw).items() if k in _ENSEMBLE_KEYS}
    if kwargs.get("kind") == "topk":
        search = raw.get("search") or {}
        if not search.get("enabled"):
            problems.append(("ensemble.kind", "'topk' needs a finished search: set "
                                              "search.enabled: true"))
            return
        kwargs["configs"] = [{}]  # the real configurations come from the search's results

    def check() -> None:
        ens = cls(**kwargs)
        ens._check()
        if ens.kind in ("snapshot", "checkpoints"):
            epochs = cfg.train.get("max_epochs")
            if epochs is not None and ens.n_members > epochs:
                raise ValueError(f"ensemble.n_members: {ens.kind} with {ens.n_members} members "
                                 f"needs max_epochs >= {ens.n_members}, got {epochs}.")

    def locate(msg: str) -> Tuple[str, str]:
        head = msg.split(" ", 1)[0].rstrip(":")
        return (head, msg.split(" ", 1)[1]) if head.startswith("ensemble.") else ("ensemble", msg)

    def drop(path: str) -> bool:
        key = path[len("ensemble."):]
        if not path.startswith("ensemble.") or key not in kwargs:
            return False
        del kwargs[key]
        return True

    _retry_dropping(check, locate, drop, problems, rounds=len(kwargs) + 1,
                    errors=(TypeError, ValueError))


def _check_data(cfg: Config, problems: Problems, data: Any) -> None:
    """With ``data`` (see :func:`validate_config`), add what the data's shape decides."""
    if data is None or any(_section_of(path) == "data" for path, _ in problems):
        return
    if not isinstance(data, DataShape):
        try:
            data = data_shape(cfg, None if data is True else data)
        except DataShapeError as exc:
            problems.append((exc.key, exc.message))
            return
        if data is None:
            return
    found = _data_problems(cfg, data.task or cfg.task, data.input_shape, data.n_features,
                           data.describe())
    problems.extend(p for p in found if p not in problems)


def data_shape(cfg: Config, folder: Any = None) -> Optional[DataShape]:
    """The data's shape, read cheaply: of the prepare stage's ``folder`` when given, else of the
    source that ``cfg.data`` names (None for a source nnpipe cannot read without loading it).

    Raises
    ------
    DataShapeError
        When ``cfg.data`` names a missing file or CSV column (``exc.key`` is its key path).
    FileNotFoundError
        When ``folder`` is not a prepared data folder.
    """
    return prepared_shape(folder) if folder is not None else source_shape(cfg.data)


def _data_problems(cfg: Config, task: Optional[str], input_shape: Optional[Tuple[int, ...]],
                   n_features: int, where: str = "the data") -> Problems:
    """What the data's shape decides: the network's input, augmentation and tta.

    The network is checked by the estimator's own ``validate_params`` and the augmentation by
    the same :meth:`Augmenter.check_shape` that ``fit`` calls, so the rules are not restated.
    """
    shape = None if input_shape is None else tuple(int(s) for s in input_shape)
    context = f"does not fit the data ({where}): "
    est = cfg.build_estimator(task, shape, augment=None)
    problems = []
    try:
        est.validate_params(n_features=n_features)
    except ValueError as exc:
        head = str(exc).split(" ", 1)[0].rstrip(":")
        key = head if head in cfg.model or head in cfg.train else \
            "input_shape" if "input_shape" in cfg.model else "module"
        section = "train" if key in cfg.train else "model"
        problems.append((f"{section}.{key}", f"{getattr(est, key, None)!r} {context}{exc}"))
    # the sample shape that fit gives the augmentation (NNClassifier._sample_shape)
    sample = tuple(est.input_shape) if est.input_shape is not None else \
        (1, n_features) if est.module == "cnn1d" else None
    if cfg.augment:
        problems += [(path, f"{cfg.augment[path.split('.', 1)[1]]!r} {context}{msg}")
                     for path, msg in _augment_problems(cfg.augment, sample, True)]
    return problems


def check_against_data(cfg: Config, task: Optional[str], input_shape: Optional[Tuple[int, ...]],
                       n_features: int) -> None:
    """Check what the data's shape decides, before any work: a 2-D CNN needs ``input_shape``
    (C, H, W) holding exactly the data's features (a 1-D CNN likewise), image augmentation ops
    need images, sequence ops sequences, and every op needs a sample shape (not flat rows).

    Stages call it after :func:`nnpipe.data.read_dataset` (``ds.task``, ``ds.input_shape``,
    ``ds.X_train.shape[1]``); ``nnpipe check`` does it with the shape read from the source.

    Raises
    ------
    ConfigError
        Listing each problem with its key path (``model.module``, ``augment.shift``), the value
        and why.

    Examples
    --------
    >>> cfg = validate_config({"data": {"source": "csv"}, "model": {"module": "cnn2d"}})
    >>> check_against_data(cfg, "classification", None, 6)  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    nnpipe.config.ConfigError: params.yaml: 1 problem
      model.module: 'cnn2d' does not fit the data (the data): CNN2d needs input_shape=...
    """
    problems = _data_problems(cfg, task, input_shape, n_features)
    if problems:
        raise ConfigError(cfg.source, problems)


def with_overrides(cfg: Config, overrides: Dict[str, Any]) -> Config:
    """``cfg`` with dotted params.yaml paths set (the search's best parameters)."""
    if not overrides:
        return cfg
    from .search import apply_overrides

    return validate_config(apply_overrides(cfg.raw, overrides), cfg.source)


def load_config(path: Union[str, Path] = "params.yaml", data: Any = None) -> Config:
    """Read and validate a params file (``data``: also check it against the data's shape, as
    :func:`validate_config` says)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such params file.")
    try:
        with path.open("rb") as fh:  # bytes: YAML finds the encoding and rejects bad characters
            raw = yaml.safe_load(fh)
    except yaml.YAMLError as exc:
        raise ConfigError(str(path), [("", f"not valid YAML: {exc}")]) from None
    except RecursionError:
        raise ConfigError(str(path), [("", "not valid YAML here: nested deeper than the parser "
                                           "can follow")]) from None
    return validate_config(raw, str(path), data)


def json_schema() -> Dict[str, Any]:
    """A JSON schema of params.yaml for editors (autocomplete of sections and knobs)."""
    schema = _Root.model_json_schema()
    schema["title"] = "nnpipe params.yaml"
    keys = _estimator_keys("classification")
    props = schema.setdefault("properties", {})
    for section, wanted in (("model", lambda k: k in MODEL_KEYS),
                            ("train", lambda k: k not in MODEL_KEYS)):
        props[section] = {
            "type": "object",
            "description": f"NNClassifier / NNRegressor parameters ({section})",
            "properties": {k: {} for k in keys if wanted(k)},
            "patternProperties": {f"^({'|'.join(p.rstrip('_') for p in _ROUTED)})__": {}},
            "additionalProperties": False,
        }
    from pydantic import TypeAdapter

    from .search import SearchSettings

    search = TypeAdapter(SearchSettings).json_schema()
    search["description"] = "Optuna search (nnpipe.search.SearchSettings)"
    search["additionalProperties"] = False
    props["search"] = search
    props["ensemble"] = {"type": ["object", "null"], "description": "nnpipe.ensemble (stage "
                         "'ensemble')", "properties": {k: {} for k in _ENSEMBLE_KEYS},
                         "additionalProperties": False}
    return schema

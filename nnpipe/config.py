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

import functools
import inspect
import math
import sys
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Literal, Optional, Tuple, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ._registry import did_you_mean

__all__ = ["Config", "ConfigError", "load_config", "validate_config", "with_overrides",
           "json_schema",
           "MODEL_KEYS", "SECTIONS"]


class ConfigError(ValueError):
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
            name, params = (step, {}) if isinstance(step, str) else next(iter(step.items()))
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


def _check_estimator_sections(cfg: Config, problems: List[Tuple[str, str]]) -> None:
    keys = _estimator_keys(cfg.task)
    for section in ("model", "train"):
        for key in getattr(cfg, section):
            routed = key.startswith(_ROUTED)
            if not routed and key not in keys:
                problems.append((f"{section}.{_key(key)}", "unknown key." + (
                    did_you_mean(key, keys) or f" Allowed: {sorted(keys)}.")))
                continue
            in_model = key in MODEL_KEYS or key.startswith(_MODEL_PREFIXES)
            if section == "model" and not in_model:
                problems.append((f"model.{key}", "is a training setting: move it to train."))
            if section == "train" and in_model:
                problems.append((f"train.{key}", "is an architecture setting: move it to model."))
    if problems:
        return
    shape = cfg.model.get("input_shape")
    if shape is None and cfg.data.source in (None, "digits"):
        shape = (1, 8, 8)  # the embedded default dataset
    # without a known sample shape (it comes with the data, after prepare) the image ops and
    # CNN sizes are checked by the train stage before it fits
    overrides = {} if shape is not None else {"augment": None, "tta": None}
    try:
        est = cfg.build_estimator(input_shape=shape, **overrides)
        try:
            n_features = math.prod(est.input_shape) if est.input_shape is not None else None
        except TypeError:
            n_features = None  # validate_params says what is wrong with input_shape
        est.validate_params(n_features=n_features)
    except ValueError as exc:
        problems.append(_locate(str(exc), cfg))


def _check_pretrain(cfg: Config, problems: List[Tuple[str, str]]) -> None:
    pre = cfg.pretrain
    if pre is None or not pre.enabled:
        return
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
    if problems:
        return
    shape = cfg.model.get("input_shape")
    if shape is None and cfg.data.source in (None, "digits"):
        shape = (1, 8, 8)
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


def validate_config(raw: Any, source: str = "params.yaml") -> Config:
    """Validate a parsed params mapping; raise :class:`ConfigError` listing every problem."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(source, [("", f"the file must be a mapping of sections "
                                        f"{list(SECTIONS)}, got {type(raw).__name__}")])
    malformed = _malformed(raw)
    if malformed:
        raise ConfigError(source, malformed)
    extra = {k: raw[k] for k in raw if k in ("search", "ensemble")}  # checked below
    body = {k: v for k, v in raw.items() if k not in extra}
    try:
        root = _Root.model_validate(body)
    except ValidationError as exc:
        raise ConfigError(source, _pydantic_problems(exc, _fields_of)) from None
    cfg = Config(source, raw, root.data, root.preprocess, root.augment, dict(root.model),
                 dict(root.train), root.cv, root.evaluate, root.tracking, extra,
                 pretrain=root.pretrain)
    problems: List[Tuple[str, str]] = []
    stage = "preprocess"
    try:
        _check_preprocess(cfg, problems)
        stage = "augment"
        if cfg.augment is not None:
            try:
                from .augment import Augmenter
                Augmenter.from_config(cfg.augment)
            except ValueError as exc:
                problems.append(("augment", str(exc)))
        stage = "model/train"
        if not problems:
            _check_estimator_sections(cfg, problems)
        stage = "pretrain"
        if not problems:
            _check_pretrain(cfg, problems)
        stage = "search"
        if not problems and "search" in raw:
            _check_search(raw, cfg, problems)
        stage = "ensemble"
        if not problems and "ensemble" in raw:
            _check_ensemble(raw, cfg, problems)
    except (TypeError, AttributeError, LookupError, ArithmeticError, StopIteration) as exc:
        # a value of a form no check foresaw: still a ConfigError naming the section, never a
        # traceback (``__cause__`` keeps the original; the fuzz tests treat this as a bug)
        raise ConfigError(source, problems + [(stage, f"a value has a type or form that could "
                                                      f"not be checked: {type(exc).__name__}: "
                                                      f"{exc}")]) from exc
    if problems:
        raise ConfigError(source, problems)
    return cfg


def _check_preprocess(cfg: Config, problems: List[Tuple[str, str]]) -> None:
    for i, step in enumerate(cfg.preprocess):
        if isinstance(step, dict) and len(step) != 1:
            problems.append((f"preprocess[{i}]", "each step must be a name or a mapping with one "
                                                 f"name: {{name: {{param: value}}}}, got {step!r}"))
    if problems:
        return
    try:
        cfg.build_preprocessing()
    except ValueError as exc:
        problems.append(("preprocess", str(exc)))


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


def _check_search(raw: Dict[str, Any], cfg: Config, problems: List[Tuple[str, str]]) -> None:
    from .search import SearchSettings, validate_space

    section = raw.get("search")
    if section is not None and not isinstance(section, dict):
        problems.append(("search", f"must be a mapping of search settings, got {section!r}"))
        return
    try:
        _search_types().model_validate(section or {})
    except ValidationError as exc:
        problems.extend(("search." + ".".join(str(p) for p in err["loc"]),
                         f"{err['msg'].lower()}, got {err.get('input')!r}") for err in exc.errors())
        return
    try:
        task = cfg.task or ("classification" if cfg.data.source in (None, "digits") else None)
        settings = SearchSettings.from_section(raw.get("search"), task)
        if settings.enabled:
            validate_space({k: v for k, v in raw.items() if k != "search"}, settings)
        cfg.search = settings
    except ValueError as exc:
        problems.append(_split_path(str(exc), "search"))


def _split_path(msg: str, default: str) -> Tuple[str, str]:
    """'search.sampler must be ...' -> ('search.sampler', 'must be ...')."""
    import re

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


def _check_ensemble(raw: Dict[str, Any], cfg: Config, problems: List[Tuple[str, str]]) -> None:
    section = raw.get("ensemble") or {}
    if not isinstance(section, dict):
        problems.append(("ensemble", f"must be a mapping, got {section!r}"))
        return
    if not isinstance(section.get("enabled", False), bool):
        problems.append(("ensemble.enabled", f"must be true or false, got "
                                             f"{section['enabled']!r}"))
    for key in section:
        if key not in _ENSEMBLE_KEYS:
            problems.append((f"ensemble.{_key(key)}", "unknown key." + (
                did_you_mean(key, _ENSEMBLE_KEYS) or f" Allowed: {list(_ENSEMBLE_KEYS)}.")))
    if problems or not section.get("enabled", False):
        return
    from .ensemble import EnsembleClassifier, EnsembleRegressor

    cls = EnsembleRegressor if cfg.task == "regression" else EnsembleClassifier
    kwargs = ensemble_kwargs(raw)
    if kwargs.get("kind") == "topk":
        search = raw.get("search") or {}
        if not search.get("enabled"):
            problems.append(("ensemble.kind", "'topk' needs a finished search: set "
                                              "search.enabled: true"))
            return
        kwargs["configs"] = [{}]  # the real configurations come from the search's results
    try:
        ens = cls(**kwargs)
        ens._check()
        if ens.kind in ("snapshot", "checkpoints"):
            epochs = cfg.train.get("max_epochs")
            if epochs is not None and ens.n_members > epochs:
                raise ValueError(f"ensemble.n_members: {ens.kind} with {ens.n_members} members "
                                 f"needs max_epochs >= {ens.n_members}, got {epochs}.")
    except (TypeError, ValueError) as exc:
        msg = str(exc)
        head = msg.split(" ", 1)[0].rstrip(":")
        problems.append((head, msg.split(" ", 1)[1]) if head.startswith("ensemble.")
                        else ("ensemble", msg))


def with_overrides(cfg: Config, overrides: Dict[str, Any]) -> Config:
    """``cfg`` with dotted params.yaml paths set (the search's best parameters)."""
    if not overrides:
        return cfg
    from .search import apply_overrides

    return validate_config(apply_overrides(cfg.raw, overrides), cfg.source)


def load_config(path: Union[str, Path] = "params.yaml") -> Config:
    """Read and validate a params file."""
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
    return validate_config(raw, str(path))


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

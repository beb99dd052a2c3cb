"""``NNClassifier`` and ``NNRegressor``: skorch nets whose training techniques are plain parameters.

Both subclass skorch's nets and override only its template methods (``initialize_module``,
``get_loss``, ``train_step_single``, ``get_iterator``, ...); the training loop is skorch's.
"""

from __future__ import annotations

import contextlib
import inspect
import math
import sys
import threading
from numbers import Integral, Real
from typing import Any, Dict, Optional

import numpy as np
import torch
from skorch import NeuralNet, NeuralNetClassifier, NeuralNetRegressor
from skorch.callbacks import Callback, EpochScoring, Freezer, GradientNormClipping, ProgressBar, Unfreezer
from skorch.dataset import unpack_data
from skorch.utils import is_dataset, to_tensor
from sklearn.model_selection import train_test_split
from sklearn.utils import check_random_state
from sklearn.utils.multiclass import check_classification_targets
from sklearn.utils.validation import validate_data
from torch import nn

from ._registry import Registry, did_you_mean, invalid_value
from ._routed import accepted_names, check_routed
from .augment import Augmenter, tta_views
from .callbacks import GradientValueClipping, LRSchedule, MaxNorm, NNEarlyStopping, log_info
from .data_iter import TensorBatches, TensorDataset
from .exceptions import NnpipeError
from .models import ACTIVATIONS, MODULES, _activation_name
from .transfer import check_lr_multipliers, lr_multiplier_groups

__all__ = ["NNClassifier", "NNRegressor", "DivergenceError", "OPTIMIZERS", "CRITERIA"]


class DivergenceError(NnpipeError, RuntimeError):
    """Training stopped because the loss became NaN or infinite.

    The module's weights are restored to those at the start of the failing epoch, so no NaN
    weights are left behind. ``epoch``, ``batch`` and ``loss`` say where it happened.
    """

    def __init__(self, epoch: int, batch: int, loss: float, start: Optional[float] = None):
        self.epoch, self.batch, self.loss, self.start = epoch, batch, loss, start
        what = (f"became {loss}" if start is None else
                f"exploded to {loss:.4g}, over divergence_factor times its starting value "
                f"{start:.4g},")
        super().__init__(
            f"training diverged: the loss {what} at epoch {epoch}, batch {batch}. "
            "The weights were restored to the start of that epoch. Lower lr, add gradient "
            "clipping (clip_grad_norm) or batch_norm.")


# --------------------------------------------------------------------------- registries

def _partial_cls(cls, **defaults):
    """An optimizer factory with defaults, keeping the class for introspection."""
    def make(params, **kwargs):
        return cls(params, **{**defaults, **kwargs})
    make.optimizer_class, make.defaults = cls, defaults
    return make


OPTIMIZERS = Registry("optimizer", "a torch.optim.Optimizer class")
for _name, _opt in {
    "sgd": torch.optim.SGD,
    "momentum": _partial_cls(torch.optim.SGD, momentum=0.9),
    "nesterov": _partial_cls(torch.optim.SGD, momentum=0.9, nesterov=True),
    "adagrad": torch.optim.Adagrad,
    "rmsprop": _partial_cls(torch.optim.RMSprop, alpha=0.9),
    "adam": torch.optim.Adam,
    "adamax": torch.optim.Adamax,
    "nadam": torch.optim.NAdam,
    "adamw": torch.optim.AdamW,
}.items():
    OPTIMIZERS.register(_name, _opt)

CRITERIA = Registry("criterion", "a torch loss class")
_CLASSIFICATION_LOSSES = {"cross_entropy": nn.CrossEntropyLoss, "nll": nn.NLLLoss,
                          "hinge": nn.MultiMarginLoss}
_REGRESSION_LOSSES = {"mse": nn.MSELoss, "mae": nn.L1Loss, "huber": nn.HuberLoss}
for _name, _loss in {**_CLASSIFICATION_LOSSES, **_REGRESSION_LOSSES}.items():
    CRITERIA.register(_name, _loss)

_ARCH_KNOBS = ("input_shape", "activation", "init", "batch_norm", "dropout")
#: The top-level parameters nnpipe adds to skorch's (the contract YAML and searches rely on).
NN_KNOBS = _ARCH_KNOBS + ("l1", "l2", "max_norm", "clip_grad_norm", "clip_grad_value",
                          "lr_schedule", "early_stopping", "transfer_from", "transfer_layers",
                          "freeze", "unfreeze_after", "lr_multipliers", "augment", "tta",
                          "random_state", "on_interrupt", "divergence_factor")
_EXTRA_PREFIXES = ["activation", "lr_schedule", "early_stopping"]
_HOOKS = ("on_train_begin", "on_train_end", "on_epoch_begin", "on_epoch_end", "on_batch_begin",
          "on_batch_end", "on_grad_computed")


def _is_subclass(base):
    return lambda obj: isinstance(obj, type) and issubclass(obj, base)


def _number(name: str, value: Any, *, low: float = 0.0, strict: bool = False,
            optional: bool = False) -> None:
    if optional and value is None:
        return
    try:
        ok = isinstance(value, Real) and not isinstance(value, bool) and math.isfinite(value)
    except OverflowError:  # an int beyond the float range
        ok = False
    ok = ok and (value > low if strict else value >= low)
    if not ok:
        allowed = f"a finite number {'>' if strict else '>='} {low:g}"
        raise invalid_value(name, value, allowed + (" or None" if optional else ""))


# --------------------------------------------------------------------------- shared behaviour

#: torch's default generator is one per process, so two networks training at once in threads
#: (joblib's threading backend, an in-process dask cluster) would interleave their random draws
#: and neither would be reproducible: in one process, nnpipe networks train one at a time.
#: Parallel training uses processes (joblib's loky, dask workers, search workers).
_TRAINING_LOCK = threading.RLock()


class _NNMixin:
    """Everything NNClassifier and NNRegressor share; see NNClassifier for the parameters."""

    prefixes_ = NeuralNet.prefixes_ + _EXTRA_PREFIXES

    def _store_knobs(self, values: Dict[str, Any]) -> None:
        for name in NN_KNOBS:
            setattr(self, name, values[name])

    # ----------------------------------------------------------------- validation

    def _check_params(self) -> None:
        """Validate every top-level knob (called by ``fit``; ``__init__`` only stores)."""
        _number("lr", self.lr, strict=True)
        for name in ("max_epochs",):
            value = getattr(self, name)
            if not isinstance(value, Integral) or isinstance(value, bool) or value < 1:
                raise invalid_value(name, value, "an int >= 1")
        bs = self.batch_size
        if not isinstance(bs, Integral) or isinstance(bs, bool) or (bs < 1 and bs != -1):
            raise invalid_value("batch_size", bs, "an int >= 1, or -1 for the whole data")
        _number("l1", self.l1)
        _number("divergence_factor", self.divergence_factor, low=1, strict=True, optional=True)
        _number("l2", self.l2)
        for name in ("max_norm", "clip_grad_norm", "clip_grad_value"):
            _number(name, getattr(self, name), strict=True, optional=True)
        split = self.train_split
        if isinstance(split, Real) and not isinstance(split, bool) and not 0 < split < 1:
            raise invalid_value("train_split", split,
                                "a fraction in (0, 1), None, or a skorch split callable")
        shape = self.input_shape
        if shape is not None and not (isinstance(shape, (list, tuple)) and shape and all(
                isinstance(d, Integral) and not isinstance(d, bool) and d > 0 for d in shape)):
            raise invalid_value("input_shape", shape, "None or a list of positive ints: (C, L) "
                                "or (C, H, W)")
        es = self.early_stopping
        if es is not None and not isinstance(es, bool) and not (isinstance(es, Integral)
                                                                and es >= 1):
            raise invalid_value("early_stopping", es, "None, a bool (True: patience 5) or the "
                                "patience, an int >= 1")
        try:
            torch.device(self.device)
        except (RuntimeError, TypeError):
            raise invalid_value("device", self.device, "a torch device: 'cpu', 'cuda' or "
                                "'cuda:<index>'") from None
        if self.on_interrupt not in ("stop", "raise"):
            raise invalid_value("on_interrupt", self.on_interrupt, "'stop' or 'raise'")
        if self.early_stopping not in (None, False) and not self.train_split:
            es_monitor = self.get_params_for("early_stopping").get("monitor", "valid_loss")
            if str(es_monitor).startswith("valid"):
                raise ValueError("early_stopping monitors a validation metric, but train_split="
                                 f"{self.train_split!r} gives no validation data; set train_split"
                                 " (e.g. 0.2) or early_stopping__monitor='train_loss'.")
        if self.freeze is not None and not (
                isinstance(self.freeze, str) or (isinstance(self.freeze, (list, tuple))
                                                 and all(isinstance(p, str) for p in self.freeze))):
            raise invalid_value("freeze", self.freeze, "a parameter-name pattern or a list of them")
        if self.unfreeze_after is not None and not self.freeze:
            raise ValueError("unfreeze_after is set but freeze is empty: name the layers to freeze.")
        check_lr_multipliers(self.lr_multipliers)
        if str(self.device).startswith("cuda") and not torch.cuda.is_available():
            raise invalid_value("device", self.device, "'cpu' here: CUDA is not available")

    def _validate_params(self):
        try:
            super()._validate_params()
        except ValueError as exc:
            names = sorted(k for k in inspect.signature(type(self).__init__).parameters
                           if k not in ("self", "kwargs"))
            hints = [did_you_mean(k, names) for k in sorted(self._params_to_validate)
                     if k not in names and "__" not in k]
            raise ValueError(f"{type(self).__name__}: {exc}{''.join(h for h in hints if h)}"
                             ) from None

    def _own_module(self) -> bool:
        if isinstance(self.module, str):
            MODULES.get(self.module)  # raise on an unknown name
            return True
        MODULES.get(self.module, accept=lambda m: callable(m) or isinstance(m, nn.Module))
        return self.module in {MODULES.get(n) for n in MODULES.names()}

    # ----------------------------------------------------------------- sklearn glue

    def _seed(self) -> Optional[int]:
        if self.random_state is None:
            return None
        if isinstance(self.random_state, Integral):
            return int(self.random_state)
        return int(check_random_state(self.random_state).randint(0, 2**31 - 1))

    @contextlib.contextmanager
    def _rng_context(self, seed):
        """Hold the process's training lock; with a seed, train on a forked global RNG."""
        with _TRAINING_LOCK:
            if seed is None:
                yield
                return
            cuda = str(self.device).startswith("cuda")
            with torch.random.fork_rng(devices=[torch.cuda.current_device()] if cuda else []):
                torch.manual_seed(seed)
                yield

    def fit(self, X, y, **fit_params):
        """Initialise the network from the data and train it; returns ``self``.

        ``X``: array-like (n_samples, n_features); ``y``: labels (classifier) or targets.
        """
        if fit_params:
            raise TypeError(f"fit got unexpected arguments {sorted(fit_params)}")
        X, y = self._prepare_data(X, y, reset=True)
        self.seed_ = self._seed()
        with self._rng_context(self.seed_):
            self.validate_params(self.n_features_in_, self.n_outputs_)
            self.sample_shape_ = self._sample_shape()
            self.augment_ = self._resolve_augment()
            if not self.warm_start or not self.initialized_:
                self.initialize()
            return self._train(X, y)

    def partial_fit(self, X, y=None, classes=None, **fit_params):
        """Train ``max_epochs`` more epochs without re-initialising (``fit`` if not fitted yet)."""
        if fit_params:
            raise TypeError(f"partial_fit got unexpected arguments {sorted(fit_params)}")
        if not (self.initialized_ and hasattr(self, "n_features_in_")):
            if classes is not None and getattr(self, "classes", None) is None:
                self.classes = list(classes)
            return self.fit(X, y)
        X, y = self._prepare_data(X, y, reset=False)
        seed = self._seed()
        if seed is not None:  # a stream of its own per (seed, epochs so far): repeatable
            seed = int(np.random.SeedSequence([seed % 2**63, len(self.history)])
                       .generate_state(1)[0])
        with self._rng_context(seed):
            return self._train(X, y)

    def _continue_training(self, X, y, epochs: int, rng_states: Dict[str, torch.Tensor]):
        """Train ``epochs`` more epochs from the random state a checkpoint saved (the optimizer
        and callbacks are restored by :func:`nnpipe.checkpoint.resume`)."""
        X, y = self._prepare_data(X, y, reset=False)
        cuda = str(self.device).startswith("cuda") and "cuda" in rng_states
        with _TRAINING_LOCK, torch.random.fork_rng(
                devices=[torch.cuda.current_device()] if cuda else []):
            torch.set_rng_state(rng_states["cpu"])
            if cuda:
                torch.cuda.set_rng_state(rng_states["cuda"])
            return self._train(X, y, epochs=epochs)

    def _train(self, X, y, epochs: Optional[int] = None):
        self.interrupted_ = False
        # skorch's loop (it swallows KeyboardInterrupt); epochs=None: max_epochs
        NeuralNet.partial_fit(self, X, y, **({} if epochs is None else {"epochs": epochs}))
        if self.interrupted_ and self.on_interrupt == "raise":
            raise KeyboardInterrupt(f"{type(self).__name__}.fit was interrupted at epoch "
                                    f"{len(self.history)}")
        return self

    def _prepare_X(self, X):
        if is_dataset(X) or torch.is_tensor(X):
            return X
        self.check_is_fitted()
        return validate_data(self, X, reset=False, dtype=np.float32)

    def check_data(self, X, y=None):
        """Validation happens in ``fit`` (with sklearn's ``validate_data``)."""

    def get_dataset(self, X, y=None):
        if is_dataset(X):
            return X
        y_dtype = torch.long if isinstance(self, NNClassifier) else torch.float32
        return TensorDataset.from_arrays(X, y, device=self.device, y_dtype=y_dtype)

    def get_split_datasets(self, X, y=None, **fit_params):
        split = self.train_split
        if not (isinstance(split, Real) and not isinstance(split, bool)):
            return super().get_split_datasets(X, y, **fit_params)
        dataset = self.get_dataset(X, y)
        idx = np.arange(len(dataset))
        stratify = None
        if isinstance(self, NNClassifier) and y is not None:
            counts = np.bincount(np.asarray(y))
            n_valid = math.ceil(split * len(idx))
            if counts[counts > 0].min() >= 2 and n_valid >= len(counts[counts > 0]):
                stratify = np.asarray(y)
        train_idx, valid_idx = train_test_split(idx, test_size=split, stratify=stratify,
                                                random_state=self.seed_)
        return dataset.subset(train_idx), dataset.subset(valid_idx)

    def get_iterator(self, dataset, training=False):
        prefix = "iterator_train" if training else "iterator_valid"
        custom = getattr(self, prefix) is not torch.utils.data.DataLoader or any(
            k != "batch_size" for k in self.get_params_for(prefix))
        if isinstance(dataset, TensorDataset) and not custom:
            bs = self.get_params_for(prefix).get("batch_size", self.batch_size)
            return TensorBatches(dataset, bs, shuffle=training)
        return super().get_iterator(dataset, training=training)

    # ----------------------------------------------------------------- components

    def _build_module(self, n_features: int, n_outputs: int) -> nn.Module:
        kwargs = self.get_params_for("module")
        if self._own_module():
            cls = MODULES.get(self.module, accept=_is_subclass(nn.Module))
            allowed = set(inspect.signature(cls.__init__).parameters) - {
                "self", "n_features", "n_outputs", "output", *_ARCH_KNOBS, "activation_kwargs"}
            for key in kwargs:
                if key not in allowed:
                    raise ValueError(f"module__{key} is not a parameter of {cls.__name__}; "
                                     f"valid: {sorted('module__' + a for a in allowed)}."
                                     + did_you_mean(key, allowed))
            return cls(n_features=n_features, n_outputs=n_outputs, output=self._output_kind(),
                       activation_kwargs=self.get_params_for("activation"),
                       **{k: getattr(self, k) for k in _ARCH_KNOBS}, **kwargs)
        set_knobs = [k for k in _ARCH_KNOBS if getattr(self, k) is not None]
        if set_knobs:
            raise ValueError(
                f"{set_knobs} apply to nnpipe's own networks ('mlp', 'cnn1d', 'cnn2d') only, "
                f"but module={self.module!r} is your own; configure it through module__* "
                "instead, or leave these at None.")
        return self.initialized_instance(self.module, kwargs)

    def initialize_module(self):
        if self._own_module() and not hasattr(self, "n_features_in_"):
            raise RuntimeError(f"{type(self).__name__}: call fit before initialize "
                               "(nnpipe's networks take their sizes from the data).")
        self.module_ = self._build_module(getattr(self, "n_features_in_", None),
                                          getattr(self, "n_outputs_", None))
        if self.transfer_from is not None:
            from .transfer import transfer_weights
            self.transferred_ = transfer_weights(self.module_, self.transfer_from,
                                                 self.transfer_layers)
        return self

    def validate_params(self, n_features: Optional[int] = None,
                        n_outputs: Optional[int] = None) -> "_NNMixin":
        """Check every parameter without training; raise ``ValueError`` naming the bad one.

        ``fit`` runs this too; call it early (as ``nnpipe check`` does for params.yaml) to fail
        before any work. ``n_features`` is the data's width and ``n_outputs`` the number of
        classes (or targets) when known.
        """
        self._check_params()
        self._check_components(n_outputs)
        shape = None if self.input_shape is None else tuple(self.input_shape)
        if n_features is None and shape:
            n_features = math.prod(shape)
        shape_unknown = self.input_shape is None and n_features is None and self.module == "cnn2d"
        if self._own_module() and not shape_unknown:
            with torch.random.fork_rng(devices=[]):  # building a test module must not draw
                names = [n for n, _ in self._build_module(n_features or 8, n_outputs or 2)
                         .named_parameters()]
            check_lr_multipliers(self.lr_multipliers, names)
        if shape is None and self.module == "cnn1d":
            shape = (1, n_features)
        if self.augment is not None:
            aug = Augmenter.from_config(self.augment) if isinstance(self.augment, dict) \
                else self.augment
            if not isinstance(aug, Augmenter):
                raise invalid_value("augment", aug, "None, an nnpipe.augment.Augmenter or a "
                                    "mapping {op name: {param: value}}")
            aug.check_shape(shape)
        if self.tta:
            tta_views(self.tta, shape)
        return self

    def _check_components(self, n_outputs: Optional[int] = None) -> None:
        """Build the criterion, optimizer, lr schedule and early stopping once, on throw-away
        inputs, so that a bad ``criterion__*`` / ``optimizer__*`` / ``lr_schedule__*`` /
        ``early_stopping__*`` fails now, naming the key, instead of at fit or mid-training.
        nnpipe's own losses also compute one loss on a dummy batch of ``n_outputs`` columns
        (torch checks ``reduction`` and the class ``weight``'s length only there)."""
        from .schedules import SCHEDULES, ScheduleContext, _is_scheduler_class, make_schedule

        crit = CRITERIA.get(self.criterion, accept=callable)
        if isinstance(crit, type):
            params = self._criterion_params()
            weight = params.get("weight")
            width = n_outputs or (len(weight) if isinstance(weight, torch.Tensor)
                                  and weight.dim() == 1 else 2)

            def criterion(kw):
                loss = crit(**kw)
                if crit in _CLASSIFICATION_LOSSES.values():
                    loss(torch.zeros(3, width), torch.arange(3) % width)
                elif crit in _REGRESSION_LOSSES.values():
                    loss(torch.zeros(3, width), torch.zeros(3, width))

            check_routed("criterion", crit.__name__, params, criterion, accepted_names(crit))
        act_kwargs = self.get_params_for("activation")
        if self._own_module() and act_kwargs:
            act = ACTIVATIONS.get("relu" if self.activation is None else self.activation,
                                  accept=_is_subclass(nn.Module))
            ours = bool(_activation_name(act))  # a registered (nnpipe / torch) activation

            def activation(kw):
                module = act(**kw)
                if ours:  # torch checks some arguments only in the forward pass; a user's class
                    # may need its own input shape, so it is only built
                    width = getattr(module, "num_parameters", 3)  # PReLU: one slope per column
                    with torch.random.fork_rng(devices=[]):  # RReLU draws: keep fit's seed
                        module(torch.zeros(2, width))

            check_routed("activation", act.__name__, act_kwargs, activation, accepted_names(act))
        opt_cls = OPTIMIZERS.get(self.optimizer, accept=_is_subclass(torch.optim.Optimizer))
        torch_cls = getattr(opt_cls, "optimizer_class", opt_cls)  # "nesterov" is SGD + defaults
        probe = [torch.zeros(2, requires_grad=True)]

        def optimizer(kw):
            return opt_cls(probe, **{"lr": self.lr, **kw})

        # skorch's own optimizer__param_groups ([(pattern, {"lr": ...})]) needs the real network
        routed = {k: v for k, v in self.get_params_for("optimizer").items() if k != "param_groups"}
        check_routed("optimizer", torch_cls.__name__, routed, optimizer,
                     accepted_names(torch_cls, skip={"params"}))
        if self.lr_schedule is not None:
            sched = SCHEDULES.get(self.lr_schedule, accept=_is_scheduler_class)
            if _is_scheduler_class(sched):
                owner, accepted = sched.__name__, accepted_names(sched, skip={"optimizer"})
                accepted = None if accepted is None else accepted | {"step_every", "monitor"}
            else:
                owner = f"lr_schedule={self.lr_schedule!r}"
                accepted = accepted_names(sched, skip={"optimizer", "ctx"})
            ctx = ScheduleContext(max_epochs=self.max_epochs, steps_per_epoch=10)
            kwargs = self.get_params_for("lr_schedule")
            check_routed("lr_schedule", owner, kwargs,
                         lambda kw: make_schedule(self.lr_schedule, optimizer({}), ctx, **kw),
                         accepted)
        if self.early_stopping not in (None, False):
            check_routed("early_stopping", "early stopping", self.get_params_for("early_stopping"),
                         lambda kw: NNEarlyStopping(**kw),
                         accepted_names(NNEarlyStopping, skip={"sink"}))

    def _output_kind(self) -> str:
        return "linear"

    def _criterion_params(self) -> Dict[str, Any]:
        """``criterion__*``, with a list for ``weight`` / ``pos_weight`` (all params.yaml can
        hold) made the float tensor torch's losses want."""
        params = self.get_params_for("criterion")
        for key in ("weight", "pos_weight"):
            if isinstance(params.get(key), (list, tuple)):
                try:
                    params[key] = torch.tensor(params[key], dtype=torch.float32)
                except (TypeError, ValueError, RuntimeError):
                    raise invalid_value(f"criterion__{key}", params[key],
                                        "a list of numbers (one per class)") from None
        return params

    def initialize_criterion(self):
        crit = CRITERIA.get(self.criterion, accept=lambda c: callable(c))
        self.criterion_ = self.initialized_instance(crit, self._criterion_params())
        return self

    def initialize_optimizer(self, triggered_directly=None):
        opt = OPTIMIZERS.get(self.optimizer, accept=_is_subclass(torch.optim.Optimizer))
        named = list(self.get_all_learnable_params())
        args, kwargs = self.get_params_for_optimizer("optimizer", named)
        if self.lr_multipliers:
            check_lr_multipliers(self.lr_multipliers, [n for n, _ in named])
            args = (lr_multiplier_groups(args[0], named, self.lr_multipliers, kwargs["lr"]),)
        try:
            self.optimizer_ = opt(*args, **kwargs)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"optimizer={self.optimizer!r} rejected its arguments "
                             f"{sorted(kwargs)}: {exc}") from None
        return self

    def get_default_callbacks(self):
        drop = set() if self.verbose else {"print_log"}
        if not self.train_split:
            drop |= {"valid_loss", "valid_acc"}
        callbacks = [(n, cb) for n, cb in super().get_default_callbacks() if n not in drop]
        if isinstance(self, NNClassifier):
            callbacks = [(n, EpochScoring(_encoded_accuracy, name="valid_acc",
                                          lower_is_better=False) if n == "valid_acc" else cb)
                         for n, cb in callbacks]
        if self.verbose and self.verbose >= 1 and sys.stderr.isatty():
            callbacks.append(("progress_bar", ProgressBar()))  # in a terminal, not in logs
        if self.clip_grad_value is not None:
            callbacks.append(("clip_grad_value", GradientValueClipping(self.clip_grad_value)))
        if self.clip_grad_norm is not None:
            callbacks.append(("clip_grad_norm", GradientNormClipping(self.clip_grad_norm)))
        if self.max_norm is not None:
            callbacks.append(("max_norm", MaxNorm(self.max_norm)))
        if self.lr_schedule is not None:
            callbacks.append(("lr_schedule", LRSchedule(self.lr_schedule,
                                                        self.get_params_for("lr_schedule"))))
        if self.early_stopping not in (None, False):
            es = self.get_params_for("early_stopping")
            if isinstance(self.early_stopping, Integral) and self.early_stopping is not True:
                es.setdefault("patience", int(self.early_stopping))
            # verbose prints the epoch table, and the stop message with it; else it is logged
            es.setdefault("sink", print if self.verbose else log_info)
            callbacks.append(("early_stopping", NNEarlyStopping(**es)))
        if self.freeze and isinstance(self.freeze, (str, list, tuple)):
            patterns = [self.freeze] if isinstance(self.freeze, str) else list(self.freeze)
            callbacks.append(("freezer", Freezer(patterns)))
            if self.unfreeze_after is not None:
                callbacks.append(("unfreezer", Unfreezer(patterns, at=int(self.unfreeze_after) + 1)))
        return callbacks

    # ----------------------------------------------------------------- the training step

    def get_loss(self, y_pred, y_true, X=None, training=False):
        loss = self.criterion_(y_pred, to_tensor(y_true, device=self.device))
        if training and (self.l1 or self.l2):
            for name, w in self.module_.named_parameters():
                if w.requires_grad and name.endswith("weight") and w.dim() > 1:
                    if self.l1:
                        loss = loss + self.l1 * w.abs().sum()
                    if self.l2:
                        loss = loss + self.l2 * w.pow(2).sum()
        return loss

    def _sample_shape(self):
        if self.input_shape is not None:
            return tuple(int(s) for s in self.input_shape)
        if self.module == "cnn1d":
            return (1, int(self.n_features_in_))
        return None

    def _resolve_augment(self):
        aug = self.augment
        if aug is None:
            return None
        if isinstance(aug, dict):
            aug = Augmenter.from_config(aug)
        if not isinstance(aug, Augmenter):
            raise invalid_value("augment", aug, "None, an nnpipe.augment.Augmenter or a mapping "
                                "{op name: {param: value}}")
        aug.check_shape(self.sample_shape_)
        return aug

    def augment_batch(self, X: torch.Tensor) -> torch.Tensor:
        """Augment a training batch (never a validation or predict batch)."""
        aug = getattr(self, "augment_", None)
        if aug is None:
            return X
        return aug(X.reshape(X.shape[0], *self.sample_shape_)).reshape(X.shape)

    def _predict_outputs(self, X) -> np.ndarray:
        """``predict_proba`` of skorch, averaged over the test-time views when ``tta`` is set."""
        X = self._prepare_X(X)
        if not self.tta or is_dataset(X):
            return NeuralNet.predict_proba(self, X)
        views = tta_views(self.tta, self.sample_shape_)
        Xt = torch.as_tensor(X, device=self.device).reshape(-1, *self.sample_shape_)
        return np.mean([NeuralNet.predict_proba(self, view(Xt).reshape(len(Xt), -1))
                        for view in views], axis=0)

    def train_step_single(self, batch, **fit_params):
        self._set_training(True)
        Xi, yi = unpack_data(batch)
        Xi = self.augment_batch(Xi)
        y_pred = self.infer(Xi, **fit_params)
        loss = self.get_loss(y_pred, yi, X=Xi, training=True)
        value = loss.item()
        if not math.isfinite(value):
            raise DivergenceError(len(self.history), len(self.history[-1]["batches"]), value)
        if self.divergence_factor is not None:
            # the untrained network's loss (first batch ever) is the scale of "exploded"
            first = self.history[0]["batches"]
            start = first[0].get("train_loss", math.inf) if first else math.inf
            if 0 < start < value / self.divergence_factor:
                raise DivergenceError(len(self.history), len(self.history[-1]["batches"]),
                                      value, start)
        loss.backward()
        return {"loss": loss, "y_pred": y_pred}

    # Per-batch overhead matters for small networks on small data (benchmarks/
    # bench_fit_overhead.py): the overrides below keep skorch's semantics but skip work that
    # cannot have an effect.

    def _set_training(self, training=True):
        # skorch re-walks every submodule each batch; switch only when the mode changes
        if self.module_.training != training or getattr(self.criterion_, "training", training) \
                != training:
            super()._set_training(training)

    def initialize_callbacks(self):
        if self.callbacks is not None and not isinstance(self.callbacks, list):
            raise TypeError(f"callbacks must be None, 'disable' (no callbacks at all, nnpipe's "
                            f"defaults included) or a list of skorch callbacks or (name, "
                            f"callback) pairs; got {self.callbacks!r}")
        super().initialize_callbacks()
        self._index_hooks()
        return self

    def _initialize_callbacks(self):
        super()._initialize_callbacks()
        if self.callbacks == "disable":  # skorch skips initialize_callbacks (and its index) then
            self._index_hooks()
        return self

    def _index_hooks(self):
        """Which callbacks implement each hook, so ``notify`` skips the no-op calls."""
        self.hooks_ = {hook: [cb for _, cb in self.callbacks_
                              if getattr(type(cb), hook, None) is not getattr(Callback, hook)]
                       for hook in _HOOKS}

    def notify(self, method_name, **cb_kwargs):
        hooks = getattr(self, "hooks_", None)
        if hooks is None or method_name not in hooks:
            return super().notify(method_name, **cb_kwargs)
        getattr(self, method_name)(self, **cb_kwargs)
        for cb in hooks[method_name]:
            getattr(cb, method_name)(self, **cb_kwargs)

    def train_step(self, batch, **fit_params):
        # skorch wraps each step in a closure for LBFGS-style optimizers and on_grad_computed
        if self.hooks_["on_grad_computed"] or isinstance(self.optimizer_, torch.optim.LBFGS):
            return super().train_step(batch, **fit_params)
        self._zero_grad_optimizer()
        step = self.train_step_single(batch, **fit_params)
        self._step_optimizer(None)
        return step

    def run_single_epoch(self, iterator, training, prefix, step_fn, **fit_params):
        if not training or iterator is None:
            return super().run_single_epoch(iterator, training, prefix, step_fn, **fit_params)
        snapshot = {k: v.detach().clone() for k, v in self.module_.state_dict().items()}
        history, count = self.history, 0
        try:
            for batch in iterator:
                self.notify("on_batch_begin", batch=batch, training=True)
                step = step_fn(batch, **fit_params)
                history.record_batch(prefix + "_loss", step["loss"].item())
                history.record_batch(prefix + "_batch_size", len(batch[0]))
                self.notify("on_batch_end", batch=batch, training=True, **step)
                count += 1
            if not all(torch.isfinite(p).all() for p in self.module_.parameters()):
                # the last step turned finite losses into inf/NaN weights
                raise DivergenceError(len(history), count, float("nan"))
        except DivergenceError:
            self.module_.load_state_dict(snapshot)
            raise
        history.record(prefix + "_batch_count", count)

    def fit_loop(self, X, y=None, epochs=None, **fit_params):
        try:
            return super().fit_loop(X, y, epochs=epochs, **fit_params)
        except KeyboardInterrupt:
            es = dict(self.callbacks_).get("early_stopping")
            if not (es is not None and getattr(es, "stopped_", False)):
                self.interrupted_ = True
            raise  # skorch's partial_fit swallows it after this; see partial_fit

    # ----------------------------------------------------------------- params

    def _get_param_names(self):
        # skorch lists every attribute without a trailing underscore, its private bookkeeping too
        return [k for k in super()._get_param_names() if not k.startswith("_")]

    def set_params(self, **kwargs):
        nested = {k[len("augment__"):]: kwargs.pop(k) for k in list(kwargs)
                  if k.startswith("augment__")}
        if nested:
            if not isinstance(self.augment, Augmenter):
                raise ValueError(f"augment__* parameters {sorted(nested)} need augment to be an "
                                 f"Augmenter, got augment={self.augment!r}.")
            self.augment.set_params(**nested)
        ours = {k: v for k, v in kwargs.items()
                if any(k.startswith(p + "__") for p in _EXTRA_PREFIXES)}
        for key, value in ours.items():
            setattr(self, key, value)
            self._params_to_validate.add(key)
        rest = {k: v for k, v in kwargs.items() if k not in ours}
        if "callbacks" in rest and not self.initialized_:
            # an unfitted net builds its callbacks in fit (and checks them there); skorch would
            # build them here already, failing on a value sklearn only stores
            self.callbacks = rest.pop("callbacks")
        if not rest:
            return self
        super().set_params(**rest)
        if "lr" in rest and self.initialized_ and hasattr(self, "optimizer_"):
            for group in self.optimizer_.param_groups:  # skorch set one lr for every group
                group["lr"] = rest["lr"] * group.get("lr_multiplier", 1.0)
        if self.initialized_ and any(k.startswith("callbacks") for k in rest):
            # skorch re-initializes the *old* callbacks before storing the new ones, so a fitted
            # net would go on training (partial_fit) with the callbacks it had
            self._initialize_callbacks()
        return self

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.input_tags.allow_nan = False
        tags.non_deterministic = self.random_state is None
        return tags


def _encoded_accuracy(net, X, y):
    """Validation accuracy on the encoded labels nnpipe trains with."""
    proba = net.predict_proba(X)
    return float(np.mean(proba.argmax(axis=1) == np.asarray(y).reshape(-1)))


_COMMON_DOC = """
    Parameters
    ----------
    module : {"mlp", "cnn1d", "cnn2d"} or nn.Module class, default="mlp"
        nnpipe's own network, sized from the data, or your own module (then the architecture knobs
        below must stay None). Sizes go through skorch's routing: ``module__hidden_sizes``,
        ``module__channels``, ``module__kernel_size``, ``module__stride``, ``module__pool``.
    criterion : str or torch loss class
        Loss; ``criterion__*`` routes its arguments (``criterion__label_smoothing=0.1``).
    optimizer : {"sgd", "momentum", "nesterov", "adagrad", "rmsprop", "adam", "adamax", "nadam",
        "adamw"} or torch optimizer class, default="adam"
        ``optimizer__*`` routes its arguments (``optimizer__momentum=0.95``,
        ``optimizer__param_groups`` for per-layer settings).
    lr : float > 0, default=1e-3
    max_epochs : int >= 1, default=30
    batch_size : int, default=64 (-1: the whole data)
    train_split : float in (0, 1), None or skorch split callable, default=0.2
        Fraction held out for validation (stratified for classifiers, seeded by
        ``random_state``); None trains on everything.
    callbacks : list of skorch callbacks, optional
    device : str, default="cpu"
        ``"cuda"`` trains on the GPU; in-memory data is moved there once.
    verbose : int, default=0
        1 prints a per-epoch table (and a progress bar when stderr is a terminal); 0 is silent.
    input_shape : tuple, optional
        ``(C, L)`` or ``(C, H, W)``: how the CNNs reshape flat feature rows.
    activation : str or nn.Module class, optional (default "relu")
        relu, leaky_relu, prelu, rrelu, elu, selu, gelu, silu, tanh, sigmoid, identity;
        ``activation__*`` routes its arguments (``activation__negative_slope=0.2``).
    init : str or callable, optional
        glorot_normal, glorot_uniform, he_normal, he_uniform, lecun_normal, lecun_uniform,
        orthogonal, normal (std 0.01), torch; None picks the one that suits ``activation``
        (He for the ReLU family, LeCun for SELU, Glorot otherwise). Biases start at zero.
    batch_norm : {None, True, "before", "after"}, optional
        Batch normalisation before (True) or after each hidden activation.
    dropout : float in [0, 1), optional
        Dropout after each hidden block; alpha dropout with ``activation="selu"``.
    l1, l2 : float >= 0, default=0
        Penalties ``l1 * sum|w|`` and ``l2 * sum w**2`` over the weight matrices / kernels (not
        biases or norm parameters), added to the training loss.
    max_norm : float > 0, optional
        Max-norm constraint on every unit's incoming weights, applied after each step.
    clip_grad_norm, clip_grad_value : float > 0, optional
        Clip the global gradient norm, or each gradient component, before each step.
    lr_schedule : str or torch scheduler class, optional
        power, exponential, piecewise, plateau, onecycle, cosine, cosine_restarts (see
        :mod:`nnpipe.schedules`); ``lr_schedule__*`` routes its arguments.
    early_stopping : bool or int, optional
        Stop when ``early_stopping__monitor`` (default "valid_loss") has not improved for
        ``early_stopping`` epochs (True: 5) and restore the best weights.
    transfer_from : path or fitted estimator, optional
        Initialise from a saved nnpipe model (:func:`nnpipe.save`): every layer but the output
        layer, or the parameters matching ``transfer_layers`` (fnmatch patterns).
    transfer_layers : list of str, optional
    freeze : str or list of str, optional
        Parameter-name patterns to freeze (``"hidden.*"``), e.g. the transferred layers.
    unfreeze_after : int, optional
        Unfreeze the frozen layers after this many epochs.
    lr_multipliers : dict of str to float, optional
        Per-layer-group learning rates: parameters whose name matches a pattern (fnmatch, first
        match wins) train at ``lr * factor`` (``{"hidden.*": 0.1}``: reused layers at a tenth;
        0 holds them still). Built as skorch's optimizer param groups (combined with
        ``optimizer__param_groups``); schedules scale every group alike, so the ratios hold.
    augment : Augmenter or dict, optional
        Augmentation of training batches only (:mod:`nnpipe.augment`); each op's parameters are
        reachable as ``augment__<op>__<param>``. Needs ``input_shape`` (or ``module="cnn1d"``).
    tta : list of str, optional
        Test-time augmentation: ``predict_proba`` averages over these deterministic views
        (``"identity"``, ``"hflip"``, ``"vflip"``). Off by default.
    random_state : int, RandomState or None
        Seeds weights, shuffling, the validation split and dropout; the same seed on the CPU gives
        identical predictions.
    on_interrupt : {"stop", "raise"}, default="stop"
        What Ctrl-C during ``fit`` does: "stop" keeps the model trained so far (skorch's
        behaviour, ``interrupted_`` is set); "raise" re-raises ``KeyboardInterrupt``, as a
        pipeline stage needs.
    divergence_factor : float or None, default=1e3
        Stop with :class:`DivergenceError` (weights restored to the start of the epoch) when a
        batch's loss exceeds this many times the untrained network's loss (the first batch of
        the first epoch), as at ``lr=1e6`` where the loss explodes without becoming NaN. A NaN or
        infinite loss always stops training. None: only NaN/inf.
    **kwargs
        skorch's routed parameters (``module__*``, ``optimizer__*``, ``iterator_train__*``, ...).
"""


class NNClassifier(_NNMixin, NeuralNetClassifier):
    __doc__ = """A neural-network classifier for flat feature matrices, as an sklearn estimator.

    Labels may be integers or strings; ``predict`` returns them as given. Raw scores become
    probabilities by softmax (``exp`` for ``criterion="nll"``, whose output layer is log-softmax).
    """ + _COMMON_DOC.replace("Loss;", "cross_entropy (default), nll, hinge, or a class;") + """
    Examples
    --------
    >>> from sklearn.datasets import load_digits
    >>> X, y = load_digits(return_X_y=True)
    >>> clf = NNClassifier(max_epochs=5, random_state=0).fit(X / 16, y)
    >>> clf.score(X / 16, y) > 0.9
    True
    """

    def __init__(self, module="mlp", *, criterion="cross_entropy", optimizer="adam", lr=1e-3,
                 max_epochs=30, batch_size=64, train_split=0.2, callbacks=None, device="cpu",
                 verbose=0, input_shape=None, activation=None, init=None, batch_norm=None,
                 dropout=None, l1=0.0, l2=0.0, max_norm=None, clip_grad_norm=None,
                 clip_grad_value=None, lr_schedule=None, early_stopping=None, transfer_from=None,
                 transfer_layers=None, freeze=None, unfreeze_after=None, lr_multipliers=None,
                 augment=None, tta=None,
                 random_state=None, on_interrupt="stop", divergence_factor=1e3, classes=None,
                 **kwargs):
        super().__init__(module, criterion=criterion, optimizer=optimizer, lr=lr,
                         max_epochs=max_epochs, batch_size=batch_size, train_split=train_split,
                         callbacks=callbacks, device=device, verbose=verbose, classes=classes,
                         **kwargs)
        self._store_knobs(locals())

    @property
    def classes_(self):
        try:
            return self.classes_inferred_
        except AttributeError:
            raise AttributeError(f"{type(self).__name__} has no classes_ before fit") from None

    def _output_kind(self) -> str:
        return "log_softmax" if CRITERIA.get(self.criterion, accept=callable) is nn.NLLLoss else "linear"

    def _prepare_data(self, X, y, reset: bool):
        X, y = validate_data(self, X, y, reset=reset, dtype=np.float32)
        check_classification_targets(y)
        if reset:
            classes = np.unique(y) if self.classes is None else np.asarray(self.classes)
            if self.classes is None and len(classes) < 2:
                raise ValueError(f"{type(self).__name__} needs at least 2 classes in y, got 1 "
                                 f"class: {classes.tolist()}.")
            self.classes_inferred_ = classes
            self.n_outputs_ = len(classes)
        unknown = np.setdiff1d(np.unique(y), self.classes_)
        if unknown.size:
            raise ValueError(f"y has labels {unknown.tolist()} that are not among the classes "
                             f"{self.classes_.tolist()}.")
        return X, np.searchsorted(self.classes_, y).astype(np.int64)

    def _get_predict_nonlinearity(self):
        if self.predict_nonlinearity == "auto":
            if isinstance(self.criterion_, nn.NLLLoss):
                return torch.exp
            return lambda scores: torch.softmax(scores, dim=-1)
        return super()._get_predict_nonlinearity()

    def predict_proba(self, X):
        """Class probabilities, shape (n_samples, n_classes), columns in ``classes_`` order."""
        return self._predict_outputs(X)

    def predict(self, X):
        """The most probable label for each row, as given in ``y`` at fit."""
        proba = self.predict_proba(X)
        return self.classes_[proba.argmax(axis=1)]


class NNRegressor(_NNMixin, NeuralNetRegressor):
    __doc__ = """A neural-network regressor for flat feature matrices, as an sklearn estimator.

    ``y`` may be 1-D (predictions are then 1-D) or 2-D for several targets.
    """ + _COMMON_DOC.replace("Loss;", "mse (default), mae, huber, or a class;") + """
    Examples
    --------
    >>> import numpy as np
    >>> X = np.random.RandomState(0).normal(size=(256, 3))
    >>> reg = NNRegressor(max_epochs=50, lr=1e-2, random_state=0).fit(X, X.sum(1))
    >>> reg.score(X, X.sum(1)) > 0.9
    True
    """

    def __init__(self, module="mlp", *, criterion="mse", optimizer="adam", lr=1e-3,
                 max_epochs=30, batch_size=64, train_split=0.2, callbacks=None, device="cpu",
                 verbose=0, input_shape=None, activation=None, init=None, batch_norm=None,
                 dropout=None, l1=0.0, l2=0.0, max_norm=None, clip_grad_norm=None,
                 clip_grad_value=None, lr_schedule=None, early_stopping=None, transfer_from=None,
                 transfer_layers=None, freeze=None, unfreeze_after=None, lr_multipliers=None,
                 augment=None, tta=None,
                 random_state=None, on_interrupt="stop", divergence_factor=1e3, **kwargs):
        super().__init__(module, criterion=criterion, optimizer=optimizer, lr=lr,
                         max_epochs=max_epochs, batch_size=batch_size, train_split=train_split,
                         callbacks=callbacks, device=device, verbose=verbose, **kwargs)
        self._store_knobs(locals())

    def _prepare_data(self, X, y, reset: bool):
        X, y = validate_data(self, X, y, reset=reset, dtype=np.float32, multi_output=True,
                             y_numeric=True)
        y = np.asarray(y, dtype=np.float32)
        if reset:
            self.y_ndim_ = y.ndim
            self.n_outputs_ = 1 if y.ndim == 1 else y.shape[1]
        y = y.reshape(len(y), -1)
        if y.shape[1] != self.n_outputs_:
            raise ValueError(f"y has {y.shape[1]} targets, but the regressor was fitted on "
                             f"{self.n_outputs_}.")
        return X, y

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.target_tags.multi_output = True
        return tags

    def predict(self, X):
        """Predictions, shape (n_samples,) when fitted on 1-D ``y``, else (n_samples, n_targets)."""
        out = self.predict_proba(X).astype(np.float64)
        return out.reshape(-1) if getattr(self, "y_ndim_", 2) == 1 else out

    def predict_proba(self, X):
        """The network's raw outputs (skorch's name for them), shape (n_samples, n_targets)."""
        return self._predict_outputs(X)

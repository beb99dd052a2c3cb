"""skorch callbacks that nnpipe adds; each overrides only the ``on_*`` hooks it needs.

Most are built for you from the estimators' top-level knobs (``max_norm``, ``clip_grad_value``,
``lr_schedule``, ``early_stopping``); they are public so they can also be passed in
``callbacks=[...]`` to any skorch net.
"""

from __future__ import annotations

import logging
import math
from numbers import Integral, Real
from typing import Any, Dict, Optional

import torch
from skorch.callbacks import Callback, EarlyStopping
from torch import nn

from ._registry import invalid_value
from .schedules import ScheduleContext, make_schedule

__all__ = ["MaxNorm", "GradientValueClipping", "LRSchedule", "NNEarlyStopping",
           "training_batches", "log_info"]

logger = logging.getLogger(__name__)


def log_info(message: str) -> None:
    """A skorch ``sink``: ``message`` to the ``nnpipe.callbacks`` logger at INFO level.

    nnpipe's callbacks report through :mod:`logging` instead of printing; an application
    shows the messages by configuring logging, e.g. ``logging.basicConfig(level="INFO")``.
    """
    logger.info(message)


class MaxNorm(Callback):
    """Max-norm constraint: after each optimizer step, rescale every unit's incoming weight vector
    whose L2 norm exceeds ``max_norm`` back to ``max_norm`` (Srivastava et al. 2014).

    Applies to the weights of every ``Linear`` and ``Conv`` layer (for a conv layer, a unit's
    incoming weights are one output channel's whole kernel).
    """

    def __init__(self, max_norm: float = 3.0):
        self.max_norm = max_norm

    def on_batch_end(self, net, training=False, **kwargs):
        if not training:
            return
        with torch.no_grad():
            for module in net.module_.modules():
                if isinstance(module, (nn.Linear, nn.Conv1d, nn.Conv2d)):
                    w = module.weight
                    w.copy_(torch.renorm(w, p=2, dim=0, maxnorm=self.max_norm))


class GradientValueClipping(Callback):
    """Clip every gradient component to ``[-clip_value, clip_value]`` before the optimizer step.

    (Clipping by norm is skorch's :class:`skorch.callbacks.GradientNormClipping`.)
    """

    def __init__(self, clip_value: float = 1.0):
        self.clip_value = clip_value

    def on_grad_computed(self, net, named_parameters, **kwargs):
        torch.nn.utils.clip_grad_value_((p for _, p in named_parameters), self.clip_value)


def json_safe(value: Any, what: str) -> Any:
    """``value`` with numpy / torch scalars and arrays as plain numbers and lists; anything else
    that JSON cannot hold raises ``TypeError`` naming ``what``."""
    if isinstance(value, dict):
        return {str(k): json_safe(v, what) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v, what) for v in value]
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if hasattr(value, "tolist") and hasattr(value, "dtype"):  # numpy scalars and arrays
        return value.tolist()
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(f"{what}: cannot checkpoint a {type(value).__name__} ({value!r}); a "
                    "training checkpoint holds numbers, text, lists and tensors only.")


def training_batches(net, dataset_train) -> Optional[int]:
    """The number of batches one training epoch of ``net`` runs over ``dataset_train``.

    It is the length of the very iterator the epoch uses (``net.get_iterator(dataset_train,
    training=True)``), so ``iterator_train__batch_size``, ``iterator_train__drop_last``, a custom
    ``iterator_train`` and the rows ``train_split`` leaves for training all count. None when that
    iterator has no length (an iterable dataset).

    Examples
    --------
    >>> import numpy as np
    >>> from nnpipe import NNClassifier
    >>> from nnpipe.data_iter import TensorDataset
    >>> net = NNClassifier(batch_size=64, iterator_train__batch_size=16)
    >>> training_batches(net, TensorDataset.from_arrays(np.zeros((100, 2)), np.zeros(100)))
    7
    """
    try:
        return len(net.get_iterator(dataset_train, training=True))
    except TypeError:  # len() of an iterator over an IterableDataset
        return None


class LRSchedule(Callback):
    """Drive the optimizer's learning rate with a schedule from :mod:`nnpipe.schedules`.

    The torch scheduler is built at the first epoch, when the number of batches per epoch is
    known (:func:`training_batches`: the length of the training iterator itself), and stepped
    per batch or per epoch as the schedule needs. The learning rate in force during each epoch
    is recorded in ``net.history[:, "lr"]``; per-batch schedules also record
    ``net.history[-1, "batches", :, "lr"]``.
    """

    def __init__(self, schedule: Any = "cosine", params: Optional[Dict[str, Any]] = None):
        self.schedule = schedule
        self.params = params

    def on_train_begin(self, net, **kwargs):
        self.scheduler_ = None
        self.step_every_ = None

    # --- exact resume (nnpipe.checkpoint): the scheduler's position goes with the checkpoint

    def training_state(self):
        """``(json-able dict, tensors)`` to resume this schedule where it is, or None."""
        if self.scheduler_ is None:
            return None
        state = {k: v for k, v in self.scheduler_.state_dict().items() if k != "optimizer"}
        return {"scheduler": json_safe(state, "lr_schedule")}, {}

    def resume_from(self, meta, tensors):
        self.resume_ = meta

    def on_epoch_begin(self, net, dataset_train=None, **kwargs):
        if self.scheduler_ is None:
            ctx = ScheduleContext(max_epochs=int(net.max_epochs),
                                  steps_per_epoch=training_batches(net, dataset_train))
            groups = net.optimizer_.param_groups
            resumed = [dict(g) for g in groups]  # building a scheduler resets the groups' lr
            self.scheduler_, self.step_every_ = make_schedule(
                self.schedule, net.optimizer_, ctx, **dict(self.params or {}))
            resume, self.resume_ = getattr(self, "resume_", None), None
            if resume is not None:
                self.scheduler_.load_state_dict(resume["scheduler"])
                for group, saved in zip(groups, resumed):
                    group.update({k: v for k, v in saved.items() if k != "params"})
        net.history.record("lr", net.optimizer_.param_groups[0]["lr"])

    def on_batch_end(self, net, training=False, **kwargs):
        if training and self.step_every_ == "batch":
            net.history.record_batch("lr", net.optimizer_.param_groups[0]["lr"])
            self._step(net, batch=True)

    def on_epoch_end(self, net, **kwargs):
        if self.step_every_ == "epoch":
            self._step(net, batch=False)

    def _step(self, net, batch: bool):
        if isinstance(self.scheduler_, torch.optim.lr_scheduler.ReduceLROnPlateau):
            monitor = getattr(self.scheduler_, "monitor", "valid_loss")
            row = net.history[-1, "batches", -1] if batch else net.history[-1]
            if monitor not in row:
                raise ValueError(
                    f"lr_schedule__monitor={monitor!r} is not in the training history (has "
                    f"{sorted(k for k in row if not k.startswith('batch'))}); use 'train_loss' "
                    "when train_split=None.")
            self.scheduler_.step(row[monitor])
        else:
            self.scheduler_.step()


class NNEarlyStopping(EarlyStopping):
    """skorch's :class:`~skorch.callbacks.EarlyStopping` that restores the best weights by default
    and remembers that it stopped the run (skorch signals the stop with ``KeyboardInterrupt``,
    which nnpipe must tell apart from a real Ctrl-C).

    Its "Stopping since ..." and "Restoring best model ..." messages go to ``sink``: by default
    the ``nnpipe.callbacks`` logger at INFO level (:func:`log_info`), whatever the net's
    ``verbose``; ``sink=print`` prints them, as skorch does, only when ``verbose``.
    """

    def __init__(self, monitor="valid_loss", patience=5, threshold=1e-4, threshold_mode="rel",
                 lower_is_better=None, sink=log_info, load_best=True):
        # skorch compares these only at the end of each epoch: a wrong type would fail there
        if not isinstance(patience, Integral) or isinstance(patience, bool) or patience < 1:
            raise invalid_value("patience", patience, "an int >= 1 (epochs without improvement)")
        if not (isinstance(threshold, Real) and not isinstance(threshold, bool)
                and math.isfinite(threshold) and threshold >= 0):
            raise invalid_value("threshold", threshold, "a finite number >= 0")
        if threshold_mode not in ("rel", "abs"):
            raise invalid_value("threshold_mode", threshold_mode, "'rel' or 'abs'")
        if not isinstance(monitor, str):
            raise invalid_value("monitor", monitor, "the name of a history column, e.g. "
                                "'valid_loss' or 'valid_acc'")
        if lower_is_better is None:
            lower_is_better = not any(s in str(monitor) for s in ("acc", "score", "r2", "auc"))
        super().__init__(monitor=monitor, patience=patience, threshold=threshold,
                         threshold_mode=threshold_mode, lower_is_better=lower_is_better,
                         sink=sink, load_best=load_best)

    def on_train_begin(self, net, **kwargs):
        super().on_train_begin(net, **kwargs)
        self.stopped_ = False
        resume, self.resume_ = getattr(self, "resume_", None), None
        if resume is not None:  # exact resume (nnpipe.checkpoint): where the patience stood
            meta, tensors = resume
            self.misses_, self.best_epoch_ = int(meta["misses_"]), int(meta["best_epoch_"])
            self.dynamic_threshold_ = float(meta["dynamic_threshold_"])
            if tensors:
                self.best_model_weights_ = {k: v.to(net.device) for k, v in tensors.items()}

    def training_state(self):
        """``(json-able dict, tensors)`` to resume early stopping where it stands."""
        if not hasattr(self, "misses_"):
            return None
        meta = {"misses_": int(self.misses_), "best_epoch_": int(self.best_epoch_),
                "dynamic_threshold_": float(self.dynamic_threshold_)}
        return meta, dict(self.best_model_weights_ or {})

    def resume_from(self, meta, tensors):
        self.resume_ = (meta, tensors)

    def on_epoch_end(self, net, **kwargs):
        if self.monitor not in net.history[-1]:
            raise ValueError(
                f"early_stopping__monitor={self.monitor!r} is not in the training history (has "
                f"{sorted(k for k in net.history[-1] if not k.startswith('batch'))}).")
        try:
            super().on_epoch_end(net, **kwargs)
        except KeyboardInterrupt:
            self.stopped_ = True
            if not net.verbose and self.sink is not print:  # skorch says it only when verbose
                self.sink(f"Stopping since {self.monitor} has not improved in the last "
                          f"{self.patience} epochs.")
            raise

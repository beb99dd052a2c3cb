"""Training checkpoints: an atomic, pickle-free :func:`nnpipe.save` directory per run, kept
loadable whatever moment training is killed at, and exact resumption from it (:func:`resume`).

Beside the weights and history, a checkpoint holds what the next epoch depends on: the
optimizer's state (momentum, Adam's moments, step counts), the lr schedule's position, early
stopping's patience and best weights, and the random generator's state (shuffling, dropout,
augmentation). :func:`resume` restores all of it and trains the epochs left of ``max_epochs``:
a run killed after any checkpoint and resumed ends with the very weights, bit for bit, that the
uninterrupted run ends with (on the CPU; on CUDA as far as its kernels are deterministic).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional

import torch
from skorch.callbacks import Callback

from ._registry import invalid_value
from .callbacks import json_safe
from .persist import load_with_training_state, save

__all__ = ["Checkpoint", "load_checkpoint", "resume"]

#: the version of the training-state layout below
_STATE_VERSION = 1


class Checkpoint(Callback):
    """Save the net with :func:`nnpipe.save` at the end of each epoch that ``monitor`` selects.

    Follows :class:`skorch.callbacks.Checkpoint` (``monitor``, ``dirname``, ``event_name``,
    ``load_best``) but writes one atomic, pickle-free :func:`nnpipe.save` directory: weights,
    parameters and the history up to the saved epoch, and the training state that
    :func:`resume` needs to go on exactly (optimizer, lr schedule, early stopping, random state).

    Parameters
    ----------
    dirname : str or path
        The checkpoint directory, created if needed; each checkpoint replaces the last atomically.
    monitor : str, callable or None, default="valid_loss_best"
        A boolean history column (skorch's ``*_best`` columns), a function ``f(net) -> bool``,
        or None to save every ``every``-th epoch. With a ``<score>_best`` column a resumed run
        replaces the checkpoint only when it beats the score saved there.
    every : int >= 1, default=1
        Consider only every ``every``-th epoch (counted over the whole history).
    event_name : str or None, default="event_cp"
        History column recording whether the epoch was saved.
    load_best : bool, default=False
        After training, load the checkpoint's weights into the net.

    Examples
    --------
    >>> import tempfile, numpy as np
    >>> from nnpipe import NNClassifier
    >>> X = np.random.RandomState(0).normal(size=(80, 4)).astype("float32"); y = X[:, 0] > 0
    >>> d = tempfile.mkdtemp()
    >>> clf = NNClassifier(max_epochs=4, random_state=0, callbacks=[Checkpoint(d)]).fit(X, y)
    >>> best = max(i for i, row in enumerate(clf.history, 1) if row["event_cp"])
    >>> resumed = load_checkpoint(d)            # the net as it was after epoch `best`
    >>> len(resumed.history) == best
    True
    >>> _ = resumed.set_params(max_epochs=2, callbacks=[Checkpoint(d)]).partial_fit(X, y)
    >>> len(resumed.history) == best + 2
    True
    """

    def __init__(self, dirname: Any, monitor: Any = "valid_loss_best", every: int = 1,
                 event_name: Optional[str] = "event_cp", load_best: bool = False):
        self.dirname = dirname
        self.monitor = monitor
        self.every = every
        self.event_name = event_name
        self.load_best = load_best

    def initialize(self):
        if not isinstance(self.dirname, (str, os.PathLike)) or not os.fspath(self.dirname):
            raise invalid_value("Checkpoint: dirname", self.dirname, "a directory path")
        if Path(self.dirname).exists() and not Path(self.dirname).is_dir():
            raise ValueError(f"Checkpoint: dirname={os.fspath(self.dirname)!r} is a file; it must "
                             "be a directory (created if missing).")
        if not (self.monitor is None or callable(self.monitor)
                or (isinstance(self.monitor, str) and self.monitor)):
            raise invalid_value("Checkpoint: monitor", self.monitor,
                                "a history column such as 'valid_loss_best', a callable or None")
        if not isinstance(self.every, int) or isinstance(self.every, bool) or self.every < 1:
            raise invalid_value("Checkpoint: every", self.every, "an int >= 1")
        return self

    def _score_key(self) -> Optional[str]:
        m = self.monitor
        return m[:-len("_best")] if isinstance(m, str) and m.endswith("_best") else None

    def on_train_begin(self, net, **kwargs):
        from .estimators import NNClassifier, NNRegressor

        if not isinstance(net, (NNClassifier, NNRegressor)):
            raise TypeError(f"Checkpoint saves nnpipe estimators (NNClassifier, NNRegressor), "
                            f"not {type(net).__name__}.")
        key, name = self._score_key(), self.event_name
        saved = [row[key] for row in net.history if key and name and row.get(name) and key in row]
        self.best_ = saved[-1] if saved else None  # on resume: the checkpoint already on disk

    def _lower_is_better(self, net, key: str) -> bool:
        for _, cb in net.callbacks_:
            if key in (getattr(cb, "name_", 0), getattr(cb, "name", 0)):
                return bool(getattr(cb, "lower_is_better", True))
        return True

    def on_epoch_end(self, net, **kwargs):
        row = net.history[-1]
        if self.monitor is None:
            do = True
        elif callable(self.monitor):
            do = bool(self.monitor(net))
        elif self.monitor not in row:
            columns = sorted(k for k in row if k != "batches")
            raise ValueError(f"Checkpoint: monitor={self.monitor!r} is not in the training "
                             f"history (has {columns}); validation columns need train_split.")
        else:
            do = bool(row[self.monitor])
        key = self._score_key()
        if do and key in row and self.best_ is not None:
            do = row[key] < self.best_ if self._lower_is_better(net, key) else row[key] > self.best_
        do = do and len(net.history) % self.every == 0
        if self.event_name is not None:
            net.history.record(self.event_name, do)  # before saving: the saved history says so
        if do:
            # with a training_state, save knows the callbacks are left out: no warning, and no
            # process-wide warnings filter to change
            save(net, self.dirname, training_state=training_state(net, self))
            if key in row:
                self.best_ = row[key]

    def on_train_end(self, net, **kwargs):
        if self.load_best and (Path(self.dirname) / "model.json").is_file():
            net.module_.load_state_dict(load_checkpoint(self.dirname).module_.state_dict())


def load_checkpoint(dirname: Any, trusted: Optional[Iterable[str]] = None,
                    device: Optional[str] = None):
    """Load the net saved by :class:`Checkpoint` in ``dirname``, ready for ``partial_fit``.

    The estimator has the saved weights and history; pass ``callbacks=[Checkpoint(dirname)]``
    again (``set_params``) to keep checkpointing. ``trusted`` and ``device`` are as in
    :func:`nnpipe.load`.
    """
    return _load(dirname, trusted, device, "load_checkpoint")[0]


def _load(dirname, trusted, device, caller):
    if not isinstance(dirname, (str, os.PathLike)):
        raise invalid_value(f"{caller}: dirname", dirname, "a directory path")
    if not Path(dirname).is_file() and not (Path(dirname) / "model.json").is_file():
        raise FileNotFoundError(f"{caller}: dirname={os.fspath(dirname)!r} holds no "
                                "checkpoint (no model.json); pass the dirname given to Checkpoint.")
    est, state = load_with_training_state(dirname, trusted=trusted, device=device)
    if not hasattr(est, "module_"):
        raise ValueError(f"{caller}: {os.fspath(dirname)!r} holds a saved "
                         f"{type(est).__name__}, not a training checkpoint of one network.")
    return est, state


# --------------------------------------------------------------------------- exact resumption


def training_state(net, checkpoint: Optional[Checkpoint] = None):
    """``(tensors, json-able dict)``: what the epoch after this one depends on, beyond the
    weights and history (see the module's docstring)."""
    tensors: Dict[str, torch.Tensor] = {"rng/cpu": torch.get_rng_state()}
    if str(net.device).startswith("cuda") and torch.cuda.is_available():
        tensors["rng/cuda"] = torch.cuda.get_rng_state()
    opt = net.optimizer_.state_dict()
    plain: Dict[str, Dict[str, Any]] = {}
    for index, entry in opt["state"].items():
        plain[str(index)] = {}
        for key, value in entry.items():
            if torch.is_tensor(value):
                tensors[f"optimizer/{index}/{key}"] = value
            else:
                plain[str(index)][key] = json_safe(value, f"optimizer state {key!r}")
    meta: Dict[str, Any] = {
        "version": _STATE_VERSION, "epochs": len(net.history),
        "optimizer": {"state": plain,
                      "param_groups": json_safe(opt["param_groups"], "optimizer param_groups")},
        "callbacks": {},
    }
    for name, cb in net.callbacks_:
        if cb is checkpoint or not hasattr(cb, "training_state"):
            continue
        state = cb.training_state()
        if state is not None:
            meta["callbacks"][name], cb_tensors = state
            tensors.update({f"callbacks/{name}/{k}": v for k, v in cb_tensors.items()})
    if checkpoint is not None:
        monitor = checkpoint.monitor
        meta["checkpoint"] = {"monitor": None if callable(monitor) else monitor,
                              "monitor_is_callable": callable(monitor), "every": checkpoint.every,
                              "event_name": checkpoint.event_name,
                              "load_best": checkpoint.load_best}
    return tensors, meta


def resume(dirname: Any, X, y=None, callbacks: Optional[List] = None,
           checkpoint: Optional[Checkpoint] = None, trusted: Optional[Iterable[str]] = None,
           device: Optional[str] = None):
    """Go on with the run checkpointed in ``dirname`` exactly as if it had never stopped.

    Loads the net and its training state (optimizer, lr schedule, early stopping, random
    state), keeps checkpointing to ``dirname`` as before, and trains the epochs left of
    ``max_epochs`` on ``X``, ``y`` (the same data as the run: the validation split is drawn
    again from the saved seed). Returns the net; when no epoch is left it comes back as saved.

    Parameters
    ----------
    dirname : path
        The directory given to :class:`Checkpoint`.
    X, y : array-like
        The training data of the run.
    callbacks : list, optional
        Your own callbacks, which a checkpoint does not save (skorch's ``callbacks``).
    checkpoint : Checkpoint, optional
        Checkpoint differently from now on (default: as the run did; required when its
        ``monitor`` was a function, which is not saved).
    trusted, device
        As in :func:`nnpipe.load`.

    Examples
    --------
    >>> import tempfile, numpy as np, torch
    >>> from skorch.callbacks import Callback
    >>> from nnpipe import NNClassifier
    >>> X = np.random.RandomState(0).normal(size=(80, 4)).astype("float32"); y = X[:, 0] > 0
    >>> class Crash(Callback):                   # stands in for a job killed after epoch 3
    ...     def on_epoch_end(self, net, **kwargs):
    ...         if len(net.history) == 3:
    ...             raise KeyboardInterrupt
    >>> params = dict(max_epochs=6, optimizer="adam", lr_schedule="cosine", dropout=0.2,
    ...               random_state=0)
    >>> whole = NNClassifier(**params).fit(X, y)
    >>> d = tempfile.mkdtemp()
    >>> cut = NNClassifier(**params, callbacks=[Checkpoint(d, monitor=None), Crash()]).fit(X, y)
    >>> resumed = resume(d, X, y)
    >>> len(cut.history), len(resumed.history)
    (3, 6)
    >>> all(torch.equal(a, b) for a, b in zip(whole.module_.state_dict().values(),
    ...                                       resumed.module_.state_dict().values()))
    True
    """
    net, state = _load(dirname, trusted, device, "resume")
    if state is None:
        raise ValueError(f"resume: {os.fspath(dirname)!r} holds a model without training state "
                         "(saved by nnpipe.save, or by a Checkpoint of an older nnpipe); go on "
                         "with load_checkpoint(...).partial_fit(X, y), which starts the optimizer "
                         "afresh.")
    tensors, meta = state
    if meta.get("version") != _STATE_VERSION:
        raise ValueError(f"resume: {os.fspath(dirname)!r} holds training state version "
                         f"{meta.get('version')!r}; this nnpipe reads version {_STATE_VERSION}.")
    if callbacks is not None and not isinstance(callbacks, (list, tuple)):
        raise invalid_value("resume: callbacks", callbacks, "None or a list of skorch callbacks")
    if checkpoint is None:
        saved = dict(meta.get("checkpoint") or {})
        if saved.pop("monitor_is_callable", False):
            raise ValueError("resume: the run's Checkpoint monitor was a function, which a "
                             "checkpoint cannot hold; pass checkpoint=Checkpoint(dirname, "
                             "monitor=...) to go on.")
        checkpoint = Checkpoint(dirname, **saved)
    left = int(net.max_epochs) - len(net.history)
    if left <= 0:
        return net
    net.set_params(callbacks=[*(callbacks or []), checkpoint])
    _restore_optimizer(net, meta["optimizer"], tensors)
    for name, cb in net.callbacks_:
        if name in meta["callbacks"] and hasattr(cb, "resume_from"):
            prefix = f"callbacks/{name}/"
            cb.resume_from(meta["callbacks"][name], {k[len(prefix):]: v for k, v in
                                                     tensors.items() if k.startswith(prefix)})
    rng = {"cpu": tensors["rng/cpu"]}
    if "rng/cuda" in tensors:
        rng["cuda"] = tensors["rng/cuda"]
    return net._continue_training(X, y, epochs=left, rng_states=rng)


def _restore_optimizer(net, saved: Dict[str, Any], tensors: Dict[str, torch.Tensor]) -> None:
    state: Dict[int, Dict[str, Any]] = {int(i): dict(entry) for i, entry in saved["state"].items()}
    for key, value in tensors.items():
        if key.startswith("optimizer/"):
            _, index, name = key.split("/", 2)
            state.setdefault(int(index), {})[name] = value
    groups = net.optimizer_.state_dict()["param_groups"]
    if len(groups) != len(saved["param_groups"]) or any(
            len(a["params"]) != len(b["params"]) for a, b in zip(groups, saved["param_groups"])):
        raise ValueError("resume: the checkpoint's optimizer has other parameter groups than the "
                         "network built from its parameters; it cannot be resumed exactly.")
    net.optimizer_.load_state_dict({"state": state, "param_groups": saved["param_groups"]})

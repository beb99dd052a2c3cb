"""MLflow tracking for pipeline stages that a tracking server being down never breaks.

One :class:`Tracker` is one MLflow run per stage execution. Children (:meth:`Tracker.child`) are
nested runs for CV folds, search trials or ensemble members. Every MLflow call is guarded: on the
first failure the tracker warns once (:class:`TrackingWarning`), goes offline for the rest of the
stage and appends everything it would have logged to ``<outbox>/<run-uuid>.jsonl``;
:func:`sync_outbox` (or ``python -m nnpipe.tracking sync``) replays those files later.

Examples
--------
::

    from nnpipe.tracking import Tracker, flatten

    with Tracker("train", params=flatten(params)) as run:
        clf = NNClassifier(callbacks=[run.epoch_logger()]).fit(X, y)
        for k, (tr, va) in enumerate(folds):
            with run.child(f"fold-{k}", params={"fold": k}) as fold:
                fold.log_metrics({"acc": score(tr, va)})
        run.log_model(nnpipe.save(clf, "models/clf"))

mlflow is imported inside the functions that use it: importing this module has no side effects.
"""

from __future__ import annotations

import argparse
import contextlib
import getpass
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import uuid
import warnings
from numbers import Integral, Real
from pathlib import Path
from typing import Any, Dict, Iterable, List, Mapping, Optional, Union

from skorch.callbacks import Callback

from ._mlflow import (_HTTP_ENV, DEFAULT_RANGE_FACTOR, PARAM_VALUE_LIMIT, TrackingWarning,
                      _client, _dataset, _experiment_id, _is_http, _is_rejection, _log_batch,
                      _log_dataset, _log_pyfunc, _model_extras, _now_ms, _restore_env, _set_env,
                      _short, _truncate, _uploading)
from ._outbox import _OUTBOX_FORMAT, _locked, _read_records, _Replay, fcntl
from ._registry import invalid_value
from .exceptions import check_server_client

__all__ = ["Tracker", "EpochLogger", "TrackingWarning", "tracking_uri", "repo_root", "flatten",
           "sync_outbox", "default_outbox", "DEFAULT_OUTBOX", "PARAM_VALUE_LIMIT", "check_status",
           "data_name", "default_experiment", "epoch_metrics"]

PathLike = Union[str, "os.PathLike[str]"]

#: Where offline trackers write by default, relative to the repository root (:func:`default_outbox`).
DEFAULT_OUTBOX = Path("metrics") / "mlflow_outbox"
_DVC_TMP = (".dvc", "tmp", "exps")
_STATUSES = ("FINISHED", "FAILED", "KILLED")
# tags a nested run copies from its parent
_INHERITED_TAGS = ("mlflow.source.git.commit", "mlflow.source.name", "mlflow.source.type",
                   "nnpipe.dvc_experiment", "mlflow.user")
_SIGNAL_EXITS = (130, 143)  # exit codes of a stage stopped by Ctrl-C / SIGTERM (pipelines/_stage)


# --------------------------------------------------------------------------- small helpers


def _git(args: List[str], cwd: Path) -> Optional[str]:
    try:
        out = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def _check_name(argument: str, value: Any) -> str:
    if not isinstance(value, str) or not value.strip():
        raise invalid_value(argument, value, "a non-empty string")
    return value


def check_status(status: Any, optional: bool = False) -> Optional[str]:
    """``status`` if it is an MLflow run status a run may end with, else a ValueError naming it.

    Examples
    --------
    >>> check_status("KILLED")
    'KILLED'
    >>> check_status("PRUNED")
    Traceback (most recent call last):
    ...
    ValueError: status must be one of 'FINISHED', 'FAILED', 'KILLED', got 'PRUNED'.
    """
    if status is None and optional:
        return None
    if not isinstance(status, str) or status not in _STATUSES:
        allowed = ", ".join(map(repr, _STATUSES)) + (" or None" if optional else "")
        raise invalid_value("status", status, f"one of {allowed}")
    return status


def _exit_status(exc_type: Optional[type], exc: Optional[BaseException]) -> str:
    """The status a ``with`` block's exit means: FINISHED when it ran through (or exited 0),
    KILLED for Ctrl-C / SIGTERM (exit 130 / 143), FAILED for any other error or exit code."""
    if exc_type is None:
        return "FINISHED"
    if issubclass(exc_type, KeyboardInterrupt):
        return "KILLED"
    if issubclass(exc_type, SystemExit):
        code = getattr(exc, "code", None)
        if code is None or code == 0:
            return "FINISHED"
        return "KILLED" if code in _SIGNAL_EXITS else "FAILED"
    return "FAILED"


def _check_mapping(argument: str, value: Any, optional: bool = True) -> Dict[Any, Any]:
    if value is None and optional:
        return {}
    if not isinstance(value, Mapping):
        raise invalid_value(argument, value, "a dict" + (" or None" if optional else ""))
    return dict(value)


# --------------------------------------------------------------------------- locations


def repo_root(start: Optional[PathLike] = None) -> Path:
    """The repository an experiment belongs to, as an absolute path.

    Inside a ``dvc exp run --queue`` / ``--temp`` workspace (``<root>/.dvc/tmp/exps/...``) this is
    the original repository ``<root>``, not the temporary copy; otherwise the git top level of
    ``start``; otherwise ``start`` itself.

    Parameters
    ----------
    start : path, optional
        Where to look from; the working directory by default.
    """
    start = Path(os.getcwd() if start is None else start).resolve()
    parts = start.parts
    for i in range(len(parts) - len(_DVC_TMP) + 1):
        if parts[i:i + len(_DVC_TMP)] == _DVC_TMP and i > 0:
            return Path(*parts[:i])
    top = _git(["rev-parse", "--show-toplevel"], start if start.is_dir() else start.parent)
    return Path(top).resolve() if top else start


def tracking_uri(start: Optional[PathLike] = None) -> str:
    """The MLflow tracking URI stages log to.

    ``MLFLOW_TRACKING_URI`` wins when set; otherwise ``sqlite:///<repo root>/mlflow.db`` with an
    absolute path, the repo root found by :func:`repo_root` (so an experiment queued with
    ``dvc exp run --queue`` logs to the original repository's database, not its temporary copy's).

    Parameters
    ----------
    start : path, optional
        Where to look for the repository from; the working directory by default.

    Examples
    --------
    >>> import os, tempfile
    >>> root = tempfile.mkdtemp()
    >>> env = os.environ.pop("MLFLOW_TRACKING_URI", None)
    >>> uri = tracking_uri(os.path.join(root, ".dvc", "tmp", "exps", "tmpabc"))
    >>> uri == "sqlite:///" + (Path(root).resolve() / "mlflow.db").as_posix()
    True
    >>> if env is not None: os.environ["MLFLOW_TRACKING_URI"] = env
    """
    env = os.environ.get("MLFLOW_TRACKING_URI", "").strip()
    if env:
        return env
    return "sqlite:///" + (repo_root(start) / "mlflow.db").as_posix()


def default_outbox(start: Optional[PathLike] = None) -> Path:
    """Where offline trackers write and ``sync`` reads by default: ``<repo root>/metrics/
    mlflow_outbox``, the root found by :func:`repo_root`, so a stage run by ``dvc exp run
    --queue`` (in a temporary copy that is deleted afterwards) keeps its records in the original
    repository, beside the ``mlflow.db`` that :func:`tracking_uri` points at.

    Examples
    --------
    >>> import os, tempfile
    >>> root = Path(tempfile.mkdtemp()).resolve()
    >>> default_outbox(root / ".dvc" / "tmp" / "exps" / "tmpabc") == root / DEFAULT_OUTBOX
    True
    """
    return repo_root(start) / DEFAULT_OUTBOX


def data_name(source: Optional[str] = None, path: Optional[PathLike] = None) -> str:
    """A short name for a data source: its name, or the stem of its file (folder for images).

    Used for MLflow dataset names, run names and the default experiment
    (:func:`default_experiment`).

    Parameters
    ----------
    source : str, optional
        ``params.yaml``'s ``data.source`` (None means ``"digits"``).
    path : path, optional
        ``data.path``: the npz / csv file or the images folder.

    Examples
    --------
    >>> data_name(), data_name("csv", "data/churn.csv"), data_name("images", "data/flowers/")
    ('digits', 'churn', 'flowers')
    >>> data_name("digits", "data/raw")  # embedded: the path is not its name
    'digits'
    """
    source = "digits" if source is None else _check_name("source", source)
    if source == "digits" or path is None or not str(path).strip():
        return source  # digits is embedded: a path given with it is a placeholder, unread
    path = Path(path)
    return (path.name if source == "images" else path.stem) or source


def default_experiment(source: Optional[str] = None, path: Optional[PathLike] = None) -> str:
    """The experiment a stage logs to when ``tracking.experiment`` is unset: ``nnpipe-<data>``.

    Examples
    --------
    >>> default_experiment(), default_experiment("npz", "/data/mnist.npz")
    ('nnpipe-digits', 'nnpipe-mnist')
    """
    return f"nnpipe-{data_name(source, path)}"


# --------------------------------------------------------------------------- params


def _param_value(value: Any) -> Any:
    if value is None or isinstance(value, (bool, int, float)):
        return value
    if hasattr(value, "item") and getattr(value, "ndim", 1) == 0:  # numpy / torch scalars
        with contextlib.suppress(Exception):
            return _param_value(value.item())
    if isinstance(value, (list, tuple)):
        text = json.dumps(list(value), default=str)
    else:
        text = os.fspath(value) if isinstance(value, os.PathLike) else str(value)
    return _truncate(text, PARAM_VALUE_LIMIT)


_PARAM_KEY = re.compile(r"[\w\-. :/]+")  # the characters MLflow allows in a param name


def flatten(mapping: Mapping[str, Any], sep: str = ".") -> Dict[str, Any]:
    """Flatten nested dicts into MLflow params: ``{"a": {"lr": 1e-3}}`` -> ``{"a.lr": 1e-3}``.

    Numbers, booleans and None stay as they are; lists and tuples become their JSON text; anything
    else its ``str``. A value longer than MLflow's limit (:data:`PARAM_VALUE_LIMIT` characters) is
    truncated and ends with a note giving its full length. An empty dict becomes ``"{}"``.

    Parameters
    ----------
    mapping : dict
    sep : str
        Joins the keys of nested levels.

    Examples
    --------
    >>> flatten({"train": {"lr": 0.001, "layers": [64, 32]}, "seed": 0})
    {'train.lr': 0.001, 'train.layers': '[64, 32]', 'seed': 0}

    A mapping with a key MLflow would refuse in a param name (only letters, digits, ``_-. :/``)
    becomes its JSON text:

    >>> flatten({"train": {"lr_multipliers": {"hidden.*": 0.1}}})
    {'train.lr_multipliers': '{"hidden.*": 0.1}'}
    """
    if not isinstance(mapping, Mapping):
        raise invalid_value("mapping", mapping, "a dict (nested dicts are flattened)")
    if not isinstance(sep, str) or not sep:
        raise invalid_value("sep", sep, "a non-empty string")
    out: Dict[str, Any] = {}

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, Mapping) and value and all(
                isinstance(k, str) and _PARAM_KEY.fullmatch(k) for k in value):
            for key, sub in value.items():
                walk(f"{prefix}{sep}{key}" if prefix else str(key), sub)
        elif isinstance(value, Mapping):  # empty, or keys MLflow refuses ("hidden.*"): as JSON
            out[prefix] = _param_value(json.dumps(value, default=str)) if value else "{}"
        else:
            out[prefix] = _param_value(value)

    for key, value in mapping.items():
        walk(str(key), value)
    return out


def _metric_values(metrics: Any) -> Dict[str, float]:
    metrics = _check_mapping("metrics", metrics, optional=False)
    values = {}
    for key, value in metrics.items():
        if hasattr(value, "item") and not isinstance(value, (Real, bool)):
            with contextlib.suppress(Exception):
                value = value.item()
        if not isinstance(value, Real) or isinstance(value, bool):
            raise invalid_value(f"metrics[{key!r}]", value, "a real number")
        values[str(key)] = float(value)
    return values


# --------------------------------------------------------------------------- shared run-tree state


class _Tree:
    """State shared by a root tracker and all its children: connection, offline flag, outbox."""

    def __init__(self, uri: str, outbox: Path, key: str):
        self.uri = uri
        self.outbox = outbox
        self.file = outbox / f"{key}.jsonl"
        self.lock = threading.RLock()
        self.offline = False
        self.recorded: set = set()
        self._client = None
        self._fh = None
        self._env: Dict[str, str] = {}
        self._write_failed = False
        self._kept = 0

    @property
    def timeout_is_ours(self) -> bool:
        return "MLFLOW_HTTP_REQUEST_TIMEOUT" in self._env

    def client(self):
        if self._client is None:
            self._client = _client(self.uri)
        return self._client

    def open(self) -> None:
        if _is_http(self.uri):
            self._env = _set_env(_HTTP_ENV)

    def close(self) -> None:
        with self.lock:
            if self._fh is not None:
                with contextlib.suppress(OSError):
                    self._fh.flush()
                    os.fsync(self._fh.fileno())
                self._fh.close()  # releases the lock
                self._fh = None
            _restore_env(self._env)
            self._env = {}

    def go_offline(self, what: str, exc: BaseException) -> None:
        with self.lock:
            if self.offline:
                return
            self.offline = True
        warnings.warn(
            f"nnpipe.tracking: MLflow at {self.uri} failed while {what} ({_short(exc)}). Training "
            f"goes on with tracking offline: everything this stage logs from now on is kept in "
            f"{self.file}. Replay it once the tracking store is reachable with `python -m "
            f"nnpipe.tracking sync --outbox {self.outbox} --uri {self.uri}`.",
            TrackingWarning, stacklevel=4)

    def keep(self, record: Dict[str, Any]) -> Dict[str, Any]:
        """``record`` with its artifact or model files copied into the outbox.

        The sync may come much later, and the logged path may be gone or hold something else by
        then: a stage logs files from its staging folder, which is moved into place when the
        stage succeeds, and the next run of the stage replaces its outputs.
        """
        if record.get("type") not in ("artifact", "model"):
            return record
        source = Path(record["path"])
        with self.lock:
            self._kept += 1
            copy = self.outbox / self.file.stem / str(self._kept) / source.name
        try:
            copy.parent.mkdir(parents=True, exist_ok=True)
            if source.is_dir():
                shutil.copytree(source, copy)
            else:
                shutil.copy2(source, copy)
        except OSError as exc:
            warnings.warn(f"nnpipe.tracking: cannot copy {source} into the tracking outbox "
                          f"({_short(exc)}); the sync will upload {source} as it is then.",
                          TrackingWarning, stacklevel=5)
            return record
        return {**record, "path": str(copy)}

    def append(self, record: Dict[str, Any]) -> None:
        line = json.dumps({"v": _OUTBOX_FORMAT, **record}, default=str)
        with self.lock:
            try:
                if self._fh is None:
                    self.outbox.mkdir(parents=True, exist_ok=True)
                    self._fh = open(self.file, "a", encoding="utf-8")
                    if fcntl is not None:
                        with contextlib.suppress(OSError):
                            fcntl.flock(self._fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                self._fh.write(line + "\n")
                self._fh.flush()
            except OSError as exc:
                if not self._write_failed:
                    self._write_failed = True
                    warnings.warn(f"nnpipe.tracking: cannot write the tracking outbox {self.file} "
                                  f"({_short(exc)}); what this stage logs is lost.",
                                  TrackingWarning, stacklevel=4)


# --------------------------------------------------------------------------- tracker


class Tracker:
    """One MLflow run for one stage execution; a context manager.

    Every MLflow call is guarded and time-bounded. On the first failure (server down, timeout,
    unwritable store) the tracker warns once with :class:`TrackingWarning`, goes offline with all
    its children, and appends everything it would have logged (params, metrics with steps, tags,
    artifact paths, models, the run hierarchy, the final status) as JSON lines to
    ``<outbox>/<run-uuid>.jsonl``, to be replayed by :func:`sync_outbox`. A request the store
    *rejects* (e.g. a param re-logged with another value) is skipped with a warning instead.

    For ``http(s)`` URIs the tracker sets ``MLFLOW_HTTP_REQUEST_MAX_RETRIES=0`` and
    ``MLFLOW_HTTP_REQUEST_TIMEOUT=5`` for its lifetime, unless they are set already, so an
    unreachable server costs seconds, not minutes.

    Parameters
    ----------
    stage : str
        The stage name: the ``nnpipe.stage`` tag, and the run name unless ``name`` is given.
    params : dict, optional
        Params to log at the start; nested dicts are flattened with :func:`flatten`.
    experiment : str
        MLflow experiment name, created if missing. Next to a sqlite database, its artifacts go
        to ``<database dir>/mlruns/<experiment>``.
    uri : str, optional
        Tracking URI; :func:`tracking_uri` by default.
    tags : dict, optional
        Extra run tags. The tracker sets ``nnpipe.stage``, ``mlflow.source.git.commit`` (git
        ``HEAD``, when in a git repository), ``nnpipe.dvc_experiment`` (``$DVC_EXP_NAME``, when
        set) and ``mlflow.user``. Nested runs inherit these and ``mlflow.source.name`` /
        ``mlflow.source.type`` (the stages set ``pipelines/<stage>.py`` / ``JOB``).
    outbox : path, optional
        Directory for offline records (a relative path: from the working directory at
        construction); :func:`default_outbox` by default.
    name : str, optional
        The run name shown in the MLflow UI (e.g. ``"train · cnn2d · digits · lr=0.005"``);
        the stage by default.

    Attributes
    ----------
    run_id : str or None
        The MLflow run id; None until started, or when the run was never created (offline).
    offline : bool
    status : str
        ``"PENDING"``, ``"RUNNING"``, then ``"FINISHED"``, ``"FAILED"`` or ``"KILLED"``.

    Examples
    --------
    ::

        with Tracker("train", params={"lr": 1e-3}) as run:
            run.log_metrics({"acc": 0.9}, step=1)
            with run.child("fold-0") as fold:
                fold.log_metrics({"acc": 0.8})
    """

    def __init__(self, stage: str, params: Optional[Mapping[str, Any]] = None, *,
                 experiment: str = "nnpipe", uri: Optional[str] = None,
                 tags: Optional[Mapping[str, Any]] = None, outbox: Optional[PathLike] = None,
                 name: Optional[str] = None):
        self.stage = _check_name("stage", stage)
        self.run_name = self.stage if name is None else _check_name("name", name)
        self.experiment = _check_name("experiment", experiment)
        if uri is not None:
            _check_name("uri", uri)
        self._params = flatten(_check_mapping("params", params))
        self._tags = {str(k): str(v) for k, v in _check_mapping("tags", tags).items()}
        if outbox is not None and not isinstance(outbox, (str, os.PathLike)):
            raise invalid_value("outbox", outbox, "a directory path or None")
        self.uri = uri if uri is not None else tracking_uri()
        check_server_client(self.uri, "tracking.uri")  # a missing library is no outage
        self.outbox = default_outbox() if outbox is None else Path(outbox).absolute()
        self.key = uuid.uuid4().hex
        self.run_id: Optional[str] = None
        self.status = "PENDING"
        self._parent: Optional[Tracker] = None
        self._tree: Optional[_Tree] = None
        self._experiment_id: Optional[str] = None
        self._children: List[Tracker] = []
        self._start_time: Optional[int] = None
        self._exit_status: Optional[str] = None  # what a clean exit ends with (child(status=))

    # ----------------------------------------------------------------- properties

    @property
    def name(self) -> str:
        """The run name (``name``, else the stage, for a root tracker; the child name for a
        child)."""
        return self.run_name

    @property
    def offline(self) -> bool:
        """True once tracking has switched to the outbox."""
        return self._tree is not None and self._tree.offline

    @property
    def outbox_file(self) -> Path:
        """The JSON-lines file offline records go to (shared with the whole run tree)."""
        root = self
        while root._parent is not None:
            root = root._parent
        return self.outbox / f"{root.key}.jsonl"

    def __copy__(self) -> "Tracker":
        return self  # a handle on one run: copies (sklearn.clone of a callback) share it

    def __deepcopy__(self, memo) -> "Tracker":
        return self

    def __repr__(self) -> str:
        state = "offline" if self.offline else self.status.lower()
        return f"Tracker({self.stage!r}, run_id={self.run_id!r}, {state})"

    # ----------------------------------------------------------------- lifecycle

    def __enter__(self) -> "Tracker":
        self.start()
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        status = _exit_status(exc_type, exc)
        if status == "FINISHED":
            self.end(self._exit_status or "FINISHED")
        else:
            self.end(status, error=exc)
        return False

    def start(self) -> "Tracker":
        """Create the MLflow run (``with`` does this); returns ``self``."""
        if self.status != "PENDING":
            raise RuntimeError(f"Tracker {self.stage!r} was started already (status "
                               f"{self.status}); create a new Tracker for a new run.")
        if self._parent is not None and self._parent.status != "RUNNING":
            raise RuntimeError(f"cannot start child {self.stage!r}: its parent "
                               f"{self._parent.stage!r} is {self._parent.status}.")
        if self._parent is None:
            self._tree = _Tree(self.uri, self.outbox, self.key)
            self._tree.open()
        self._start_time = _now_ms()
        self.status = "RUNNING"
        tags = self._system_tags()
        tags.update(self._tags)
        self._tags = tags
        self._guarded(f"creating run {self.stage!r} in experiment {self.experiment!r}",
                      self._create_run, None, creating=True)
        if self.offline:
            with self._tree.lock:
                self._ensure_recorded()
        return self

    def end(self, status: str = "FINISHED", error: Optional[BaseException] = None) -> None:
        """End the run with ``status`` (``with`` does this); open children end with it too (a
        child given ``status=`` ends with its own when this one finishes)."""
        check_status(status)
        if self.status == "PENDING":
            raise RuntimeError(f"Tracker {self.stage!r} was never started.")
        if self.status != "RUNNING":
            return
        for child in self._children:
            if child.status == "RUNNING":
                child.end((child._exit_status or status) if status == "FINISHED" else status)
        if error is not None:
            self.set_tags({"nnpipe.error": _short(error)})
        try:
            end_time = _now_ms()
            self._guarded(f"ending run {self.stage!r}",
                          lambda: self._tree.client().set_terminated(self.run_id, status, end_time),
                          {"type": "end", "status": status, "end_time": end_time})
        finally:
            self.status = status
            if self._parent is None:
                self._tree.close()

    def child(self, name: str, params: Optional[Mapping[str, Any]] = None, *,
              tags: Optional[Mapping[str, Any]] = None,
              status: Optional[str] = None) -> "Tracker":
        """A nested run (``mlflow.parentRunId`` = this run) for a fold, a trial, a member.

        Use it as a context manager; a child that is logged to without ``with`` starts itself and
        is ended when its parent ends.

        Parameters
        ----------
        name : str
            The nested run's name.
        params, tags : dict, optional
            Params (flattened) and tags to log at its start.
        status : {"FINISHED", "FAILED", "KILLED"}, optional
            The MLflow status the child ends with when its block exits normally (e.g.
            ``"KILLED"`` for a pruned search trial, ``"FAILED"`` for a failed one); None means
            ``"FINISHED"``. A block that raises always ends the child ``"FAILED"`` (``"KILLED"``
            for Ctrl-C / SIGTERM), whatever ``status`` says.
        """
        _check_name("name", name)
        check_status(status, optional=True)
        self._require_running()
        kid = Tracker(name, params, experiment=self.experiment, uri=self.uri, tags=tags,
                      outbox=self.outbox)
        kid._parent, kid._tree = self, self._tree
        kid._exit_status = status
        self._children.append(kid)
        return kid

    # ----------------------------------------------------------------- logging

    def log_params(self, params: Mapping[str, Any]) -> None:
        """Log params; nested dicts are flattened with :func:`flatten`."""
        flat = flatten(_check_mapping("params", params, optional=False))
        self._require_running()
        self._params.update(flat)
        self._guarded(f"logging params to run {self.stage!r}",
                      lambda: _log_batch(self._tree.client(), self.run_id, params=flat),
                      {"type": "params", "params": flat})

    def log_metrics(self, metrics: Mapping[str, Any], step: Optional[int] = None, *,
                    timestamp: Optional[int] = None) -> None:
        """Log numeric metrics at ``step`` (MLflow's step 0 when None), stamped ``timestamp``
        (milliseconds since the epoch; now when None)."""
        values = _metric_values(metrics)
        if step is not None and (not isinstance(step, Integral) or isinstance(step, bool)):
            raise invalid_value("step", step, "an int or None")
        if timestamp is not None and (not isinstance(timestamp, Integral)
                                      or isinstance(timestamp, bool)):
            raise invalid_value("timestamp", timestamp, "an int (ms since the epoch) or None")
        self._require_running()
        step, stamp = int(step or 0), _now_ms() if timestamp is None else int(timestamp)
        self._guarded(f"logging metrics to run {self.stage!r}",
                      lambda: _log_batch(self._tree.client(), self.run_id, metrics=values,
                                         step=step, timestamp=stamp),
                      {"type": "metrics", "metrics": values, "step": step, "timestamp": stamp})

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        """Set run tags (values are converted to strings)."""
        values = {str(k): str(v) for k, v in _check_mapping("tags", tags, optional=False).items()}
        self._require_running()
        self._tags.update(values)
        self._guarded(f"setting tags on run {self.stage!r}",
                      lambda: _log_batch(self._tree.client(), self.run_id, tags=values),
                      {"type": "tags", "tags": values})

    def log_artifact(self, path: PathLike, artifact_path: Optional[str] = None) -> None:
        """Log one file (under ``artifact_path`` in the run's artifacts, if given)."""
        self._log_files(path, artifact_path, directory=False)

    def log_artifacts(self, directory: PathLike, artifact_path: Optional[str] = None) -> None:
        """Log a directory's files (under ``artifact_path`` in the run's artifacts, if given)."""
        self._log_files(directory, artifact_path, directory=True)

    def log_dataset(self, X: Any, y: Any = None, *, name: str, source: PathLike,
                    context: str = "training") -> None:
        """Log a dataset as an input of this run (the run's Dataset column in the MLflow UI).

        Only its description is logged: ``name``, a digest of the arrays, ``source``, the schema
        (dtype and shape) and the profile (sizes); never the data. Offline, the description is
        kept in the outbox and :func:`sync_outbox` logs it.

        Parameters
        ----------
        X : array-like
            The features, as the model receives them.
        y : array-like, optional
            The targets.
        name : str
            The dataset's name, e.g. ``"digits"`` or a CSV file's stem (:func:`data_name`).
        source : path or str
            Where the arrays were read from (e.g. ``data/prepared/train.npz``); a relative path
            is made absolute.
        context : str
            What the run used it for: ``"training"``, ``"test"``, ...
        """
        _check_name("name", name)
        _check_name("context", context)
        if not isinstance(source, (str, os.PathLike)) or not str(source).strip():
            raise invalid_value("source", source, "a path or URI string")
        if isinstance(source, os.PathLike) or "://" not in str(source):
            source = str(Path(source).absolute())
        self._require_running()
        dataset = self._describe(f"describe dataset {name!r}", _dataset, X, y, name, str(source))
        if dataset is None:
            return
        self._guarded(f"logging dataset {name!r} to run {self.stage!r}",
                      lambda: _log_dataset(self._tree.client(), self.run_id, dataset, context),
                      {"type": "dataset", "dataset": dataset, "context": context})

    def log_model(self, model_dir: PathLike, name: str = "model", *, X_train: Any = None,
                  n_examples: int = 5, range_factor: Optional[float] = DEFAULT_RANGE_FACTOR,
                  **kwargs: Any) -> Optional[str]:
        """Log an :func:`nnpipe.save` directory as an MLflow pyfunc model; returns its URI.

        The model is logged "from code" (``nnpipe/mlflow_model.py``) with the directory as its
        artifact ``"model"``: nothing is pickled. Load it with ``mlflow.pyfunc.load_model(uri)``
        (with the tracking URI pointing at this store).

        With ``X_train`` the model gets a signature (inferred from its first rows and the model's
        predictions on them), those rows as its input example, and the training value range.
        Serving then refuses input with the wrong number of columns or the wrong dtype (an
        MLflow error naming the expected schema), non-finite values, and values beyond
        ``range_factor`` times the largest magnitude seen in training (e.g. raw 0-16 pixels
        for a model trained on pixels scaled to [0, 1]).

        Parameters
        ----------
        model_dir : path
            A directory written by :func:`nnpipe.save`.
        name : str
            The logged model's name.
        X_train : array-like of shape (n_samples, n_features), optional
            The training input as the model receives it (before the saved pipeline's own
            preprocessing).
        n_examples : int
            How many rows of ``X_train`` make the input example.
        range_factor : float or None
            Serving refuses values beyond ``range_factor * max(|min|, |max|)`` of ``X_train``;
            None checks no range. A prediction can ask for another factor (0: no check) with
            ``model.predict(X, params={"range_factor": ...})`` (an inference parameter of the
            signature).
        **kwargs
            Passed on to MLflow's model logging (``signature``, ``input_example``,
            ``registered_model_name``, ``pip_requirements``, ...).

        Returns
        -------
        str or None
            The model URI (``models:/<model id>``), or None when tracking is offline (the model
            is then logged by :func:`sync_outbox`; only JSON-serialisable ``kwargs`` are kept).
        """
        model_dir = Path(model_dir).absolute()
        if not model_dir.is_dir():
            raise invalid_value("model_dir", str(model_dir),
                                "an existing directory written by nnpipe.save")
        _check_name("name", name)
        if not isinstance(n_examples, Integral) or isinstance(n_examples, bool) or n_examples < 1:
            raise invalid_value("n_examples", n_examples, "an int >= 1")
        if range_factor is not None and (not isinstance(range_factor, Real)
                                         or isinstance(range_factor, bool) or
                                         not 0 < range_factor < float("inf")):
            raise invalid_value("range_factor", range_factor, "a finite number > 0 or None")
        self._require_running()
        extras = None if X_train is None else self._describe(
            f"infer the signature of model {name!r} (it is logged without one)", _model_extras,
            model_dir, X_train, int(n_examples), range_factor)
        try:
            saved_kwargs = json.loads(json.dumps(kwargs))
        except (TypeError, ValueError):
            saved_kwargs = {k: v for k, v in kwargs.items() if _jsonable(v)}
        record = {"type": "model", "path": str(model_dir), "name": name, "kwargs": saved_kwargs,
                  "extras": extras}
        return self._guarded(
            f"logging model {name!r} to run {self.stage!r}",
            lambda: _log_pyfunc(self._tree.client(), self.uri, self.run_id, self._experiment_id,
                                model_dir, name, self._params, kwargs,
                                self._tree.timeout_is_ours, extras),
            record)

    def epoch_logger(self, prefix: str = "", skip: Iterable[str] = ()) -> "EpochLogger":
        """A skorch callback logging each epoch's numeric history entries to this run.

        See :class:`EpochLogger`.
        """
        return EpochLogger(self, prefix=prefix, skip=skip)

    # ----------------------------------------------------------------- internals

    def _system_tags(self) -> Dict[str, str]:
        root = self
        while root._parent is not None:
            root = root._parent
        tags = {"nnpipe.stage": root.stage, "mlflow.runName": self.run_name}
        if self._parent is not None:
            tags.update({k: v for k, v in self._parent._tags.items() if k in _INHERITED_TAGS})
            return tags
        commit = _git(["rev-parse", "HEAD"], Path.cwd())
        if commit:
            tags["mlflow.source.git.commit"] = commit
        if os.environ.get("DVC_EXP_NAME"):
            tags["nnpipe.dvc_experiment"] = os.environ["DVC_EXP_NAME"]
        with contextlib.suppress(Exception):
            tags["mlflow.user"] = getpass.getuser()
        return tags

    def _create_run(self) -> None:
        client = self._tree.client()
        tags = dict(self._tags)
        if self._parent is None:
            self._experiment_id = _experiment_id(client, self.uri, self.experiment)
        else:
            self._experiment_id = self._parent._experiment_id
            tags["mlflow.parentRunId"] = self._parent.run_id
        run = client.create_run(self._experiment_id, start_time=self._start_time, tags=tags,
                                run_name=self.run_name)
        self.run_id = run.info.run_id
        if self._params:
            _log_batch(client, self.run_id, params=self._params)

    def _describe(self, what: str, fn, *args: Any) -> Any:
        """``fn(*args)``, or None with a warning: describing what is logged never stops a
        stage at its end (a model or data the description fails on is the stage's own)."""
        try:
            return fn(*args)
        except Exception as exc:  # noqa: BLE001 - tracking never breaks training
            warnings.warn(f"nnpipe.tracking: could not {what}: {_short(exc)}",
                          TrackingWarning, stacklevel=4)
            return None

    def _require_running(self) -> None:
        if self.status == "PENDING" and self._parent is not None:
            self.start()
        if self.status == "PENDING":
            raise RuntimeError(f"Tracker {self.stage!r} was never started: use "
                               "`with Tracker(...) as run:`.")
        if self.status != "RUNNING":
            raise RuntimeError(f"Tracker {self.stage!r} has ended ({self.status}).")

    def _log_files(self, path: PathLike, artifact_path: Optional[str], directory: bool) -> None:
        path = Path(path).absolute()
        ok = path.is_dir() if directory else path.is_file()
        if not ok:
            argument = "directory" if directory else "path"
            raise invalid_value(argument, str(path),
                                "an existing directory" if directory else "an existing file")
        self._require_running()

        def call():
            client = self._tree.client()
            with _uploading(self._tree.timeout_is_ours):
                if directory:
                    client.log_artifacts(self.run_id, str(path), artifact_path)
                else:
                    client.log_artifact(self.run_id, str(path), artifact_path)

        self._guarded(f"logging artifact {path}", call,
                      {"type": "artifact", "path": str(path), "artifact_path": artifact_path,
                       "dir": directory})

    def _guarded(self, what: str, call, record: Optional[Dict[str, Any]], creating: bool = False):
        tree = self._tree
        if not tree.offline and (self.run_id is not None or creating):
            try:
                return call()
            except Exception as exc:
                if _is_rejection(exc) and not creating:
                    warnings.warn(f"nnpipe.tracking: MLflow at {self.uri} rejected {what} "
                                  f"({_short(exc)}); skipped, tracking goes on.",
                                  TrackingWarning, stacklevel=3)
                    return None
                tree.go_offline(what, exc)
        if record is not None:
            with tree.lock:
                self._ensure_recorded()
                tree.append({**tree.keep(record), "run": self.key})
        return None

    def _ensure_recorded(self) -> None:
        """Write this run's (and its ancestors') ``run`` record before its first data record."""
        tree = self._tree
        if self.key in tree.recorded:
            return
        if self._parent is not None:
            self._parent._ensure_recorded()
        tree.append({
            "type": "run", "run": self.key,
            "parent": self._parent.key if self._parent is not None else None,
            "name": self.run_name, "experiment": self.experiment, "uri": self.uri,
            "mlflow_run_id": self.run_id, "start_time": self._start_time,
            "tags": dict(self._tags), "params": dict(self._params),
        })
        tree.recorded.add(self.key)


def _jsonable(value: Any) -> bool:
    try:
        json.dumps(value)
    except (TypeError, ValueError):
        return False
    return True


#: history entries that are settings, not measurements: a per-epoch metric only once they change
HELD_KEYS = ("lr",)


def _measurement(key: str, value: Any, skip: Iterable[str] = ()) -> bool:
    """Whether a history entry can be an epoch metric: a number, not a flag, not the epoch, not
    a batch count or size (bookkeeping, not a result), not in ``skip``."""
    if key in ("epoch", "batches") or key in skip or key.endswith(("_batch_count", "_batch_size")):
        return False
    return (isinstance(value, Real) and not isinstance(value, bool)
            and type(value).__name__ != "bool_")


def epoch_metrics(history: Any, held: Iterable[str] = HELD_KEYS, skip: Iterable[str] = ()
                  ) -> "tuple[List[tuple[int, Dict[str, float]]], Dict[str, float]]":
    """Split a fitted net's history into per-epoch metrics and single final values.

    Measurements (``train_loss``, ``valid_loss``, ``valid_acc`` and other scores, ``dur``) are
    per-epoch metrics. A ``held`` entry (``lr``) is one only when it changes during training (a
    schedule); a constant one becomes a single final value. Batch counts and sizes, ``epoch``,
    the ``*_best`` flags and the names in ``skip`` are not metrics.

    Parameters
    ----------
    history : skorch History or list of dict
    held : iterable of str
    skip : iterable of str

    Returns
    -------
    per_epoch : list of (epoch, dict)
    final : dict
        The constant ``held`` entries, with their value.

    Examples
    --------
    >>> rows = [{"epoch": 1, "lr": 0.1, "train_batch_count": 3, "train_loss": 0.9},
    ...         {"epoch": 2, "lr": 0.1, "train_batch_count": 3, "train_loss": 0.5}]
    >>> epoch_metrics(rows)
    ([(1, {'train_loss': 0.9}), (2, {'train_loss': 0.5})], {'lr': 0.1})
    """
    rows = list(history.to_list() if hasattr(history, "to_list") else history)
    held, skip = tuple(held), tuple(skip)
    seen: Dict[str, set] = {}
    for row in rows:
        for key in held:
            if _measurement(key, row.get(key), skip):
                seen.setdefault(key, set()).add(float(row[key]))
    changing = {key for key, values in seen.items() if len(values) > 1}
    per_epoch = [(int(row["epoch"]),
                  {str(k): float(v) for k, v in row.items() if _measurement(k, v, skip)
                   and (k not in held or k in changing)}) for row in rows]
    final = {key: float(next(r[key] for r in reversed(rows) if key in r))
             for key in seen if key not in changing}
    return [(step, values) for step, values in per_epoch if values], final


class EpochLogger(Callback):
    """skorch callback: log each epoch's measurements to a :class:`Tracker`, with the epoch as
    the step.

    What changes from epoch to epoch is a per-epoch metric: the losses, the validation scores,
    ``dur``, and a ``held`` entry (``lr``) once it changes (a schedule; its earlier epochs are
    then logged too, with their steps and times). A ``held`` entry that stays constant is logged
    once, when training ends (at the last epoch's step). Batch counts and sizes, ``epoch``, the
    ``*_best`` flags (booleans) and the names in ``skip`` are never logged (see
    :func:`epoch_metrics`). Copies made by ``sklearn.clone`` log to the same tracker.

    Parameters
    ----------
    tracker : Tracker
    prefix : str
        Prepended to each metric name (e.g. ``"fold0/"``).
    skip : iterable of str
        History keys not to log (e.g. ``("dur",)``).
    held : iterable of str
        History keys that are settings: per-epoch metrics only once they change.
    """

    def __init__(self, tracker: Tracker, prefix: str = "", skip: Iterable[str] = (),
                 held: Iterable[str] = HELD_KEYS):
        self.tracker = tracker
        self.prefix = prefix
        self.skip = skip
        self.held = held

    def __deepcopy__(self, memo):  # sklearn.clone deep-copies callbacks; share the tracker
        return type(self)(self.tracker, prefix=self.prefix, skip=tuple(self.skip),
                          held=tuple(self.held))

    def initialize(self):
        if not isinstance(self.tracker, Tracker):
            raise invalid_value("tracker", self.tracker, "an nnpipe.tracking.Tracker")
        if not isinstance(self.prefix, str):
            raise invalid_value("prefix", self.prefix, "a string")
        self.skip_ = tuple(self.skip)
        self.held_ = tuple(self.held)
        self._reset()
        return self

    def _reset(self) -> None:
        self.pending_: Dict[str, List[tuple]] = {}  # held key -> [(step, value, ms)] so far
        self.changing_: set = set()

    def on_train_begin(self, net, **kwargs):
        self._reset()

    def on_epoch_end(self, net, **kwargs):
        row = net.history[-1]
        step, stamp = int(row["epoch"]), _now_ms()
        values = {}
        for key, value in row.items():
            if not _measurement(key, value, self.skip_):
                continue
            if key in self.held_ and key not in self.changing_:
                points = self.pending_.setdefault(key, [])
                points.append((step, float(value), stamp))
                if points[0][1] == float(value):
                    continue  # constant so far: held back
                self.changing_.add(key)  # it changes: its earlier epochs are metrics too
                for old_step, old_value, old_stamp in self.pending_.pop(key)[:-1]:
                    self.tracker.log_metrics({f"{self.prefix}{key}": old_value}, step=old_step,
                                             timestamp=old_stamp)
            values[f"{self.prefix}{key}"] = float(value)
        if values:
            self.tracker.log_metrics(values, step=step, timestamp=stamp)

    def on_train_end(self, net, **kwargs):
        for key, points in getattr(self, "pending_", {}).items():  # constant: one final value
            step, value, stamp = points[-1]
            self.tracker.log_metrics({f"{self.prefix}{key}": value}, step=step, timestamp=stamp)
        self._reset()


# --------------------------------------------------------------------------- replay


def sync_outbox(outbox: Optional[PathLike] = None, uri: Optional[str] = None) -> int:
    """Replay offline tracking records into a tracking store; returns the number of runs synced.

    Each ``<outbox>/*.jsonl`` file is replayed in full (runs and nested runs with their parent
    links, params, metrics with their steps and timestamps, tags, artifacts, models, final status)
    and then deleted. A run that was created online before the tracker went offline is continued
    when it exists in the store; otherwise a new run is created (tagged ``nnpipe.outbox_key``, so
    running sync again after an interruption continues that run instead of duplicating it).
    Files a running stage is still writing are skipped.

    Parameters
    ----------
    outbox : path, optional
        The outbox directory; :func:`default_outbox` (``<repo root>/metrics/mlflow_outbox``) by
        default.
    uri : str, optional
        Tracking URI; :func:`tracking_uri` by default.

    Raises
    ------
    RuntimeError
        When a file cannot be replayed (e.g. the store is still down); that file is kept.
    """
    if outbox is not None and not isinstance(outbox, (str, os.PathLike)):
        raise invalid_value("outbox", outbox, "a directory path or None")
    outbox = default_outbox() if outbox is None else Path(outbox)
    uri = uri if uri is not None else tracking_uri()
    _check_name("uri", uri)
    files = sorted(outbox.glob("*.jsonl"), key=lambda p: (p.stat().st_mtime, p.name)) \
        if outbox.is_dir() else []
    if not files:
        return 0
    synced = 0
    changed = _set_env(_HTTP_ENV) if _is_http(uri) else {}
    try:
        client = _client(uri)
        for path in files:
            with _locked(path) as fh:
                if fh is None:
                    warnings.warn(f"{path} is being written by a running stage; not synced.",
                                  TrackingWarning, stacklevel=2)
                    continue
                replay = _Replay(client, uri, path, "MLFLOW_HTTP_REQUEST_TIMEOUT" in changed)
                try:
                    for record in _read_records(path, fh):
                        replay.apply(record)
                    replay.finish()
                except Exception as exc:
                    raise RuntimeError(f"could not sync {path} to {uri} ({_short(exc)}); the file "
                                       "is kept: run the sync again later.") from exc
                path.unlink()
                shutil.rmtree(path.with_suffix(""), ignore_errors=True)  # kept files, if any
                synced += len(replay.runs)
    finally:
        _restore_env(changed)
    return synced


# --------------------------------------------------------------------------- CLI


def add_sync_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``sync`` (``python -m nnpipe.tracking sync`` and ``nnpipe sync``)."""
    parser.add_argument("--outbox", default=None,
                        help=f"outbox directory (default: <repo root>/"
                             f"{DEFAULT_OUTBOX.as_posix()})")
    parser.add_argument("--uri", default=None,
                        help="tracking URI (default: $MLFLOW_TRACKING_URI, else "
                             "sqlite:///<repo root>/mlflow.db)")


def sync_command(args: argparse.Namespace) -> int:
    """Run ``sync`` for parsed :func:`add_sync_arguments` options; returns the exit status.

    An ``--outbox`` given but not a directory is an error (exit 1); the default outbox may not
    exist yet (nothing ever went offline): then there is nothing to sync (exit 0).
    """
    uri = args.uri or tracking_uri()
    outbox = Path(args.outbox) if args.outbox else default_outbox()
    if args.outbox and not outbox.is_dir():
        print(f"error: --outbox {str(outbox)!r} is not a directory (give the folder offline "
              f"runs were written to; default <repo root>/{DEFAULT_OUTBOX.as_posix()})",
              file=sys.stderr)
        return 1
    try:
        count = sync_outbox(outbox, uri=uri)
    except Exception as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"synced {count} run{'s' if count != 1 else ''} from {outbox} to {uri}"
          + (": nothing to sync (no offline runs there)" if count == 0 else ""))
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    """``python -m nnpipe.tracking sync [--outbox DIR] [--uri URI]``."""
    parser = argparse.ArgumentParser(prog="python -m nnpipe.tracking",
                                     description="nnpipe MLflow tracking utilities.")
    commands = parser.add_subparsers(dest="command", required=True)
    add_sync_arguments(commands.add_parser("sync", help="replay offline tracking records into "
                                                        "MLflow"))
    return sync_command(parser.parse_args(argv))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

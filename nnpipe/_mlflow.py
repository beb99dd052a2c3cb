"""MLflow plumbing shared by :mod:`nnpipe.tracking` and its outbox replay: a client that is safe
to start on a new PostgreSQL database, experiments with their artifacts beside a sqlite store,
batched logging within MLflow's limits, models-from-code pyfunc logging, and the environment
(short HTTP timeouts) nnpipe sets for a server that may be down.

mlflow is imported inside the functions that use it: importing this module has no side effects.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any, Dict, Iterator, List, Mapping, Optional

import numpy as np

from .persist import load

#: MLflow's limit on a param value (``mlflow.utils.validation.MAX_PARAM_VAL_LENGTH``).
PARAM_VALUE_LIMIT = 6000
_TAG_VALUE_LIMIT = 8000  # mlflow.utils.validation.MAX_TAG_VAL_LENGTH
_PARAMS_PER_BATCH, _METRICS_PER_BATCH = 100, 1000
_HTTP_ENV = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "5"}
_UPLOAD_TIMEOUT = "60"  # artifact uploads stream data: a 5 s read timeout is too tight for them
# MLflow error codes meaning "the server is up and refused this particular request"; every other
# failure (connection refused, timeout, 5xx, auth, a locked sqlite file) takes the tracker offline
_REJECTIONS = {"INVALID_PARAMETER_VALUE", "BAD_REQUEST", "RESOURCE_ALREADY_EXISTS"}
_MODEL_CODE = Path(__file__).with_name("mlflow_model.py")
#: serving refuses inputs beyond this many times the largest magnitude seen in training
DEFAULT_RANGE_FACTOR = 4.0
#: the model artifact holding the training range (``input_range``, ``range_factor``)
SERVING_CONFIG = "serving.json"


class TrackingWarning(UserWarning):
    """MLflow tracking failed or rejected something; training goes on."""


def _now_ms() -> int:
    return int(time.time() * 1000)


def _truncate(text: str, limit: int) -> str:
    if len(text) <= limit:
        return text
    note = f"... [truncated, {len(text)} chars]"
    return text[:limit - len(note)] + note


def _short(exc: BaseException) -> str:
    return _truncate(f"{type(exc).__name__}: {exc}".replace("\n", " "), 400)


def _is_rejection(exc: BaseException) -> bool:
    return getattr(exc, "error_code", None) in _REJECTIONS


def _artifact_location(uri: str, experiment: str) -> Optional[str]:
    """Where a new experiment's artifacts go: next to a sqlite database, never under the cwd.

    MLflow's default for a sqlite store is ``./mlruns`` of whatever directory the process runs in,
    which for a queued DVC experiment is a temporary copy that is deleted afterwards.
    """
    if not uri.startswith("sqlite:///"):
        return None
    db = uri[len("sqlite:///"):].split("?", 1)[0]
    if not db or db == ":memory:":
        return None
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", experiment).strip("._") or "experiment"
    return (Path(db).resolve().parent / "mlruns" / slug).as_uri()


def _set_env(values: Mapping[str, str]) -> Dict[str, Optional[str]]:
    """Set environment variables the user has not set; returns what to restore."""
    changed = {}
    for name, value in values.items():
        if name not in os.environ:
            changed[name] = value
            os.environ[name] = value
    return changed


def _restore_env(changed: Mapping[str, str]) -> None:
    for name, value in changed.items():
        if os.environ.get(name) == value:  # leave it alone if someone else changed it since
            del os.environ[name]


@contextlib.contextmanager
def _env(values: Mapping[str, str]) -> Iterator[None]:
    changed = _set_env(values)
    try:
        yield
    finally:
        _restore_env(changed)


@contextlib.contextmanager
def _uploading(timeout_is_ours: bool) -> Iterator[None]:
    """No progress bars; a longer HTTP read timeout for uploads when nnpipe set the short one.

    Artifact uploads stream data and the server may answer only once it has stored them, so the
    5 s timeout that bounds ordinary calls is too tight; a timeout the user set is kept.
    """
    name = "MLFLOW_HTTP_REQUEST_TIMEOUT"
    saved = os.environ.get(name)
    if timeout_is_ours:
        os.environ[name] = _UPLOAD_TIMEOUT
    try:
        with _env({"MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false"}):
            yield
    finally:
        if timeout_is_ours and saved is not None:
            os.environ[name] = saved


@contextlib.contextmanager
def _global_tracking_uri(uri: str) -> Iterator[None]:
    """Point mlflow's global tracking URI at ``uri`` for the duration; restore it and the env."""
    import mlflow

    try:
        from mlflow.tracking._tracking_service import utils as _tracking_utils
        previous = _tracking_utils._tracking_uri
    except (ImportError, AttributeError):  # pragma: no cover - mlflow internals moved
        previous = mlflow.get_tracking_uri()
    saved_env = os.environ.get("MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(previous)
        if saved_env is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = saved_env


def _is_http(uri: str) -> bool:
    return uri.lower().startswith(("http://", "https://"))


def _client(uri: str):
    from mlflow.tracking import MlflowClient

    if not uri.startswith("postgresql"):
        return MlflowClient(tracking_uri=uri)
    # MLflow creates its tables on first use, and its migrations are not safe to run twice at
    # once: trackers starting together on a new database take turns (an advisory lock, which
    # the server drops if this process dies)
    import sqlalchemy

    engine = sqlalchemy.create_engine(uri, poolclass=sqlalchemy.pool.NullPool,
                                      connect_args={"connect_timeout": 10})
    try:
        with engine.connect() as conn:
            conn.execute(sqlalchemy.text(f"SELECT pg_advisory_lock({_SCHEMA_LOCK})"))
            try:
                client = MlflowClient(tracking_uri=uri)
                client.search_experiments(max_results=1)  # creates or upgrades the tables
            finally:
                conn.execute(sqlalchemy.text(f"SELECT pg_advisory_unlock({_SCHEMA_LOCK})"))
    finally:
        engine.dispose()
    return client


_SCHEMA_LOCK = 0x6E6E6D66  # "nnmf": the advisory lock key for MLflow's schema creation


def _experiment_id(client, uri: str, name: str) -> str:
    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        try:
            return client.create_experiment(name, artifact_location=_artifact_location(uri, name))
        except Exception as exc:  # another process created it first
            if not _is_rejection(exc):
                raise
            experiment = client.get_experiment_by_name(name)
            if experiment is None:
                raise
    if experiment.lifecycle_stage != "active":
        raise RuntimeError(f"experiment {name!r} is deleted in {uri}; restore it or choose another "
                           "experiment name.")
    return experiment.experiment_id


def _log_batch(client, run_id: str, params: Mapping[str, Any] = (), tags: Mapping[str, Any] = (),
               metrics: Mapping[str, float] = (), step: int = 0,
               timestamp: Optional[int] = None) -> None:
    from mlflow.entities import Metric, Param, RunTag

    params = [Param(k, str(v)) for k, v in dict(params).items()]
    tags = [RunTag(k, _truncate(str(v), _TAG_VALUE_LIMIT)) for k, v in dict(tags).items()]
    timestamp = _now_ms() if timestamp is None else int(timestamp)
    metrics = [Metric(k, float(v), timestamp, int(step)) for k, v in dict(metrics).items()]
    for i in range(0, len(params), _PARAMS_PER_BATCH):
        client.log_batch(run_id, params=params[i:i + _PARAMS_PER_BATCH])
    for i in range(0, len(tags), _PARAMS_PER_BATCH):
        client.log_batch(run_id, tags=tags[i:i + _PARAMS_PER_BATCH])
    for i in range(0, len(metrics), _METRICS_PER_BATCH):
        client.log_batch(run_id, metrics=metrics[i:i + _METRICS_PER_BATCH])


def _requirements() -> List[str]:
    from importlib import metadata

    from . import __version__

    reqs = [f"nnpipe=={__version__}"]
    for dist in ("mlflow", "torch", "skorch", "scikit-learn", "numpy", "safetensors", "pandas"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            reqs.append(f"{dist}=={metadata.version(dist)}")
    return reqs


def _dataset(X: Any, y: Any, name: str, source: str) -> Dict[str, str]:
    """An MLflow numpy dataset's description (name, digest, source, schema, profile) as strings:
    what ``log_inputs`` stores, and JSON, so the outbox can keep it. No data is kept."""
    import mlflow.data

    X = np.asarray(X)
    if X.ndim < 1 or X.size == 0:
        raise ValueError(f"log_dataset: X must be a non-empty array, got shape {X.shape}.")
    with warnings.catch_warnings():  # a local path "can be interpreted in multiple ways"
        warnings.filterwarnings("ignore", message="The specified dataset source")
        dataset = mlflow.data.from_numpy(X, source=source, name=name,
                                         targets=None if y is None else np.asarray(y))
    return {k: v for k, v in dataset.to_dict().items() if v is not None}


def _log_dataset(client, run_id: str, dataset: Mapping[str, str], context: str) -> None:
    """Log a :func:`_dataset` description as an input of run ``run_id`` in ``context``."""
    from mlflow.entities import Dataset, DatasetInput, InputTag

    entity = Dataset(**{k: dataset.get(k) for k in
                        ("name", "digest", "source_type", "source", "schema", "profile")})
    client.log_inputs(run_id, datasets=[
        DatasetInput(entity, tags=[InputTag("mlflow.data.context", context)])])


def _model_extras(model_dir: Path, X_train: Any, n_examples: int = 5,
                  range_factor: Optional[float] = DEFAULT_RANGE_FACTOR) -> Dict[str, Any]:
    """What serving needs to refuse wrong input, as JSON: the signature (inferred from a few
    training rows and the model's predictions on them), those rows as the input example, and
    the training value range with the factor :mod:`nnpipe.mlflow_model` enforces it with."""
    from mlflow.models import infer_signature

    X = np.asarray(X_train)
    if X.ndim < 2 or len(X) == 0:
        raise ValueError(f"log_model: X_train must be the non-empty training input, an array of "
                         f"shape (n_samples, n_features), got shape {X.shape}.")
    sample = X[:n_examples]
    prediction = np.asarray(load(model_dir).predict(sample))
    finite = X[np.isfinite(X)] if np.issubdtype(X.dtype, np.floating) else X
    factor = 0.0 if range_factor is None else float(range_factor)  # 0: no range check
    config = {"input_range": [float(finite.min()), float(finite.max())], "range_factor": factor}
    signature = infer_signature(sample, prediction, params={"range_factor": factor})
    return {"signature": signature.to_dict(),
            "input_example": sample.tolist(), "input_dtype": str(sample.dtype),
            "model_config": config}


def _with_extras(kwargs: Mapping[str, Any], extras: Optional[Mapping[str, Any]]) -> Dict[str, Any]:
    """``kwargs`` for ``Model.log`` with :func:`_model_extras`' signature and input example
    turned back into MLflow objects (what the caller passed explicitly wins)."""
    kwargs = dict(kwargs)
    if not extras:
        return kwargs
    from mlflow.models import ModelSignature

    kwargs.setdefault("signature", ModelSignature.from_dict(dict(extras["signature"])))
    kwargs.setdefault("input_example",
                      np.asarray(extras["input_example"], dtype=extras["input_dtype"]))
    return kwargs


def _log_pyfunc(client, uri: str, run_id: str, experiment_id: str, model_dir: Path, name: str,
                params: Mapping[str, Any], kwargs: Mapping[str, Any],
                timeout_is_ours: bool = False,
                extras: Optional[Mapping[str, Any]] = None) -> str:
    """Log ``model_dir`` as a models-from-code pyfunc model of run ``run_id``; returns its URI.

    The LoggedModel is created in the run's experiment explicitly, so no fluent (global) active
    run is needed and the user's own active run or experiment, if any, is left alone.
    ``extras`` (:func:`_model_extras`) add the signature, input example and serving config.
    """
    import mlflow
    from mlflow.models import Model

    kwargs = _with_extras(kwargs, extras)
    kwargs.setdefault("pip_requirements", _requirements())
    model = client.create_logged_model(
        experiment_id, name=name, source_run_id=run_id,
        params={k: _truncate(str(v), PARAM_VALUE_LIMIT) for k, v in dict(params).items()})
    with tempfile.TemporaryDirectory(prefix="nnpipe-serving-") as tmp:
        artifacts = {"model": str(model_dir)}
        if extras and extras.get("model_config"):
            # an artifact, not MLflow's model_config, which Model.log also logs as run params
            serving = Path(tmp) / SERVING_CONFIG
            serving.write_text(json.dumps(extras["model_config"]))
            artifacts["serving"] = str(serving)
        with _global_tracking_uri(uri), _uploading(timeout_is_ours):
            info = Model.log(artifact_path=None, name=name, flavor=mlflow.pyfunc, run_id=run_id,
                             model_id=model.model_id, python_model=str(_MODEL_CODE),
                             artifacts=artifacts, flavor_name="pyfunc.ModelFromCode", **kwargs)
    return info.model_uri

"""Safe save / load: parameters as JSON, weights as safetensors, atomic writes, no pickle.

Layout of a saved model directory::

    model.json                      # class, parameters, fitted attributes, history, weight files
    weights-<sha256 prefix>.safetensors

Saving writes the weights under a content-addressed name first, then replaces ``model.json``
atomically (temporary file + ``os.replace``): ``model.json`` is the commit point, so a crash at any
moment leaves either the old or the new model loadable, never a mixture. Loading verifies the
weights' SHA-256 and never unpickles anything. Classes named in ``model.json`` are imported only
from torch, skorch, sklearn, numpy and nnpipe, or from modules you pass in ``trusted``.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import os
import tempfile
import warnings
from pathlib import Path
from typing import Any, Dict, Iterable, Optional

import numpy as np
import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from skorch.history import History

__all__ = ["save", "load", "atomic_write_bytes", "UntrustedTypeError", "FORMAT_VERSION"]

FORMAT_VERSION = 1
_SAFE_PACKAGES = ("torch", "skorch", "sklearn", "numpy", "nnpipe")
_MANIFEST = "model.json"


class UntrustedTypeError(ValueError):
    """A saved model names a class outside the trusted packages."""


# --------------------------------------------------------------------------- atomic files


def atomic_write_bytes(path: os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers see the old file or the new one, never a part."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with _suppress():
            os.unlink(tmp)
        raise
    with _suppress():
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


class _suppress:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return exc[0] is not None and issubclass(exc[0], OSError)


# --------------------------------------------------------------------------- (de)serialising values


def _ref(obj: Any) -> str:
    return f"{obj.__module__}:{obj.__qualname__}"


def _encode(name: str, value: Any) -> Any:
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (np.integer, np.floating, np.bool_)):
        return value.item()
    if isinstance(value, (list, tuple)):
        return [_encode(name, v) for v in value]
    if isinstance(value, dict):
        return {str(k): _encode(f"{name}.{k}", v) for k, v in value.items()}
    if callable(value) and hasattr(value, "__qualname__") and "<" not in value.__qualname__:
        return {"__ref__": _ref(value)}
    raise TypeError(f"cannot save parameter {name}={value!r}: only numbers, strings, lists, dicts "
                    "and importable classes / functions can be written to model.json.")


def _resolve(ref: str, trusted: Iterable[str]) -> Any:
    module_name, _, qualname = ref.partition(":")
    top = module_name.split(".")[0]
    if top not in _SAFE_PACKAGES and not any(
            ref == t or module_name == t or module_name.startswith(t + ".") for t in trusted):
        raise UntrustedTypeError(
            f"model.json names {ref!r}, outside the trusted packages {list(_SAFE_PACKAGES)}. "
            f"If you wrote that class, load with trusted=[{module_name!r}].")
    obj = importlib.import_module(module_name)
    for part in qualname.split("."):
        obj = getattr(obj, part)
    return obj


def _decode(value: Any, trusted: Iterable[str]) -> Any:
    if isinstance(value, list):
        return [_decode(v, trusted) for v in value]
    if isinstance(value, dict):
        if set(value) == {"__ref__"}:
            return _resolve(value["__ref__"], trusted)
        if set(value) == {"__augment__"}:
            from .augment import Augmenter

            return Augmenter.from_config(value["__augment__"])
        return {k: _decode(v, trusted) for k, v in value.items()}
    return value


def _json_default(obj: Any) -> Any:
    if isinstance(obj, (np.integer, np.floating, np.bool_)):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if torch.is_tensor(obj):
        return obj.tolist()
    return repr(obj)


# --------------------------------------------------------------------------- estimators

_FITTED_ATTRS = ("classes_inferred_", "n_features_in_", "feature_names_in_", "n_outputs_",
                 "y_ndim_", "seed_", "sample_shape_")


def _nn_params(est) -> Dict[str, Any]:
    params = est.get_params(deep=False)
    encoded = {}
    for key, value in params.items():
        if key == "callbacks" and value:
            warnings.warn(f"nnpipe.save: the callbacks {value!r} are not saved (they only matter "
                          "for training); pass them again to continue training.", stacklevel=3)
            value = None
        if key == "transfer_from" and value is not None and not isinstance(value, (str, os.PathLike)):
            value = None  # the transferred weights are in the saved weights already
        if isinstance(value, os.PathLike):
            value = os.fspath(value)
        if key == "augment" and hasattr(value, "to_config"):
            value = {"__augment__": value.to_config()}
        encoded[key] = _encode(key, value)
    return encoded


def save(estimator, directory: os.PathLike) -> Path:
    """Save a fitted nnpipe estimator, or an sklearn ``Pipeline`` ending in one, to ``directory``.

    The directory is created if needed; the path is returned. A pipeline's preprocessing steps
    are written with skops (sklearn's secure, pickle-free format), its network as below.

    Examples
    --------
    >>> import tempfile, numpy as np
    >>> from nnpipe import NNClassifier
    >>> X = np.random.RandomState(0).normal(size=(60, 4)).astype("float32"); y = X[:, 0] > 0
    >>> clf = NNClassifier(max_epochs=2, random_state=0).fit(X, y)
    >>> path = save(clf, tempfile.mkdtemp())
    >>> bool((load(path).predict_proba(X) == clf.predict_proba(X)).all())
    True
    """
    from sklearn.pipeline import Pipeline
    from sklearn.utils.validation import check_is_fitted

    if isinstance(estimator, Pipeline):
        return _save_pipeline(estimator, Path(directory))
    if hasattr(estimator, "members_"):
        return _save_ensemble(estimator, Path(directory))
    check_is_fitted(estimator, "module_")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to("cpu").contiguous() for k, v in estimator.module_.state_dict().items()}
    blob = st_save(state, metadata={"format": "nnpipe", "version": str(FORMAT_VERSION)})
    digest = hashlib.sha256(blob).hexdigest()
    weights = f"weights-{digest[:16]}.safetensors"
    if not (directory / weights).exists():
        atomic_write_bytes(directory / weights, blob)
    fitted = {a: getattr(estimator, a) for a in _FITTED_ATTRS if hasattr(estimator, a)}
    manifest = {
        "format": "nnpipe", "format_version": FORMAT_VERSION,
        "class": type(estimator).__name__,
        "params": _nn_params(estimator),
        "fitted": json.loads(json.dumps(fitted, default=_json_default)),
        "history": json.loads(json.dumps(estimator.history_.to_list(), default=_json_default)),
        "weights": {"file": weights, "sha256": digest},
    }
    atomic_write_bytes(directory / _MANIFEST, json.dumps(manifest, indent=1).encode())
    for old in directory.glob("weights-*.safetensors"):
        if old.name != weights:
            with _suppress():
                old.unlink()
    return directory


def _read_manifest(directory: Path) -> Dict[str, Any]:
    path = directory / _MANIFEST
    if not path.is_file():
        raise FileNotFoundError(f"{directory} is not an nnpipe model directory: no {_MANIFEST}.")
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path} is not valid JSON ({exc}); it was not written by nnpipe.save."
                         ) from None
    if not isinstance(manifest, dict) or manifest.get("format") != "nnpipe":
        raise ValueError(f"{path} is not an nnpipe manifest (no 'format': 'nnpipe').")
    if manifest.get("format_version", 0) > FORMAT_VERSION:
        raise ValueError(f"{path} was written by a newer nnpipe (format "
                         f"{manifest['format_version']} > {FORMAT_VERSION}); upgrade nnpipe.")
    return manifest


def _read_weights(directory: Path, manifest: Dict[str, Any], device: str):
    info = manifest.get("weights") or {}
    name = str(info.get("file", ""))
    if not name.startswith("weights-") or "/" in name or os.sep in name:
        raise ValueError(f"{directory / _MANIFEST} names an invalid weights file {name!r}.")
    blob = (directory / name).read_bytes()
    if hashlib.sha256(blob).hexdigest() != info.get("sha256"):
        raise ValueError(f"{directory / name} does not match the checksum in {_MANIFEST}: the file "
                         "is corrupt or was replaced.")
    return {k: v.to(device) for k, v in st_load(blob).items()}


def load(directory: os.PathLike, trusted: Optional[Iterable[str]] = None, device: Optional[str] = None):
    """Load an estimator written by :func:`save`; it predicts exactly what the saved one did.

    Parameters
    ----------
    directory : path
    trusted : list of str, optional
        Modules (``"mypkg.nets"``) or references (``"mypkg.nets:MyNet"``) outside torch, skorch,
        sklearn, numpy and nnpipe that ``model.json`` may name, e.g. your own module class.
    device : str, optional
        Override the saved ``device`` (a CUDA-trained model loads on the CPU when no GPU is found).
    """
    from . import estimators

    directory = Path(directory)
    manifest = _read_manifest(directory)
    trusted = list(trusted or [])
    if manifest.get("class") == "Pipeline":
        return _load_pipeline(directory, manifest, trusted, device)
    if manifest.get("class") in ("EnsembleClassifier", "EnsembleRegressor"):
        return _load_ensemble(directory, manifest, trusted, device)
    classes = {"NNClassifier": estimators.NNClassifier, "NNRegressor": estimators.NNRegressor}
    if manifest.get("class") not in classes:
        raise ValueError(f"{directory / _MANIFEST}: class {manifest.get('class')!r} is not one of "
                         f"{sorted(classes)}.")
    params = _decode(manifest["params"], trusted)
    if device is None and str(params.get("device", "cpu")).startswith("cuda") \
            and not torch.cuda.is_available():
        warnings.warn("the model was saved on CUDA; loading it on the CPU.", stacklevel=2)
        device = "cpu"
    if device is not None:
        params["device"] = device
    transfer_from = params.pop("transfer_from", None)
    est = classes[manifest["class"]](**params)
    for key, value in manifest.get("fitted", {}).items():
        if key in ("classes_inferred_", "feature_names_in_"):
            value = np.asarray(value, dtype=object if key == "feature_names_in_" else None)
        if key == "sample_shape_" and value is not None:
            value = tuple(value)
        setattr(est, key, value)
    est.initialize()
    est.module_.load_state_dict(_read_weights(directory, manifest, params.get("device", "cpu")))
    est.history_ = History(manifest.get("history", []))
    est.transfer_from = transfer_from
    return est


# --------------------------------------------------------------------------- pipelines


def _save_pipeline(pipeline, directory: Path) -> Path:
    import uuid

    import skops.io as sio

    *pre, (final_name, final) = pipeline.steps
    directory.mkdir(parents=True, exist_ok=True)
    manifest: Dict[str, Any] = {"format": "nnpipe", "format_version": FORMAT_VERSION,
                                "class": "Pipeline", "steps": [name for name, _ in pipeline.steps]}
    keep = set()
    if pre:
        from sklearn.pipeline import Pipeline

        blob = sio.dumps(Pipeline(pre))
        digest = hashlib.sha256(blob).hexdigest()
        name = f"preprocess-{digest[:16]}.skops"
        if not (directory / name).exists():
            atomic_write_bytes(directory / name, blob)
        manifest["preprocess"] = {"file": name, "sha256": digest}
        keep.add(name)
    sub = f"estimator-{uuid.uuid4().hex[:12]}"
    save(final, directory / sub)
    manifest["final"] = {"name": final_name, "dir": sub}
    keep.add(sub)
    atomic_write_bytes(directory / _MANIFEST, json.dumps(manifest, indent=1).encode())
    import shutil

    for old in list(directory.glob("preprocess-*.skops")) + list(directory.glob("estimator-*")):
        if old.name not in keep:
            with _suppress():
                shutil.rmtree(old) if old.is_dir() else old.unlink()
    return directory


def _safe_name(directory: Path, name: Any, prefix: str) -> Path:
    name = str(name)
    if not name.startswith(prefix) or "/" in name or os.sep in name or ".." in name:
        raise ValueError(f"{directory / _MANIFEST} names an invalid file {name!r}.")
    return directory / name


def _load_pipeline(directory: Path, manifest: Dict[str, Any], trusted, device):
    import skops.io as sio
    from sklearn.pipeline import Pipeline

    steps = []
    info = manifest.get("preprocess")
    if info:
        blob = _safe_name(directory, info.get("file"), "preprocess-").read_bytes()
        if hashlib.sha256(blob).hexdigest() != info.get("sha256"):
            raise ValueError(f"{directory / info['file']} does not match the checksum in "
                             f"{_MANIFEST}: the file is corrupt or was replaced.")
        types = sio.get_untrusted_types(data=blob)
        bad = [t for t in types if t.split(".")[0] not in _SAFE_PACKAGES
               and not any(t == x or t.startswith(x + ".") for x in trusted)]
        if bad:
            raise UntrustedTypeError(f"{directory / info['file']} contains types outside the "
                                     f"trusted packages: {bad}; pass trusted=[...] to allow them.")
        steps = list(sio.loads(blob, trusted=types).steps)
    final = manifest.get("final") or {}
    estimator = load(_safe_name(directory, final.get("dir"), "estimator-"), trusted, device)
    return Pipeline(steps + [(final.get("name", "model"), estimator)])


# --------------------------------------------------------------------------- ensembles


def _save_ensemble(ens, directory: Path) -> Path:
    import shutil
    import uuid

    import skops.io as sio

    directory.mkdir(parents=True, exist_ok=True)
    params = {k: v for k, v in ens.get_params(deep=False).items()
              if k not in ("estimator", "meta_estimator", "configs")}
    tag = uuid.uuid4().hex[:8]
    members = []
    for i, member in enumerate(ens.members_):
        name = f"member-{tag}-{i}"
        save(member, directory / name)
        members.append(name)
    manifest: Dict[str, Any] = {
        "format": "nnpipe", "format_version": FORMAT_VERSION, "class": type(ens).__name__,
        "params": {k: _encode(k, v) for k, v in params.items()},
        "members": members,
        "fitted": json.loads(json.dumps({
            "weights_": ens.weights_, "temperature_": getattr(ens, "temperature_", None),
            "classes_": getattr(ens, "classes_", None), "n_features_in_": ens.n_features_in_,
            "member_seeds_": ens.member_seeds_}, default=_json_default)),
    }
    if getattr(ens, "meta_", None) is not None:
        blob = sio.dumps(ens.meta_)
        digest = hashlib.sha256(blob).hexdigest()
        name = f"meta-{digest[:16]}.skops"
        atomic_write_bytes(directory / name, blob)
        manifest["meta"] = {"file": name, "sha256": digest}
    atomic_write_bytes(directory / _MANIFEST, json.dumps(manifest, indent=1).encode())
    keep = set(members) | {manifest.get("meta", {}).get("file")}
    for old in list(directory.glob("member-*")) + list(directory.glob("meta-*.skops")):
        if old.name not in keep:
            with _suppress():
                shutil.rmtree(old) if old.is_dir() else old.unlink()
    return directory


def _load_ensemble(directory: Path, manifest: Dict[str, Any], trusted, device):
    import skops.io as sio

    from . import ensemble

    cls = getattr(ensemble, manifest["class"])
    ens = cls(**_decode(manifest.get("params", {}), trusted))
    ens.members_ = [load(_safe_name(directory, name, "member-"), trusted, device)
                    for name in manifest.get("members", [])]
    fitted = manifest.get("fitted", {})
    ens.weights_ = np.asarray(fitted.get("weights_"), dtype=float)
    ens.temperature_ = fitted.get("temperature_")
    ens.n_features_in_ = fitted.get("n_features_in_")
    ens.member_seeds_ = fitted.get("member_seeds_")
    if fitted.get("classes_") is not None:
        ens.classes_ = np.asarray(fitted["classes_"])
    ens.meta_ = None
    info = manifest.get("meta")
    if info:
        blob = _safe_name(directory, info.get("file"), "meta-").read_bytes()
        if hashlib.sha256(blob).hexdigest() != info.get("sha256"):
            raise ValueError(f"{directory / info['file']} does not match its checksum.")
        types = sio.get_untrusted_types(data=blob)
        bad = [t for t in types if t.split(".")[0] not in _SAFE_PACKAGES]
        if bad:
            raise UntrustedTypeError(f"{directory / info['file']} contains untrusted types {bad}.")
        ens.meta_ = sio.loads(blob, trusted=types)
    return ens

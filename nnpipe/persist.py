"""Safe save / load: parameters as JSON, weights as safetensors, atomic writes, no pickle.

Layout of a saved model directory::

    model.json                      # class, parameters, fitted attributes, history, weight files
    weights-<sha256 prefix>.safetensors

Saving writes the weights under a content-addressed name first, then replaces ``model.json``
atomically (temporary file + ``os.replace``): ``model.json`` is the commit point, so a crash at any
moment leaves either the old or the new model loadable, never a mixture. Saves to one directory
take turns (``flock``); a load that races a save re-reads the new version. Loading verifies the
weights' SHA-256 and never unpickles anything. Classes named in ``model.json`` are imported only
from torch, skorch, sklearn, numpy and nnpipe, and only network, loss, optimizer, scheduler and
data classes and init / activation functions (loading calls them), or from modules you pass in
``trusted``. skops files (pipelines' preprocessing, stacking meta-learners) may name only
scikit-learn and nnpipe estimators beyond skops' own trusted types.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import json
import os
import tempfile
import time
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


def _user_trusted(name: str, trusted: Iterable[str], sep: str = ".") -> bool:
    module_name = name.partition(":")[0] if sep == ":" else name
    return any(name == t or module_name == t or module_name.startswith(t + ".") for t in trusted)


def _loadable(obj: Any) -> bool:
    """May a reference into torch, skorch, sklearn, numpy or nnpipe be loaded without trusted=?

    Loading calls what ``model.json`` names with arguments from ``model.json`` (``criterion`` with
    ``criterion__*``, ``module`` with ``module__*``, ...), so a bare package check is not enough:
    ``torch.load`` or ``numpy.testing``'s ``runstring`` would run code. Only the kinds of object
    nnpipe's parameters take pass: network, loss, optimizer, scheduler and data classes, and
    functions of ``torch.nn.init`` / ``torch.nn.functional`` / nnpipe's init and schedules.
    """
    import skorch.dataset
    import torch.utils.data

    if isinstance(obj, type):
        return issubclass(obj, (torch.nn.Module, torch.optim.Optimizer,
                                torch.optim.lr_scheduler.LRScheduler,
                                torch.optim.lr_scheduler.ReduceLROnPlateau,
                                torch.utils.data.Dataset, torch.utils.data.DataLoader,
                                skorch.dataset.ValidSplit))
    if any(obj is f for f in (torch.exp, torch.sigmoid, torch.softmax, torch.log_softmax,
                              torch.tanh)):
        return True
    return callable(obj) and getattr(obj, "__module__", None) in (
        "torch.nn.init", "torch.nn.functional", "nnpipe.models", "nnpipe.schedules")


def _resolve(ref: str, trusted: Iterable[str]) -> Any:
    module_name, _, qualname = ref.partition(":")
    top = module_name.split(".")[0]
    user_trusted = _user_trusted(ref, trusted, sep=":")
    if top not in _SAFE_PACKAGES and not user_trusted:
        raise UntrustedTypeError(
            f"model.json names {ref!r}, outside the trusted packages {list(_SAFE_PACKAGES)}. "
            f"If you wrote that class, load with trusted=[{module_name!r}].")
    try:
        obj = importlib.import_module(module_name)
        for part in qualname.split("."):
            obj = getattr(obj, part)
    except (ImportError, AttributeError, ValueError) as exc:
        raise ValueError(f"model.json names {ref!r}, which cannot be imported ({exc}).") from None
    if not user_trusted and not _loadable(obj):
        raise UntrustedTypeError(
            f"model.json names {ref!r}, which is not a network, loss, optimizer, scheduler or "
            "data class, nor an init / activation function: nnpipe will not call it while "
            f"loading (it could run code). If you meant it, load with trusted=[{ref!r}].")
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
                 "y_ndim_", "seed_", "sample_shape_", "folded_bn_paths_")


def _nn_params(est, warn_callbacks: bool = True) -> Dict[str, Any]:
    params = est.get_params(deep=False)
    encoded = {}
    for key, value in params.items():
        if key == "callbacks" and value:
            if warn_callbacks:
                warnings.warn(f"nnpipe.save: the callbacks {value!r} are not saved (they only "
                              "matter for training); pass them again to continue training.",
                              stacklevel=3)
            value = None
        if key == "transfer_from" and value is not None and not isinstance(value, (str, os.PathLike)):
            value = None  # the transferred weights are in the saved weights already
        if isinstance(value, os.PathLike):
            value = os.fspath(value)
        if key == "augment" and hasattr(value, "to_config"):
            value = {"__augment__": value.to_config()}
        encoded[key] = _encode(key, value)
    return encoded


def save(estimator, directory: os.PathLike, *, training_state=None) -> Path:
    """Save a fitted nnpipe estimator, or an sklearn ``Pipeline`` ending in one, to ``directory``.

    The directory is created if needed; the path is returned. A pipeline's preprocessing steps
    are written with skops (sklearn's secure, pickle-free format), its network as below.
    ``training_state`` (``(tensors, json-able dict)``, for one network only) is what
    :class:`~nnpipe.checkpoint.Checkpoint` adds so that a run resumes exactly: it is committed
    with the weights, in the same ``model.json``. The estimator's ``callbacks`` are never saved;
    a ``UserWarning`` says so, except for such a training checkpoint.

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

    if not isinstance(estimator, Pipeline) and not hasattr(estimator, "members_"):
        check_is_fitted(estimator, "module_")
    if training_state is not None and (isinstance(estimator, Pipeline)
                                       or hasattr(estimator, "members_")):
        raise TypeError("save: training_state is for a single network, not a "
                        f"{type(estimator).__name__}.")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    with _locked(directory):
        if isinstance(estimator, Pipeline):
            _save_pipeline(estimator, directory)
        elif hasattr(estimator, "members_"):
            _save_ensemble(estimator, directory)
        else:
            _save_net(estimator, directory, training_state)
        for tmp in directory.glob(".*.tmp"):  # from saves killed mid-write (saves take turns)
            if tmp.name.startswith((".model.json.", ".weights-", ".preprocess-", ".meta-",
                                    ".state-")):
                with _suppress():
                    tmp.unlink()
        for tmp in directory.glob(".*.tmpdir"):  # sub-models of a killed save
            if tmp.name.startswith((".estimator-", ".member-")):
                import shutil

                shutil.rmtree(tmp, ignore_errors=True)
    return directory


@contextlib.contextmanager
def _locked(directory: Path):
    """Serialise saves to one directory across processes and threads (``flock`` on it; the OS
    releases it when a process dies): each save removes the parts its manifest does not name,
    which would include the parts another save has written but not yet committed."""
    try:
        import fcntl
    except ImportError:  # no flock (Windows): saves to one directory must not overlap
        yield
        return
    fd = os.open(directory, os.O_RDONLY)
    try:
        with _suppress():  # a file system without locks: as without fcntl
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _write_tensors(directory: Path, prefix: str, tensors: Dict[str, torch.Tensor]):
    """Write ``tensors`` as ``<prefix>-<sha256 prefix>.safetensors``; returns (name, sha256)."""
    state = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    # one metadata key: safetensors writes several in a random order, and the same weights must
    # give the same bytes (and file name) in every process, or DVC sees a new model each run
    blob = st_save(state, metadata={"format": f"nnpipe/{FORMAT_VERSION}"})
    digest = hashlib.sha256(blob).hexdigest()
    name = f"{prefix}-{digest[:16]}.safetensors"
    if not (directory / name).exists():
        atomic_write_bytes(directory / name, blob)
    return name, digest


def _timeless(history):
    """The history without skorch's wall-clock ``dur`` columns (epochs and batches): the same
    training must give the same bytes, or DVC sees a new model on every identical rerun."""
    return [{k: ([{bk: bv for bk, bv in b.items() if bk != "dur"} for b in v]
                 if k == "batches" else v) for k, v in row.items() if k != "dur"}
            for row in history]


def _stable_skops(obj) -> bytes:
    """``skops.io.dumps``, made a function of the object alone: skops numbers its nodes and
    names its array files after ``id()`` (memory addresses) and stamps the zip with the time;
    here ids and files are numbered in the schema's order and the time is 1980-01-01. So the
    same object gives the same bytes (and content-addressed file name) in every process."""
    import io
    import zipfile

    import skops.io as sio

    src = zipfile.ZipFile(io.BytesIO(sio.dumps(obj)))
    members = set(src.namelist())
    schema = json.loads(src.read("schema.json"))
    ids: Dict[int, int] = {}
    files: Dict[str, str] = {}

    def renumber(node):
        if isinstance(node, dict):
            for key, value in node.items():
                if key == "__id__" and isinstance(value, int):
                    node[key] = ids.setdefault(value, len(ids))
                elif key == "file" and isinstance(value, str) and value in members:
                    node[key] = files.setdefault(value, f"{len(files)}{Path(value).suffix}")
                else:
                    renumber(value)
        elif isinstance(node, list):
            for value in node:
                renumber(value)

    renumber(schema)
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as dst:
        for info in src.infolist():
            name = files.get(info.filename, info.filename)
            data = (json.dumps(schema, indent=2).encode() if name == "schema.json"
                    else src.read(info))
            fixed = zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0))
            fixed.compress_type, fixed.external_attr = info.compress_type, info.external_attr
            dst.writestr(fixed, data)
    return out.getvalue()


def _save_content_named(estimator, directory: Path, prefix: str) -> str:
    """Save ``estimator`` into a sub-directory named after its content (``<prefix>-<sha256>``):
    written under a temporary name, then renamed (before the parent's ``model.json`` commits),
    so the same model always lands under the same name."""
    import shutil
    import uuid

    tmp = directory / f".{prefix}-{uuid.uuid4().hex[:12]}.tmpdir"
    save(estimator, tmp)
    digest = hashlib.sha256()
    for path in sorted(p for p in tmp.rglob("*") if p.is_file()):
        digest.update(path.relative_to(tmp).as_posix().encode() + b"\0")
        digest.update(hashlib.sha256(path.read_bytes()).digest())
    name = f"{prefix}-{digest.hexdigest()[:16]}"
    if (directory / name / _MANIFEST).is_file():  # the very same model is there already
        shutil.rmtree(tmp)
    else:
        with _suppress():
            shutil.rmtree(directory / name)  # a part left by a killed save
        os.rename(tmp, directory / name)
    return name


def _save_net(estimator, directory: Path, training_state=None) -> Path:
    weights, digest = _write_tensors(directory, "weights", estimator.module_.state_dict())
    fitted = {a: getattr(estimator, a) for a in _FITTED_ATTRS if hasattr(estimator, a)}
    manifest = {
        "format": "nnpipe", "format_version": FORMAT_VERSION,
        "class": type(estimator).__name__,
        # a training checkpoint (training_state) leaves the run's callbacks out knowingly
        "params": _nn_params(estimator, warn_callbacks=training_state is None),
        "fitted": json.loads(json.dumps(fitted, default=_json_default)),
        "history": json.loads(json.dumps(_timeless(estimator.history_.to_list()),
                                         default=_json_default)),
        "weights": {"file": weights, "sha256": digest},
    }
    keep = {weights}
    if training_state is not None:
        tensors, meta = training_state
        name, state_digest = _write_tensors(directory, "state", tensors)
        manifest["training_state"] = {"file": name, "sha256": state_digest,
                                      "meta": json.loads(json.dumps(meta))}
        keep.add(name)
    atomic_write_bytes(directory / _MANIFEST, json.dumps(manifest, indent=1).encode())
    for old in [*directory.glob("weights-*.safetensors"), *directory.glob("state-*.safetensors")]:
        if old.name not in keep:
            with _suppress():
                old.unlink()
    return directory


def _read_manifest(directory: Path) -> Dict[str, Any]:
    path = directory / _MANIFEST
    if directory.is_file():
        raise ValueError(f"{directory} is a file, not an nnpipe model directory (nnpipe.save "
                         "writes a directory with model.json); nnpipe never loads pickles or "
                         "torch.save files.")
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


def _read_weights(directory: Path, manifest: Dict[str, Any], device: str, part: str = "weights"):
    info = manifest.get(part) or {}
    name = str(info.get("file", ""))
    prefix = "weights-" if part == "weights" else "state-"
    if not name.startswith(prefix) or "/" in name or os.sep in name:
        raise ValueError(f"{directory / _MANIFEST} names an invalid {part} file {name!r}.")
    blob = (directory / name).read_bytes()
    if hashlib.sha256(blob).hexdigest() != info.get("sha256"):
        raise ValueError(f"{directory / name} does not match the checksum in {_MANIFEST}: the file "
                         "is corrupt or was replaced.")
    try:
        state = st_load(blob)
    except Exception as exc:  # safetensors' own error type is no ValueError
        raise ValueError(f"{directory / name} is not a safetensors file ({exc}); nnpipe never "
                         "loads pickles or torch.save files.") from None
    return {k: v.to(device) for k, v in state.items()}


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

    Loading while another process saves to ``directory`` (a training :class:`~nnpipe.checkpoint.
    Checkpoint`) gives the old version or the new one. Nothing is unpickled: a file that is not
    what ``model.json`` says it is raises ``ValueError`` naming it.
    """
    return _load_retrying(directory, trusted, device)


def load_with_training_state(directory: os.PathLike, trusted: Optional[Iterable[str]] = None,
                             device: Optional[str] = None):
    """:func:`load` a network together with the training state saved beside it (``None`` when
    there is none), both from the same ``model.json``."""
    return _load_retrying(directory, trusted, device, with_state=True)


def _load_retrying(directory, trusted, device, with_state=False):
    directory, trusted = Path(directory), list(trusted or [])
    attempts = 20
    for attempt in range(attempts):
        stamp = _stamp(directory)
        try:
            return _load_once(directory, trusted, device, with_state)
        except FileNotFoundError:
            # a save (in another process) committed a new model.json and removed the parts of
            # the old one while this load was reading them: read the new version (a writer
            # saving back to back can overtake a slow load more than once)
            if attempt == attempts - 1 or stamp is None or _stamp(directory) == stamp:
                raise
            time.sleep(0.005 * attempt)


def _stamp(directory: Path):
    try:
        st = (directory / _MANIFEST).stat()
    except OSError:
        return None
    return st.st_ino, st.st_mtime_ns, st.st_size


def _load_once(directory: Path, trusted, device, with_state=False):
    # one read of model.json for the model and its training state: a save that commits
    # meanwhile removes the files it named, and the FileNotFoundError makes load read again
    manifest = _read_manifest(directory)
    est = _load_manifest(directory, manifest, trusted, device)
    if not with_state:
        return est
    if "training_state" not in manifest or not hasattr(est, "module_"):
        return est, None
    tensors = _read_weights(directory, manifest, "cpu", part="training_state")
    return est, (tensors, manifest["training_state"].get("meta") or {})


def _load_manifest(directory: Path, manifest: Dict[str, Any], trusted, device):
    from . import estimators

    if manifest.get("class") == "Pipeline":
        return _load_pipeline(directory, manifest, trusted, device)
    if manifest.get("class") in ("EnsembleClassifier", "EnsembleRegressor"):
        return _load_ensemble(directory, manifest, trusted, device)
    from .pretrain import Pretrainer

    classes = {"NNClassifier": estimators.NNClassifier, "NNRegressor": estimators.NNRegressor,
               "Pretrainer": Pretrainer}
    if manifest.get("class") not in classes:
        raise ValueError(f"{directory / _MANIFEST}: class {manifest.get('class')!r} is not one of "
                         f"{sorted(classes)}.")
    try:
        params = _decode(manifest["params"], trusted)
    except UntrustedTypeError as exc:
        raise UntrustedTypeError(f"{directory / _MANIFEST}: {exc}") from None
    if (params.get("torch_load_kwargs") or {}).get("weights_only", True) is not True:
        raise UntrustedTypeError(f"{directory / _MANIFEST} sets torch_load_kwargs="
                                 f"{params['torch_load_kwargs']!r}: skorch's load_params would "
                                 "unpickle (run) code; nnpipe only loads with weights_only=True.")
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
    if est.augment is not None and hasattr(est, "sample_shape_"):
        est.augment_ = est._resolve_augment()  # partial_fit goes on augmenting as fit did
    est.initialize()
    if getattr(est, "folded_bn_paths_", None):  # a partly folded network (nnpipe.export)
        from .export import replace_with_identity

        replace_with_identity(est.module_, est.folded_bn_paths_)
        est.initialize_optimizer()
    est.module_.load_state_dict(_read_weights(directory, manifest, params.get("device", "cpu")))
    est.history_ = History(manifest.get("history", []))
    est.transfer_from = transfer_from
    return est


# --------------------------------------------------------------------------- pipelines


def _save_pipeline(pipeline, directory: Path) -> Path:
    *pre, (final_name, final) = pipeline.steps
    directory.mkdir(parents=True, exist_ok=True)
    manifest: Dict[str, Any] = {"format": "nnpipe", "format_version": FORMAT_VERSION,
                                "class": "Pipeline", "steps": [name for name, _ in pipeline.steps]}
    keep = set()
    if pre:
        from sklearn.pipeline import Pipeline

        blob = _stable_skops(Pipeline(pre))
        digest = hashlib.sha256(blob).hexdigest()
        name = f"preprocess-{digest[:16]}.skops"
        if not (directory / name).exists():
            atomic_write_bytes(directory / name, blob)
        manifest["preprocess"] = {"file": name, "sha256": digest}
        keep.add(name)
    sub = _save_content_named(final, directory, "estimator")
    manifest["final"] = {"name": final_name, "dir": sub}
    keep.add(sub)
    atomic_write_bytes(directory / _MANIFEST, json.dumps(manifest, indent=1).encode())
    import shutil

    for old in list(directory.glob("preprocess-*.skops")) + list(directory.glob("estimator-*")):
        if old.name not in keep:
            with _suppress():
                shutil.rmtree(old) if old.is_dir() else old.unlink()
    return directory


def _estimator_class(name: str) -> bool:
    """Is ``name`` ("pkg.module.Class") a scikit-learn or nnpipe estimator class?"""
    module_name, _, cls = name.rpartition(".")
    if module_name.split(".")[0] not in ("sklearn", "nnpipe"):
        return False
    from sklearn.base import BaseEstimator

    try:
        obj = getattr(importlib.import_module(module_name), cls)
    except (ImportError, AttributeError, ValueError):
        return False
    return isinstance(obj, type) and issubclass(obj, BaseEstimator)


def _skops_loads(path: Path, blob: bytes, trusted: Iterable[str]) -> Any:
    """Load a skops file nnpipe wrote: beyond skops' own trusted types, only sklearn and nnpipe
    estimator classes, or what ``trusted`` names (a skops file can name any callable to call)."""
    import skops.io as sio

    try:
        types = sio.get_untrusted_types(data=blob)
    except Exception as exc:  # not a zip, no schema.json, bad protocol, ...
        raise ValueError(f"{path} is not a skops file written by nnpipe.save ({exc}).") from None
    bad = [t for t in types if not _user_trusted(t, trusted) and not _estimator_class(t)]
    if bad:
        raise UntrustedTypeError(f"{path} names types that are not scikit-learn or nnpipe "
                                 f"estimators: {bad}; loading them could run code. If you wrote "
                                 "them, pass trusted=[...] naming them.")
    return sio.loads(blob, trusted=types)


def _safe_name(directory: Path, name: Any, prefix: str) -> Path:
    name = str(name)
    if not name.startswith(prefix) or "/" in name or os.sep in name or ".." in name:
        raise ValueError(f"{directory / _MANIFEST} names an invalid file {name!r}.")
    return directory / name


def _load_pipeline(directory: Path, manifest: Dict[str, Any], trusted, device):
    from sklearn.pipeline import Pipeline

    steps = []
    info = manifest.get("preprocess")
    if info:
        blob = _safe_name(directory, info.get("file"), "preprocess-").read_bytes()
        if hashlib.sha256(blob).hexdigest() != info.get("sha256"):
            raise ValueError(f"{directory / info['file']} does not match the checksum in "
                             f"{_MANIFEST}: the file is corrupt or was replaced.")
        steps = list(_skops_loads(directory / info["file"], blob, trusted).steps)
    final = manifest.get("final") or {}
    estimator = load(_safe_name(directory, final.get("dir"), "estimator-"), trusted, device)
    return Pipeline(steps + [(final.get("name", "model"), estimator)])


# --------------------------------------------------------------------------- ensembles


def _save_ensemble(ens, directory: Path) -> Path:
    import shutil

    directory.mkdir(parents=True, exist_ok=True)
    params = {k: v for k, v in ens.get_params(deep=False).items()
              if k not in ("estimator", "meta_estimator", "configs")}
    members = [_save_content_named(member, directory, "member") for member in ens.members_]
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
        blob = _stable_skops(ens.meta_)
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
        ens.meta_ = _skops_loads(directory / info["file"], blob, trusted)
    return ens

"""Dataset sources and train/test splits: what the pipeline's ``prepare`` stage produces.

:func:`load_dataset` reads one of the :data:`SOURCES` (``"digits"``, embedded in scikit-learn;
``"npz"``; ``"csv"``; ``"images"``, a folder of class sub-folders), infers the task, checks the
data and splits it; :func:`save_dataset` / :func:`read_dataset` store the result as
``train.npz``, ``test.npz`` and ``meta.json``. Features are always float32 rows (images are
flattened in ``(C, H, W)`` order, ``input_shape`` keeps the shape). Nothing is downloaded and
nothing is ever unpickled: every ``.npz`` is read with ``allow_pickle=False``.
"""

from __future__ import annotations

import json
import numbers
import zipfile
from collections import namedtuple
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np

from nnpipe._registry import Registry, did_you_mean, invalid_value

__all__ = ["Dataset", "load_dataset", "save_dataset", "read_dataset", "SOURCES", "TASKS"]

TASKS = ("classification", "regression")
_IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
_MAX_INT_CLASSES = 50  # integer targets with more unique values are inferred as regression


@dataclass(eq=False)
class Dataset:
    """A train/test split with the metadata the later stages need.

    ``X_*`` are float32 ``(n, n_features)``; ``y_*`` hold labels (classification) or float
    targets (regression); ``input_shape`` is the per-sample shape before flattening (``None``
    for tabular data); ``classes`` are the sorted labels (``None`` for regression);
    ``feature_names`` are the csv feature columns (``None`` otherwise); ``X_unlabeled`` holds
    training rows without a label (``label_fraction``), for unsupervised pretraining only.

    Examples
    --------
    >>> ds = load_dataset("digits")
    >>> ds
    Dataset(task='classification', n_train=1347, n_test=450, n_features=64, input_shape=(1, 8, 8))
    """

    X_train: np.ndarray
    y_train: np.ndarray
    X_test: np.ndarray
    y_test: np.ndarray
    task: str
    input_shape: Optional[tuple] = None
    classes: Optional[list] = None
    feature_names: Optional[list] = None
    X_unlabeled: Optional[np.ndarray] = None

    def __repr__(self) -> str:
        unlabeled = "" if self.X_unlabeled is None else f", n_unlabeled={len(self.X_unlabeled)}"
        return (f"Dataset(task={self.task!r}, n_train={len(self.X_train)}{unlabeled}, "
                f"n_test={len(self.X_test)}, n_features={self.X_train.shape[1]}, "
                f"input_shape={self.input_shape})")


_Raw = namedtuple("_Raw", "X y X_test y_test feature_names", defaults=(None, None, None))


SOURCES = Registry("load_dataset: source", "a loader added with SOURCES.register")
"""Dataset source names, each mapped to a loader ``f(path, target, image_size, grayscale)``."""


def _need_path(source: str, path: Any, what: str) -> Path:
    if path is None:
        raise ValueError(f"load_dataset: path is required for source={source!r} ({what}), got "
                         "None.")
    if not Path(path).exists():
        raise FileNotFoundError(f"load_dataset: path {str(path)!r} for source={source!r} does not "
                                f"exist (expected {what}).")
    return Path(path)


def _only(source: str, **given: Any) -> None:
    """Refuse options that ``source`` does not use, rather than silently ignoring them."""
    for name, value in given.items():
        if value is not None and value is not False:
            raise ValueError(f"load_dataset: {name}={value!r} has no meaning for source={source!r}"
                             "; leave it at its default.")


def _digits(path, target, image_size, grayscale) -> _Raw:
    from sklearn.datasets import load_digits

    _only("digits", path=path, target=target, image_size=image_size, grayscale=grayscale)
    X, y = load_digits(return_X_y=True)
    return _Raw((X / 16.0).reshape(-1, 1, 8, 8), y)


def _npz(path, target, image_size, grayscale) -> _Raw:
    _only("npz", target=target, image_size=image_size, grayscale=grayscale)
    p = _need_path("npz", path, "an .npz file with arrays X, y and optionally X_test, y_test")
    try:
        archive = np.load(p, allow_pickle=False)
    except (ValueError, OSError, EOFError) as exc:
        raise ValueError(f"load_dataset: path {str(p)!r} is not a readable .npz archive ({exc}).") \
            from None
    if not isinstance(archive, np.lib.npyio.NpzFile):
        raise ValueError(f"load_dataset: path {str(p)!r} holds a single array; source='npz' needs "
                         "an .npz archive with arrays X and y (np.savez(path, X=X, y=y)).")
    with archive:
        keys, arrays = list(archive.files), {}
        for key in ("X", "y"):
            if key not in keys:
                raise ValueError(f"load_dataset: {str(p)!r} has no array {key!r}; it holds {keys}."
                                 + did_you_mean(key, keys))
        if ("X_test" in keys) != ("y_test" in keys):
            raise ValueError(f"load_dataset: {str(p)!r} must hold both X_test and y_test or "
                             f"neither, got arrays {keys}.")
        for key in [k for k in ("X", "y", "X_test", "y_test") if k in keys]:
            try:
                arrays[key] = archive[key]
            except ValueError:  # numpy refuses object arrays when allow_pickle=False
                raise ValueError(f"load_dataset: array {key!r} in {str(p)!r} is an object array, "
                                 "refused because loading it would unpickle (run) code; save "
                                 "numeric or fixed-width string arrays instead.") from None
    return _Raw(arrays["X"], arrays["y"], arrays.get("X_test"), arrays.get("y_test"))


def _csv(path, target, image_size, grayscale) -> _Raw:
    import pandas as pd

    _only("csv", image_size=image_size, grayscale=grayscale)
    p = _need_path("csv", path, "a CSV file with a header row")
    if target is None:
        raise ValueError("load_dataset: target is required for source='csv' (the name of the "
                         "target column), got None.")
    try:
        df = pd.read_csv(p)
    except pd.errors.EmptyDataError:
        df = pd.DataFrame()
    columns = df.columns = [str(c) for c in df.columns]
    if df.empty:
        raise ValueError(f"load_dataset: the dataset in {str(p)!r} is empty: 0 samples.")
    if target not in columns:
        raise ValueError(f"load_dataset: target {target!r} is not a column of {str(p)!r}; the "
                         f"columns are {columns}." + did_you_mean(target, columns))
    features = [c for c in columns if c != target]
    for col in features:
        if not pd.api.types.is_numeric_dtype(df[col]):
            first = df[col].dropna().iloc[0] if df[col].notna().any() else None
            raise ValueError(f"load_dataset: feature column {col!r} of {str(p)!r} is not numeric "
                             f"(dtype {df[col].dtype}, e.g. {first!r}); only the target column "
                             "may hold strings. Encode or drop it.")
    missing = np.flatnonzero(df[target].isna().to_numpy())
    if missing.size:
        raise ValueError(f"load_dataset: target column {target!r} of {str(p)!r} is missing in "
                         f"{missing.size} rows (first data rows: {missing[:5].tolist()}).")
    y = df[target].to_numpy()
    y = y.astype(str) if y.dtype == object else y
    return _Raw(df[features].to_numpy(dtype=np.float64), y, feature_names=features)


def _images(path, target, image_size, grayscale) -> _Raw:
    from PIL import Image, UnidentifiedImageError

    _only("images", target=target)
    p = _need_path("images", path, "a folder with one sub-folder of PNG/JPEG files per class")
    if image_size is not None and not (
            isinstance(image_size, (tuple, list)) and len(image_size) == 2
            and all(isinstance(s, numbers.Integral) and s > 0 for s in image_size)):
        raise invalid_value("load_dataset: image_size", image_size,
                            "None or a pair of positive integers (height, width)")
    dirs = sorted(d for d in p.iterdir() if d.is_dir() and not d.name.startswith(".")) \
        if p.is_dir() else []
    if not dirs:
        raise ValueError(f"load_dataset: the dataset in {str(p)!r} is empty: source='images' "
                         "needs a folder with one sub-folder of images per class.")
    images, labels, first = [], [], None
    for d in dirs:
        files = sorted(f for f in d.iterdir() if f.suffix.lower() in _IMAGE_SUFFIXES)
        if not files:
            raise ValueError(f"load_dataset: class folder {str(d)!r} has no images (allowed "
                             f"extensions: {', '.join(_IMAGE_SUFFIXES)}).")
        for f in files:
            try:
                with Image.open(f) as im:
                    im = im.convert("L" if grayscale else "RGB")
                    if image_size is not None:
                        im = im.resize((image_size[1], image_size[0]), Image.BILINEAR)
                    arr = np.asarray(im, dtype=np.float32) / 255.0
            except (UnidentifiedImageError, OSError) as exc:
                raise ValueError(f"load_dataset: cannot read image {str(f)!r} ({exc}).") from None
            first = first or (f, arr.shape[:2])
            if arr.shape[:2] != first[1]:
                (h0, w0), (h, w) = first[1], arr.shape[:2]
                raise ValueError(f"load_dataset: images must all have the same size, but "
                                 f"{str(first[0])!r} is {h0}x{w0} and {str(f)!r} is {h}x{w} "
                                 "(height x width); pass image_size=(height, width) to resize.")
            images.append(arr[None] if grayscale else arr.transpose(2, 0, 1))
            labels.append(d.name)
    return _Raw(np.stack(images), np.array(labels))


for _name, _loader in {"digits": _digits, "npz": _npz, "csv": _csv, "images": _images}.items():
    SOURCES.register(_name, _loader)


def _check_xy(X: Any, y: Any, part: str, where: str) -> tuple:
    X, y = np.asarray(X), np.asarray(y)
    if X.ndim < 2 or X.dtype.kind not in "biuf" or y.ndim not in (1, 2) \
            or y.dtype.kind not in "biufUS":
        raise ValueError(f"load_dataset: {part}X from {where} must be numeric with shape (n, ...) "
                         f"and {part}y numeric or string with shape (n,) (or (n, k) for "
                         f"regression), got {X.dtype} {X.shape} and {y.dtype} {y.shape}.")
    if len(X) != len(y):
        raise ValueError(f"load_dataset: {part}X and {part}y from {where} must have the same "
                         f"length, got {len(X)} rows in X and {len(y)} in y.")
    if X.size == 0:
        raise ValueError(f"load_dataset: the dataset from {where} is empty: 0 samples or "
                         f"features ({part}X has shape {X.shape}).")
    X, y = X.reshape(len(X), -1).astype(np.float32), y.astype(str) if y.dtype.kind == "S" else y
    for name, arr in ((part + "X", X), (part + "y", y)):
        bad = np.flatnonzero(~np.isfinite(arr.reshape(len(arr), -1)).all(axis=1)) \
            if arr.dtype.kind == "f" else []
        if len(bad):
            raise ValueError(f"load_dataset: {name} from {where} has NaN or infinite values in "
                             f"{len(bad)} of {len(arr)} rows (first rows: {bad[:5].tolist()}); "
                             "fill or drop them first.")
    return X, y


def _resolve_task(task: Any, y: np.ndarray) -> str:
    if task is None:
        many = y.dtype.kind in "iu" and len(np.unique(y)) > _MAX_INT_CLASSES
        return "regression" if y.dtype.kind == "f" or many else "classification"
    if isinstance(task, str) and task in TASKS:
        return task
    hint = did_you_mean(task, TASKS) if isinstance(task, str) else ""
    allowed = "None, 'classification' or 'regression'"
    raise ValueError(str(invalid_value("load_dataset: task", task, allowed)) + hint)


def _as_targets(y: np.ndarray, task: str, where: str) -> np.ndarray:
    if task == "regression" and y.dtype.kind not in "biuf":
        raise ValueError(f"load_dataset: task='regression' needs numeric y, got dtype {y.dtype} "
                         f"from {where}.")
    if task == "regression":
        return y if y.dtype.kind == "f" else y.astype(np.float64)
    if y.ndim != 1:
        raise ValueError(f"load_dataset: task='classification' needs 1-D y, got shape {y.shape} "
                         f"from {where}.")
    return y.astype(np.int64) if y.dtype.kind == "f" and np.all(y == np.round(y)) else y


def load_dataset(source: Optional[str] = "digits", *, path: Any = None,
                 target: Optional[str] = None, task: Optional[str] = None,
                 test_size: Optional[float] = 0.25, random_state: Optional[int] = 0,
                 stratify: Optional[bool] = None, image_size: Optional[tuple] = None,
                 grayscale: bool = False, label_fraction: Optional[float] = None) -> Dataset:
    """Load a dataset source, infer the task, check the data and split it into train/test.

    Parameters
    ----------
    source : {"digits", "npz", "csv", "images"}, default="digits"
        A name from :data:`SOURCES` (None means ``"digits"``). ``"npz"``: arrays ``X``, ``y``
        and optionally ``X_test``, ``y_test`` (then used as the test set); ``"csv"``: every
        column but ``target`` is a numeric feature; ``"images"``: one sub-folder of PNG/JPEG
        files per class.
    path : str or Path, optional
        The file (npz, csv) or folder (images); required for every source but ``"digits"``.
    target : str, optional
        The target column (``"csv"`` only, required there).
    task : {"classification", "regression"}, optional
        Inferred when None: float y, or integer y with more than 50 distinct values, is
        regression; other integer, bool and string y is classification.
    test_size : float, default=0.25
        Test fraction in (0, 1), unless the source provides its own test set (None: 0.25).
    random_state : int or None, default=0
        Seed of the split (None: a different split each call, as in scikit-learn).
    stratify : bool, optional
        Stratify the split by class; None means yes for classification, no for regression.
    image_size : (height, width), optional
        Resize every image (``"images"``); without it all images must share one size.
    grayscale : bool, default=False
        Read images as one channel instead of RGB (``"images"`` only).
    label_fraction : float in (0, 1], optional
        Keep the labels of only this fraction of the training rows (stratified like the split,
        seeded by ``random_state``); the other training rows become ``X_unlabeled``, for
        unsupervised pretraining (:mod:`nnpipe.pretrain`). The test set keeps every label.

    Returns
    -------
    Dataset

    Examples
    --------
    >>> ds = load_dataset("digits", test_size=0.5)
    >>> ds.X_train.shape, ds.X_train.dtype, ds.input_shape, ds.classes[:3]
    ((898, 64), dtype('float32'), (1, 8, 8), [0, 1, 2])
    >>> load_dataset("digits", label_fraction=0.05)
    Dataset(task='classification', n_train=67, n_unlabeled=1280, n_test=450, n_features=64, input_shape=(1, 8, 8))
    >>> load_dataset("digit")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    ValueError: load_dataset: source must be one of 'csv', 'digits', ... Did you mean 'digits'?
    """
    source = "digits" if source is None else source
    test_size = 0.25 if test_size is None else test_size
    if (isinstance(test_size, bool) or not isinstance(test_size, numbers.Real)
            or not 0 < test_size < 1):
        raise invalid_value("load_dataset: test_size", test_size, "a fraction in (0, 1)")
    if stratify is not None and not isinstance(stratify, bool):
        raise invalid_value("load_dataset: stratify", stratify, "None, True or False")
    _resolve_task(task, np.empty(0))  # validate an explicit task before loading anything
    raw = SOURCES.get(source)(path, target, image_size, grayscale)
    where = f"source={source!r}" + (f" (path {str(path)!r})" if path is not None else "")
    X, y = _check_xy(raw.X, raw.y, "", where)
    task = _resolve_task(task, y)
    y = _as_targets(y, task, where)
    shape = tuple(int(s) for s in np.shape(raw.X)[1:])
    if raw.X_test is not None:
        X_test, y_test = _check_xy(raw.X_test, raw.y_test, "test ", where)
        if np.shape(raw.X_test)[1:] != shape:
            raise ValueError(f"load_dataset: X_test from {where} must have per-sample shape "
                             f"{shape} like X, got {np.shape(raw.X_test)[1:]}.")
        y_test = _as_targets(y_test, task, where)
    if stratify and task != "classification":
        raise ValueError(f"load_dataset: stratify=True needs task='classification', got "
                         f"task={task!r}; use stratify=None or False.")
    classes = None
    if task == "classification":
        all_y = y if raw.X_test is None else np.concatenate([y, y_test])
        labels, counts = np.unique(all_y, return_counts=True)
        if len(labels) < 2:
            raise ValueError(f"load_dataset: classification needs at least 2 classes, but every "
                             f"label from {where} is {labels[0].item()!r}.")
        classes = [c.item() for c in labels]
    if raw.X_test is None:
        from sklearn.model_selection import train_test_split

        strat = task == "classification" and stratify is not False
        if strat and counts.min() < 2:
            raise ValueError(f"load_dataset: a stratified split needs at least 2 samples per "
                             f"class, but class {labels[np.argmin(counts)].item()!r} from "
                             f"{where} has 1; add samples or pass stratify=False.")
        X, X_test, y, y_test = train_test_split(X, y, test_size=test_size, stratify=y if strat
                                                else None, random_state=random_state)
    X, y, X_unlabeled = _hide_labels(X, y, label_fraction, task, stratify, random_state)
    return Dataset(X, y, X_test, y_test, task, shape if len(shape) > 1 else None, classes,
                   raw.feature_names, X_unlabeled)


def _hide_labels(X, y, fraction, task, stratify, random_state):
    """Keep the labels of ``fraction`` of the rows; the rest become unlabeled rows."""
    if fraction is None:
        return X, y, None
    if isinstance(fraction, bool) or not isinstance(fraction, numbers.Real) \
            or not 0 < fraction <= 1:
        raise invalid_value("load_dataset: label_fraction", fraction, "a fraction in (0, 1] or "
                            "None")
    if fraction == 1:
        return X, y, None
    from sklearn.model_selection import train_test_split

    n_keep = int(fraction * len(y))
    strat = task == "classification" and stratify is not False
    n_classes = len(np.unique(y)) if task == "classification" else 1
    if n_keep < max(n_classes, 1):
        raise ValueError(f"load_dataset: label_fraction={fraction} keeps {n_keep} of "
                         f"{len(y)} training labels, fewer than the {n_classes} classes; "
                         "raise it.")
    keep, drop = train_test_split(np.arange(len(y)), train_size=n_keep, random_state=random_state,
                                  stratify=y if strat else None)
    return X[keep], y[keep], X[drop]


def _write_npz(file: Path, **arrays: np.ndarray) -> None:
    """Like ``np.savez`` but byte-reproducible (fixed timestamps) and never pickling."""
    with zipfile.ZipFile(file, "w", zipfile.ZIP_STORED) as zf:
        for name, arr in arrays.items():
            info = zipfile.ZipInfo(name + ".npy", date_time=(1980, 1, 1, 0, 0, 0))
            with zf.open(info, "w", force_zip64=True) as f:
                np.lib.format.write_array(f, np.asanyarray(arr), allow_pickle=False)


def save_dataset(ds: Dataset, directory: Any) -> None:
    """Write ``train.npz``, ``test.npz`` (arrays ``X``, ``y``) and ``meta.json`` to ``directory``
    (and ``unlabeled.npz``, array ``X``, when the dataset has unlabeled rows).

    Object arrays are refused (they would need pickle); string labels are stored as fixed-width
    unicode. The files are byte-identical for identical datasets, so DVC sees no change.

    Examples
    --------
    >>> import tempfile
    >>> ds = load_dataset("digits")
    >>> with tempfile.TemporaryDirectory() as d:
    ...     save_dataset(ds, d)
    ...     back = read_dataset(d)
    >>> bool((back.X_test == ds.X_test).all()), back.classes == ds.classes
    (True, True)
    """
    for name in ("X_train", "y_train", "X_test", "y_test"):
        if np.asarray(getattr(ds, name)).dtype == object:
            raise ValueError(f"save_dataset: ds.{name} is an object array, which cannot be "
                             "saved without pickle; convert it to a numeric or str dtype.")
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    _write_npz(d / "train.npz", X=ds.X_train, y=ds.y_train)
    _write_npz(d / "test.npz", X=ds.X_test, y=ds.y_test)
    meta = {"task": ds.task, "n_train": len(ds.X_train), "n_test": len(ds.X_test)}
    if ds.X_unlabeled is not None:
        _write_npz(d / "unlabeled.npz", X=ds.X_unlabeled)
        meta["n_unlabeled"] = len(ds.X_unlabeled)
    for key in ("input_shape", "classes", "feature_names"):  # numpy scalars -> JSON values
        seq = getattr(ds, key)
        meta[key] = None if seq is None else [getattr(v, "item", lambda: v)() for v in seq]
    (d / "meta.json").write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")


def read_dataset(directory: Any) -> Dataset:
    """Read what :func:`save_dataset` wrote (``.npz`` files with ``allow_pickle=False``)."""
    d = Path(directory)
    for name in ("train.npz", "test.npz", "meta.json"):
        if not (d / name).is_file():
            raise FileNotFoundError(f"read_dataset: {str(d / name)!r} does not exist; directory "
                                    f"{str(d)!r} must hold train.npz, test.npz and meta.json.")
    meta, arrays = json.loads((d / "meta.json").read_text()), []
    for split in ("train", "test"):
        try:
            with np.load(d / f"{split}.npz", allow_pickle=False) as z:
                arrays += [z["X"], z["y"]]
        except (ValueError, OSError, EOFError, KeyError, TypeError, zipfile.BadZipFile) as exc:
            raise ValueError(f"read_dataset: {str(d / (split + '.npz'))!r} is not an .npz archive "
                             f"of numeric arrays X and y as save_dataset writes ({exc}); pickled "
                             "data and object arrays are refused.") from None
        if len(arrays[-1]) != meta[f"n_{split}"]:
            raise ValueError(f"read_dataset: {split}.npz in {str(d)!r} has {len(arrays[-1])} rows "
                             f"but meta.json says n_{split}={meta[f'n_{split}']}; out of sync.")
    unlabeled = None
    if meta.get("n_unlabeled") is not None:
        with np.load(d / "unlabeled.npz", allow_pickle=False) as z:
            unlabeled = z["X"]
    shape = meta["input_shape"]
    return Dataset(*arrays, meta["task"], None if shape is None else tuple(shape),
                   meta["classes"], meta["feature_names"], unlabeled)

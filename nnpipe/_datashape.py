"""The data's shape, read cheaply, so that ``nnpipe check`` can check what the data decides.

:func:`source_shape` reads a ``data`` section's source without loading it (digits: known; csv:
the header row; npz: the array header of ``X``; images: one file's size); :func:`prepared_shape`
reads the prepare stage's folder (``meta.json`` and the array header of ``train.npz``). Neither
reads the rows.
"""

from __future__ import annotations

import json
import math
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Tuple

import numpy as np

from ._registry import did_you_mean
from .data import _IMAGE_SUFFIXES
from .exceptions import NnpipeError

__all__ = ["DataShape", "DataShapeError", "source_shape", "prepared_shape", "DIGITS_SHAPE"]

#: the embedded digits' sample shape
DIGITS_SHAPE = (1, 8, 8)


class DataShapeError(NnpipeError, ValueError):
    """The ``data`` section names data that cannot be what it says; ``key`` is its key path."""

    def __init__(self, key: str, message: str):
        self.key, self.message = key, message
        super().__init__(f"{key}: {message}")


@dataclass(frozen=True)
class DataShape:
    """What the data decides for the network: the task (when known), the per-sample shape
    (``None`` for flat rows) and the number of features per row; ``where`` names the data."""

    task: Optional[str]
    input_shape: Optional[Tuple[int, ...]]
    n_features: int
    where: str

    def describe(self) -> str:
        """``"csv 'x.csv': 6 features per row, no sample shape"``."""
        shape = ("no sample shape (flat rows)" if self.input_shape is None
                 else f"samples of shape {self.input_shape}")
        return f"{self.where}: {self.n_features} features per row, {shape}"


def _npy_shape(archive: Path, member: str) -> Tuple[int, ...]:
    """The shape of array ``member`` in an ``.npz`` archive, read from its header only."""
    with zipfile.ZipFile(archive) as zf, zf.open(member + ".npy") as fh:
        version = np.lib.format.read_magic(fh)
        read = np.lib.format.read_array_header_1_0 if version == (1, 0) \
            else np.lib.format.read_array_header_2_0
        shape, _, _ = read(fh)
    return tuple(int(s) for s in shape)


def _from_sample(task: Optional[str], sample: Tuple[int, ...], where: str) -> DataShape:
    # as load_dataset: a per-sample shape of more than one axis is the input_shape
    return DataShape(task, sample if len(sample) > 1 else None, math.prod(sample), where)


def prepared_shape(folder: Any) -> DataShape:
    """The shape of the prepare stage's output (``train.npz`` and ``meta.json`` in ``folder``).

    Raises
    ------
    FileNotFoundError
        When ``folder`` lacks ``meta.json`` or ``train.npz``.
    """
    d = Path(folder)
    for name in ("meta.json", "train.npz"):
        if not (d / name).is_file():
            raise FileNotFoundError(f"--data {str(d)!r}: no {name}; give the prepare stage's "
                                    "folder (`dvc repro prepare` writes data/prepared).")
    meta = json.loads((d / "meta.json").read_text())
    try:
        rows = _npy_shape(d / "train.npz", "X")
    except (KeyError, ValueError, OSError, zipfile.BadZipFile) as exc:
        raise ValueError(f"--data {str(d)!r}: train.npz has no readable array X ({exc}).") \
            from None
    shape = meta.get("input_shape")
    return DataShape(meta.get("task"), None if shape is None else tuple(shape),
                     int(math.prod(rows[1:])), str(d))


def source_shape(data) -> Optional[DataShape]:
    """The shape of the data a ``data`` section (:class:`nnpipe.config.DataSection`) names,
    read without loading it; ``None`` when the source is not one of the built-in ones.

    Raises
    ------
    DataShapeError
        Naming ``data.path`` (missing) or ``data.target`` (missing, or not a column of the CSV).
    """
    source = data.source or "digits"
    if source == "digits":
        return DataShape("classification", DIGITS_SHAPE, math.prod(DIGITS_SHAPE), "digits")
    if source not in ("csv", "npz", "images"):
        return None
    if data.path is None or not Path(data.path).exists():
        raise DataShapeError("data.path", f"{data.path!r} does not exist (source={source!r} "
                                          "reads it)")
    path = Path(data.path)
    where = f"{source} {str(path)!r}"
    if source == "csv":
        return _csv_shape(data, path, where)
    if source == "npz":
        try:
            rows = _npy_shape(path, "X")
        except (KeyError, ValueError, OSError, zipfile.BadZipFile):
            return None  # the prepare stage says what is wrong with the file
        return _from_sample(data.task, rows[1:], where) if len(rows) >= 2 else None
    return _image_shape(data, path, where)


def _csv_shape(data, path: Path, where: str) -> Optional[DataShape]:
    import pandas as pd

    if data.target is None:
        raise DataShapeError("data.target", "is required for source='csv' (the name of the "
                                            "target column), got None")
    try:
        columns = [str(c) for c in pd.read_csv(path, nrows=0).columns]
    except (pd.errors.EmptyDataError, pd.errors.ParserError, UnicodeDecodeError):
        return None  # the prepare stage says what is wrong with the file
    if data.target not in columns:
        raise DataShapeError("data.target", f"{data.target!r} is not a column of {str(path)!r}; "
                                            f"the columns are {columns}."
                                            + did_you_mean(data.target, columns))
    return DataShape(data.task, None, len(columns) - 1, where)


def _image_shape(data, path: Path, where: str) -> Optional[DataShape]:
    from PIL import Image, UnidentifiedImageError

    files = (f for d in sorted(path.iterdir()) if d.is_dir() and not d.name.startswith(".")
             for f in sorted(d.iterdir()) if f.suffix.lower() in _IMAGE_SUFFIXES)
    first = next(files, None)
    if first is None:
        return None
    try:
        with Image.open(first) as im:  # reads the header only
            width, height = im.size
    except (UnidentifiedImageError, OSError):
        return None
    height, width = data.image_size or (height, width)
    return _from_sample(data.task or "classification",
                        (1 if data.grayscale else 3, int(height), int(width)), where)

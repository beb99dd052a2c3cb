"""DVC stage ``prepare``: load the configured data source, split it and save the arrays.

``data.path`` is the raw data this stage depends on in ``dvc.yaml`` (``${data.path}``), so new
rows or images re-run it. ``data.source: digits`` is embedded in scikit-learn and reads no file:
its ``data.path`` is a placeholder folder (``data/raw/``, shipped with a README) that is not read.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict

from nnpipe.data import load_dataset, save_dataset

from ._stage import run, tracker_for


def _args(parser):
    parser.add_argument("--out", required=True, help="folder for train.npz, test.npz, meta.json")


def dataset_kwargs(data: Dict[str, Any]) -> Dict[str, Any]:
    """``load_dataset`` keyword arguments from the ``data`` section (as set in params.yaml).

    With ``source: digits`` (the default) ``path`` is the placeholder folder ``dvc.yaml``
    depends on, and is dropped; a ``path`` naming a file there is a mistake (a CSV or npz file
    meant for another source) and fails.

    Parameters
    ----------
    data : dict
        The ``data`` section's keys that were set.

    Returns
    -------
    dict

    Raises
    ------
    ValueError
        ``source`` is digits and ``path`` is an existing file.
    """
    kwargs = dict(data)
    if kwargs.get("source") in (None, "digits") and kwargs.get("path") is not None:
        path = Path(kwargs.pop("path"))
        if path.is_file():
            raise ValueError(f"data.path: {str(path)!r} is a file, but data.source is 'digits' "
                             "(embedded, reads no file): set data.source to 'csv' or 'npz' to "
                             "read it, or point data.path at a folder (the placeholder "
                             "'data/raw').")
    return kwargs


def _body(args, cfg, outputs):
    with tracker_for(cfg, "prepare", params={"data": cfg.raw.get("data") or {}}) as tracker:
        ds = load_dataset(**dataset_kwargs(cfg.data_kwargs()))
        save_dataset(ds, outputs.path(args.out, is_dir=True))
        tracker.log_metrics({"n_train": len(ds.y_train), "n_test": len(ds.y_test),
                             "n_features": ds.X_train.shape[1]})
    print(f"[prepare] {cfg.data.source or 'digits'}: {len(ds.y_train)} train / "
          f"{len(ds.y_test)} test rows, {ds.X_train.shape[1]} features, task {ds.task}")


def main(argv=None):
    run("prepare", _body, _args, argv)


if __name__ == "__main__":
    main()

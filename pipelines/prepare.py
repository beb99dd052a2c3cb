"""DVC stage ``prepare``: load the configured data source, split it and save the arrays."""

from __future__ import annotations

from nnpipe.data import load_dataset, save_dataset

from ._stage import run, tracker_for


def _args(parser):
    parser.add_argument("--out", required=True, help="folder for train.npz, test.npz, meta.json")


def _body(args, cfg, outputs):
    with tracker_for(cfg, "prepare", params={"data": cfg.raw.get("data") or {}}) as tracker:
        ds = load_dataset(**cfg.data_kwargs())
        save_dataset(ds, outputs.path(args.out, is_dir=True))
        tracker.log_metrics({"n_train": len(ds.y_train), "n_test": len(ds.y_test),
                             "n_features": ds.X_train.shape[1]})
    print(f"[prepare] {cfg.data.source or 'digits'}: {len(ds.y_train)} train / "
          f"{len(ds.y_test)} test rows, {ds.X_train.shape[1]} features, task {ds.task}")


def main(argv=None):
    run("prepare", _body, _args, argv)


if __name__ == "__main__":
    main()

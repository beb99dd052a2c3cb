"""DVC stage ``pretrain``: unsupervised pretraining of the network's lower layers.

With ``pretrain.enabled``, fits a :class:`nnpipe.pretrain.Pretrainer` (``model``'s architecture,
with the search's best parameters applied as ``train`` applies them; ``pretrain``'s training
keys) on every training row, labeled or not (``data.label_fraction`` leaves rows unlabeled),
and saves it; ``train`` then starts from its encoder. The rows go through the ``preprocess``
steps fitted as the train stage fits them, on the labeled rows, so the encoder sees the inputs
the classifier will see. Disabled, it writes only a marker file: the stage graph stays static.

Without unlabeled rows it still pretrains, on the labeled rows' features, and warns: the point
of pretraining is the rows that have no label.
"""

from __future__ import annotations

import json
import warnings

import numpy as np

from nnpipe import save
from nnpipe.data import read_dataset

from ._stage import best_config, log_history, run, tracker_for


def _args(parser):
    parser.add_argument("--data", required=True, help="the prepare stage's folder")
    parser.add_argument("--best", help="the search stage's best_params.json (may be {})")
    parser.add_argument("--out", required=True, help="where to save the pretrained encoder")


def pretrain(cfg, ds):
    """Fit the configured Pretrainer on all training rows; return it and the rows' counts."""
    from sklearn.pipeline import Pipeline

    unlabeled = ds.X_unlabeled if ds.X_unlabeled is not None else ds.X_train[:0]
    if len(unlabeled) == 0:
        warnings.warn("pretrain.enabled, but the data has no unlabeled rows (set "
                      "data.label_fraction, e.g. 0.05, to keep the labels of only that fraction "
                      f"of the training rows): pretraining on the {len(ds.X_train)} labeled "
                      "rows' features only.", UserWarning, stacklevel=2)
    X = np.concatenate([ds.X_train, unlabeled])
    steps = cfg.build_preprocessing()
    if steps:
        X = Pipeline(steps).fit(ds.X_train, ds.y_train).transform(X)
    params = {"on_interrupt": "raise", "verbose": cfg.train.get("verbose", 1)}
    pre = cfg.build_pretrainer(ds.input_shape, **params).fit(X)
    return pre, {"n_rows": len(X), "n_unlabeled": len(unlabeled)}


def _body(args, cfg, outputs):
    out = outputs.path(args.out, is_dir=True)
    if not cfg.pretrain_enabled:
        (out / "disabled.json").write_text(json.dumps({"enabled": False}) + "\n")
        print("[pretrain] disabled (pretrain.enabled is false): train starts from scratch")
        return
    ds = read_dataset(args.data)
    cfg = best_config(cfg, args.best)
    with tracker_for(cfg, "pretrain") as tracker:
        pre, counts = pretrain(cfg, ds)
        pre.callbacks = None
        save(pre, out)
        log_history(tracker, pre.history)
        last = pre.history[-1]
        summary = {**counts, "epochs": len(pre.history),
                   **{k: float(last[k]) for k in ("train_loss", "valid_loss") if k in last}}
        tracker.log_metrics(summary)
    print(f"[pretrain] encoder {pre.encoder_patterns()} pretrained: {summary}")


def main(argv=None):
    run("pretrain", _body, _args, argv)


if __name__ == "__main__":
    main()

"""DVC stage ``train``: fit the configured pipeline (preprocessing + network) on the training set.

Writes the fitted pipeline (``nnpipe.save``), per-epoch learning curves (a CSV table, and a PNG
for people and ``dvc plots``, with the train/validation gap and any diagnostics marked) and
``metrics/train.json`` (epochs, fit time; ``--report``: every final number); prints the
diagnostics (:func:`nnpipe.diagnostics.diagnose`: exploding or flat loss, overfitting) and tags
the MLflow run with them; logs params, per-epoch metrics, artifacts and the model (as an MLflow
pyfunc model) to MLflow.
"""

from __future__ import annotations

import time

from nnpipe import save
from nnpipe.data import read_dataset
from nnpipe.diagnostics import diagnose, format_findings
from nnpipe.plots import learning_curves, learning_curves_table

from ._stage import (add_pretrained_argument, best_config, log_dataset, pretrained_params, run,
                     tracker_for)


def _args(parser):
    parser.add_argument("--data", required=True, help="the prepare stage's folder")
    parser.add_argument("--best", help="the search stage's best_params.json (may be {})")
    parser.add_argument("--model", required=True, help="where to save the fitted pipeline")
    parser.add_argument("--metrics", required=True,
                        help="JSON metrics file: epochs and fit time (dvc metrics)")
    parser.add_argument("--report", help="JSON file with the final epoch's losses and the "
                                         "number of transferred tensors as well")
    parser.add_argument("--curves", required=True, help="learning curves table (CSV)")
    parser.add_argument("--plot", required=True, help="learning curves PNG")
    add_pretrained_argument(parser)


def fit_pipeline(cfg, ds, tracker, **overrides):
    """Build and fit the configured pipeline on the training rows, logging epochs to MLflow."""
    logger = tracker.epoch_logger()
    callbacks = [("mlflow", logger)] if logger is not None else None
    params = {"on_interrupt": "raise", "verbose": cfg.train.get("verbose", 1), **overrides}
    pipe = cfg.build_pipeline(ds.task, ds.input_shape, callbacks=callbacks, **params)
    start = time.perf_counter()
    pipe.fit(ds.X_train, ds.y_train)
    return pipe, time.perf_counter() - start


#: What metrics/train.json keeps (the report has every number): the rest is in the test
#: metrics (evaluate) and the learning curves.
_METRICS = ("epochs", "fit_seconds")


def _body(args, cfg, outputs):
    ds = read_dataset(args.data)
    cfg = best_config(cfg, args.best)
    reuse = pretrained_params(cfg, args.pretrained)
    with tracker_for(cfg, "train") as tracker:
        log_dataset(tracker, cfg, args.data, ds)
        pipe, seconds = fit_pipeline(cfg, ds, tracker, **reuse)
        net = pipe[-1]
        if reuse:
            print(f"[train] started from the pretrained encoder {args.pretrained}: "
                  f"{len(net.transferred_)} tensors transferred ({reuse['transfer_layers']})")
        net.callbacks = None  # the MLflow logger lives in this process only
        history = net.history.to_list()
        model_dir = outputs.path(args.model, is_dir=True)
        save(pipe, model_dir)
        learning_curves_table(history, outputs.path(args.curves))
        findings = diagnose(history)
        print(format_findings(findings, prefix="[train] "), flush=True)
        plot = learning_curves(history, outputs.path(args.plot), findings=findings)
        tracker.set_tags({"nnpipe.diagnostics": ",".join(f.code for f in findings) or "ok",
                          "nnpipe.diagnostics.text": format_findings(findings)[:8000]})
        last = history[-1]
        metrics = {"epochs": len(history), "fit_seconds": round(seconds, 3),
                   "transferred_tensors": len(getattr(net, "transferred_", None) or []),
                   **{k: float(last[k]) for k in ("train_loss", "valid_loss", "valid_acc")
                      if k in last}}
        outputs.json(args.metrics, {k: metrics[k] for k in _METRICS})
        if args.report:
            outputs.json(args.report, metrics)
        tracker.log_metrics({f"final_{k}": v for k, v in metrics.items()})
        tracker.log_artifact(plot)
        tracker.log_model(model_dir, name="model", X_train=ds.X_train)
    print(f"[train] {metrics}")


def main(argv=None):
    run("train", _body, _args, argv)


if __name__ == "__main__":
    main()

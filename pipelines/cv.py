"""DVC stage ``cv``: k-fold cross-validation of the configured pipeline on the training set.

Each fold fits a fresh pipeline (preprocessing and augmentation never see the held-out fold);
with ``pretrain.enabled`` each fold's network starts from the pretrain stage's encoder, as
``train``'s does (the encoder saw every training row's features, never a label).
Writes mean +- std of the headline metrics (the report: every metric, per fold too), the
out-of-fold predictions and a per-fold table; logs a parent MLflow run with one nested run per fold.
"""

from __future__ import annotations

import csv

import numpy as np

from nnpipe.cv import cross_validate_model
from nnpipe.data import read_dataset
from nnpipe.diagnostics import diagnose, format_findings
from nnpipe.metrics import CV_HEADLINE_METRICS, headline

from ._stage import (add_pretrained_argument, best_config, log_dataset, log_history,
                     pretrained_params, run, tracker_for)


def _args(parser):
    parser.add_argument("--data", required=True, help="the prepare stage's folder")
    parser.add_argument("--best", help="the search stage's best_params.json (may be {})")
    add_pretrained_argument(parser)
    parser.add_argument("--metrics", required=True,
                        help="JSON metrics file: mean and std of the headline metrics")
    parser.add_argument("--report", help="JSON file with every fold's metrics, mean and std")
    parser.add_argument("--oof", required=True, help="out-of-fold predictions (.npz)")
    parser.add_argument("--table", required=True, help="per-fold metrics table (CSV)")


def _body(args, cfg, outputs):
    ds = read_dataset(args.data)
    cfg = best_config(cfg, args.best)
    cv = cfg.cv.model_dump(exclude_unset=True)
    reuse = pretrained_params(cfg, args.pretrained, announce="[cv] every fold")
    with tracker_for(cfg, "cv") as tracker:
        log_dataset(tracker, cfg, args.data, ds)
        pipe = cfg.build_pipeline(ds.task, ds.input_shape, on_interrupt="raise",
                                  verbose=cfg.train.get("verbose", 0), **reuse)

        def on_fold(i, model, metrics):
            findings = diagnose(model[-1].history)
            with tracker.child(f"fold-{i}", params={"fold": i}) as child:
                log_history(child, model[-1].history)
                child.log_metrics(metrics)
                child.set_tags({"nnpipe.diagnostics": ",".join(f.code for f in findings) or "ok"})
            print(f"[cv] fold {i}: " + ", ".join(f"{k}={v:.4f}" for k, v in metrics.items()))
            if findings:
                print(format_findings(findings, prefix=f"[cv] fold {i} "), flush=True)

        result = cross_validate_model(pipe, ds.X_train, ds.y_train, task=ds.task,
                                      on_fold=on_fold, **cv)
        summary = result.summary()
        outputs.json(args.metrics, {k: headline(summary[k], CV_HEADLINE_METRICS)
                                    for k in ("mean", "std")})
        if args.report:
            outputs.json(args.report, summary)
        np.savez(outputs.path(args.oof), oof=result.oof, y=ds.y_train,
                 fold=_fold_of_rows(result, len(ds.y_train)))
        with open(outputs.path(args.table), "w", newline="") as fh:
            keys = list(result.fold_metrics[0])
            writer = csv.DictWriter(fh, ["fold", *keys])
            writer.writeheader()
            for i, m in enumerate(result.fold_metrics):
                writer.writerow({"fold": i, **m})
        tracker.log_metrics({f"{k}_mean": v for k, v in result.mean.items()})
        tracker.log_metrics({f"{k}_std": v for k, v in result.std.items()})
    print("[cv] mean: " + ", ".join(f"{k}={v:.4f} +- {result.std[k]:.4f}"
                                    for k, v in result.mean.items()))


def _fold_of_rows(result, n):
    fold = np.full(n, -1)
    for i, f in enumerate(result.folds):
        fold[f["test"]] = i
    return fold


def main(argv=None):
    run("cv", _body, _args, argv)


if __name__ == "__main__":
    main()

"""DVC stage ``evaluate``: test-set metrics and plots for the trained pipeline.

Classification: accuracy, balanced accuracy, NLL, Brier, ECE (``evaluate.ece_bins`` bins), a
per-class report, a confusion matrix and a reliability diagram. Regression: R2, RMSE, MAE.
"""

from __future__ import annotations

import nnpipe
from nnpipe.data import read_dataset
from nnpipe.metrics import classification_metrics, ece, per_class_report, regression_metrics
from nnpipe.plots import (confusion_matrix_plot, reliability_diagram, save_calibration_csv,
                          save_confusion_csv)

from ._stage import run, tracker_for


def _args(parser):
    parser.add_argument("--data", required=True, help="the prepare stage's folder")
    parser.add_argument("--model", required=True, help="the train stage's model folder")
    parser.add_argument("--metrics", required=True, help="JSON metrics file")
    parser.add_argument("--plots", required=True, help="folder for plots and their CSV data")


def _body(args, cfg, outputs):
    ds = read_dataset(args.data)
    model = nnpipe.load(args.model)
    ev = cfg.evaluate.model_dump(exclude_unset=True)
    plots = outputs.path(args.plots, is_dir=True)
    with tracker_for(cfg, "evaluate", params={"evaluate": cfg.raw.get("evaluate", {})}) as tracker:
        if ds.task == "classification":
            proba = model.predict_proba(ds.X_test)
            classes = list(model.classes_)
            pred = model.predict(ds.X_test)
            bins = {"n_bins": ev["ece_bins"]} if "ece_bins" in ev else {}
            metrics = classification_metrics(ds.y_test, proba, classes)
            metrics["ece"] = ece(ds.y_test, proba, labels=classes, **bins)
            report = per_class_report(ds.y_test, pred, classes)
            save_confusion_csv(ds.y_test, pred, plots / "confusion.csv")
            save_calibration_csv(ds.y_test, proba, plots / "calibration.csv", labels=classes,
                                 **bins)
            confusion_matrix_plot(ds.y_test, pred, classes, plots / "confusion.png")
            reliability_diagram(ds.y_test, proba, plots / "reliability.png", labels=classes,
                                **bins)
            outputs.json(args.metrics, {**metrics, "per_class": report})
        else:
            metrics = regression_metrics(ds.y_test, model.predict(ds.X_test))
            outputs.json(args.metrics, metrics)
        tracker.log_metrics(metrics)
        tracker.log_artifacts(plots)
    print("[evaluate] " + ", ".join(f"{k}={v:.4f}" for k, v in metrics.items()))


def main(argv=None):
    run("evaluate", _body, _args, argv)


if __name__ == "__main__":
    main()

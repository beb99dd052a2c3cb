"""DVC stage ``evaluate``: test-set metrics and plots for the trained pipeline.

Classification: accuracy, balanced accuracy, NLL, Brier, ECE (``evaluate.ece_bins`` bins), a
per-class report, a confusion matrix and a reliability diagram. Regression: R2, RMSE, MAE.
"""

from __future__ import annotations

from pathlib import Path

import nnpipe
from nnpipe.data import read_dataset
from nnpipe.metrics import classification_metrics, ece, per_class_report, regression_metrics
from nnpipe.plots import (confusion_matrix_plot, reliability_diagram, save_calibration_csv,
                          save_confusion_csv)

from ._stage import run, tracker_for


def _args(parser):
    parser.add_argument("--data", required=True, help="the prepare stage's folder")
    parser.add_argument("--model", required=True, help="the train stage's model folder")
    parser.add_argument("--ensemble", help="the ensemble stage's folder (reported when built)")
    parser.add_argument("--metrics", required=True, help="JSON metrics file")
    parser.add_argument("--plots", required=True, help="folder for plots and their CSV data")


def _body(args, cfg, outputs):
    ds = read_dataset(args.data)
    model = nnpipe.load(args.model)
    ensemble = None
    if args.ensemble and (Path(args.ensemble) / "model.json").exists():
        ensemble = nnpipe.load(args.ensemble)
    ev = cfg.evaluate.model_dump(exclude_unset=True)
    plots = outputs.path(args.plots, is_dir=True)
    with tracker_for(cfg, "evaluate", params={"evaluate": cfg.raw.get("evaluate", {})}) as tracker:
        if ds.task == "classification":
            proba = model.predict_proba(ds.X_test)
            classes = list(model.classes_)
            pred = model.predict(ds.X_test)
            bins = {"n_bins": ev["ece_bins"]} if "ece_bins" in ev else {}
            metrics = _metrics(ds.y_test, proba, classes, bins)
            report = per_class_report(ds.y_test, pred, classes)
            save_confusion_csv(ds.y_test, pred, plots / "confusion.csv")
            save_calibration_csv(ds.y_test, proba, plots / "calibration.csv", labels=classes,
                                 **bins)
            confusion_matrix_plot(ds.y_test, pred, classes, plots / "confusion.png")
            curves = {"single model": proba}
            result = {**metrics, "per_class": report}
            if ensemble is not None:
                result.update(_ensemble_report(ensemble, ds, classes, bins))
                curves["ensemble"] = ensemble.predict_proba(ds.X_test)
                curves[f"best single member ({result['best_single']['member']})"] = \
                    ensemble.members_[result["best_single"]["member"]].predict_proba(ds.X_test)
                tracker.log_metrics({f"ensemble_{k}": v for k, v in result["ensemble"].items()})
            reliability_diagram(ds.y_test, curves, plots / "reliability.png", labels=classes,
                                **bins)
            outputs.json(args.metrics, result)
        else:
            metrics = regression_metrics(ds.y_test, model.predict(ds.X_test))
            result = dict(metrics)
            if ensemble is not None:
                members = [regression_metrics(ds.y_test, m.predict(ds.X_test))
                           for m in ensemble.members_]
                best = min(range(len(members)), key=lambda i: members[i]["rmse"])
                result.update({"ensemble": regression_metrics(ds.y_test,
                                                              ensemble.predict(ds.X_test)),
                               "members": members,
                               "best_single": {"member": best, **members[best]}})
            outputs.json(args.metrics, result)
        tracker.log_metrics(metrics)
        tracker.log_artifacts(plots)
    print("[evaluate] " + ", ".join(f"{k}={v:.4f}" for k, v in metrics.items()))
    if ensemble is not None and "ensemble" in result:
        print("[evaluate] ensemble: " + ", ".join(
            f"{k}={v:.4f}" for k, v in result["ensemble"].items()))


def _metrics(y, proba, classes, bins):
    """classification_metrics, with ECE over ``evaluate.ece_bins`` bins when set."""
    metrics = classification_metrics(y, proba, classes)
    if bins:
        metrics["ece"] = ece(y, proba, labels=classes, **bins)
    return metrics


def _ensemble_report(ensemble, ds, classes, bins):
    """Test metrics of the ensemble, of every member, and of the best single member (lowest
    test NLL: a report, not a selection)."""
    members = [_metrics(ds.y_test, m.predict_proba(ds.X_test), classes, bins)
               for m in ensemble.members_]
    ens = _metrics(ds.y_test, ensemble.predict_proba(ds.X_test), classes, bins)
    best = min(range(len(members)), key=lambda i: members[i]["nll"])
    mean_member = {k: sum(m[k] for m in members) / len(members) for k in members[0]}
    return {"ensemble": ens, "members": members, "mean_member": mean_member,
            "best_single": {"member": best, **members[best]}}


def main(argv=None):
    run("evaluate", _body, _args, argv)


if __name__ == "__main__":
    main()

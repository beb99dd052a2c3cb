"""DVC stage ``evaluate``: test-set metrics and plots for the trained pipeline.

Classification: accuracy, balanced accuracy, NLL, Brier, ECE (``evaluate.ece_bins`` bins), a
per-class report, a confusion matrix and a reliability diagram. Regression: R2, RMSE, MAE.
Always the model's fraction of exact zero weights (``sparsity``). With ``evaluate.prune``, also
the model magnitude-pruned to that sparsity (optionally fine-tuned): its exact zeros and what it
costs in accuracy / NLL (or RMSE). With ``evaluate.fold_batchnorm``, the model with batch norm
folded: the largest prediction difference and the predict latency per sample before / after.

Everything goes to the report (``--report``, e.g. ``reports/evaluate.json``); the metrics file
keeps only the headline numbers (:data:`nnpipe.metrics.HEADLINE_METRICS`) of the model, the
ensemble and the mean member, the few columns ``dvc metrics show`` compares across experiments.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List

import nnpipe
from nnpipe.data import read_dataset
from nnpipe.metrics import (classification_metrics, ece, headline, per_class_report,
                            regression_metrics)
from nnpipe.plots import (confusion_matrix_plot, reliability_diagram, save_calibration_csv,
                          save_confusion_csv)
from nnpipe.sparsity import prune, sparsity_report

from ._stage import log_dataset, run, tracker_for


def _args(parser):
    parser.add_argument("--data", required=True, help="the prepare stage's folder")
    parser.add_argument("--model", required=True, help="the train stage's model folder")
    parser.add_argument("--ensemble", help="the ensemble stage's folder (reported when built)")
    parser.add_argument("--metrics", required=True,
                        help="JSON metrics file: the headline numbers (dvc metrics)")
    parser.add_argument("--report", help="JSON file with every detail (per-class report, each "
                                         "member, pruning, folding)")
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
        log_dataset(tracker, cfg, args.data, ds, split="test")
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
            if ev.get("prune"):
                result["pruned"] = _pruned_report(model, ds, ev["prune"], metrics, bins)
        else:
            metrics = regression_metrics(ds.y_test, model.predict(ds.X_test))
            result = dict(metrics)
            if ensemble is not None:
                members = [regression_metrics(ds.y_test, m.predict(ds.X_test))
                           for m in ensemble.members_]
                best = min(range(len(members)), key=lambda i: members[i]["rmse"])
                result.update({"ensemble": regression_metrics(ds.y_test,
                                                              ensemble.predict(ds.X_test)),
                               "members": members, "mean_member": _mean(members),
                               "best_single": {"member": best, **members[best]}})
            if ev.get("prune"):
                result["pruned"] = _pruned_report(model, ds, ev["prune"], metrics, {})
        result["sparsity"] = sparsity_report(model)["sparsity"]  # exact zeros (l1, pruning)
        if ev.get("fold_batchnorm"):
            result["folded"] = _folded_report(model, ds)
            tracker.log_metrics({f"folded_{k}": v for k, v in result["folded"].items()})
        outputs.json(args.metrics, summary(result))
        if args.report:
            outputs.json(args.report, result)
        tracker.log_metrics({**metrics, "sparsity": result["sparsity"]})
        if "pruned" in result:
            tracker.log_metrics({f"pruned_{k}": v for k, v in result["pruned"].items()
                                 if isinstance(v, (int, float))})
        tracker.log_artifacts(plots)
    print("[evaluate] " + ", ".join(f"{k}={v:.4f}" for k, v in metrics.items()))
    if "pruned" in result:
        p = result["pruned"]
        cost = ("accuracy_cost", p["accuracy_cost"]) if "accuracy_cost" in p else \
            ("rmse_cost", p["rmse_cost"])
        print(f"[evaluate] pruned to {p['sparsity']:.1%} exact zeros: {cost[0]}={cost[1]:+.4f}")
    if ensemble is not None and "ensemble" in result:
        print("[evaluate] ensemble: " + ", ".join(
            f"{k}={v:.4f}" for k, v in result["ensemble"].items()))


def summary(result: Dict[str, Any]) -> Dict[str, Any]:
    """The metrics file's content: the headline numbers of the model and, when reported, of
    the ensemble and of its mean member (the report keeps everything else)."""
    out = headline(result)
    for key in ("ensemble", "mean_member"):
        if key in result:
            out[key] = headline(result[key])
    return out


def _mean(members: List[Dict[str, float]]) -> Dict[str, float]:
    """The mean of each metric over the members."""
    return {k: sum(m[k] for m in members) / len(members) for k in members[0]}


def _metrics(y, proba, classes, bins):
    """classification_metrics, with ECE over ``evaluate.ece_bins`` bins when set."""
    metrics = classification_metrics(y, proba, classes)
    if bins:
        metrics["ece"] = ece(y, proba, labels=classes, **bins)
    return metrics


def _folded_report(model, ds, repeats: int = 7):
    """The model with batch norm folded (:func:`nnpipe.fold_batchnorm`): how far its predictions
    are from the model's, and predict latency per sample before / after at batch 1 and 256
    (medians of interleaved repeats)."""
    import time

    import numpy as np

    from nnpipe import fold_batchnorm

    folded = fold_batchnorm(model)
    out = {"max_abs_diff": float(np.abs(_outputs(folded, ds.X_test) - _outputs(model, ds.X_test))
                                 .max())}
    for batch in (1, 256):
        X = ds.X_test[:batch]
        times = {"unfolded": [], "folded": []}
        for _ in range(repeats):
            for name, m in (("unfolded", model), ("folded", folded)):
                start = time.perf_counter()
                _outputs(m, X)
                times[name].append((time.perf_counter() - start) / len(X))
        for name, values in times.items():
            out[f"{name}_us_per_sample_bs{batch}"] = float(np.median(values) * 1e6)
    return out


def _outputs(model, X):
    return model.predict_proba(X) if hasattr(model, "classes_") else model.predict(X)


def _pruned_report(model, ds, spec, dense, bins):
    """Test metrics of the model pruned as ``evaluate.prune`` says (fine-tuned on the training
    rows when ``fine_tune_epochs`` is set), its sparsity, and the cost against the dense model."""
    sparse = prune(model, X=ds.X_train, y=ds.y_train, **spec)
    report = sparsity_report(sparse)
    out = {"sparsity": report["sparsity"], "zeros": report["zeros"], "weights": report["weights"],
           "layer_sparsity": {k: v["sparsity"] for k, v in report["layers"].items()}}
    if ds.task == "classification":
        metrics = _metrics(ds.y_test, sparse.predict_proba(ds.X_test), list(model.classes_), bins)
        out.update(metrics, accuracy_cost=dense["accuracy"] - metrics["accuracy"],
                   nll_cost=metrics["nll"] - dense["nll"])
    else:
        metrics = regression_metrics(ds.y_test, sparse.predict(ds.X_test))
        out.update(metrics, rmse_cost=metrics["rmse"] - dense["rmse"])
    return out


def _ensemble_report(ensemble, ds, classes, bins):
    """Test metrics of the ensemble, of every member, and of the best single member (lowest
    test NLL: a report, not a selection)."""
    members = [_metrics(ds.y_test, m.predict_proba(ds.X_test), classes, bins)
               for m in ensemble.members_]
    ens = _metrics(ds.y_test, ensemble.predict_proba(ds.X_test), classes, bins)
    best = min(range(len(members)), key=lambda i: members[i]["nll"])
    return {"ensemble": ens, "members": members, "mean_member": _mean(members),
            "best_single": {"member": best, **members[best]}}


def main(argv=None):
    run("evaluate", _body, _args, argv)


if __name__ == "__main__":
    main()

"""DVC stage ``search``: the Optuna study declared in params.yaml's ``search`` section.

Writes ``best_params.json`` (dotted params.yaml paths; ``{}`` when the search is disabled, so
``train`` and ``cv`` then use the declared values), all trials as CSV, the top-k configurations
for ensembles, and plots; logs a parent MLflow run with one nested run per trial. The study lives
in an Optuna journal file (``--journal``, kept between runs): re-running resumes it.

Extra workers on other machines, against a database server (``search.storage: postgresql://``)::

    python -m pipelines.search --worker --data data/prepared
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

from nnpipe.data import read_dataset

from ._stage import run, tracker_for


def _args(parser):
    parser.add_argument("--data", required=True, help="the prepare stage's folder")
    parser.add_argument("--best", default="search/best_params.json")
    parser.add_argument("--results", default="search/results",
                        help="folder for trials.csv, top_trials.json, plots")
    parser.add_argument("--journal", default="search/journal/study.log",
                        help="Optuna journal file (when search.storage is unset)")
    parser.add_argument("--worker", action="store_true",
                        help="only run trials (another process or machine writes the outputs)")


def _body(args, cfg, outputs):
    from nnpipe.search import (best_overrides, run_search, save_plots, top_trials,
                               trials_table)

    settings = cfg.search
    Path(args.journal).parent.mkdir(parents=True, exist_ok=True)  # a persisted DVC out
    if settings is None or not settings.enabled:
        outputs.json(args.best, {})
        results = outputs.path(args.results, is_dir=True)
        (results / "trials.csv").write_text("number,state,value\n")
        (results / "top_trials.json").write_text("[]\n")
        print("[search] disabled (search.enabled is false): train and cv use params.yaml as is")
        return
    ds = read_dataset(args.data)
    raw = cfg.raw
    if args.worker:
        run_search(raw, ds.X_train, ds.y_train, ds.task, ds.input_shape, settings=settings,
                   journal=args.journal)
        return
    with tracker_for(cfg, "search") as tracker:
        study = run_search(raw, ds.X_train, ds.y_train, ds.task, ds.input_shape,
                           settings=settings, journal=args.journal)
        rows = trials_table(study)
        for t in study.get_trials(deepcopy=False):
            with tracker.child(f"trial-{t.number}", params=dict(t.params)) as child:
                child.set_tags({"optuna.state": t.state.name,
                                "optuna.reason": t.user_attrs.get("fail_reason", "")[:500]})
                for step, value in sorted(t.intermediate_values.items()):
                    child.log_metrics({f"fold0_{settings.metric}": value}, step=step)
                if t.value is not None:
                    child.log_metrics({settings.metric: t.value})
        best = best_overrides(study)
        outputs.json(args.best, best)
        results = outputs.path(args.results, is_dir=True)
        with open(results / "trials.csv", "w", newline="") as fh:
            keys = sorted({k for r in rows for k in r}, key=lambda k: (k.startswith("params."), k))
            writer = csv.DictWriter(fh, keys)
            writer.writeheader()
            writer.writerows(rows)
        (results / "top_trials.json").write_text(json.dumps(
            top_trials(study, settings.top_k), indent=2, default=str))
        save_plots(study, results / "plots")
        tracker.log_params({f"best.{k}": v for k, v in best.items()})
        tracker.log_metrics({f"best_{settings.metric}": study.best_value,
                             "n_trials": len(rows)})
        tracker.log_artifacts(results)
    print(f"[search] best {settings.metric}={study.best_value:.4f} with {best}")


def main(argv=None):
    run("search", _body, _args, argv)


if __name__ == "__main__":
    main()

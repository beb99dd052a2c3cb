"""DVC stage ``search``: the Optuna study declared in params.yaml's ``search`` section.

Writes ``best_params.json`` (dotted params.yaml paths; ``{}`` when the search is disabled, so
``train`` and ``cv`` then use the declared values), all trials as CSV, the top-k configurations
for ensembles, and plots; logs a parent MLflow run named by the study with one nested run
``trial-<n>`` per finished trial (each trial logged once, however often the search is resumed).
The study lives in an Optuna journal file (``--journal``, kept between runs): re-running resumes
it while the data and every setting a trial reads are unchanged, else starts a new study beside
it. Progress lines (the ``nnpipe`` logger) go to stdout.

Extra workers on other machines, against a database server (``search.storage: postgresql://``)::

    python -m pipelines.search --worker --data data/prepared
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any, Dict, List

from nnpipe.data import read_dataset

from ._stage import run, tracker_for

#: the study user attribute listing the trial numbers already logged to MLflow
LOGGED_ATTR = "nnpipe_mlflow_logged"
#: an Optuna trial state -> the status its MLflow run ends with
RUN_STATUS = {"COMPLETE": "FINISHED", "PRUNED": "KILLED", "FAIL": "FAILED"}


def _args(parser):
    parser.add_argument("--data", required=True, help="the prepare stage's folder")
    parser.add_argument("--best", default="search/best_params.json")
    parser.add_argument("--results", default="search/results",
                        help="folder for trials.csv, top_trials.json, plots")
    parser.add_argument("--journal", default="search/journal/study.log",
                        help="Optuna journal file (when search.storage is unset)")
    parser.add_argument("--worker", action="store_true",
                        help="only run trials (another process or machine writes the outputs)")


def log_trials(tracker, study, metric: str) -> List[int]:
    """One nested MLflow run ``trial-<n>`` per finished trial not logged before (the numbers
    logged are kept in the study's ``nnpipe_mlflow_logged`` attribute, so a resumed search never
    logs a trial twice); it ends FINISHED, KILLED (pruned) or FAILED. Returns the numbers logged.
    """
    from optuna.trial import TrialState

    done = set(study.user_attrs.get(LOGGED_ATTR, []))
    finished = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)
    new = [t for t in study.get_trials(deepcopy=False, states=finished) if t.number not in done]
    for t in new:
        reason = t.user_attrs.get("fail_reason", t.user_attrs.get("prune_reason", ""))
        with tracker.child(f"trial-{t.number}", params=dict(t.params),
                           status=RUN_STATUS[t.state.name]) as child:
            child.set_tags({"optuna.study": study.study_name, "optuna.trial": t.number,
                            "optuna.state": t.state.name, "optuna.reason": reason[:500]})
            for step, value in sorted(t.intermediate_values.items()):
                child.log_metrics({f"fold0_{metric}": value}, step=step)
            if t.value is not None:
                child.log_metrics({metric: t.value})
    return sorted(done | {t.number for t in new})


def _write_results(results: Path, study, rows: List[Dict[str, Any]], top_k: int) -> None:
    from nnpipe.search import save_plots, top_trials

    with open(results / "trials.csv", "w", newline="") as fh:
        keys = sorted({k for r in rows for k in r}, key=lambda k: (k.startswith("params."), k))
        writer = csv.DictWriter(fh, keys)
        writer.writeheader()
        writer.writerows(rows)
    (results / "top_trials.json").write_text(json.dumps(
        top_trials(study, top_k), indent=2, default=str))
    save_plots(study, results / "plots")


def _body(args, cfg, outputs):
    from nnpipe.search import best_overrides, fixed_by_params, run_search, trials_table

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
    fixed = fixed_by_params(raw, settings.space)
    space = {k: spec for k, spec in settings.space.items() if k not in fixed}
    with tracker_for(cfg, "search") as tracker:
        study = run_search(raw, ds.X_train, ds.y_train, ds.task, ds.input_shape,
                           settings=settings, journal=args.journal)
        tracker.set_tags({"mlflow.runName": f"search · {study.study_name} · "
                                            f"{settings.n_trials} trials",
                          "optuna.study": study.study_name})
        rows = trials_table(study)
        logged = log_trials(tracker, study, settings.metric)
        if cfg.tracking.enabled:
            study.set_user_attr(LOGGED_ATTR, logged)
        best = best_overrides(study, space)
        outputs.json(args.best, best)
        results = outputs.path(args.results, is_dir=True)
        _write_results(results, study, rows, settings.top_k)
        tracker.log_params({f"best.{k}": v for k, v in best.items()})
        tracker.log_metrics({f"best_{settings.metric}": study.best_value,
                             "n_trials": len(rows)})
        tracker.log_artifacts(results)
    print(f"[search] best {settings.metric}={study.best_value:.4f} with {best}")


def main(argv=None):
    run("search", _body, _args, argv)


if __name__ == "__main__":
    main()

"""Many processes against one PostgreSQL server at once: nnpipe's search budget and its MLflow
tracking under real contention (issue #7).

Every test gets a fresh database on the server at 127.0.0.1:5432 (dropped afterwards), so the
workers also race to create Optuna's / MLflow's tables. Workers are separate OS processes that
start together behind a file barrier; their stdout and stderr are kept in files and checked.
"""

import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
#: what must never appear in a worker's stderr
DB_ERRORS = ("Traceback", "OperationalError", "IntegrityError", "ProgrammingError",
             "deadlock", "UniqueViolation", "could not serialize", "TrackingWarning")


def _env():
    env = dict(os.environ)
    env.pop("MLFLOW_TRACKING_URI", None)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    return env


def _run_workers(script, argvs, cwd: Path, timeout: float):
    """Start one process per argv (all at once), wait for all; ``[(rc, stdout, stderr)]``."""
    procs, files = [], []
    try:
        for i, argv in enumerate(argvs):
            out, err = open(cwd / f"w{i}.out", "w+"), open(cwd / f"w{i}.err", "w+")
            files.append((out, err))
            procs.append(subprocess.Popen([sys.executable, "-c", script, *map(str, argv)],
                                          stdout=out, stderr=err, cwd=cwd, env=_env()))
        deadline = time.monotonic() + timeout
        for p in procs:
            p.wait(timeout=max(1.0, deadline - time.monotonic()))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    results = []
    for p, (out, err) in zip(procs, files):
        out.seek(0)
        err.seek(0)
        results.append((p.returncode, out.read(), err.read()))
        out.close()
        err.close()
    return results


def _check_clean_exit(results):
    for i, (rc, out, err) in enumerate(results):
        assert rc == 0, f"worker {i} exited {rc}:\n{err[-4000:]}"
        bad = [word for word in DB_ERRORS if word.lower() in err.lower()]
        assert not bad, f"worker {i} stderr mentions {bad}:\n{err[-4000:]}"


# the barrier: every worker waits until all have imported what they need, then goes at once
_BARRIER = """
def barrier(folder, me, n):
    import os, time
    open(os.path.join(folder, f"ready-{me}"), "w").close()
    deadline = time.monotonic() + 120
    while sum(f.startswith("ready-") for f in os.listdir(folder)) < n:
        if time.monotonic() > deadline:
            raise SystemExit(f"worker {me}: the other workers never became ready")
        time.sleep(0.005)
"""

# --------------------------------------------------------------------------- the search budget

SEARCH_WORKER = _BARRIER + r"""
import os, random, sys, time, types

repo, url, study_name, me, n_workers, n_trials, folder = sys.argv[1:8]
me, n_workers, n_trials = int(me), int(n_workers), int(n_trials)
# nnpipe/__init__ imports the estimators (torch, skorch); nnpipe.search itself does not need
# them, so load it as a submodule of a bare package: the workers start in a second, not five
package = types.ModuleType("nnpipe")
package.__path__ = [os.path.join(repo, "nnpipe")]
sys.modules["nnpipe"] = package
from nnpipe.search import SearchSettings, make_study, optimize

assert "torch" not in sys.modules
settings = SearchSettings.from_section(
    {"enabled": True, "n_trials": n_trials, "sampler": "random", "pruner": "none",
     "metric": "rmse", "storage": url, "study_name": study_name, "random_state": 0})
rng = random.Random(me)


def objective(trial):
    x = trial.suggest_float("x", -5.0, 5.0)
    trial.set_user_attr("worker", me)
    time.sleep(rng.uniform(0.0, 0.01))  # so that the workers' trials interleave
    print(f"ran trial {trial.number}", flush=True)
    return (x - 1.0) ** 2


barrier(folder, me, n_workers)  # all at once: they also race to create Optuna's tables
study = make_study(settings, "", worker=me)
optimize(study, objective, settings, "")
print("done", flush=True)
"""


def test_eight_workers_on_one_postgres_study_run_exactly_the_budget(pg_url, tmp_path):
    """8 processes run nnpipe's own search loop (``nnpipe.search.optimize``) on one study with
    ``n_trials=200``: the advisory-lock budget must stop them at exactly 200 finished trials,
    numbered 0..199 once each, none left RUNNING, no worker hitting a database error."""
    import optuna
    from optuna.trial import TrialState

    url = pg_url
    n_workers, n_trials, name = 8, 200, "many-workers"
    barrier = tmp_path / "barrier"
    barrier.mkdir()
    start = time.monotonic()
    results = _run_workers(SEARCH_WORKER, [(REPO, url, name, w, n_workers, n_trials, barrier)
                                           for w in range(n_workers)], tmp_path, timeout=300)
    elapsed = time.monotonic() - start
    _check_clean_exit(results)
    assert all(out.rstrip().endswith("done") for _, out, _ in results)

    trials = optuna.load_study(study_name=name, storage=url).get_trials(deepcopy=False)
    states = {s.name: sum(t.state == s for t in trials) for s in TrialState}
    assert len(trials) == n_trials, states
    assert states["COMPLETE"] == n_trials, states  # none RUNNING, WAITING, FAIL or PRUNED
    assert sorted(t.number for t in trials) == list(range(n_trials))  # unique, no gaps
    assert all(t.value == pytest.approx((t.params["x"] - 1.0) ** 2) for t in trials)

    # every trial ran in exactly one worker: the one that recorded it
    ran = {w: [int(line.split()[-1]) for line in out.splitlines() if line.startswith("ran trial")]
           for w, (_, out, _) in enumerate(results)}
    assert sorted(n for numbers in ran.values() for n in numbers) == list(range(n_trials))
    assert {t.number: t.user_attrs["worker"] for t in trials} == \
        {n: w for w, numbers in ran.items() for n in numbers}
    # the work was really shared (each worker waits at the barrier, then competes for the lock)
    busy = {w: len(numbers) for w, numbers in ran.items()}
    assert sum(count > 0 for count in busy.values()) >= n_workers // 2, busy
    print(f"\n{n_workers} workers, {n_trials} trials in {elapsed:.1f}s; per worker: {busy}")


# --------------------------------------------------------------------------- MLflow tracking

N_STEPS, METRICS = 50, ("loss", "acc", "lr")


def _value(worker: int, metric: int, step: int) -> float:
    """What worker ``worker`` logs as metric number ``metric`` at ``step`` (full float64)."""
    return math.sin(1.0 + worker * 100 + metric * 10 + step) * 10 ** (metric - 1)


TRACKING_WORKER = _BARRIER + r"""
import json, math, sys, warnings

uri, experiment, me, n_workers, outbox, folder, report, n_steps, fit = sys.argv[1:10]
me, n_workers, n_steps, fit = int(me), int(n_workers), int(n_steps), fit == "1"
from nnpipe.tracking import Tracker, TrackingWarning, epoch_metrics

if fit:
    import numpy as np
    import torch

    from nnpipe import NNClassifier

    torch.set_num_threads(1)
    rng = np.random.RandomState(me)
    y = rng.randint(0, 3, size=150)
    X = (rng.normal(scale=3.0, size=(3, 6))[y] + rng.normal(size=(150, 6))).astype(np.float32)

METRICS = ("loss", "acc", "lr")


def value(worker, metric, step):
    return math.sin(1.0 + worker * 100 + metric * 10 + step) * 10 ** (metric - 1)


barrier(folder, me, n_workers)
out = {}
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    with Tracker(f"worker-{me}", params={"worker": me, "train": {"lr": 0.01}},
                 experiment=experiment, uri=uri, outbox=outbox) as run:
        for step in range(n_steps):
            run.log_metrics({name: value(me, k, step) for k, name in enumerate(METRICS)},
                            step=step)
        if fit:
            net = NNClassifier("mlp", module__hidden_sizes=[8], max_epochs=15, lr=0.01,
                               random_state=me, callbacks=[("mlflow", run.epoch_logger("fit."))])
            net.fit(X, y)
            # what changes per epoch, every epoch; a constant (lr) once, at the last epoch;
            # batch counts never (nnpipe.tracking.epoch_metrics)
            per_epoch, final = epoch_metrics(net.history)
            out["fit"] = {}
            for step, values in per_epoch:
                for k, v in values.items():
                    out["fit"].setdefault(f"fit.{k}", []).append([step, v])
            out["fit"].update({f"fit.{k}": [[per_epoch[-1][0], v]] for k, v in final.items()})
            assert "fit.train_loss" in out["fit"]
            assert not any("batch_count" in k for k in out["fit"])
        out["offline_during"] = run.offline
    out.update(run_id=run.run_id, status=run.status, offline=run.offline,
               warnings=[f"{w.category.__name__}: {w.message}" for w in caught
                         if issubclass(w.category, TrackingWarning)])
with open(report, "w") as fh:
    json.dump(out, fh)
"""


def test_concurrent_trackers_log_every_metric_to_postgres(pg_url, tmp_path):
    """4 processes, each an nnpipe ``Tracker`` run in one experiment on one PostgreSQL tracking
    store at the same time, log 3 metrics x 50 steps (one also fits an NNClassifier with the
    tracker's epoch logger): every run ends FINISHED with every metric's full history, and no
    tracker fell back to its offline outbox.

    The database is empty: the workers also race to create MLflow's tables (whose migrations
    are not safe to run concurrently; nnpipe's trackers take turns under an advisory lock) and
    the experiment.
    """
    uri = pg_url
    results, reports = _track(uri, tmp_path)
    _check_clean_exit(results)
    assert not list((tmp_path / "outbox").glob("*")), "a tracker went offline"
    for w, report in enumerate(reports):
        assert report["status"] == "FINISHED" and not report["offline"], report
        assert not report["offline_during"] and not report["warnings"], report
    _check_store(uri, reports)


def _track(uri, tmp_path, n_workers=4):
    barrier = tmp_path / "barrier"
    barrier.mkdir()
    argvs = [(uri, "many-trackers", w, n_workers, tmp_path / "outbox", barrier,
              tmp_path / f"report{w}.json", N_STEPS, int(w == 0)) for w in range(n_workers)]
    results = _run_workers(TRACKING_WORKER, argvs, tmp_path, timeout=300)
    reports = []
    for w in range(n_workers):
        path = tmp_path / f"report{w}.json"
        assert path.exists(), f"worker {w} wrote no report:\n{results[w][2][-4000:]}"
        reports.append({"worker": w, **json.loads(path.read_text())})
    return results, reports


def _check_store(uri, reports):
    """Every run FINISHED, in one experiment, with exactly the metric histories logged."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    assert len({r["run_id"] for r in reports}) == len(reports)
    experiments = set()
    for report in reports:
        w = report["worker"]
        run = client.get_run(report["run_id"])
        experiments.add(run.info.experiment_id)
        assert run.info.status == "FINISHED", (w, run.info)
        assert run.data.params["worker"] == str(w) and run.data.params["train.lr"] == "0.01"
        expected = {name: [(step, _value(w, k, step)) for step in range(N_STEPS)]
                    for k, name in enumerate(METRICS)}
        expected.update({name: [tuple(pair) for pair in pairs]
                         for name, pairs in report.get("fit", {}).items()})
        assert set(run.data.metrics) == set(expected), (w, sorted(run.data.metrics))
        for name, points in expected.items():
            history = sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id,
                                                                                   name))
            assert history == points, (w, name)  # every step, exactly once, bit-identical
    assert len(experiments) == 1  # the racing workers created the experiment once
    assert any("fit" in r for r in reports)

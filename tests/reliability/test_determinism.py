"""Determinism (issue #7, item 9): the same parameters and seed on the CPU give bitwise-identical
weights, predictions and metrics -- for one fit, a cross-validation, a parallel ensemble and a
parallel search; in one process and across fresh processes.

Every comparison is bitwise: ``torch.equal``, ``np.array_equal`` and ``==`` on floats, never
``allclose``. What is *not* guaranteed: the same bits under a different torch thread count (CPU
kernels such as convolution and batch norm split their reductions by thread), and, with parallel
search workers, which worker runs which trial and in what order (see
``test_two_worker_search_guarantees`` for what does hold).

The test process runs torch on one thread (tests/conftest.py); the thread count is part of what
must match: CPU kernels (convolution, batch norm) split their reductions by thread.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits
from sklearn.pipeline import Pipeline

from nnpipe import NNClassifier
from nnpipe.cv import cross_validate_model
from nnpipe.ensemble import EnsembleClassifier
from nnpipe.preprocessing import Standardizer

REPO = Path(__file__).resolve().parents[2]

#: augmentation ops drawing from every kind of random source: flips (Bernoulli), a fused affine
#: warp (uniform angles), crops (integer offsets), Gaussian noise, cutout squares
AUGMENT = {"hflip": {"p": 0.5}, "rotation": {"degrees": 10.0}, "crop": {"padding": 1},
           "noise": {"std": 0.05}, "cutout": {"size": 0.25}}


def digits_subset(n: int = 360):
    X, y = load_digits(return_X_y=True)
    return (X[:n] / 16.0).astype(np.float32), y[:n]


def cnn(**kw) -> NNClassifier:
    """A CNN that consumes randomness everywhere: init, shuffling, validation split, dropout,
    batch norm (batch statistics), augmentation."""
    return NNClassifier(**{"module": "cnn2d", "input_shape": (1, 8, 8),
                           "module__channels": [4, 8], "batch_norm": True, "dropout": 0.25,
                           "augment": AUGMENT, "max_epochs": 2, "batch_size": 32,
                           "train_split": 0.2, "random_state": 0, **kw})


def mlp(**kw) -> NNClassifier:
    return NNClassifier(**{"module__hidden_sizes": [32], "dropout": 0.2, "max_epochs": 3,
                           "lr": 3e-3, "random_state": 0, **kw})


# --------------------------------------------------------------------------- bitwise comparisons

def _history(net) -> list:
    """Every number in the history but the wall-clock durations."""
    rows = []
    for row in net.history:
        rows.append({"epoch": {k: v for k, v in row.items() if k not in ("batches", "dur")},
                     "batches": [{k: v for k, v in b.items()} for b in row["batches"]]})
    return rows


def assert_same_net(a, b, X) -> None:
    sa, sb = a.module_.state_dict(), b.module_.state_dict()
    assert list(sa) == list(sb)
    different = [k for k in sa if not torch.equal(sa[k], sb[k])]
    assert not different, f"weights differ in {different}"
    assert np.array_equal(a.predict_proba(X), b.predict_proba(X))
    assert _history(a) == _history(b)  # losses and scores, float ==


def _hash_floats(h, values) -> None:
    for v in values:
        h.update(float(v).hex().encode() if v is not None else b"None")


def net_digest(net, X) -> str:
    h = hashlib.sha256()
    for key, value in net.module_.state_dict().items():
        h.update(key.encode())
        h.update(value.detach().cpu().contiguous().numpy().tobytes())
    h.update(np.ascontiguousarray(net.predict_proba(X)).tobytes())
    h.update(json.dumps(_history(net), sort_keys=True, default=float.hex).encode())
    return h.hexdigest()


def cv_digest(result) -> str:
    h = hashlib.sha256()
    for metrics in result.fold_metrics:
        h.update(json.dumps(sorted(metrics)).encode())
        _hash_floats(h, [metrics[k] for k in sorted(metrics)])
    h.update(np.ascontiguousarray(result.oof).tobytes())
    return h.hexdigest()


def ensemble_digest(ens, X) -> str:
    h = hashlib.sha256()
    for member in ens.members_:
        h.update(net_digest(member, X).encode())
    h.update(np.ascontiguousarray(ens.predict_proba(X)).tobytes())
    h.update(repr(ens.member_seeds_).encode())
    return h.hexdigest()


def run_cv(X, y):
    pipe = Pipeline([("std", Standardizer()), ("net", cnn(train_split=None))])
    return cross_validate_model(pipe, X, y, folds=3, random_state=0)


def digests() -> dict:
    """One digest per configuration; the cross-process test compares these between processes."""
    X, y = digits_subset()
    return {
        "cnn": net_digest(cnn().fit(X, y), X),
        "cv": cv_digest(run_cv(X, y)),
        "ensemble": ensemble_digest(
            EnsembleClassifier(cnn(train_split=None), n_members=2, n_jobs=2).fit(X, y), X),
    }


@pytest.fixture
def one_thread():
    """Run the test on one torch thread (what conftest sets), whatever ran before."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


# --------------------------------------------------------------------------- (1) a single fit

@pytest.mark.parametrize("make", [mlp, cnn], ids=["mlp_dropout", "cnn_bn_dropout_augment"])
def test_a_seeded_fit_is_bitwise_repeatable(make, one_thread):
    X, y = digits_subset()
    first = make().fit(X, y)
    # whatever the global generators hold, the fit draws only from its own seed ...
    torch.manual_seed(1234)
    torch.rand(17)
    np.random.seed(99)
    random.seed(7)
    state = torch.get_rng_state()
    second = make().fit(X, y)
    # ... and leaves them untouched
    assert torch.equal(torch.get_rng_state(), state)
    assert_same_net(first, second, X)
    # not vacuous: the seed does reach the random parts
    other = make(random_state=1).fit(X, y)
    assert not torch.equal(other.module_.state_dict()["output.weight"],
                           first.module_.state_dict()["output.weight"])
    assert _history(other) != _history(first)


def test_partial_fit_after_fit_is_repeatable(one_thread):
    """Regression: partial_fit drew from the global RNG: fit + partial_fit differed run to run."""
    X, y = digits_subset()
    runs = []
    for _ in range(2):
        net = cnn(max_epochs=1).fit(X, y)
        torch.rand(5)  # the global generator moves between the runs
        runs.append(net.partial_fit(X, y).partial_fit(X, y))
    assert len(runs[0].history) == 3
    assert_same_net(runs[0], runs[1], X)


def test_seeded_fits_in_concurrent_threads_match_sequential_fits(one_thread):
    """Regression: torch's generator is process-wide; two seeded fits in threads interleaved their
    draws (joblib's threading backend, an in-process dask cluster). nnpipe trains one network at a
    time per process, so the results are those of sequential fits."""
    X, y = digits_subset()
    sequential = [mlp(random_state=s).fit(X, y) for s in (0, 1)]
    with ThreadPoolExecutor(2) as pool:
        threaded = list(pool.map(lambda s: mlp(random_state=s).fit(X, y), (0, 1)))
    for a, b in zip(sequential, threaded):
        assert_same_net(a, b, X)


def test_threading_ensemble_matches_the_sequential_one_and_leaks_no_thread_count(one_thread):
    X, y = digits_subset(240)
    base = mlp(max_epochs=2, train_split=None)
    seq = EnsembleClassifier(base, n_members=2, n_jobs=1).fit(X, y)
    thr = EnsembleClassifier(base, n_members=2, n_jobs=2, backend="threading").fit(X, y)
    assert np.array_equal(seq.predict_proba(X), thr.predict_proba(X))
    for a, b in zip(seq.members_, thr.members_):
        assert_same_net(a, b, X)
    # worker threads train with the caller's thread count, whatever it is (fits take turns) ...
    torch.set_num_threads(2)
    seq2 = EnsembleClassifier(base, n_members=2, n_jobs=1).fit(X, y)
    thr2 = EnsembleClassifier(base, n_members=2, n_jobs=2, backend="threading").fit(X, y)
    assert np.array_equal(seq2.predict_proba(X), thr2.predict_proba(X))
    # ... and leave it: a worker thread's torch.set_num_threads(1) used to become the count
    # every later thread of the process started with
    seen = []
    t = threading.Thread(target=lambda: seen.append(torch.get_num_threads()))
    t.start()
    t.join()
    assert seen == [2] and torch.get_num_threads() == 2


# --------------------------------------------------------------------------- (2) cross-validation

def test_cross_validation_is_bitwise_repeatable(one_thread):
    X, y = digits_subset()
    a, b = run_cv(X, y), run_cv(X, y)
    assert a.fold_metrics == b.fold_metrics  # dicts of floats, ==
    assert np.array_equal(a.oof, b.oof)
    for fa, fb in zip(a.folds, b.folds):
        assert np.array_equal(fa["train"], fb["train"]) and np.array_equal(fa["test"], fb["test"])
    strip = [[{k: v for k, v in row.items() if k not in ("dur", "batches")} for row in h]
             for h in a.histories]
    assert strip == [[{k: v for k, v in row.items() if k not in ("dur", "batches")} for row in h]
                     for h in b.histories]


# --------------------------------------------------------------------------- (3) 2-worker ensemble

@pytest.mark.slow
def test_two_worker_ensemble_is_bitwise_repeatable_and_equals_one_worker(one_thread):
    X, y = digits_subset()
    make = lambda n_jobs: EnsembleClassifier(cnn(train_split=None), n_members=2,  # noqa: E731
                                             n_jobs=n_jobs).fit(X, y)
    a, b = make(2), make(2)
    assert a.member_seeds_ == b.member_seeds_ == [0, 1]
    for ma, mb in zip(a.members_, b.members_):
        assert_same_net(ma, mb, X)
    assert np.array_equal(a.predict_proba(X), b.predict_proba(X))
    # loky workers train on one thread; so does this process here: n_jobs changes nothing
    c = make(1)
    for ma, mc in zip(a.members_, c.members_):
        assert_same_net(ma, mc, X)


# --------------------------------------------------------------------------- (4) the search

SEARCH_BASE = {  # lr and dropout are searched, so not set here (a set value would be fixed)
    "model": {"module": "mlp", "module__hidden_sizes": [16]},
    "train": {"max_epochs": 3, "random_state": 0, "verbose": 0, "train_split": None},
}
SPACE = {"train.lr": {"type": "float", "low": 1e-3, "high": 5e-2, "log": True},
         "model.dropout": {"type": "float", "low": 0.0, "high": 0.5}}
GRID = {"train.lr": {"type": "categorical", "choices": [0.003, 0.01, 0.03]},
        "model.dropout": {"type": "categorical", "choices": [0.0, 0.3]}}


def _search(tmp_path, name, X, y, epochs=3, **search):
    from nnpipe.search import run_search

    raw = {**SEARCH_BASE, "train": {**SEARCH_BASE["train"], "max_epochs": epochs},
           "search": {"enabled": True, "holdout": 0.3, "random_state": 0, "space": SPACE,
                      **search}}
    study = run_search(raw, X, y, "classification", journal=tmp_path / f"{name}.journal")
    return sorted(study.get_trials(), key=lambda t: t.number)


def _record(trial) -> tuple:
    attrs = {k: trial.user_attrs.get(k) for k in ("overrides", "fold_scores", "epochs",
                                                   "prune_reason", "fail_reason")}
    return (trial.number, trial.state.name, trial.params, trial.value,
            sorted(trial.intermediate_values.items()), attrs)


@pytest.mark.slow
def test_one_worker_search_repeats_the_trial_sequence(tmp_path, blobs, one_thread):
    """n_jobs=1: numbers, parameters, states, values, pruning decisions all repeat -- with TPE
    past its 10 random start-up trials and the median pruner."""
    X, y = blobs
    kw = dict(n_trials=12, n_jobs=1, sampler="tpe", pruner="median")
    a = _search(tmp_path, "a", X, y, **kw)
    b = _search(tmp_path, "b", X, y, **kw)
    assert len(a) == 12
    assert [_record(t) for t in a] == [_record(t) for t in b]


def _stream(seed: int, n: int, space: dict) -> list:
    """The parameters a RandomSampler seeded ``seed`` proposes, in order (no training)."""
    import optuna

    from nnpipe.search import _sampler, parse_space, suggest

    parsed = parse_space(space)
    study = optuna.create_study(sampler=_sampler("random", seed, parsed))
    out = []
    for _ in range(n):
        trial = study.ask()
        suggest(trial, parsed, SEARCH_BASE)
        out.append(trial.params)
        study.tell(trial, 0.0)
    return out


def _as_prefix_split(params: list, streams: list) -> list:
    """How many of ``params`` come from each stream, if they are prefixes of them; else fail."""
    remaining = [dict(p) for p in params]
    taken = []
    for stream in streams:
        k = 0
        while k < len(stream) and stream[k] in remaining:
            remaining.remove(stream[k])
            k += 1
        taken.append(k)
    assert not remaining, f"trials from no worker's seeded stream: {remaining}"
    return taken


@pytest.mark.slow
def test_two_worker_search_guarantees(tmp_path, blobs, one_thread):
    """n_jobs=2: which worker runs which trial, and when, depends on timing. What holds:

    * a trial's value is a function of its parameters (same parameters: bitwise the same value),
    * with the random sampler, worker w proposes the parameters of RandomSampler(seed=random_state
      + w) in order, so each worker's trials are a prefix of its own seeded stream (how many
      each runs is timing),
    * with the grid sampler and n_trials >= the grid, the *set* of (parameters, value) is exact.
    """
    X, y = blobs
    # trials long enough (~1-2 s) that the spawned worker starts before the budget is spent
    runs = [_search(tmp_path, f"r{i}", X, y, epochs=30, n_trials=8, n_jobs=2,
                    sampler="random", pruner="none") for i in range(2)]
    streams = [_stream(0, 8, SPACE), _stream(1, 8, SPACE)]
    values = {}
    for trials in runs:
        assert len(trials) == 8 and all(t.state.name == "COMPLETE" for t in trials)
        split = _as_prefix_split([t.params for t in trials], streams)
        assert sum(split) == 8
        for t in trials:
            key = json.dumps(t.params, sort_keys=True)
            assert values.setdefault(key, t.value) == t.value  # bitwise, float ==
    grids = [_search(tmp_path, f"g{i}", X, y, epochs=30, n_trials=6, n_jobs=2,
                     sampler="grid", pruner="none", space=GRID) for i in range(2)]
    sets = [sorted((json.dumps(t.params, sort_keys=True), t.value) for t in g) for g in grids]
    assert len(sets[0]) == 6 and len({p for p, _ in sets[0]}) == 6  # every grid point once
    assert sets[0] == sets[1]


# --------------------------------------------------------------------------- fresh processes

_SCRIPT = """
import json, sys, torch
torch.set_num_threads(1)
from tests.reliability.test_determinism import digests
print("DIGESTS " + json.dumps(digests()))
"""


def _fresh_digests(hash_seed: str) -> dict:
    env = {**os.environ, "PYTHONHASHSEED": hash_seed,
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run([sys.executable, "-c", _SCRIPT], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("DIGESTS ")][-1]
    return json.loads(line[len("DIGESTS "):])


@pytest.mark.slow
def test_two_fresh_processes_and_this_one_agree_bitwise(one_thread):
    """Different hash seeds, fresh interpreters, fresh loky workers: the same bits."""
    first, second = _fresh_digests("0"), _fresh_digests("4242")
    assert first == second
    assert digests() == first


_DASK_SCRIPT = """
import json, os, torch
torch.set_num_threads(1)
import distributed
from nnpipe.ensemble import EnsembleClassifier
from tests.reliability.test_determinism import cnn, digits_subset, ensemble_digest, net_digest
X, y = digits_subset(240)
def loky():
    return ensemble_digest(EnsembleClassifier(cnn(train_split=None), n_members=2, n_jobs=2)
                           .fit(X, y), X)
if __name__ == "__main__":
    before, single = loky(), net_digest(cnn().fit(X, y), X)
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                  dashboard_address=None) as cluster, distributed.Client(cluster):
        dask = ensemble_digest(EnsembleClassifier(cnn(train_split=None), n_members=2, n_jobs=2,
                                                  backend="dask").fit(X, y), X)
    with distributed.LocalCluster(n_workers=1, threads_per_worker=2, processes=False,
                                  dashboard_address=None) as cluster, distributed.Client(cluster):
        threads = ensemble_digest(EnsembleClassifier(cnn(train_split=None), n_members=2, n_jobs=2,
                                                     backend="dask").fit(X, y), X)
    print("RESULT " + json.dumps({
        "before": before, "dask": dask, "in_process_dask": threads, "after": loky(),
        "single_after": net_digest(cnn().fit(X, y), X), "single": single,
        "torch_threads": torch.get_num_threads(), "omp_env": os.environ.get("OMP_NUM_THREADS")}))
"""


@pytest.mark.slow
def test_a_dask_cluster_in_the_process_changes_no_later_result(tmp_path):
    """dask on worker processes and on in-process threads, then loky again: the same bits.

    (dask's nanny does leave ``OMP_NUM_THREADS=1`` etc. in this process's ``os.environ``: only
    processes started later and not setting their thread count see it; nnpipe's workers set it.)
    """
    pytest.importorskip("distributed")
    script = tmp_path / "dask_determinism.py"
    script.write_text(_DASK_SCRIPT)
    env = {**os.environ,
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run([sys.executable, str(script)], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=500)
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")][-1]
    r = json.loads(line[len("RESULT "):])
    assert r["before"] == r["dask"] == r["in_process_dask"] == r["after"]
    assert r["single"] == r["single_after"] and r["torch_threads"] == 1

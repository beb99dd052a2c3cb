"""Ensembles: member strategies, combiners, uncertainty, calibration, parallelism, persistence."""

import copy
import pickle

import numpy as np
import pytest
import torch
from skorch.callbacks import Callback
from sklearn.base import clone
from sklearn.model_selection import train_test_split
from sklearn.utils.estimator_checks import parametrize_with_checks

from nnpipe import NNClassifier, NNRegressor, load, save
from nnpipe.ensemble import EnsembleClassifier, EnsembleRegressor
from nnpipe.metrics import ece, nll


@pytest.fixture(scope="module")
def small_digits(digits):
    Xtr, Xte, ytr, yte = digits
    return Xtr[:600], Xte, ytr[:600], yte


def _mlp(**kw):
    return NNClassifier(**{"max_epochs": 6, "lr": 3e-3, "module__hidden_sizes": [32],
                           "dropout": 0.2, "train_split": None, **kw})


def test_seed_ensemble_beats_its_average_member(small_digits):
    Xtr, Xte, ytr, yte = small_digits
    ens = EnsembleClassifier(_mlp(), kind="seeds", n_members=5).fit(Xtr, ytr)
    P = ens.member_outputs(Xte)
    assert ens.member_seeds_ == [0, 1, 2, 3, 4]
    assert not np.allclose(P[0], P[1])  # different seeds, different members
    member_nll = np.mean([nll(yte, p) for p in P])
    member_acc = np.mean([(p.argmax(1) == yte).mean() for p in P])
    assert nll(yte, ens.predict_proba(Xte)) < member_nll
    assert ens.score(Xte, yte) >= member_acc
    report = ens.uncertainty(Xte)
    assert set(report) == {"predictive_entropy", "expected_entropy", "mutual_information",
                           "disagreement"}
    assert report["mutual_information"].shape == (len(Xte),)
    wrong = ens.predict(Xte) != yte
    assert report["predictive_entropy"][wrong].mean() > report["predictive_entropy"][~wrong].mean()


def test_parallel_members_are_deterministic(blobs):
    X, y = blobs
    a = EnsembleClassifier(_mlp(), n_members=3, n_jobs=2).fit(X, y).predict_proba(X)
    b = EnsembleClassifier(_mlp(), n_members=3, n_jobs=2).fit(X, y).predict_proba(X)
    np.testing.assert_array_equal(a, b)  # bitwise, run to run
    # in-process members match up to CPU kernels' float differences (thread pools differ)
    c = EnsembleClassifier(_mlp(), n_members=3, n_jobs=1).fit(X, y).predict_proba(X)
    np.testing.assert_allclose(a, c, atol=2e-2)


def test_bagging_trains_members_on_different_bootstrap_samples(blobs):
    X, y = blobs
    ens = EnsembleClassifier(_mlp(), kind="bagging", n_members=3).fit(X, y)
    P = ens.member_outputs(X)
    assert len(ens.members_) == 3 and not np.allclose(P[0], P[1])


class _Weights(Callback):
    def initialize(self):
        self.states = []
        return self

    def on_epoch_end(self, net, **kwargs):
        self.states.append(copy.deepcopy(net.module_.state_dict()))


def test_snapshot_members_come_from_the_ends_of_cosine_cycles(blobs):
    X, y = blobs
    ens = EnsembleClassifier(_mlp(max_epochs=9, callbacks=[_Weights()]), kind="snapshot",
                             n_members=3).fit(X, y)
    rec = dict(ens.members_[0].callbacks_)["_Weights"]  # the fitted copy of the recorder
    assert len(ens.members_) == 3
    history = ens.members_[0].history
    assert len(history) == 9  # one run, not three
    lrs = history[:, "lr"]
    assert lrs[0] == lrs[3] == lrs[6] == pytest.approx(3e-3)  # restarts every 3 epochs
    for member, epoch in zip(ens.members_, (3, 6, 9)):
        for k, v in member.module_.state_dict().items():
            assert torch.equal(v, rec.states[epoch - 1][k])
    with pytest.raises(ValueError, match="n_members=12 cycles but max_epochs=9"):
        EnsembleClassifier(_mlp(max_epochs=9), kind="snapshot", n_members=12).fit(X, y)


def test_checkpoint_members_are_the_last_epochs(blobs):
    X, y = blobs
    ens = EnsembleClassifier(_mlp(max_epochs=6, callbacks=[_Weights()]), kind="checkpoints",
                             n_members=2).fit(X, y)
    rec = dict(ens.members_[0].callbacks_)["_Weights"]
    for member, epoch in zip(ens.members_, (5, 6)):
        w = member.module_.state_dict()["output.weight"]
        assert torch.equal(w, rec.states[epoch - 1]["output.weight"])


def test_swa_averages_weights_and_recomputes_batch_norm(blobs):
    X, y = blobs
    ens = EnsembleClassifier(_mlp(max_epochs=8, batch_norm=True, callbacks=[_Weights()]),
                             kind="swa", swa_start=0.5).fit(X, y)
    (member,) = ens.members_
    rec = dict(member.callbacks_)["_Weights"]
    expected = torch.stack([s["output.weight"] for s in rec.states[3:]]).mean(0)
    torch.testing.assert_close(member.module_.state_dict()["output.weight"], expected)
    bn = member.module_.hidden[2]
    assert isinstance(bn, torch.nn.BatchNorm1d)
    with torch.no_grad():
        h = member.module_.hidden[1](torch.as_tensor(X))
    # update_bn averages the batch means (batches of 256 rows) with equal weight
    expected_mean = (h[:256].mean(0) + h[256:].mean(0)) / 2
    torch.testing.assert_close(bn.running_mean, expected_mean, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("combine", ["weighted", "greedy", "stacking", "vote"])
def test_combiners(small_digits, combine):
    Xtr, Xte, ytr, yte = small_digits
    ens = EnsembleClassifier(_mlp(max_epochs=20, lr=1e-2), n_members=3, combine=combine,
                             validation_fraction=0.25 if combine != "vote" else None)
    ens.fit(Xtr, ytr)
    proba = ens.predict_proba(Xte)
    np.testing.assert_allclose(proba.sum(1), 1, atol=1e-6)
    assert ens.score(Xte, yte) > 0.85
    assert np.isclose(ens.weights_.sum(), 1) and (ens.weights_ >= 0).all()
    if combine == "greedy":  # selection with replacement: weights are counts / rounds
        counts = ens.weights_ * max(10, 2 * 3)
        np.testing.assert_allclose(counts, np.round(counts), atol=1e-9)
    if combine == "stacking":
        assert ens.meta_ is not None


def test_learned_combiners_need_validation_data(blobs):
    X, y = blobs
    for combine in ("weighted", "greedy", "stacking"):
        with pytest.raises(ValueError, match=f"combine='{combine}' is fitted on validation data"):
            EnsembleClassifier(_mlp(), combine=combine).fit(X, y)


def test_temperature_scaling_lowers_ece_on_held_out_data():
    # overlapping classes and a network trained far past the optimum: overconfident
    rng = np.random.RandomState(0)
    centers = rng.normal(scale=1.2, size=(3, 8))
    y = rng.randint(0, 3, size=2000)
    X = (centers[y] + rng.normal(size=(2000, 8))).astype(np.float32)
    Xtr, Xte, ytr, yte = train_test_split(X, y, test_size=0.5, random_state=0)
    base = _mlp(max_epochs=80, lr=1e-2, dropout=0.0, module__hidden_sizes=[128, 128])
    raw = EnsembleClassifier(base, n_members=2, validation_fraction=0.3).fit(Xtr, ytr)
    cal = EnsembleClassifier(base, n_members=2, validation_fraction=0.3,
                             temperature=True).fit(Xtr, ytr)
    assert cal.temperature_ > 1.2
    assert nll(yte, cal.predict_proba(Xte)) < nll(yte, raw.predict_proba(Xte))
    assert ece(yte, cal.predict_proba(Xte)) < 0.7 * ece(yte, raw.predict_proba(Xte))
    np.testing.assert_array_equal(cal.predict(Xte), raw.predict(Xte))


def test_topk_uses_the_given_configurations(blobs):
    X, y = blobs
    configs = [{"lr": 1e-2, "module__hidden_sizes": [8]}, {"lr": 3e-3, "module__hidden_sizes": [16]}]
    ens = EnsembleClassifier(_mlp(), kind="topk", configs=configs).fit(X, y)
    assert [m.module__hidden_sizes for m in ens.members_] == [[8], [16]]
    with pytest.raises(ValueError, match="topk' needs configs"):
        EnsembleClassifier(_mlp(), kind="topk").fit(X, y)


def test_diverging_members_fail_loudly_after_retries(blobs):
    X, y = blobs
    with pytest.raises(RuntimeError, match="diverged and was not dropped.*seed 0: .*seed 1002: "):
        EnsembleClassifier(_mlp(lr=1e7, optimizer="sgd"), n_members=2, max_retries=1).fit(X, y)


def test_members_that_disagree_on_classes_are_refused():
    rng = np.random.RandomState(0)
    X = rng.normal(size=(60, 4)).astype(np.float32)
    y = np.r_[np.zeros(30, int), np.ones(29, int), [2]]  # class 2 has one row
    with pytest.raises(ValueError, match="disagree on the classes"):
        EnsembleClassifier(_mlp(max_epochs=1), kind="bagging", n_members=5).fit(X, y)


@pytest.mark.parametrize("kwargs, match", [
    (dict(n_members=0), r"ensemble.n_members must be an int >= 1, got 0"),
    (dict(kind="seed"), r"Did you mean 'seeds'"),
    (dict(combine="avg"), r"ensemble.combine must be one of"),
    (dict(validation_fraction=1.5), r"validation_fraction must be a fraction"),
    (dict(backend="spark"), r"ensemble.backend"),
])
def test_bad_ensemble_settings(blobs, kwargs, match):
    X, y = blobs
    with pytest.raises(ValueError, match=match):
        EnsembleClassifier(_mlp(), **kwargs).fit(X, y)


def test_regression_ensemble_with_spread(tmp_path):
    rng = np.random.RandomState(0)
    X = rng.normal(size=(300, 3)).astype(np.float32)
    y = X.sum(1)
    base = NNRegressor(max_epochs=30, lr=1e-2, train_split=None)
    ens = EnsembleRegressor(base, n_members=3, combine="weighted", validation_fraction=0.2)
    ens.fit(X, y)
    mean, std = ens.predict(X, return_std=True)
    assert mean.shape == (300,) and (std > 0).all()
    assert ens.score(X, y) > 0.95
    save(ens, tmp_path / "reg")
    np.testing.assert_allclose(load(tmp_path / "reg").predict(X), mean)
    with pytest.raises(ValueError, match="vote"):
        EnsembleRegressor(base, combine="vote").fit(X, y)


def test_save_load_clone_pickle(small_digits, tmp_path):
    Xtr, Xte, ytr, _ = small_digits
    ens = EnsembleClassifier(_mlp(max_epochs=2), n_members=2, combine="stacking",
                             validation_fraction=0.2).fit(Xtr, ytr)
    save(ens, tmp_path / "ens")
    np.testing.assert_array_equal(load(tmp_path / "ens").predict_proba(Xte),
                                  ens.predict_proba(Xte))
    np.testing.assert_array_equal(pickle.loads(pickle.dumps(ens)).predict_proba(Xte),
                                  ens.predict_proba(Xte))
    twin = clone(ens)
    assert twin.get_params()["combine"] == "stacking" and not hasattr(twin, "members_")


_DASK = """
import numpy as np, sys
import distributed
from nnpipe import NNClassifier
from nnpipe.ensemble import EnsembleClassifier
rng = np.random.RandomState(0)
X = rng.normal(size=(200, 6)).astype(np.float32); y = (X[:, 0] > 0).astype(int)
mk = lambda: NNClassifier(max_epochs=3, module__hidden_sizes=[16], train_split=None)
if __name__ == "__main__":
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                  dashboard_address=None) as cluster, distributed.Client(cluster) as c:
        ens = EnsembleClassifier(mk(), n_members=2, n_jobs=2, backend="dask").fit(X, y)
        ran_on = set(c.run(lambda: 1))
    local = EnsembleClassifier(mk(), n_members=2, n_jobs=2).fit(X, y)
    assert len(ran_on) == 2, ran_on
    np.testing.assert_allclose(ens.predict_proba(X), local.predict_proba(X), atol=1e-6)
    print("dask ok", len(ens.members_))
"""


def test_dask_backend_trains_members_on_a_local_cluster(tmp_path):
    """In a fresh process: a dask.distributed cluster changes process-wide state."""
    import subprocess
    import sys

    pytest.importorskip("distributed")
    script = tmp_path / "dask_ensemble.py"
    script.write_text(_DASK)
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "dask ok 2" in proc.stdout


_FLOAT32 = ("members compute in float32 and PyTorch's CPU kernels block by batch size: a row's "
            "probability differs by ~1e-7 between a batch and a subset, over the check's 1e-7")


@parametrize_with_checks(
    [EnsembleClassifier(NNClassifier(max_epochs=20, lr=1e-2, train_split=None), n_members=2),
     EnsembleRegressor(NNRegressor(max_epochs=20, lr=1e-2, train_split=None), n_members=2)],
    expected_failed_checks=lambda est: (
        {"check_methods_subset_invariance": _FLOAT32}
        if isinstance(est, EnsembleClassifier) else {}),
)
def test_sklearn_checks(estimator, check):
    check(estimator)

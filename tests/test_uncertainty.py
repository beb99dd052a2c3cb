"""MC dropout, the uncertainty decomposition and temperature scaling, on real numbers."""

import math

import numpy as np
import pytest
import torch
from sklearn.exceptions import NotFittedError
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from torch import nn

from nnpipe import NNClassifier
from nnpipe.metrics import ece, nll
from nnpipe.uncertainty import (
    TemperatureScaler,
    disagreement,
    dropout_only,
    expected_entropy,
    mc_dropout_proba,
    mutual_information,
    predictive_entropy,
    uncertainty_report,
)

LOG2 = math.log(2.0)


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def data():
    rng = np.random.RandomState(0)
    centers = rng.normal(scale=2.0, size=(3, 6))
    y = rng.randint(0, 3, size=240)
    X = (centers[y] + rng.normal(size=(240, 6))).astype(np.float32)
    return X, y


@pytest.fixture(scope="module")
def clf(data):
    X, y = data
    return NNClassifier(module__hidden_sizes=[32], dropout=0.5, batch_norm=True, max_epochs=3,
                        random_state=0).fit(X, y)


def _bn_state(module):
    return {name: buf.clone() for name, buf in module.named_buffers()}


def _modes(module):
    return [m.training for m in module.modules()]


# --------------------------------------------------------------------------- MC dropout


def test_mc_dropout_samples_vary_and_leave_the_model_untouched(clf, data):
    X = data[0][:50]
    assert any(isinstance(m, nn.BatchNorm1d) for m in clf.module_.modules())
    buffers = _bn_state(clf.module_)
    assert {n.rsplit(".", 1)[1] for n in buffers} >= {"running_mean", "running_var",
                                                      "num_batches_tracked"}
    modes = _modes(clf.module_)
    assert not any(modes)  # skorch leaves the fitted module in eval mode
    before = clf.predict_proba(X)

    P = mc_dropout_proba(clf, X, n_samples=20, random_state=0)

    assert P.shape == (20, 50, 3) and P.dtype == np.float32
    np.testing.assert_allclose(P.sum(-1), 1.0, atol=1e-5)
    # every pair of samples differs
    flat = P.reshape(20, -1)
    gaps = np.abs(flat[:, None, :] - flat[None, :, :]).max(-1)
    assert gaps[~np.eye(20, dtype=bool)].min() > 1e-4
    assert np.abs(P.mean(0) - before).max() > 1e-3
    # BatchNorm statistics bit-identical, modes restored, predictions deterministic again
    after = _bn_state(clf.module_)
    assert buffers.keys() == after.keys()
    for name, buf in buffers.items():
        assert torch.equal(buf, after[name]), name
    assert _modes(clf.module_) == modes
    np.testing.assert_array_equal(clf.predict_proba(X), before)
    np.testing.assert_array_equal(clf.predict_proba(X), clf.predict_proba(X))


def test_mc_dropout_same_seed_same_samples_and_global_rng_untouched(clf, data):
    X = data[0][:30]
    torch.manual_seed(123)
    state = torch.get_rng_state()
    a = mc_dropout_proba(clf, X, n_samples=5, random_state=7)
    b = mc_dropout_proba(clf, X, n_samples=5, random_state=7)
    c = mc_dropout_proba(clf, X, n_samples=5, random_state=8)
    assert torch.equal(torch.get_rng_state(), state)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    # a RandomState seeds too; None draws from (and so advances) torch's global RNG
    r1 = mc_dropout_proba(clf, X, n_samples=2, random_state=np.random.RandomState(3))
    r2 = mc_dropout_proba(clf, X, n_samples=2, random_state=np.random.RandomState(3))
    np.testing.assert_array_equal(r1, r2)
    torch.manual_seed(5)
    n1 = mc_dropout_proba(clf, X, n_samples=2)
    torch.manual_seed(5)
    n2 = mc_dropout_proba(clf, X, n_samples=2)
    np.testing.assert_array_equal(n1, n2)


def test_mc_dropout_batches_match_single_pass_shape(clf, data):
    X = data[0]
    P = mc_dropout_proba(clf, X, n_samples=3, random_state=0, batch_size=7)
    assert P.shape == (3, len(X), 3)
    np.testing.assert_allclose(P.sum(-1), 1.0, atol=1e-5)
    # a tensor input gives the same samples as the array
    Pt = mc_dropout_proba(clf, torch.as_tensor(X), n_samples=3, random_state=0, batch_size=7)
    np.testing.assert_array_equal(P, Pt)


def test_mc_dropout_restores_modes_on_error(clf):
    clf.module_.hidden[0].train()  # an unusual starting state is restored exactly too
    modes = _modes(clf.module_)
    try:
        with pytest.raises(ValueError, match="features"):
            mc_dropout_proba(clf, np.zeros((4, 99), dtype=np.float32), n_samples=2)
        with pytest.raises(RuntimeError, match="boom"):
            with dropout_only(clf.module_) as active:
                assert active and all(m.training for m in active)
                assert not any(m.training for m in clf.module_.modules()
                               if not isinstance(m, nn.Dropout))
                raise RuntimeError("boom")
        assert _modes(clf.module_) == modes
    finally:
        clf.module_.hidden[0].eval()


def test_dropout_only_covers_every_dropout_kind():
    net = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4), nn.Dropout(0.1), nn.AlphaDropout(0.1),
                        nn.Dropout1d(0.1), nn.Dropout2d(0.1), nn.Dropout3d(0.1),
                        nn.FeatureAlphaDropout(0.1), nn.ReLU()).train()
    with dropout_only(net) as active:
        assert len(active) == 6
        assert [m.training for m in net] == [False, False] + [True] * 6 + [False]
    assert all(m.training for m in net.modules())
    with pytest.raises(ValueError, match="module must be a torch.nn.Module"):
        with dropout_only("net"):
            pass


def test_mc_dropout_without_dropout_is_an_error(data):
    X, y = data
    for dropout in (0.0, None):
        plain = NNClassifier(module__hidden_sizes=[8], dropout=dropout, max_epochs=1,
                             random_state=0).fit(X, y)
        with pytest.raises(ValueError, match=r"MC dropout needs dropout > 0"):
            mc_dropout_proba(plain, X[:5])


def test_mc_dropout_argument_errors(clf, data):
    X = data[0][:5]
    with pytest.raises(ValueError, match=r"n_samples must be an int >= 1, got 0"):
        mc_dropout_proba(clf, X, n_samples=0)
    with pytest.raises(ValueError, match=r"batch_size must be an int >= 1"):
        mc_dropout_proba(clf, X, batch_size=1.5)
    with pytest.raises(ValueError, match=r"random_state must be"):
        mc_dropout_proba(clf, X, random_state="seed")
    with pytest.raises(ValueError, match=r"estimator must be a fitted NNClassifier"):
        mc_dropout_proba(StandardScaler(), X)
    with pytest.raises(NotFittedError):
        mc_dropout_proba(NNClassifier(dropout=0.5), X)


def test_mc_dropout_accepts_a_pipeline(data):
    X, y = data
    pipe = make_pipeline(StandardScaler(), NNClassifier(module__hidden_sizes=[16], dropout=0.3,
                                                        max_epochs=2, random_state=0))
    pipe.fit(X * 10 + 5, y)
    P = mc_dropout_proba(pipe, X[:20] * 10 + 5, n_samples=4, random_state=0)
    direct = mc_dropout_proba(pipe[-1], pipe[0].transform(X[:20] * 10 + 5), n_samples=4,
                              random_state=0)
    np.testing.assert_array_equal(P, direct)
    with pytest.raises(ValueError, match="Pipeline ending with StandardScaler"):
        mc_dropout_proba(make_pipeline(StandardScaler()).fit(X), X)


def test_mc_dropout_nll_criterion_uses_exp(data):
    X, y = data
    net = NNClassifier(module__hidden_sizes=[16], dropout=0.3, criterion="nll", max_epochs=2,
                       random_state=0).fit(X, y)
    P = mc_dropout_proba(net, X[:10], n_samples=3, random_state=0)
    np.testing.assert_allclose(P.sum(-1), 1.0, atol=1e-5)
    assert (P >= 0).all()


# --------------------------------------------------------------------------- decomposition


def test_identical_members_have_no_epistemic_uncertainty():
    p = np.array([[0.7, 0.2, 0.1], [0.1, 0.1, 0.8], [1 / 3, 1 / 3, 1 / 3]])
    P = np.stack([p] * 5)
    r = uncertainty_report(P)
    np.testing.assert_allclose(r["mutual_information"], 0.0, atol=1e-12)
    assert (r["mutual_information"] >= 0).all()
    np.testing.assert_array_equal(r["disagreement"], 0.0)
    np.testing.assert_allclose(r["predictive_entropy"], predictive_entropy(p), atol=1e-12)
    np.testing.assert_allclose(r["expected_entropy"], predictive_entropy(p), atol=1e-12)


def test_confident_members_that_disagree_are_all_epistemic():
    P = np.array([[[1.0, 0.0]], [[0.0, 1.0]]])
    np.testing.assert_allclose(mutual_information(P), [LOG2], rtol=1e-12)
    np.testing.assert_allclose(expected_entropy(P), [0.0], atol=1e-12)
    np.testing.assert_allclose(predictive_entropy(P.mean(0)), [LOG2], rtol=1e-12)
    np.testing.assert_allclose(disagreement(P), [0.5])  # the tie goes to class 0


def test_uniform_members_are_all_aleatoric():
    K = 4
    P = np.full((3, 6, K), 1.0 / K)
    np.testing.assert_allclose(expected_entropy(P), math.log(K), rtol=1e-12)
    np.testing.assert_allclose(mutual_information(P), 0.0, atol=1e-12)
    np.testing.assert_array_equal(disagreement(P), 0.0)


def test_decomposition_identity_on_random_stacks():
    rng = np.random.RandomState(0)
    P = rng.dirichlet(np.ones(5) * 0.5, size=(7, 40))
    r = uncertainty_report(P)
    assert set(r) == {"predictive_entropy", "expected_entropy", "mutual_information",
                      "disagreement"}
    assert all(v.shape == (40,) for v in r.values())
    np.testing.assert_allclose(r["predictive_entropy"] - r["expected_entropy"],
                               r["mutual_information"], atol=1e-12)
    assert (r["mutual_information"] >= 0).all()
    expected = (P.argmax(2) != P.mean(0).argmax(1)).mean(0)
    np.testing.assert_array_equal(r["disagreement"], expected)
    np.testing.assert_allclose(expected_entropy(P),
                               np.mean([predictive_entropy(p) for p in P], axis=0))


def test_decomposition_errors():
    with pytest.raises(ValueError, match=r"P must be an array of shape \(n_members, n_samples, "
                                         r"n_classes\), got shape \(2, 2\).*P\[None\]"):
        uncertainty_report([[0.5, 0.5], [0.2, 0.8]])
    with pytest.raises(ValueError, match="rows must sum to 1"):
        mutual_information([[[0.5, 0.6]]])
    with pytest.raises(ValueError, match="non-negative"):
        expected_entropy([[[1.5, -0.5]]])


# --------------------------------------------------------------------------- temperature


def _overconfident(n=5000, k=4, factor=3.0, seed=0):
    """Labels drawn from a calibrated model's softmax(z); probabilities of softmax(factor * z)."""
    rng = np.random.RandomState(seed)
    z = rng.normal(scale=1.5, size=(n, k))
    calibrated = np.exp(z - z.max(1, keepdims=True))
    calibrated /= calibrated.sum(1, keepdims=True)
    y = np.array([rng.choice(k, p=row) for row in calibrated])
    sharp = np.exp(factor * (z - z.max(1, keepdims=True)))
    return sharp / sharp.sum(1, keepdims=True), y


def test_temperature_recovers_the_sharpening_factor_and_calibrates():
    proba, y = _overconfident()
    fit_p, fit_y, test_p, test_y = proba[:2500], y[:2500], proba[2500:], y[2500:]
    ts = TemperatureScaler().fit(fit_p, fit_y)
    assert abs(ts.temperature_ - 3.0) / 3.0 < 0.10
    assert ts.nll_after_ < ts.nll_before_
    out = ts.transform(test_p)
    np.testing.assert_allclose(out.sum(1), 1.0, atol=1e-12)
    np.testing.assert_array_equal(out.argmax(1), test_p.argmax(1))
    assert ece(test_y, out) < 0.5 * ece(test_y, test_p)
    assert ece(test_y, out) < 0.04
    assert nll(test_y, out) < nll(test_y, test_p) - 0.1


def test_temperature_sharpens_underconfident_and_logits_input():
    proba, y = _overconfident(factor=0.5, n=3000, seed=1)
    ts = TemperatureScaler().fit(proba, y)
    assert abs(ts.temperature_ - 0.5) / 0.5 < 0.10
    logits = np.log(proba) + 7.0  # a shift does not change the softmax
    tl = TemperatureScaler(inputs="logits").fit(logits, y)
    assert tl.temperature_ == pytest.approx(ts.temperature_, rel=1e-4)
    np.testing.assert_allclose(tl.transform(logits), ts.transform(proba), atol=1e-6)


def test_temperature_with_string_labels_and_class_order():
    proba, y = _overconfident(n=2000, k=3, seed=2)
    names = np.array(["cat", "dog", "eel"])
    # columns listed in a non-sorted order: reorder the proba columns to match
    order = ["eel", "cat", "dog"]
    perm = [list(names).index(c) for c in order]
    ts = TemperatureScaler().fit(proba[:, perm], names[y], classes=order)
    ref = TemperatureScaler().fit(proba, y)
    assert ts.temperature_ == pytest.approx(ref.temperature_, rel=1e-6)
    # labels as the sorted distinct values when classes is None
    tn = TemperatureScaler().fit(proba, names[y])
    assert tn.temperature_ == pytest.approx(ref.temperature_, rel=1e-6)


def test_temperature_identity_on_calibrated_and_sklearn_contract():
    from sklearn.base import clone

    proba, y = _overconfident(factor=1.0, n=4000, seed=3)
    ts = TemperatureScaler(bounds=(0.1, 10.0))
    assert ts.get_params() == {"bounds": (0.1, 10.0), "inputs": "proba"}
    assert not hasattr(ts, "temperature_")
    out = ts.fit_transform(proba, y)
    assert abs(ts.temperature_ - 1.0) < 0.1
    np.testing.assert_allclose(out, ts.transform(proba))
    assert not hasattr(clone(ts), "temperature_")


def test_temperature_errors():
    proba, y = _overconfident(n=200, k=3)
    with pytest.raises(NotFittedError):
        TemperatureScaler().transform(proba)
    with pytest.raises(ValueError, match=r"proba must be an array of shape \(199, n_classes\)"):
        TemperatureScaler().fit(proba, y[:199])
    with pytest.raises(ValueError, match=r"shape \(200, 2\).*len\(classes\)=2"):
        TemperatureScaler().fit(proba, y, classes=[0, 1])
    ts = TemperatureScaler().fit(proba, y)
    with pytest.raises(ValueError, match=r"\(n_samples, 3\) \(fitted on 3 classes\), got shape "
                                         r"\(200, 2\)"):
        ts.transform(proba[:, :2] / proba[:, :2].sum(1, keepdims=True))
    with pytest.raises(ValueError, match="at least 2 distinct classes.*1 class: \\['a'\\]"):
        TemperatureScaler().fit(proba, ["a"] * 200, classes=["a", "b", "c"])
    with pytest.raises(ValueError, match="at least 2 columns"):
        TemperatureScaler().fit(np.ones((4, 1)), [0, 0, 0, 0])
    with pytest.raises(ValueError, match=r"y must be values from classes"):
        TemperatureScaler().fit(proba, ["x"] * 200, classes=["a", "b", "c"])
    with pytest.raises(ValueError, match="rows must sum to 1"):
        TemperatureScaler().fit(proba * 2, y)
    with pytest.raises(ValueError, match=r"bounds must be a pair \(low, high\)"):
        TemperatureScaler(bounds=(2.0, 1.0)).fit(proba, y)
    with pytest.raises(ValueError, match=r"inputs must be 'proba' or 'logits', got 'probs'"):
        TemperatureScaler(inputs="probs").fit(proba, y)
    with pytest.raises(ValueError, match="logits must be finite"):
        TemperatureScaler(inputs="logits").fit(np.full((2, 2), np.inf), [0, 1])


def test_temperature_warns_on_a_bound():
    # perfectly separated, confident and right: sharper is always better, T hits the low bound
    proba = np.array([[0.9, 0.1], [0.1, 0.9]] * 10)
    y = np.array([0, 1] * 10)
    with pytest.warns(UserWarning, match="edge of bounds"):
        ts = TemperatureScaler().fit(proba, y)
    assert ts.temperature_ == pytest.approx(0.05, rel=1e-3)

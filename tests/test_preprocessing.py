"""Tests for nnpipe.preprocessing: numbers against numpy formulas, whitening properties,
the scikit-learn estimator contract, error messages and a hypothesis robustness property."""

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from sklearn.decomposition import PCA
from sklearn.preprocessing import MinMaxScaler, StandardScaler
from sklearn.utils.estimator_checks import parametrize_with_checks

from nnpipe.preprocessing import (
    PREPROCESSOR_REGISTRY,
    PREPROCESSORS,
    Centerer,
    Standardizer,
    ZCAWhitener,
    make_preprocessor,
)

ALL_TRANSFORMERS = [
    Centerer(mode="feature"),
    Centerer(mode="global"),
    Centerer(mode="sample"),
    Standardizer(mode="global"),
    Standardizer(mode="sample"),
    ZCAWhitener(),
    ZCAWhitener(epsilon=1e-2, copy=False),
]


def _expected_failed_checks(estimator):
    if isinstance(estimator, ZCAWhitener) and not estimator.copy:
        reason = "copy=False centres the caller's float64 X in place, by design"
        return {
            "check_estimators_pickle": reason,
            "check_methods_sample_order_invariance": reason,
            "check_methods_subset_invariance": reason,
        }
    return {}


@parametrize_with_checks(ALL_TRANSFORMERS, expected_failed_checks=_expected_failed_checks)
def test_sklearn_estimator_checks(estimator, check):
    check(estimator)


# --------------------------------------------------------------------------- fixtures / helpers


@pytest.fixture
def rng():
    return np.random.default_rng(12345)


def _correlated(rng, n=500, p=8):
    mixing = rng.normal(size=(p, p))
    return rng.normal(size=(n, p)) @ mixing + rng.normal(size=p) * 5


def _random_orthogonal(rng, p):
    q, r = np.linalg.qr(rng.normal(size=(p, p)))
    return q * np.sign(np.diag(r))


# --------------------------------------------------------------------------- Centerer / Standardizer


def test_centerer_feature_matches_numpy_and_uses_train_mean(rng):
    X, X_test = rng.normal(3, 2, size=(40, 5)), rng.normal(-1, 4, size=(7, 5))
    c = Centerer().fit(X)
    np.testing.assert_allclose(c.transform(X), X - X.mean(0))
    np.testing.assert_allclose(c.transform(X_test), X_test - X.mean(0))
    np.testing.assert_allclose(c.mean_, X.mean(0))
    np.testing.assert_allclose(c.inverse_transform(c.transform(X_test)), X_test)


def test_centerer_global_matches_numpy_and_uses_train_mean(rng):
    X, X_test = rng.uniform(0, 255, size=(30, 16)), rng.uniform(0, 10, size=(4, 16))
    c = Centerer(mode="global").fit(X)
    assert isinstance(c.mean_, float)
    np.testing.assert_allclose(c.transform(X), X - X.mean())
    np.testing.assert_allclose(c.transform(X_test), X_test - X.mean())
    np.testing.assert_allclose(c.inverse_transform(c.transform(X_test)), X_test)


def test_centerer_sample_is_per_row_and_stateless(rng):
    X, X_test = rng.normal(size=(20, 6)), rng.normal(5, 1, size=(3, 6))
    c = Centerer(mode="sample").fit(X)
    assert c.n_features_in_ == 6 and not hasattr(c, "mean_")
    np.testing.assert_allclose(c.transform(X_test), X_test - X_test.mean(1, keepdims=True))
    assert not hasattr(c, "inverse_transform")


def test_standardizer_global_matches_numpy_and_uses_train_stats(rng):
    X, X_test = rng.normal(10, 3, size=(50, 4)), rng.normal(0, 1, size=(6, 4))
    s = Standardizer().fit(X)
    np.testing.assert_allclose(s.transform(X), (X - X.mean()) / X.std())
    np.testing.assert_allclose(s.transform(X_test), (X_test - X.mean()) / X.std())
    np.testing.assert_allclose([s.mean_, s.scale_], [X.mean(), X.std()])
    Z = s.transform(X)
    assert abs(Z.mean()) < 1e-12 and abs(Z.std() - 1) < 1e-12
    np.testing.assert_allclose(s.inverse_transform(s.transform(X_test)), X_test)


def test_standardizer_sample_is_per_row(rng):
    X, X_test = rng.normal(size=(10, 5)), rng.normal(2, 7, size=(3, 5))
    s = Standardizer(mode="sample").fit(X)
    expected = (X_test - X_test.mean(1, keepdims=True)) / X_test.std(1, keepdims=True)
    np.testing.assert_allclose(s.transform(X_test), expected)
    assert not hasattr(s, "inverse_transform")


def test_zero_std_is_guarded():
    const = np.full((5, 3), 0.1)
    s = Standardizer().fit(const)
    assert s.scale_ == 1.0
    # only the mean's round-off survives; it is not blown up to +-1 by a ~1e-17 std
    np.testing.assert_allclose(s.transform(const), 0.0, atol=1e-15)
    X = np.array([[0.1, 0.1, 0.1], [1.0, 2.0, 3.0], [7.0, 7.0, 7.0]])
    Z = Standardizer(mode="sample").fit_transform(X)
    assert np.isfinite(Z).all()
    np.testing.assert_allclose(Z[[0, 2]], 0.0, atol=1e-15)
    np.testing.assert_allclose(Z[1], [-np.sqrt(1.5), 0, np.sqrt(1.5)])


@pytest.mark.parametrize("est", [Centerer(), Standardizer(), ZCAWhitener()])
def test_float32_is_preserved_and_ints_become_float64(est, rng):
    X = rng.normal(size=(20, 3))
    assert est.fit(X.astype(np.float32)).transform(X.astype(np.float32)).dtype == np.float32
    assert est.fit(X.astype(np.int64)).transform(X.astype(np.int64)).dtype == np.float64


# --------------------------------------------------------------------------- ZCA


def test_zca_whitens_to_identity_with_symmetric_W(rng):
    X = _correlated(rng)
    z = ZCAWhitener(epsilon=1e-8).fit(X)
    Z = z.transform(X)
    assert Z.shape == X.shape
    np.testing.assert_allclose(np.cov(Z, rowvar=False), np.eye(8), atol=1e-6)
    np.testing.assert_allclose(z.whitening_, z.whitening_.T, atol=1e-12)
    assert z.components_ is z.whitening_
    np.testing.assert_allclose(z.whitening_ @ z.dewhitening_, np.eye(8), atol=1e-8)
    np.testing.assert_allclose(Z, (X - X.mean(0)) @ z.whitening_)


def test_zca_is_the_whitening_closest_to_the_input(rng):
    X = _correlated(rng)
    Xc = X - X.mean(0)
    Z_zca = ZCAWhitener(epsilon=1e-10).fit_transform(X)
    Z_pca = PCA(whiten=True).fit_transform(X)
    # Both are whitened; every other whitening is Z_pca rotated by an orthogonal matrix.
    np.testing.assert_allclose(np.cov(Z_pca, rowvar=False), np.eye(8), atol=1e-6)

    def msd(Z):
        return np.mean(np.sum((Z - Xc) ** 2, axis=1))

    best = msd(Z_zca)
    assert best < msd(Z_pca)
    for _ in range(50):
        R = _random_orthogonal(rng, 8)
        assert best < msd(Z_pca @ R)
        assert best < msd(Z_zca @ R)


def test_zca_epsilon_shrinks_low_variance_directions(rng):
    scales = np.array([10.0, 3.0, 1.0, 0.1, 0.01])
    X = _correlated(rng, n=2000, p=5) @ np.diag(scales) @ _random_orthogonal(rng, 5)
    lam, U = np.linalg.eigh(np.cov(X, rowvar=False))
    variances = []
    for eps in [1e-8, 1e-4, 1e-2, 1.0]:
        Z = ZCAWhitener(epsilon=eps).fit_transform(X)
        var_along_eigvecs = np.var(Z @ U, axis=0, ddof=1)
        np.testing.assert_allclose(var_along_eigvecs, lam / (lam + eps), rtol=1e-6)
        variances.append(var_along_eigvecs[0])  # lowest-variance direction
    assert all(a > b for a, b in zip(variances, variances[1:]))
    assert variances[0] > 0.99 and variances[-1] < 0.01


def test_zca_degenerate_columns_give_finite_output(rng):
    base = _correlated(rng, n=200, p=4)
    X = np.column_stack([base, np.full(200, 3.0), base[:, 1]])  # constant + duplicate
    z = ZCAWhitener(epsilon=1e-5).fit(X)
    Z = z.transform(X)
    assert np.isfinite(Z).all() and np.isfinite(z.whitening_).all()
    assert (z.eigenvalues_ >= 0).all()
    ev = np.sort(np.linalg.eigvalsh(np.cov(Z, rowvar=False)))
    np.testing.assert_allclose(ev[:2], 0.0, atol=1e-6)  # the two null directions
    np.testing.assert_allclose(ev[2:], 1.0, atol=1e-3)  # the rest is whitened
    np.testing.assert_allclose(z.inverse_transform(Z), X, atol=1e-8)


def test_zca_inverse_transform_round_trips(rng):
    X, X_test = _correlated(rng), _correlated(rng, n=20)
    z = ZCAWhitener().fit(X)
    np.testing.assert_allclose(z.inverse_transform(z.transform(X_test)), X_test, atol=1e-9)


def test_zca_copy_false_centres_float64_input_in_place(rng):
    X = _correlated(rng, n=50, p=3)
    X_before = X.copy()
    z = ZCAWhitener().fit(X)
    expected = z.transform(X)
    np.testing.assert_array_equal(X, X_before)  # copy=True leaves X alone
    Z = z.set_params(copy=False).transform(X)
    np.testing.assert_allclose(Z, expected)
    np.testing.assert_allclose(X, X_before - X_before.mean(0))  # centred in place


# --------------------------------------------------------------------------- registry / PCA


def test_registry_builds_the_documented_estimators():
    assert set(PREPROCESSORS) == {
        "center", "global_center", "sample_center", "standardize", "global_standardize",
        "sample_standardize", "minmax", "pca_whiten", "zca",
    }
    assert PREPROCESSORS == tuple(PREPROCESSOR_REGISTRY.names())
    assert make_preprocessor("center").mode == "feature"
    assert make_preprocessor("global_center").mode == "global"
    assert make_preprocessor("sample_center").mode == "sample"
    assert make_preprocessor("global_standardize").mode == "global"
    assert make_preprocessor("sample_standardize").mode == "sample"
    assert type(make_preprocessor("standardize")) is StandardScaler
    mm = make_preprocessor("minmax")
    assert type(mm) is MinMaxScaler and mm.feature_range == (-1, 1)
    pca = make_preprocessor("pca_whiten", n_components=0.9)
    assert type(pca) is PCA and pca.whiten and pca.n_components == 0.9
    assert make_preprocessor("ZCA", epsilon=0.1).epsilon == 0.1
    assert make_preprocessor("zca") is not make_preprocessor("zca")
    mine = ZCAWhitener(epsilon=3.0)
    cloned = make_preprocessor(mine, copy=False)
    assert cloned is not mine and cloned.epsilon == 3.0 and cloned.copy is False


def test_minmax_maps_training_range_to_minus_one_one(rng):
    X = rng.uniform(-5, 20, size=(30, 4))
    Z = make_preprocessor("minmax").fit_transform(X)
    np.testing.assert_allclose(Z.min(0), -1.0)
    np.testing.assert_allclose(Z.max(0), 1.0)


def test_pca_whiten_gives_identity_covariance(rng):
    X = _correlated(rng)
    Z = make_preprocessor("pca_whiten").fit_transform(X)
    np.testing.assert_allclose(np.cov(Z, rowvar=False, ddof=1), np.eye(8), atol=1e-8)
    Z3 = make_preprocessor("pca_whiten", n_components=3).fit_transform(X)
    assert Z3.shape == (500, 3)
    np.testing.assert_allclose(np.cov(Z3, rowvar=False, ddof=1), np.eye(3), atol=1e-8)


# --------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "est, bad, valid",
    [
        (Centerer(mode="feat"), "'feat'", "Did you mean 'feature'?"),
        (Centerer(mode="rows"), "'rows'", "'sample'"),
        (Standardizer(mode="sampel"), "'sampel'", "Did you mean 'sample'?"),
        (Standardizer(mode="feature"), "'feature'", "StandardScaler"),
        (Standardizer(mode=None), "None", "'global'"),
    ],
)
def test_unknown_mode_is_rejected_in_fit(est, bad, valid):
    with pytest.raises(ValueError, match="mode") as info:
        est.fit(np.ones((3, 2)))
    assert bad in str(info.value) and valid in str(info.value)


def test_unknown_preprocessor_name():
    with pytest.raises(ValueError) as info:
        make_preprocessor("standardise")
    msg = str(info.value)
    assert "'standardise'" in msg and "'zca'" in msg and "Did you mean 'standardize'?" in msg
    with pytest.raises(ValueError, match="got 42"):
        make_preprocessor(42)
    with pytest.raises(ValueError, match="epsilon"):
        make_preprocessor("center", epsilon=1.0)


@pytest.mark.parametrize("eps", [0, 0.0, -1e-3, np.nan, np.inf, "small", True])
def test_zca_rejects_bad_epsilon(eps):
    with pytest.raises(ValueError, match="epsilon must be a finite float > 0") as info:
        ZCAWhitener(epsilon=eps).fit(np.eye(3))
    assert repr(eps) in str(info.value)


@pytest.mark.parametrize("est", ALL_TRANSFORMERS, ids=repr)
def test_nan_and_wrong_shape_are_rejected(est):
    X = np.arange(12.0).reshape(4, 3)
    bad = X.copy()
    bad[1, 1] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        est.fit(bad)
    est.fit(X)
    with pytest.raises(ValueError, match="NaN"):
        est.transform(bad)
    with pytest.raises(ValueError, match="features"):
        est.transform(X[:, :2])
    with pytest.raises(ValueError, match="2D"):
        est.fit(X[0])


# --------------------------------------------------------------------------- property test


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning:sklearn")
@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    X=st.tuples(st.integers(2, 30), st.integers(1, 6)).flatmap(
        lambda shape: arrays(
            np.float64, shape, elements=st.floats(-1e3, 1e3, allow_nan=False)
        )
    ),
    name=st.sampled_from(PREPROCESSORS),
)
def test_property_finite_same_shape_or_value_error(X, name):
    est = make_preprocessor(name)
    try:
        Z = est.fit(X).transform(X)
    except ValueError:
        return
    assert np.isfinite(Z).all()
    if name == "pca_whiten":
        assert Z.shape[0] == X.shape[0] and Z.shape[1] <= X.shape[1]
    else:
        assert Z.shape == X.shape

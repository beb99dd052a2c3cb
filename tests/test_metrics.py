"""nnpipe.metrics: values against hand computations, scikit-learn and numpy; loud validation."""

import json
import math

import numpy as np
import pytest
from sklearn.metrics import (
    accuracy_score,
    balanced_accuracy_score,
    brier_score_loss,
    classification_report,
    log_loss,
)

from nnpipe.metrics import (
    CV_HEADLINE_METRICS,
    HEADLINE_METRICS,
    brier,
    classification_metrics,
    ece,
    headline,
    nll,
    per_class_report,
    predictive_entropy,
    regression_metrics,
    reliability_curve,
)


def _sample_labels(rng, proba):
    """One label per row, drawn from that row's probabilities (vectorised)."""
    u = rng.random(len(proba))[:, None]
    return np.minimum((proba.cumsum(axis=1) < u).sum(axis=1), proba.shape[1] - 1)


@pytest.fixture(scope="module")
def calibrated():
    rng = np.random.default_rng(0)
    proba = rng.dirichlet(np.full(5, 0.5), size=200_000)
    return _sample_labels(rng, proba), proba


# --------------------------------------------------------------------------- nll


def test_nll_hand_computation_and_sklearn():
    y = [0, 2, 1]
    p = np.array([[0.7, 0.2, 0.1], [0.1, 0.3, 0.6], [0.25, 0.5, 0.25]])
    expected = -(math.log(0.7) + math.log(0.6) + math.log(0.5)) / 3
    assert nll(y, p) == pytest.approx(expected, rel=1e-12)
    assert nll(y, p) == pytest.approx(log_loss(y, p), rel=1e-12)


def test_nll_unsorted_string_labels_follow_the_columns():
    # Columns in the order ["dog", "cat", "bird"]; sklearn assumes sorted label order, so it
    # gets the same value only after reordering the columns to ["bird", "cat", "dog"].
    labels = ["dog", "cat", "bird"]
    y = ["dog", "bird", "cat", "dog"]
    p = np.array([[0.6, 0.3, 0.1], [0.2, 0.2, 0.6], [0.1, 0.8, 0.1], [0.5, 0.25, 0.25]])
    expected = -(math.log(0.6) + math.log(0.6) + math.log(0.8) + math.log(0.5)) / 4
    assert nll(y, p, labels=labels) == pytest.approx(expected, rel=1e-12)
    assert nll(y, p, labels=labels) == pytest.approx(log_loss(y, p[:, [2, 1, 0]]), rel=1e-12)


def test_labels_none_column_indices_or_sorted_labels_like_sklearn():
    p = np.array([[0.7, 0.2, 0.1], [0.1, 0.3, 0.6], [0.25, 0.5, 0.25]])
    # Integers in [0, 3): column indices, even when a class is absent from y_true.
    assert nll([0, 0, 1], p) == pytest.approx(-(math.log(0.7) + math.log(0.1) + math.log(0.5)) / 3)
    # Anything else with one distinct value per column: the sorted labels (sklearn's convention).
    for y in (["b", "c", "a"], [10, 20, 5]):
        assert nll(y, p) == pytest.approx(log_loss(y, p), rel=1e-12)
        assert nll(y, p) == pytest.approx(nll(y, p, labels=sorted(y)), rel=1e-12)
        assert ece(y, p) == ece(y, p, labels=sorted(y))


def test_nll_is_clipped_like_sklearn():
    p = np.array([[1.0, 0.0], [0.5, 0.5]])
    value = nll([1, 0], p)
    assert math.isfinite(value)
    assert value == pytest.approx(log_loss([1, 0], p), rel=1e-12)
    assert value == pytest.approx((-math.log(np.finfo(np.float64).eps) + math.log(2)) / 2)


def test_nll_accepts_float32_softmax_rows_off_by_rounding():
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(100, 7)).astype(np.float32)
    p32 = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    y = rng.integers(0, 7, size=100)
    p64 = p32.astype(np.float64)
    p64 /= p64.sum(axis=1, keepdims=True)
    assert nll(y, p32) == pytest.approx(log_loss(y, p64), rel=1e-9)


# --------------------------------------------------------------------------- brier


def test_brier_perfect_is_zero():
    y = np.array([0, 1, 2, 1])
    assert brier(y, np.eye(3)[y]) == 0.0


@pytest.mark.parametrize("k", [2, 3, 10])
def test_brier_uniform_is_k_minus_1_over_k(k):
    y = np.arange(50) % k
    assert brier(y, np.full((50, k), 1.0 / k)) == pytest.approx((k - 1) / k, rel=1e-12)


def test_brier_hand_computation_and_binary_sklearn():
    y = [0, 1, 1]
    p = np.array([[0.8, 0.2], [0.4, 0.6], [0.9, 0.1]])
    hand = ((0.2**2 + 0.2**2) + (0.4**2 + 0.4**2) + (0.9**2 + 0.9**2)) / 3
    assert brier(y, p) == pytest.approx(hand, rel=1e-12)
    assert brier(y, p) == pytest.approx(2 * brier_score_loss(y, p[:, 1]), rel=1e-12)


def test_brier_of_certain_wrong_predictions_is_two():
    assert brier([1, 0], [[1.0, 0.0], [0.0, 1.0]]) == 2.0


# --------------------------------------------------------------------------- ece / reliability


def test_ece_of_calibrated_predictions_is_small(calibrated):
    y, p = calibrated
    assert ece(y, p) < 0.01


def test_ece_of_overconfident_predictions():
    # Always 99% confident in class 0 (out of 10), right 70% of the time: ECE = 0.99 - 0.7.
    n = 1000
    p = np.full((n, 10), 0.01 / 9)
    p[:, 0] = 0.99
    y = np.where(np.arange(n) < 700, 0, 1 + np.arange(n) % 9)
    assert ece(y, p) == pytest.approx(0.29, abs=1e-9)
    conf, acc, count = reliability_curve(y, p)
    assert count[-1] == n and count[:-1].sum() == 0
    assert conf[-1] == pytest.approx(0.99) and acc[-1] == pytest.approx(0.7)


def test_ece_is_weighted_gap_of_the_reliability_curve(calibrated):
    y, p = calibrated[0][:5000], calibrated[1][:5000]
    conf, acc, count = reliability_curve(y, p, n_bins=10)
    full = count > 0
    expected = np.sum(count[full] / count.sum() * np.abs(acc[full] - conf[full]))
    assert ece(y, p, n_bins=10) == pytest.approx(expected, rel=1e-12)
    # One bin: |overall accuracy - mean confidence|.
    one = abs(np.mean(p.argmax(1) == y) - p.max(1).mean())
    assert ece(y, p, n_bins=1) == pytest.approx(one, rel=1e-12)


def test_reliability_curve_counts_sum_to_n_and_empty_bins_are_nan(calibrated):
    y, p = calibrated
    conf, acc, count = reliability_curve(y, p)
    assert conf.shape == acc.shape == count.shape == (15,)
    assert count.dtype == np.int64 and count.sum() == len(y)
    # With 5 classes the max probability is >= 0.2, so bins [0, 1/15] and (1/15, 2/15] are empty.
    assert count[0] == count[1] == 0 and np.isnan(conf[:2]).all() and np.isnan(acc[:2]).all()
    edges = np.linspace(0, 1, 16)
    full = count > 0
    assert np.all((conf[full] > edges[:-1][full]) & (conf[full] <= edges[1:][full]))


def test_reliability_curve_bin_edges_are_right_closed():
    k = 15
    # n_bins=4: [0, .25], (.25, .5], (.5, .75], (.75, 1]; 0.5 and 0.75 close their bins.
    p = np.array([[0.5, 0.5], [0.75, 0.25], [0.76, 0.24], [1.0, 0.0]])
    _, _, count = reliability_curve([0, 0, 0, 0], p, n_bins=4)
    assert count.tolist() == [0, 1, 1, 2]
    # A confidence of exactly 1/15 is in the first of 15 bins (only reachable with >= 15 classes).
    p = np.full((1, k), 1.0 / k)
    _, _, count = reliability_curve([0], p, n_bins=k)
    assert count[0] == 1


def test_ties_predict_the_first_column():
    conf, acc, _ = reliability_curve([0, 1], [[0.5, 0.5], [0.5, 0.5]], n_bins=2)
    assert acc[0] == 0.5 and conf[0] == 0.5


# --------------------------------------------------------------------------- entropy


@pytest.mark.parametrize("k", [2, 5, 10])
def test_entropy_of_uniform_is_log_k(k):
    h = predictive_entropy(np.full((3, k), 1.0 / k))
    np.testing.assert_allclose(h, np.log(k), rtol=1e-12)


def test_entropy_of_one_hot_is_zero_and_matches_formula():
    h = predictive_entropy([[0.0, 1.0, 0.0], [0.2, 0.3, 0.5]])
    assert h[0] == 0.0 and not np.signbit(h[0])
    assert h[1] == pytest.approx(-(0.2 * math.log(0.2) + 0.3 * math.log(0.3) + 0.5 * math.log(0.5)))


# --------------------------------------------------------------------------- summaries


def test_classification_metrics_with_string_classes_in_any_order():
    rng = np.random.default_rng(3)
    classes = np.array(["zebra", "ant", "moth"])
    p = rng.dirichlet([1, 1, 1], size=300)
    idx = _sample_labels(rng, p)
    y = classes[idx]
    m = classification_metrics(y, p, classes)
    assert set(m) >= {"accuracy", "balanced_accuracy", "nll", "brier", "ece"}
    assert all(type(v) is float for v in m.values())
    json.dumps(m)
    pred = classes[p.argmax(1)]
    assert m["accuracy"] == pytest.approx(accuracy_score(y, pred))
    assert m["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(y, pred))
    assert m["nll"] == pytest.approx(nll(idx, p))
    assert m["brier"] == pytest.approx(brier(idx, p))
    assert m["ece"] == pytest.approx(ece(idx, p))
    # The same predictions with integer labels give the same numbers.
    assert classification_metrics(idx, p, [0, 1, 2]) == pytest.approx(m)


def test_regression_metrics_against_numpy():
    rng = np.random.default_rng(4)
    y = rng.normal(size=200)
    pred = y + rng.normal(scale=0.3, size=200)
    m = regression_metrics(y, pred)
    assert list(m) == ["r2", "rmse", "mae"] and all(type(v) is float for v in m.values())
    r2 = 1 - np.sum((y - pred) ** 2) / np.sum((y - y.mean()) ** 2)
    assert m["r2"] == pytest.approx(r2, rel=1e-12)
    assert m["rmse"] == pytest.approx(np.sqrt(np.mean((y - pred) ** 2)), rel=1e-12)
    assert m["mae"] == pytest.approx(np.mean(np.abs(y - pred)), rel=1e-12)
    # A (n, 1) column is the same as (n,).
    assert regression_metrics(y[:, None], pred) == pytest.approx(m)


def test_regression_metrics_multi_output_averages_outputs():
    rng = np.random.default_rng(5)
    y = rng.normal(size=(100, 2)) * [1.0, 10.0]
    pred = y + rng.normal(size=(100, 2))
    m = regression_metrics(y, pred)
    r2 = np.mean([regression_metrics(y[:, j], pred[:, j])["r2"] for j in range(2)])
    assert m["r2"] == pytest.approx(r2)
    assert m["rmse"] == pytest.approx(np.sqrt(np.mean((y - pred) ** 2)))
    assert m["mae"] == pytest.approx(np.mean(np.abs(y - pred)))


def test_per_class_report_string_keys_and_plain_numbers():
    y = ["cat", "dog", "dog", "bird", "cat"]
    pred = ["cat", "dog", "cat", "bird", "bird"]
    r = per_class_report(y, pred, ["dog", "cat", "bird", "fish"])
    ref = classification_report(y, pred, labels=["dog", "cat", "bird", "fish"], output_dict=True,
                                zero_division=0)
    assert list(r) == ["dog", "cat", "bird", "fish", "accuracy", "macro avg", "weighted avg"]
    assert r["dog"] == pytest.approx(ref["dog"])
    assert r["accuracy"] == pytest.approx(0.6)
    assert r["fish"] == {"precision": 0.0, "recall": 0.0, "f1-score": 0.0, "support": 0}
    assert type(r["cat"]["support"]) is int and type(r["cat"]["recall"]) is float
    json.dumps(r)
    assert list(per_class_report([0, 1], [1, 1], classes=[0, 1]))[:2] == ["0", "1"]


# --------------------------------------------------------------------------- validation


def test_proba_columns_must_match_labels():
    with pytest.raises(ValueError,
                       match=r"proba must be an array of shape \(2, 3\).*got shape \(2, 2\)"):
        classification_metrics(["a", "b"], [[0.5, 0.5], [0.5, 0.5]], classes=["a", "b", "c"])


def test_proba_rows_must_match_y_true_length():
    with pytest.raises(ValueError, match=r"len\(y_true\)=3.*got shape \(2, 2\)"):
        nll([0, 1, 1], [[0.5, 0.5], [0.5, 0.5]])
    with pytest.raises(ValueError, match=r"got shape \(2,\)"):
        brier([0, 1], [0.5, 0.5])


def test_proba_rows_must_sum_to_one():
    with pytest.raises(ValueError,
                       match=r"rows must sum to 1 \(within 0.001\), got row 1 summing to 1.01"):
        ece([0, 1], [[0.5, 0.5], [0.5, 0.51]])
    nll([0, 1], [[0.5, 0.5], [0.5, 0.5005]])  # within tolerance: accepted
    with pytest.raises(ValueError, match="rows must sum to 1"):
        predictive_entropy([[0.2, 0.2]])


@pytest.mark.parametrize("bad, message", [
    ([[0.5, 0.5], [np.nan, 1.0]], "proba must be finite"),
    ([[0.5, 0.5], [1.5, -0.5]], "proba must be non-negative"),
])
def test_proba_must_be_finite_and_non_negative(bad, message):
    with pytest.raises(ValueError, match=message):
        nll([0, 1], bad)


def test_unknown_labels_are_named():
    with pytest.raises(ValueError,
                       match=r"y_true must be values from classes \['a', 'b'\], got \['c'\]"):
        classification_metrics(["a", "c"], [[0.5, 0.5], [0.5, 0.5]], classes=["a", "b"])
    # labels=None: neither column indices nor one distinct value per column.
    with pytest.raises(ValueError, match=r"column indices in \[0, 3\), or hold exactly 3 "
                                         r"distinct values.*got \['a', 'b'\]"):
        nll(["a", "b"], [[0.5, 0.3, 0.2], [0.5, 0.3, 0.2]])
    with pytest.raises(ValueError, match=r"column indices in \[0, 3\).*got \[1, 7\]"):
        nll([1, 7], [[0.5, 0.3, 0.2], [0.5, 0.3, 0.2]])
    with pytest.raises(ValueError, match=r"y_pred must be values from classes"):
        per_class_report([0, 1], [0, 7], classes=[0, 1])


def test_other_argument_errors():
    with pytest.raises(ValueError, match=r"classes must be a sequence of distinct class labels"):
        classification_metrics([0, 1], [[0.5, 0.5], [0.5, 0.5]], classes=[0, 0])
    with pytest.raises(ValueError, match=r"n_bins must be a positive integer, got 0"):
        ece([0], [[1.0, 0.0]], n_bins=0)
    with pytest.raises(ValueError,
                       match=r"y_pred must have the shape of y_true \(3,\), got shape \(2,\)"):
        regression_metrics([1.0, 2.0, 3.0], [1.0, 2.0])
    with pytest.raises(ValueError, match=r"y_true must be 1-D"):
        nll(np.zeros((2, 2)), [[0.5, 0.5], [0.5, 0.5]])


def test_headline_keeps_the_summary_numbers_of_a_full_result_and_drops_the_details():
    full = {**classification_metrics([0, 1, 1], [[0.7, 0.3], [0.2, 0.8], [0.6, 0.4]], [0, 1]),
            "per_class": per_class_report([0, 1, 1], [0, 1, 0], [0, 1]),
            "sparsity": 0.0, "members": [{"accuracy": 1.0}]}
    kept = headline(full)
    assert list(kept) == ["accuracy", "balanced_accuracy", "nll", "brier", "ece"]
    assert all(type(v) is float and v == full[k] for k, v in kept.items())
    assert list(headline(full, CV_HEADLINE_METRICS)) == ["accuracy", "nll", "ece"]
    reg = regression_metrics([1.0, 2.0, 3.0], [1.0, 2.0, 4.0])
    assert headline({**reg, "np": np.float32(1)}) == reg
    assert set(HEADLINE_METRICS) >= set(CV_HEADLINE_METRICS)


def test_headline_refuses_a_kept_entry_that_is_not_a_number():
    with pytest.raises(ValueError, match=r"headline: metrics\['nll'\] must be a number, got "
                                         r"\{'mean': 0.3\}"):
        headline({"accuracy": 0.9, "nll": {"mean": 0.3}})
    with pytest.raises(ValueError, match=r"metrics\['accuracy'\] must be a number, got True"):
        headline({"accuracy": True})


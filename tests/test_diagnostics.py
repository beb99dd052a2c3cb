"""nnpipe.diagnostics: each pattern, synthetic and from a real short fit; the plot marks."""

import math

import numpy as np
import pytest
from skorch.history import History
from sklearn.datasets import make_classification

from nnpipe import DivergenceError, NNClassifier, plots
from nnpipe.diagnostics import Finding, diagnose, format_findings


def rows(train, valid=None, **extra):
    out = [{"epoch": i + 1, "train_loss": t, **extra} for i, t in enumerate(train)]
    for row, v in zip(out, valid or []):
        row["valid_loss"] = v
    return out


def codes(findings):
    return [(f.code, f.epoch) for f in findings]


HEALTHY = rows([1.94, 0.92, 0.41, 0.24, 0.17, 0.14, 0.11, 0.094],
               [1.02, 0.41, 0.25, 0.19, 0.16, 0.16, 0.13, 0.12])


# --------------------------------------------------------------------------- synthetic histories


def test_healthy_history_has_no_findings():
    assert diagnose(HEALTHY) == []
    assert diagnose(HEALTHY, initial_loss=math.log(10)) == []


def test_exploding_loss_against_the_lowest_loss_before():
    findings = diagnose(rows([2.0, 1.2, 0.9, 3.0, 2.5]))
    assert codes(findings) == [("exploding_loss", 4)]
    f = findings[0]
    assert f.severity == "error" and f.value == pytest.approx(3.0 / 0.9)
    assert "learning rate is too high" in f.message and "lr_range_test" in f.message
    # below the factor, a rise is not an explosion (the run still ends above its start)
    assert codes(diagnose(rows([2.0, 1.2, 0.9, 3.0, 2.5]), explode_factor=4)) == [
        ("underfitting", 5)]


def test_exploding_in_the_first_epoch_needs_the_untrained_loss():
    history = rows([1.5e6, 26.0, 6.3, 2.97, 2.48])  # observed with lr=10 on digits
    assert codes(diagnose(history)) == []  # nothing before epoch 1 to compare with
    findings = diagnose(history, initial_loss=math.log(10))
    assert codes(findings) == [("exploding_loss", 1)]
    assert findings[0].value == pytest.approx(1.5e6 / math.log(10))
    # a skorch history records batches: the first batch's loss is the untrained loss
    h = History()
    for row in history:
        h.new_epoch()
        h.new_batch()
        h.record_batch("train_loss", 2.8 if row["epoch"] == 1 else 3.0)
        for k, v in row.items():
            h.record(k, v)
    assert codes(diagnose(h)) == [("exploding_loss", 1)]
    assert diagnose(h)[0].value == pytest.approx(1.5e6 / 2.8)


def test_non_finite_loss():
    findings = diagnose(rows([2.0, 1.0, float("nan")]))
    assert codes(findings) == [("non_finite_loss", 3)]
    assert findings[0].severity == "error" and "nan" in findings[0].message
    assert codes(diagnose(rows([2.0, 1.0], [2.0, float("inf")]))) == [("non_finite_loss", 2)]


def test_flat_loss():
    findings = diagnose(rows([2.30, 2.29, 2.285, 2.28]))
    assert codes(findings) == [("flat_loss", None)]
    f = findings[0]
    assert f.severity == "warning" and f.value == pytest.approx(0.02 / 2.30)
    assert "too low" in f.message and "0.9%" in f.message
    # with a stricter tolerance it is no longer flat, but still far from trained
    assert codes(diagnose(rows([2.30, 2.29, 2.285, 2.28]), flat_tol=0.005)) == [
        ("underfitting", 4)]


def test_underfitting():
    findings = diagnose(rows([2.3, 2.0, 1.8, 1.6]))
    assert codes(findings) == [("underfitting", 4)]
    assert findings[0].severity == "info"
    assert findings[0].value == pytest.approx(1.6 / 2.3)
    assert diagnose(rows([2.3, 2.0, 1.8, 1.6]), underfit_level=0.75) == []


def test_overfitting_by_a_rising_valid_loss():
    history = rows([1.0, 0.5, 0.2, 0.1, 0.05], [1.0, 0.6, 0.62, 0.64, 0.66])
    findings = diagnose(history, gap_frac=10)
    assert codes(findings) == [("overfitting", 2)]  # the epoch where it starts
    assert findings[0].value == pytest.approx(0.1)
    assert "rose 10% above its best (0.6 at epoch 2)" in findings[0].message
    assert "early_stopping" in findings[0].message and "regularisation" in findings[0].message
    assert diagnose(history, gap_frac=10, overfit_rise=0.2) == []


def test_overfitting_by_a_wide_gap():
    history = rows([1.0, 0.5, 0.2, 0.05], [1.0, 0.7, 0.45, 0.40], valid_acc=0.9)
    findings = diagnose(history)
    assert codes(findings) == [("overfitting", 4)]
    assert findings[0].value == pytest.approx(0.35)  # gap / starting loss (1.0)
    assert "valid_acc peaked at 0.9" in findings[0].message
    assert diagnose(history, gap_frac=0.4) == []


def test_exploding_runs_are_not_also_flat_or_overfitting():
    history = rows([2.0, 9.0, 2.1, 2.0], [2.0, 8.0, 2.5, 3.0])
    assert codes(diagnose(history)) == [("exploding_loss", 2)]


def test_unfinished_epochs_are_skipped_and_most_severe_comes_first():
    history = rows([2.3, 2.29, 2.28], [2.3, 2.5, 2.9]) + [{"epoch": 4, "batches": [{}]}]
    assert codes(diagnose(history)) == [("flat_loss", None), ("overfitting", 1)]
    assert diagnose([]) == []


def test_argument_errors():
    with pytest.raises(ValueError, match=r"history must be a skorch History, a fitted net or a "
                                         r"list of per-epoch dicts, got 'dict'"):
        diagnose({"train_loss": 1.0})
    with pytest.raises(ValueError, match="per-epoch dicts, got float at position 1"):
        diagnose([{"train_loss": 1.0}, 0.5])
    with pytest.raises(ValueError, match=r"explode_factor must be a number > 1, got 1"):
        diagnose(HEALTHY, explode_factor=1)
    with pytest.raises(ValueError, match=r"flat_tol must be a number in \(0, 1\), got 1\.5"):
        diagnose(HEALTHY, flat_tol=1.5)
    with pytest.raises(ValueError, match=r"initial_loss must be a number > 0, got -1"):
        diagnose(HEALTHY, initial_loss=-1)


def test_format_findings():
    assert format_findings([]) == "diagnostics: no problems found"
    text = format_findings([Finding("underfitting", "info", 4, "train longer.", 0.7),
                            Finding("exploding_loss", "error", 2, "lower lr.", 5.0)],
                           prefix="[train] ")
    assert text.splitlines() == [
        "[train] diagnostics: 2 findings",
        "[train]   [error] exploding_loss at epoch 2: lower lr.",
        "[train]   [info] underfitting at epoch 4: train longer."]
    with pytest.raises(ValueError, match="findings must be a list of Finding, got str"):
        format_findings(["flat_loss"])


# --------------------------------------------------------------------------- real short fits


def fit(X, y, **params):
    net = NNClassifier(random_state=0, **params)
    try:
        net.fit(X, y)
    except DivergenceError:
        pass  # the history up to the failure is what we diagnose
    return net


def test_real_fit_with_lr_10_explodes(digits):
    Xtr, _, ytr, _ = digits
    # divergence_factor=None: let the loss explode instead of stopping the fit at once
    net = fit(Xtr, ytr, lr=10, max_epochs=3, divergence_factor=None)
    findings = diagnose(net)  # a fitted net is read through its history
    # observed: epoch-1 train loss 2.6e6 against 2.63 for the first batch (ratio 9.9e5)
    assert codes(findings)[0] in {("exploding_loss", 1), ("non_finite_loss", 1)}
    assert findings[0].severity == "error"
    assert findings[0].code != "exploding_loss" or findings[0].value > 1e3


def test_real_fit_with_lr_1e6_is_flat(digits):
    Xtr, _, ytr, _ = digits
    net = fit(Xtr, ytr, lr=1e-6, max_epochs=3)
    findings = diagnose(net.history)
    # observed: train loss 2.718, 2.714, 2.710 after a first batch of 2.627
    assert codes(findings) == [("flat_loss", None)]
    assert findings[0].value < 0.05


def test_real_fit_big_mlp_on_50_samples_overfits():
    X, y = make_classification(n_samples=50, n_features=20, n_informative=3, flip_y=0.1,
                               random_state=0)
    net = fit(X.astype(np.float32), y, module__hidden_sizes=(512, 512), max_epochs=20,
              train_split=0.4, batch_size=16)
    findings = diagnose(net.history)
    # observed: train loss 1.87 -> 0.0011; valid loss best 1.11 at epoch 1, ends 1.27 (+14%)
    assert [f.code for f in findings] == ["overfitting"]
    assert net.history[-1, "valid_loss"] - net.history[-1, "train_loss"] > 0.5


def test_real_healthy_fit_has_no_findings(digits):
    Xtr, _, ytr, _ = digits
    net = fit(Xtr, ytr, max_epochs=8)
    # observed: train loss 1.94 -> 0.094, valid loss 1.02 -> 0.12
    assert diagnose(net.history) == []


# --------------------------------------------------------------------------- the plot


def test_learning_curves_mark_findings(tmp_path):
    import matplotlib.image as mpimg
    import matplotlib.pyplot as plt

    history = rows([1.0, 0.5, 0.2, 0.1, 0.05], [1.0, 0.6, 0.8, 1.3, 1.1])
    findings = diagnose(history) + [Finding("underfitting", "info", None, "x", 0.6)]
    plain = plots.learning_curves(history, tmp_path / "plain.png")
    marked = plots.learning_curves(history, tmp_path / "marked.png", findings=findings)
    a, b = mpimg.imread(plain), mpimg.imread(marked)
    assert a.shape == b.shape and np.abs(a - b).sum() > 0  # the marks were drawn
    assert plt.get_fignums() == []
    with pytest.raises(ValueError, match="findings must be a list of nnpipe.diagnostics.Finding"
                                         ", got str at position 0"):
        plots.learning_curves(history, tmp_path / "bad.png", findings=["overfitting"])
    assert not (tmp_path / "bad.png").exists()


def test_a_tiny_rise_of_a_near_perfect_validation_loss_is_not_overfitting():
    # the default CNN on digits: valid loss 0.0096 -> 0.011 (+15%) in the last epoch, while the
    # starting loss was 2.3: 0.07% of it, noise rather than overfitting
    rows = [{"epoch": i + 1, "train_loss": 2.3 / (i + 1) ** 2, "valid_loss": v}
            for i, v in enumerate([0.5, 0.05, 0.0096, 0.011])]
    assert diagnose(rows, initial_loss=2.3) == []
    assert [f.code for f in diagnose(rows, initial_loss=2.3, min_rise_frac=0)] == ["overfitting"]
    with pytest.raises(ValueError, match="min_rise_frac must be a number >= 0, got -1"):
        diagnose(rows, min_rise_frac=-1)

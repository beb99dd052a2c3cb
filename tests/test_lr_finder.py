"""nnpipe.lr_finder: a real range test on digits; the curve, the suggestion and the copy checked."""

import re

import numpy as np
import pytest
from skorch.callbacks import Callback
from sklearn.pipeline import Pipeline, make_pipeline
from sklearn.preprocessing import StandardScaler

from nnpipe import NNClassifier, NNRegressor
from nnpipe.lr_finder import LRRangeResult, lr_range_test

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


class Calls(Callback):
    """A user callback that must not run (nor be copied) during a range test."""

    def __init__(self):
        self.n = 0

    def on_batch_end(self, net, **kwargs):
        self.n += 1

    def __deepcopy__(self, memo):
        raise AssertionError("the range test must not deep-copy the estimator's callbacks")


@pytest.fixture(scope="module")
def curve(digits):
    Xtr, _, ytr, _ = digits
    clf = NNClassifier(random_state=0)
    return clf, lr_range_test(clf, Xtr, ytr)  # defaults: 1e-7 .. 10 over 100 batches


def test_curve_follows_the_exponential_sweep_and_the_smoothing(curve):
    _, r = curve
    assert isinstance(r, LRRangeResult)
    n = len(r.lrs)
    gamma = (10 / 1e-7) ** (1 / 99)
    np.testing.assert_allclose(r.lrs, 1e-7 * gamma ** np.arange(n), rtol=1e-9)
    avg, expected = 0.0, []
    for i, loss in enumerate(r.raw_losses, start=1):  # fast.ai's debiased moving average
        avg = 0.98 * avg + 0.02 * loss
        expected.append(avg / (1 - 0.98 ** i))
    np.testing.assert_allclose(r.losses, expected, rtol=1e-12)
    assert r.losses.shape == r.raw_losses.shape == (n,)


def test_curve_stops_after_divergence(curve):
    _, r = curve
    # digits + Adam: observed stop after 84 of the 100 batches, at lr 0.51 (smoothed loss
    # 8.88 > 4 x 1.84, its best)
    assert r.stop_reason == "diverged"
    assert 20 < len(r.lrs) < 100
    assert r.losses[-1] > 4 * r.losses.min()
    running_best = np.minimum.accumulate(r.losses)
    assert np.all(r.losses[1:-1] <= 4 * running_best[:-2])  # no earlier point had diverged


def test_suggested_lr_trains_better_than_a_tiny_or_a_huge_lr(curve, digits):
    clf, r = curve
    Xtr, _, ytr, _ = digits
    # observed: steepest 0.0148, min loss at lr 0.095
    assert 1e-7 < r.suggested_lr < 10
    assert r.suggested_lr == r.steepest_lr
    assert 1e-3 < r.suggested_lr < r.min_loss_lr < r.lrs[-1]

    def loss_after(lr):
        # divergence_factor=None: a too-high lr gives its (bad) loss instead of stopping the fit
        net = NNClassifier(random_state=0, lr=lr, max_epochs=3, divergence_factor=None)
        return net.fit(Xtr, ytr).history[-1, "train_loss"]

    good, tiny, huge = loss_after(r.suggested_lr), loss_after(1e-6), loss_after(r.lrs[-1])
    # observed: 0.098 with the suggestion, 2.71 with 1e-6 (start_lr x 10), 2.17 with 0.51
    assert good < 0.2
    assert good < tiny / 10
    assert good < huge / 10


def test_min_loss_rule(digits):
    Xtr, _, ytr, _ = digits
    r = lr_range_test(NNClassifier(random_state=0), Xtr, ytr, start_lr=1e-4, num_iter=40,
                      suggest="min_loss")
    assert r.min_loss_lr == r.lrs[np.argmin(r.losses)]
    assert r.suggested_lr == pytest.approx(r.min_loss_lr / 10)
    assert 1e-4 < r.suggested_lr < 10


def test_same_seed_same_curve(curve, digits):
    clf, r = curve
    Xtr, _, ytr, _ = digits
    again = lr_range_test(clf, Xtr, ytr, num_iter=100)
    np.testing.assert_array_equal(again.raw_losses, r.raw_losses)


def test_runs_all_batches_when_nothing_diverges(blobs):
    X, y = blobs
    r = lr_range_test(NNClassifier(random_state=0, batch_size=32), X, y, start_lr=1e-6,
                      end_lr=1e-3, num_iter=25)  # 300 rows / 32: three epochs of batches
    assert r.stop_reason == "num_iter"
    assert len(r.lrs) == 25
    assert r.lrs[0] == pytest.approx(1e-6) and r.lrs[-1] == pytest.approx(1e-3)


@pytest.mark.parametrize("train_iter", [{"iterator_train__batch_size": 150},
                                        {"iterator_train__batch_size": 64,
                                         "iterator_train__drop_last": True}])
def test_the_sweep_is_paced_by_the_batches_an_epoch_really_runs(blobs, train_iter):
    """300 rows with batch_size=16 but training batches of 150 (2 per epoch) or 64 without the
    last (4 per epoch): the sweep still gets all num_iter batches."""
    X, y = blobs
    r = lr_range_test(NNClassifier(random_state=0, batch_size=16, **train_iter), X, y,
                      start_lr=1e-6, end_lr=1e-3, num_iter=40)
    assert r.stop_reason == "num_iter" and len(r.lrs) == 40
    assert r.lrs[-1] == pytest.approx(1e-3)


def test_estimator_left_untouched_unfitted(blobs):
    X, y = blobs
    calls = Calls()
    clf = NNClassifier(random_state=0, lr=0.05, max_epochs=7, lr_schedule="cosine",
                       early_stopping=3, callbacks=[("calls", calls)],
                       module__hidden_sizes=(32,), optimizer__weight_decay=1e-4)
    before = clf.get_params(deep=False)
    lr_range_test(clf, X, y, start_lr=1e-5, num_iter=30)
    after = clf.get_params(deep=False)
    assert after.keys() == before.keys()
    assert all(after[k] is before[k] or after[k] == before[k] for k in before)
    assert after["callbacks"][0][1] is calls and calls.n == 0
    assert not clf.initialized_ and not hasattr(clf, "module_") and not clf.history
    assert not hasattr(clf, "n_features_in_")


def test_estimator_left_untouched_fitted(blobs):
    X, y = blobs
    clf = NNClassifier(random_state=0, max_epochs=3).fit(X, y)
    weights = {k: v.clone() for k, v in clf.module_.state_dict().items()}
    proba = clf.predict_proba(X)
    lr_range_test(clf, X, y, start_lr=1e-5, num_iter=30)
    assert len(clf.history) == 3 and clf.lr == 1e-3
    for k, v in clf.module_.state_dict().items():
        assert np.array_equal(v.numpy(), weights[k].numpy())
    np.testing.assert_array_equal(clf.predict_proba(X), proba)


def test_pipeline_and_regressor(blobs):
    X, y = blobs
    pipe = make_pipeline(StandardScaler(), NNClassifier(random_state=0))
    r = lr_range_test(pipe, X * 100 + 5, y, start_lr=1e-5, num_iter=40)
    assert 1e-5 < r.suggested_lr < 10
    assert not hasattr(pipe[0], "mean_")  # the pipeline's own steps stay unfitted

    rng = np.random.RandomState(0)
    Xr = rng.normal(size=(256, 3)).astype(np.float32)
    rr = lr_range_test(NNRegressor(random_state=0), Xr, Xr.sum(1), start_lr=1e-5,
                       num_iter=40)
    assert 1e-5 < rr.suggested_lr < 10 and rr.raw_losses[0] > 1  # MSE of an untrained net


def test_the_estimators_own_loss_is_used(blobs):
    X, y = blobs
    plain = lr_range_test(NNClassifier(random_state=0), X, y, start_lr=1e-6, end_lr=1e-5,
                          num_iter=5)
    penalised = lr_range_test(NNClassifier(random_state=0, l2=0.01), X, y, start_lr=1e-6,
                              end_lr=1e-5, num_iter=5)

    class Initial(Callback):
        def on_train_begin(self, net, **kwargs):
            self.weights = [w.detach().clone() for n, w in net.module_.named_parameters()
                            if n.endswith("weight") and w.dim() > 1]

    initial = Initial()
    NNClassifier(random_state=0, max_epochs=1, callbacks=[initial]).fit(X, y)
    penalty = 0.01 * sum(float((w ** 2).sum()) for w in initial.weights)
    # same seed, same initial weights: the first batches differ by exactly the l2 penalty
    assert penalty > 1
    assert penalised.raw_losses[0] - plain.raw_losses[0] == pytest.approx(penalty, rel=1e-4)


def test_start_lr_too_high(blobs):
    X, y = blobs
    with pytest.raises(ValueError, match=r"start_lr=1000\.0 is already too high\. Lower "
                                         r"start_lr"):
        lr_range_test(NNClassifier(random_state=0), X, y, start_lr=1e3, end_lr=1e5,
                      num_iter=20)


@pytest.mark.parametrize("kwargs, message", [
    ({"start_lr": 1.0, "end_lr": 0.1}, r"start_lr must be smaller than end_lr, got "
                                       r"start_lr=1\.0 >= end_lr=0\.1"),
    ({"start_lr": 0}, r"start_lr must be a finite number > 0, got 0"),
    ({"end_lr": float("inf")}, r"end_lr must be a finite number > 0, got inf"),
    ({"num_iter": 1}, r"num_iter must be an int >= 2 .*, got 1"),
    ({"num_iter": 10.0}, r"num_iter must be an int >= 2 .*, got 10\.0"),
    ({"smooth": 1.0}, r"smooth must be a number in \[0, 1\) .*, got 1\.0"),
    ({"diverge_factor": 1}, r"diverge_factor must be a number > 1, got 1"),
    ({"suggest": "valley"}, r"suggest must be 'steepest' or 'min_loss', got 'valley'"),
])
def test_argument_errors(blobs, kwargs, message):
    X, y = blobs
    with pytest.raises(ValueError, match=message):
        lr_range_test(NNClassifier(), X, y, **kwargs)


def test_estimator_must_be_an_nnpipe_net(blobs):
    from sklearn.linear_model import LogisticRegression

    X, y = blobs
    with pytest.raises(ValueError, match="estimator must be an NNClassifier, an NNRegressor or "
                                         "a Pipeline ending in one, got 'LogisticRegression'"):
        lr_range_test(make_pipeline(StandardScaler(), LogisticRegression()), X, y)


def test_plot_writes_a_png(curve, tmp_path):
    import matplotlib.pyplot as plt
    from matplotlib.figure import Figure

    _, r = curve
    path = tmp_path / "plots" / "lr_range.png"
    fig = r.plot(path)
    assert isinstance(fig, Figure)
    assert fig.axes[0].get_xscale() == "log"
    assert path.read_bytes()[:8] == PNG_SIGNATURE and path.stat().st_size > 10_000
    assert isinstance(r.plot(), Figure)
    assert plt.get_fignums() == []


def test_the_command_line_suggests_train_lr_for_a_params_file(tmp_path, capsys):
    import yaml

    from nnpipe.cli import main
    from nnpipe.data import load_dataset, save_dataset

    save_dataset(load_dataset("digits"), tmp_path / "data")
    params = {"data": {"source": "digits"}, "preprocess": ["global_center"],
              "model": {"module": "mlp", "module__hidden_sizes": [32]},
              "train": {"lr": 0.5, "random_state": 0}}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    code = main(["lr-range-test", "--params", str(tmp_path / "params.yaml"), "--data",
                 str(tmp_path / "data"), "--plot", str(tmp_path / "p" / "lr.png"),
                 "--num-iter", "60"])
    out = capsys.readouterr().out
    assert code == 0, out
    suggested = float(re.search(r"suggested train.lr: ([0-9.e-]+)", out).group(1))
    assert 1e-7 < suggested < 10 and "params.yaml has 0.5" in out
    assert (tmp_path / "p" / "lr.png").stat().st_size > 10_000
    assert main(["lr-range-test", "--params", str(tmp_path / "params.yaml"), "--data",
                 str(tmp_path / "missing")]) == 1
    assert "missing" in capsys.readouterr().err


def test_a_pipeline_without_preprocessing_steps(blobs):
    """params.yaml's ``preprocess: []`` builds Pipeline([("model", net)]): its empty
    ``pipe[:-1]`` is no transformer, so the rows go to the network as they are."""
    X, y = blobs
    net = NNClassifier(module__hidden_sizes=[16], random_state=0)
    alone = lr_range_test(net, X, y, start_lr=1e-4, end_lr=1.0, num_iter=12)
    piped = lr_range_test(Pipeline([("model", net)]), X, y, start_lr=1e-4, end_lr=1.0,
                          num_iter=12)
    np.testing.assert_allclose(piped.raw_losses, alone.raw_losses)

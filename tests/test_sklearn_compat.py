"""sklearn's contract: its own estimator checks, Pipeline, cross_validate, GridSearchCV, clone, pickle."""

import pickle

import numpy as np
import pytest
from sklearn.base import clone
from sklearn.model_selection import GridSearchCV, cross_validate
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.utils.estimator_checks import parametrize_with_checks

from nnpipe import NNClassifier, NNRegressor

_SKORCH_INIT = ("skorch's NeuralNet.__init__ sets history_, initialized_ and virtual_params_ "
                "(skorch design, kept so skorch's own machinery works)")

EXPECTED_FAILED = {
    "NNClassifier": {
        "check_no_attributes_set_in_init": _SKORCH_INIT,
    },
    "NNRegressor": {
        "check_no_attributes_set_in_init": _SKORCH_INIT,
        "check_regressors_no_decision_function": (
            "skorch's NeuralNetRegressor exposes predict_proba, returning the raw network output"),
    },
}


@parametrize_with_checks(
    [NNClassifier(max_epochs=20, lr=1e-2, train_split=None),
     NNRegressor(max_epochs=20, lr=1e-2, train_split=None)],
    expected_failed_checks=lambda est: EXPECTED_FAILED[type(est).__name__],
)
def test_sklearn_estimator_checks(estimator, check):
    check(estimator)


def test_pipeline_cross_validate_and_grid_search(blobs):
    X, y = blobs
    pipe = make_pipeline(StandardScaler(), NNClassifier(max_epochs=5, lr=1e-2, random_state=0))
    scores = cross_validate(pipe, X, y, cv=3)["test_score"]
    assert len(scores) == 3 and scores.min() > 0.9
    grid = GridSearchCV(pipe, {"nnclassifier__lr": [1e-4, 1e-2],
                               "nnclassifier__module__hidden_sizes": [[8], [32]]}, cv=2)
    grid.fit(X, y)
    assert grid.best_params_["nnclassifier__lr"] == 1e-2
    assert len(grid.cv_results_["params"]) == 4


def test_get_params_exposes_every_knob_and_set_params_reaches_it():
    clf = NNClassifier(lr_schedule="cosine", lr_schedule__eta_min=1e-5)
    params = clf.get_params()
    for knob in ("input_shape", "activation", "init", "batch_norm", "dropout", "l1", "l2",
                 "max_norm", "clip_grad_norm", "clip_grad_value", "lr_schedule",
                 "early_stopping", "random_state", "module", "criterion", "optimizer", "lr",
                 "max_epochs", "batch_size", "train_split", "callbacks", "device", "verbose"):
        assert knob in params, knob
    assert params["lr_schedule__eta_min"] == 1e-5
    assert not any(k.startswith("_") for k in params)
    clf.set_params(dropout=0.2, activation__negative_slope=0.3, optimizer__momentum=0.8,
                   lr_schedule__eta_min=0.0)
    assert clf.get_params()["dropout"] == 0.2
    assert clf.get_params()["activation__negative_slope"] == 0.3
    assert clf.get_params()["lr_schedule__eta_min"] == 0.0


def test_clone_and_pickle_round_trip(blobs):
    X, y = blobs
    clf = NNClassifier(max_epochs=3, module__hidden_sizes=[16], dropout=0.1, random_state=0)
    cloned = clone(clf)
    assert cloned.get_params()["module__hidden_sizes"] == [16]
    clf.fit(X, y)
    restored = pickle.loads(pickle.dumps(clf))
    np.testing.assert_array_equal(restored.predict_proba(X), clf.predict_proba(X))
    # a clone of a fitted estimator is unfitted and trains to the same result
    refit = clone(clf).fit(X, y)
    np.testing.assert_array_equal(refit.predict_proba(X), clf.predict_proba(X))


def test_partial_fit_continues_training(blobs):
    X, y = blobs
    clf = NNClassifier(max_epochs=2, lr=1e-4, random_state=0).fit(X, y)  # far from converged
    before = clf.history[-1, "train_loss"]
    clf.partial_fit(X, y)
    assert len(clf.history) == 4 and clf.history[-1, "train_loss"] < before
    with pytest.raises(ValueError, match="not among the classes"):
        clf.partial_fit(X, np.full_like(y, 7))


def test_set_params_stores_callbacks_and_fit_checks_them(blobs):
    """sklearn's convention: set_params only stores; a bad `callbacks` fails in fit, by name."""
    from skorch.callbacks import EpochScoring

    X, y = blobs
    clf = NNClassifier(max_epochs=2, random_state=0).set_params(callbacks=5)
    assert clf.get_params()["callbacks"] == 5
    with pytest.raises(TypeError, match=r"callbacks must be None, 'disable' .* got 5"):
        clf.fit(X, y)
    with pytest.raises(TypeError, match=r"or a list of skorch callbacks .* got \(1,\)"):
        clf.set_params(callbacks=(1,)).fit(X, y)
    scoring = EpochScoring("accuracy", on_train=True, name="train_acc")
    clf.set_params(callbacks=[("train_acc", scoring)],
                   callbacks__train_acc__lower_is_better=True).fit(X, y)
    assert len(clf.history[:, "train_acc"]) == 2
    assert dict(clf.callbacks_)["train_acc"].lower_is_better is True
    # skorch's "disable": no callbacks at all, and training still runs (also on a fitted net)
    clf.set_params(callbacks="disable").partial_fit(X, y)
    assert clf.callbacks_ == [] and len(clf.history) == 4  # 2 more epochs
    assert "train_loss" not in clf.history[-1]  # no scoring callback ran
    fresh = NNClassifier(max_epochs=2, random_state=0, callbacks="disable").fit(X, y)
    assert fresh.callbacks_ == [] and len(fresh.history) == 2

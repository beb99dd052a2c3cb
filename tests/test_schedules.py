"""Each learning-rate schedule produces its documented curve."""

import math

import numpy as np
import pytest
import torch

from nnpipe import NNClassifier
from nnpipe.schedules import ScheduleContext, make_schedule

LR0 = 0.1
CTX = ScheduleContext(max_epochs=10, steps_per_epoch=5)


def _curve(name, n_steps, **params):
    """Learning rate in force at each step (batch or epoch, as the schedule steps)."""
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=LR0)
    sched, every = make_schedule(name, opt, CTX, **params)
    lrs = []
    for _ in range(n_steps):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return np.array(lrs), every


def test_power():
    lrs, every = _curve("power", 50, decay_steps=10, power=2)
    t = np.arange(50)
    assert every == "batch"
    np.testing.assert_allclose(lrs, LR0 / (1 + t / 10) ** 2, rtol=1e-6)


def test_exponential_falls_tenfold_over_the_run_by_default():
    lrs, every = _curve("exponential", 51)
    t = np.arange(51)
    np.testing.assert_allclose(lrs, LR0 * 0.1 ** (t / CTX.total_steps), rtol=1e-6)
    assert lrs[50] == pytest.approx(LR0 / 10)


def test_piecewise_constant():
    lrs, every = _curve("piecewise", 10, boundaries=[3, 7], values=[1.0, 0.5, 0.1])
    assert every == "epoch"
    np.testing.assert_allclose(lrs, LR0 * np.array([1, 1, 1, .5, .5, .5, .5, .1, .1, .1]))


def test_onecycle_rises_to_max_lr_then_anneals_far_below():
    lrs, every = _curve("onecycle", CTX.total_steps, max_lr=1.0)
    peak = int(np.argmax(lrs))
    assert every == "batch"
    assert lrs.max() == pytest.approx(1.0, rel=1e-3)
    assert peak == pytest.approx(0.3 * CTX.total_steps, abs=1)
    assert lrs[0] == pytest.approx(1.0 / 25)
    assert lrs[-1] < lrs[0] / 100
    assert np.all(np.diff(lrs[:peak]) > 0) and np.all(np.diff(lrs[peak:]) < 0)


def test_cosine():
    lrs, _ = _curve("cosine", CTX.total_steps)
    t = np.arange(CTX.total_steps)
    np.testing.assert_allclose(lrs, LR0 * (1 + np.cos(np.pi * t / CTX.total_steps)) / 2,
                               atol=1e-9)


def test_cosine_restarts_restart_every_cycle():
    lrs, _ = _curve("cosine_restarts", 30, cycle_epochs=2)  # a cycle is 2 * 5 = 10 steps
    t = np.arange(30) % 10
    np.testing.assert_allclose(lrs, LR0 * (1 + np.cos(np.pi * t / 10)) / 2, atol=1e-9)


def test_plateau_halves_once_more_than_patience_epochs_fail_to_improve():
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=LR0)
    sched, every = make_schedule("plateau", opt, CTX, patience=2, factor=0.5)
    lrs = []
    for loss in [1.0, 0.9, 0.9, 0.9, 0.9, 0.9, 0.9]:
        sched.step(loss)
        lrs.append(opt.param_groups[0]["lr"])
    assert every == "epoch"
    # epochs 2, 3, 4 do not improve on 0.9: the third bad epoch (> patience) halves the lr
    assert lrs == pytest.approx([LR0, LR0, LR0, LR0, LR0 / 2, LR0 / 2, LR0 / 2])


def test_estimator_records_the_schedule_in_history(blobs):
    X, y = blobs
    clf = NNClassifier(max_epochs=6, lr=LR0, optimizer="sgd", lr_schedule="piecewise",
                       lr_schedule__boundaries=[2, 4], lr_schedule__values=[1, 0.1, 0.01],
                       random_state=0).fit(X, y)
    np.testing.assert_allclose(clf.history[:, "lr"], LR0 * np.array([1, 1, .1, .1, .01, .01]))
    assert clf.optimizer_.param_groups[0]["lr"] == pytest.approx(LR0 * 0.01)


def test_per_batch_schedule_steps_every_batch(blobs):
    X, y = blobs  # 240 training rows / batch 60 = 4 steps per epoch
    clf = NNClassifier(max_epochs=3, lr=LR0, batch_size=60, lr_schedule="cosine",
                       random_state=0).fit(X, y)
    batch_lrs = [b["lr"] for epoch in clf.history for b in epoch["batches"] if "lr" in b]
    t = np.arange(12)
    np.testing.assert_allclose(batch_lrs, LR0 * (1 + np.cos(np.pi * t / 12)) / 2, atol=1e-7)


def test_plateau_monitors_validation_loss_inside_fit(blobs):
    X, y = blobs
    clf = NNClassifier(max_epochs=4, lr_schedule="plateau", lr_schedule__patience=0,
                       lr_schedule__factor=0.5, lr_schedule__threshold=10.0,
                       random_state=0).fit(X, y)
    # threshold=10 means no epoch counts as an improvement: lr halves after every epoch
    assert clf.history[:, "lr"] == pytest.approx([1e-3, 5e-4, 2.5e-4, 1.25e-4])


@pytest.mark.parametrize("bad, match", [
    (dict(lr_schedule="cosin"), "Did you mean 'cosine'"),
    (dict(lr_schedule="power", lr_schedule__decay_steps=-1), "lr_schedule__decay_steps"),
    (dict(lr_schedule="piecewise", lr_schedule__boundaries=[2], lr_schedule__values=[1.0]),
     "one more entry"),
    (dict(lr_schedule="cosine", lr_schedule__bogus=1), "bogus"),
    (dict(lr_schedule="plateau", lr_schedule__monitor="valid_f1"), "valid_f1"),
])
def test_bad_schedules_fail_with_the_key_and_value(blobs, bad, match):
    X, y = blobs
    with pytest.raises(ValueError, match=match):
        NNClassifier(max_epochs=2, **bad).fit(X, y)


def test_torch_scheduler_class_is_accepted(blobs):
    X, y = blobs
    clf = NNClassifier(max_epochs=3, lr=LR0, lr_schedule=torch.optim.lr_scheduler.StepLR,
                       lr_schedule__step_size=1, lr_schedule__gamma=0.5, random_state=0).fit(X, y)
    assert clf.history[:, "lr"] == pytest.approx([LR0, LR0 / 2, LR0 / 4])
    assert math.isclose(clf.optimizer_.param_groups[0]["lr"], LR0 / 8)


# --- per-batch schedules are paced by the real number of training batches per epoch

def _reference(name, ctx, n_steps, lr, **params):
    """The lr in force at each of ``n_steps`` steps of schedule ``name`` paced by ``ctx``."""
    opt = torch.optim.Adam([torch.zeros(1, requires_grad=True)], lr=lr)
    sched, _ = make_schedule(name, opt, ctx, **dict(params))
    lrs = []
    for _ in range(n_steps):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return np.array(lrs), opt.param_groups[0]["lr"]


def _batch_lrs(clf):
    return np.array([b["lr"] for epoch in clf.history for b in epoch["batches"] if "lr" in b])


# blobs: 300 rows, 240 of them train with the default train_split=0.2
@pytest.mark.parametrize("knobs, per_epoch", [
    (dict(iterator_train__batch_size=16), 15),                         # 240 / 16
    (dict(iterator_train__drop_last=True), 3),                          # floor(240 / 64)
    (dict(train_split=None, iterator_train__batch_size=16), 19),       # ceil(300 / 16)
    (dict(iterator_train__batch_size=100, iterator_train__drop_last=True), 2),  # floor(240 / 100)
], ids=["train_batch_16", "drop_last", "no_split", "train_batch_100_drop_last"])
def test_onecycle_is_paced_by_the_real_training_batches(blobs, knobs, per_epoch):
    X, y = blobs
    epochs, lr = 3, 0.01
    clf = NNClassifier(max_epochs=epochs, lr=lr, batch_size=64, lr_schedule="onecycle",
                       random_state=0, **knobs).fit(X, y)
    assert [sum("train_loss" in b for b in row["batches"]) for row in clf.history] \
        == [per_epoch] * epochs
    sched = dict(clf.callbacks_)["lr_schedule"].scheduler_
    assert sched.total_steps == per_epoch * epochs
    expected, _ = _reference("onecycle", ScheduleContext(epochs, per_epoch), per_epoch * epochs, lr)
    lrs = _batch_lrs(clf)
    np.testing.assert_allclose(lrs, expected, rtol=1e-6)
    assert lrs[-1] == pytest.approx(lr / 25 / 1e4, rel=1e-6)  # OneCycleLR's final lr


@pytest.mark.parametrize("name, params", [
    ("onecycle", {}), ("cosine", {"eta_min": 1e-4}), ("cosine_restarts", {"cycle_epochs": 1}),
    ("power", {}), ("exponential", {}),
])
def test_every_per_batch_schedule_counts_iterator_train_batches(blobs, name, params):
    X, y = blobs  # 240 training rows in batches of 16: 15 steps per epoch, not 240 / 64 = 4
    epochs, lr, per_epoch = 2, 0.01, 15
    clf = NNClassifier(max_epochs=epochs, lr=lr, batch_size=64, iterator_train__batch_size=16,
                       lr_schedule=name, random_state=0,
                       **{f"lr_schedule__{k}": v for k, v in params.items()}).fit(X, y)
    expected, final = _reference(name, ScheduleContext(epochs, per_epoch), per_epoch * epochs,
                                 lr, **params)
    np.testing.assert_allclose(_batch_lrs(clf), expected, rtol=1e-6)
    assert clf.optimizer_.param_groups[0]["lr"] == pytest.approx(final, rel=1e-6)


@pytest.mark.parametrize("knobs", [dict(iterator_train__batch_size=16),
                                   dict(iterator_train__drop_last=True),
                                   dict(train_split=None, iterator_train__batch_size=32)],
                         ids=["train_batch_16", "drop_last", "no_split"])
def test_cosine_reaches_eta_min_with_the_last_batch(blobs, knobs):
    X, y = blobs
    clf = NNClassifier(max_epochs=2, lr=0.01, batch_size=64, lr_schedule="cosine",
                       lr_schedule__eta_min=1e-4, random_state=0, **knobs).fit(X, y)
    lrs = _batch_lrs(clf)
    assert np.all(np.diff(lrs) < 0) and lrs[-1] > 1e-4  # annealing all the way, not restarting
    assert clf.optimizer_.param_groups[0]["lr"] == pytest.approx(1e-4, rel=1e-9)


def test_a_per_batch_schedule_without_a_batch_count_says_so():
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=LR0)
    with pytest.raises(ValueError, match="number of training batches per epoch"):
        make_schedule("cosine", opt, ScheduleContext(max_epochs=3, steps_per_epoch=None))
    sched, every = make_schedule("piecewise", opt, ScheduleContext(3, None))  # per epoch: fine
    assert every == "epoch"

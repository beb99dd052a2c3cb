"""Exact resumption from a training checkpoint (nnpipe.checkpoint.resume).

A run killed right after any checkpoint and resumed must end with the weights, losses and
learning rates of the run that was never killed, bit for bit: the checkpoint holds the optimizer
state, the lr schedule's position, early stopping's patience and the random state.
"""

import json

import numpy as np
import pytest
import torch
from skorch.callbacks import Callback

from nnpipe import NNClassifier, NNRegressor, save
from nnpipe.checkpoint import Checkpoint, load_checkpoint, resume


class Crash(Callback):
    """Stops the run after epoch ``at``, as a killed job would (after that epoch's checkpoint:
    skorch runs the user's callbacks in order)."""

    def __init__(self, at):
        self.at = at

    def on_epoch_end(self, net, **kwargs):
        if len(net.history) == self.at:
            raise KeyboardInterrupt


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(0)
    X = rng.normal(size=(160, 16)).astype(np.float32)
    y = (X[:, :4].sum(1) > 0).astype(np.int64) + (X[:, 4] > 1)
    return X, y


def _same_run(a, b):
    for (name, wa), wb in zip(a.module_.state_dict().items(), b.module_.state_dict().values()):
        assert torch.equal(wa, wb), name
    for column in ("train_loss", "valid_loss", "lr"):
        if column in a.history[-1]:
            assert a.history[:, column] == b.history[:, column], column
    assert len(a.history) == len(b.history)


CONFIGS = {
    "adam+cosine(batch)+dropout": dict(optimizer="adam", lr=0.01, lr_schedule="cosine",
                                       dropout=0.3),
    "nesterov+onecycle+batchnorm": dict(optimizer="nesterov", lr=0.05, lr_schedule="onecycle",
                                        batch_norm=True),
    "rmsprop+plateau+early_stopping": dict(optimizer="rmsprop", lr=0.02, lr_schedule="plateau",
                                           lr_schedule__patience=1, early_stopping=3),
    "nadam+piecewise+l2+max_norm": dict(optimizer="nadam", lr=0.01, lr_schedule="piecewise",
                                        l2=1e-4, max_norm=2.0),
    "adamw+lr_multipliers+freeze/unfreeze": dict(optimizer="adamw", lr=0.01,
                                                 lr_multipliers={"hidden.*": 0.1},
                                                 freeze="hidden.0.*", unfreeze_after=3),
    "cnn2d+augment+power": dict(module="cnn2d", input_shape=[1, 4, 4], module__channels=[4],
                                module__hidden_sizes=[16], lr_schedule="power",
                                augment={"noise": {"std": 0.1}, "hflip": {"p": 0.5}}),
}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_a_killed_and_resumed_run_equals_the_uninterrupted_one(data, tmp_path, name):
    X, y = data
    params = dict(max_epochs=8, batch_size=32, random_state=3, **CONFIGS[name])
    whole = NNClassifier(**params).fit(X, y)
    cut = NNClassifier(**params, callbacks=[Checkpoint(tmp_path, monitor=None), Crash(4)])
    cut.fit(X, y)
    assert len(cut.history) == 4 and cut.interrupted_
    if len(whole.history) <= 4:  # early stopping ended it first: nothing to resume
        pytest.skip("the uninterrupted run stopped before the crash")
    resumed = resume(tmp_path, X, y)
    _same_run(whole, resumed)
    # and the checkpoint went on: it now holds the last epoch
    assert len(load_checkpoint(tmp_path).history) == len(whole.history)


def test_a_run_killed_twice_still_equals_the_uninterrupted_one(data, tmp_path):
    X, y = data
    params = dict(max_epochs=9, optimizer="adam", lr_schedule="cosine", dropout=0.2,
                  random_state=0)
    whole = NNClassifier(**params).fit(X, y)
    NNClassifier(**params, callbacks=[Checkpoint(tmp_path, monitor=None), Crash(2)]).fit(X, y)
    again = resume(tmp_path, X, y, callbacks=[Crash(5)])
    assert len(again.history) == 5
    _same_run(whole, resume(tmp_path, X, y))


def test_resuming_from_the_best_epoch_replays_the_rest_exactly(data, tmp_path):
    """With the default monitor the checkpoint is the best epoch, not the last: resuming from
    it replays the epochs after it, to the same end, and early stopping fires where it did."""
    X, y = data
    params = dict(max_epochs=60, optimizer="adam", lr=0.05, early_stopping=4, random_state=1)
    whole = NNClassifier(**params).fit(X, y)
    assert len(whole.history) < 60  # early stopping did stop it
    NNClassifier(**params, callbacks=[Checkpoint(tmp_path), Crash(len(whole.history) - 1)]
                 ).fit(X, y)
    saved = load_checkpoint(tmp_path)
    assert len(saved.history) < len(whole.history) - 1  # the best epoch, some way back
    resumed = resume(tmp_path, X, y)
    _same_run(whole, resumed)


def test_a_regressor_with_huber_loss_resumes_exactly(data, tmp_path):
    X, _ = data
    target = X[:, :2] @ np.array([[1.0], [-2.0]], np.float32)
    params = dict(max_epochs=6, criterion="huber", optimizer="momentum", lr=0.01,
                  lr_schedule="exponential", random_state=0)
    whole = NNRegressor(**params).fit(X, target)
    NNRegressor(**params, callbacks=[Checkpoint(tmp_path, monitor=None), Crash(3)]).fit(X, target)
    _same_run(whole, resume(tmp_path, X, target))


def test_the_checkpoint_keeps_one_state_file_which_is_checked(data, tmp_path):
    X, y = data
    NNClassifier(max_epochs=4, random_state=0, callbacks=[Checkpoint(tmp_path, monitor=None)]
                 ).fit(X, y)
    states = list(tmp_path.glob("state-*.safetensors"))
    assert len(states) == 1 and len(list(tmp_path.glob("weights-*.safetensors"))) == 1
    manifest = json.loads((tmp_path / "model.json").read_text())
    assert manifest["training_state"]["meta"]["epochs"] == 4
    blob = bytearray(states[0].read_bytes())
    blob[-1] ^= 0xFF
    states[0].write_bytes(bytes(blob))
    with pytest.raises(ValueError, match="does not match the checksum"):
        resume(tmp_path, X, y)


def test_resume_refuses_what_it_cannot_continue_exactly(data, tmp_path):
    X, y = data
    net = NNClassifier(max_epochs=2, random_state=0).fit(X, y)
    save(net, tmp_path / "plain")
    with pytest.raises(ValueError, match="holds a model without training state .* "
                                         "load_checkpoint\\(\\.\\.\\.\\)\\.partial_fit"):
        resume(tmp_path / "plain", X, y)
    with pytest.raises(FileNotFoundError, match="resume: dirname=.* holds no checkpoint"):
        resume(tmp_path / "nothing", X, y)
    NNClassifier(max_epochs=4, random_state=0, callbacks=[
        Checkpoint(tmp_path / "fn", monitor=lambda net: True), Crash(2)]).fit(X, y)
    with pytest.raises(ValueError, match="monitor was a function.* pass "
                                         "checkpoint=Checkpoint\\(dirname, monitor=\\.\\.\\.\\)"):
        resume(tmp_path / "fn", X, y)
    going_on = resume(tmp_path / "fn", X, y,
                      checkpoint=Checkpoint(tmp_path / "fn", monitor=lambda net: True))
    assert len(going_on.history) == 4
    with pytest.raises(ValueError, match="resume: callbacks must be None or a list"):
        resume(tmp_path / "fn", X, y, callbacks=Crash(1))


def test_a_finished_run_comes_back_as_saved(data, tmp_path):
    X, y = data
    done = NNClassifier(max_epochs=3, random_state=0,
                        callbacks=[Checkpoint(tmp_path, monitor=None)]).fit(X, y)
    again = resume(tmp_path, X, y)
    assert len(again.history) == 3
    np.testing.assert_array_equal(again.predict_proba(X), done.predict_proba(X))

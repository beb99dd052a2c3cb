"""nnpipe.checkpoint: atomic, pickle-free training checkpoints and resuming from them."""

import numpy as np
import pytest
import torch
from skorch.callbacks import Callback
from sklearn.base import clone

from nnpipe import NNClassifier
from nnpipe.checkpoint import Checkpoint, load_checkpoint


class _Recorder(Callback):
    """Record the net's probabilities on X after every epoch (the reference for each version)."""

    def __init__(self, X):
        self.X = X

    def initialize(self):
        self.proba_ = {}
        return self

    def on_epoch_end(self, net, **kwargs):
        self.proba_[len(net.history)] = net.predict_proba(self.X)


def _net(tmp_path, **kwargs):
    kwargs.setdefault("max_epochs", 6)
    return NNClassifier(module__hidden_sizes=[16], lr=0.02, random_state=0, **kwargs)


def test_saves_the_best_epoch_and_loads_it_exactly(blobs, tmp_path):
    X, y = blobs
    rec = _Recorder(X[:50])
    clf = _net(tmp_path, callbacks=[rec, Checkpoint(tmp_path / "cp", load_best=True)])
    clf.fit(X, y)
    best_flags = clf.history[:, "valid_loss_best"]
    saved_flags = clf.history[:, "event_cp"]
    assert saved_flags == best_flags  # every=1: exactly the improving epochs were saved
    best = max(i for i, flag in enumerate(best_flags, 1) if flag)
    cp = load_checkpoint(tmp_path / "cp")
    assert len(cp.history) == best
    assert cp.history[-1, "valid_loss"] == min(clf.history[:, "valid_loss"])
    np.testing.assert_array_equal(cp.predict_proba(X[:50]), rec.proba_[best])
    # load_best: after training the net holds the checkpoint's weights, not the last epoch's
    np.testing.assert_array_equal(clf.predict_proba(X[:50]), rec.proba_[best])
    assert [p.name for p in (tmp_path / "cp").iterdir() if p.name.startswith("weights-")] \
        and len(list((tmp_path / "cp").glob("weights-*"))) == 1
    clone(clf)  # a Checkpoint in callbacks survives sklearn's clone


def test_monitor_none_saves_every_kth_epoch(blobs, tmp_path):
    X, y = blobs
    rec = _Recorder(X[:20])
    clf = _net(tmp_path, max_epochs=5, train_split=None,
               callbacks=[rec, Checkpoint(tmp_path, monitor=None, every=2)]).fit(X, y)
    assert clf.history[:, "event_cp"] == [False, True, False, True, False]
    cp = load_checkpoint(tmp_path)
    assert len(cp.history) == 4
    np.testing.assert_array_equal(cp.predict_proba(X[:20]), rec.proba_[4])


def test_resume_continues_history_and_keeps_a_better_checkpoint(blobs, tmp_path):
    X, y = blobs
    _net(tmp_path, max_epochs=4, callbacks=[Checkpoint(tmp_path)]).fit(X, y)
    before = (tmp_path / "model.json").read_bytes()
    saved = load_checkpoint(tmp_path)
    n = len(saved.history)
    # resume from a worse state: skorch's fresh scorers call the first epoch "best", but the
    # checkpoint on disk is better and must not be replaced
    for p in saved.module_.parameters():
        p.data.mul_(-3.0)
    saved.set_params(max_epochs=1, lr=1e-6, callbacks=[Checkpoint(tmp_path)])
    saved.partial_fit(X, y)
    assert len(saved.history) == n + 1
    assert saved.history[-1, "valid_loss_best"] and not saved.history[-1, "event_cp"]
    assert (tmp_path / "model.json").read_bytes() == before
    # a resumed run that improves replaces it, and the history on disk runs on
    resumed = load_checkpoint(tmp_path)
    resumed.set_params(max_epochs=3, callbacks=[Checkpoint(tmp_path, monitor=None)])
    resumed.partial_fit(X, y)
    assert len(load_checkpoint(tmp_path).history) == n + 3
    np.testing.assert_array_equal(load_checkpoint(tmp_path).predict_proba(X),
                                  resumed.predict_proba(X))


@pytest.mark.parametrize("kwargs, match", [
    ({"dirname": 123}, "Checkpoint: dirname must be a directory path, got 123"),
    ({"dirname": ""}, "Checkpoint: dirname must be a directory path, got ''"),
    ({"monitor": 5}, "Checkpoint: monitor must be .*, got 5"),
    ({"every": 0}, "Checkpoint: every must be an int >= 1, got 0"),
    ({"monitor": "valid_los_best"}, r"monitor='valid_los_best' is not in the training history "
                                    r"\(has \[.*'valid_loss_best'"),
])
def test_bad_arguments_name_the_argument_and_value(blobs, tmp_path, kwargs, match):
    X, y = blobs
    kwargs.setdefault("dirname", tmp_path / "cp")
    with pytest.raises(ValueError, match=match):
        _net(tmp_path, max_epochs=1, callbacks=[Checkpoint(**kwargs)]).fit(X, y)
    assert not (tmp_path / "cp" / "model.json").exists()


def test_dirname_that_is_a_file_and_missing_validation_data_are_explained(blobs, tmp_path):
    X, y = blobs
    (tmp_path / "f").write_text("x")
    with pytest.raises(ValueError, match=r"dirname='.*/f' is a file"):
        _net(tmp_path, max_epochs=1, callbacks=[Checkpoint(tmp_path / "f")]).fit(X, y)
    with pytest.raises(ValueError, match="monitor='valid_loss_best'.*need train_split"):
        _net(tmp_path, max_epochs=1, train_split=None,
             callbacks=[Checkpoint(tmp_path / "cp")]).fit(X, y)
    with pytest.raises(FileNotFoundError, match="load_checkpoint: dirname=.* holds no checkpoint"):
        load_checkpoint(tmp_path / "cp")


def test_plain_skorch_nets_are_refused(blobs, tmp_path):
    from skorch import NeuralNetClassifier

    X, y = blobs
    net = NeuralNetClassifier(torch.nn.Linear, module__in_features=8, module__out_features=3,
                              criterion=torch.nn.CrossEntropyLoss, max_epochs=1,
                              callbacks=[Checkpoint(tmp_path)])
    with pytest.raises(TypeError, match="nnpipe estimators .* not NeuralNetClassifier"):
        net.fit(X, y)


def test_a_resumed_net_keeps_augmenting(blobs, tmp_path):
    """The checkpoint restores the augmentation fit set up, so partial_fit trains as fit did."""
    X, y = blobs
    _net(tmp_path, max_epochs=1, input_shape=(2, 4), augment={"noise": {"std": 0.1}},
         callbacks=[Checkpoint(tmp_path, monitor=None)]).fit(X, y)
    resumed = load_checkpoint(tmp_path)
    assert resumed.augment_ is not None and resumed.augment_.to_config()["noise"]["std"] == 0.1
    batch = resumed.augment_batch(torch.from_numpy(X[:4]))
    assert not np.array_equal(batch.numpy(), X[:4])

"""Per-layer-group learning rates (``lr_multipliers``): optimizer groups, schedules, freezing."""

import math

import numpy as np
import pytest
import torch
from skorch.callbacks import Callback

from nnpipe import NNClassifier, load, save
from nnpipe.config import ConfigError, validate_config


class Snapshots(Callback):
    """The weights at the start of training and after every epoch; the lr of every group per
    batch."""

    def on_train_begin(self, net, **kwargs):
        self.start = {k: v.clone() for k, v in net.module_.state_dict().items()}
        self.epochs, self.lrs = [], []

    def on_batch_end(self, net, training=False, **kwargs):
        if training:
            self.lrs.append([g["lr"] for g in net.optimizer_.param_groups])

    def on_epoch_end(self, net, **kwargs):
        self.epochs.append({k: v.clone() for k, v in net.module_.state_dict().items()})


def _groups(net):
    names = {id(p): n for n, p in net.module_.named_parameters()}
    return {names[id(p)]: (g["lr"], g["lr_multiplier"]) for g in net.optimizer_.param_groups
            for p in g["params"]}


def test_optimizer_groups_have_the_multiplied_lrs(blobs):
    X, y = blobs
    net = NNClassifier(module__hidden_sizes=[16, 8], lr=0.01, max_epochs=1, random_state=0,
                       lr_multipliers={"hidden.1.*": 0.1, "hidden.3.*": 0.0}).fit(X, y)
    groups = _groups(net)
    expected = {
        "hidden.1.weight": (0.001, 0.1), "hidden.1.bias": (0.001, 0.1),
        "hidden.3.weight": (0.0, 0.0), "hidden.3.bias": (0.0, 0.0),
        "output.weight": (0.01, 1.0), "output.bias": (0.01, 1.0)}
    assert sorted(groups) == sorted(expected)
    for name, pair in expected.items():  # pytest >= 9 refuses approx over nested containers
        assert groups[name] == pytest.approx(pair), name
    # the unscaled group comes first: the history's "lr" and onecycle's default peak read it
    assert net.optimizer_.param_groups[0]["lr_multiplier"] == 1.0
    assert len(net.optimizer_.param_groups) == 3


def test_a_zero_multiplier_group_does_not_move_even_with_weight_decay(blobs):
    X, y = blobs
    snap = Snapshots()
    NNClassifier(module__hidden_sizes=[16, 8], lr=0.01, max_epochs=2, random_state=0,
                 optimizer="adamw", optimizer__weight_decay=0.1, callbacks=[snap],
                 lr_multipliers={"hidden.3.*": 0}).fit(X, y)
    end = snap.epochs[-1]
    for name in ("hidden.3.weight", "hidden.3.bias"):
        assert torch.equal(end[name], snap.start[name]), name
    for name in ("hidden.1.weight", "output.weight"):
        assert (end[name] - snap.start[name]).abs().max() > 1e-3, name


def test_schedules_scale_every_group_alike(blobs):
    """Cosine (per batch): each group follows torch's formula from its own base lr, so the
    ratio stays 0.1 at every step; onecycle peaks at lr and lr * 0.1."""
    X, y = blobs
    for schedule in ("cosine", "onecycle", "piecewise"):
        snap = Snapshots()
        net = NNClassifier(module__hidden_sizes=[16], lr=0.02, max_epochs=4, batch_size=64,
                           train_split=None, lr_schedule=schedule, callbacks=[snap],
                           lr_multipliers={"hidden.*": 0.1}, random_state=0).fit(X, y)
        lrs = np.array(snap.lrs)  # (batches, groups): [output group, hidden group]
        assert lrs.shape == (4 * 5, 2)
        np.testing.assert_allclose(lrs[:, 1], 0.1 * lrs[:, 0], rtol=1e-9, atol=1e-15)
        if schedule == "cosine":
            total = 4 * math.ceil(300 / 64)
            # recorded after each step: t = 1 .. total
            ref = [0.02 * (1 + math.cos(math.pi * t / total)) / 2 for t in range(1, total + 1)]
            np.testing.assert_allclose(lrs[:, 0], ref, rtol=1e-6)
        if schedule == "onecycle":
            assert lrs[:, 0].max() == pytest.approx(0.02, rel=0.05)
            assert lrs[:, 1].max() == pytest.approx(0.002, rel=0.05)
        # the history records the base group's lr (onecycle starts at lr / div_factor 25)
        assert net.history[0, "lr"] == pytest.approx(0.02 / (25 if schedule == "onecycle" else 1))


def test_freeze_then_unfreeze_with_a_smaller_lr(blobs):
    X, y = blobs
    snap = Snapshots()
    NNClassifier(module__hidden_sizes=[16], lr=0.01, max_epochs=4, freeze="hidden.*",
                 unfreeze_after=2, lr_multipliers={"hidden.*": 0.1}, callbacks=[snap],
                 random_state=0).fit(X, y)
    w = "hidden.1.weight"
    assert torch.equal(snap.epochs[1][w], snap.start[w])  # frozen for epochs 1-2
    moved = (snap.epochs[3][w] - snap.epochs[1][w]).abs().max().item()
    head = (snap.epochs[1]["output.weight"] - snap.start["output.weight"]).abs().max().item()
    # Adam moves each weight by about lr per step: ~0.001 here, ~0.01 for the head
    assert 1e-4 < moved < head


def test_an_unmatched_pattern_lists_the_parameter_names(blobs):
    X, y = blobs
    with pytest.raises(ValueError, match=r"lr_multipliers pattern 'hiden\.\*' matches no "
                                         r"parameter of the network; its parameters are "
                                         r"\['hidden\.1\.weight', 'hidden\.1\.bias', "
                                         r"'output\.weight', 'output\.bias'\]"):
        NNClassifier(module__hidden_sizes=[4], max_epochs=1,
                     lr_multipliers={"hiden.*": 0.1}).fit(X, y)
    with pytest.raises(ValueError, match=r"lr_multipliers: the factor for 'hidden\.\*' must be "
                                         r"a finite number >= 0 \(it multiplies lr\), got -1"):
        NNClassifier(lr_multipliers={"hidden.*": -1}).fit(X, y)
    with pytest.raises(ValueError, match="lr_multipliers must be None or a non-empty mapping"):
        NNClassifier(lr_multipliers=[("hidden.*", 0.1)]).fit(X, y)


def test_combines_with_optimizer_param_groups_and_set_params_lr(blobs):
    X, y = blobs
    net = NNClassifier(module__hidden_sizes=[8], lr=0.01, max_epochs=1, random_state=0,
                       optimizer__param_groups=[("output.*", {"lr": 0.5})],
                       lr_multipliers={"output.*": 0.1, "hidden.*": 0.2}).fit(X, y)
    groups = _groups(net)
    assert groups["output.weight"] == pytest.approx((0.05, 0.1))  # the group's own lr x 0.1
    assert groups["hidden.1.weight"] == pytest.approx((0.002, 0.2))
    net.set_params(lr=0.1)  # skorch sets one lr for all groups; the factors are kept
    assert _groups(net)["hidden.1.weight"] == pytest.approx((0.02, 0.2))


def test_saved_and_loaded_with_the_model(blobs, tmp_path):
    X, y = blobs
    net = NNClassifier(module__hidden_sizes=[8], max_epochs=1, random_state=0,
                       lr_multipliers={"hidden.*": 0.25}).fit(X, y)
    back = load(save(net, tmp_path / "m"))
    assert back.lr_multipliers == {"hidden.*": 0.25}
    assert _groups(back)["hidden.1.weight"] == pytest.approx((0.00025, 0.25))


def _raw(**train):
    return {"data": {"source": "digits"}, "model": {"module": "mlp", "module__hidden_sizes": [8]},
            "train": {"max_epochs": 1, **train}}


def test_params_yaml_train_lr_multipliers_is_checked_and_searchable():
    cfg = validate_config(_raw(lr_multipliers={"hidden.*": 0.1}))
    assert cfg.build_estimator().lr_multipliers == {"hidden.*": 0.1}
    with pytest.raises(ConfigError, match=r"train\.lr_multipliers: pattern 'dense\.\*' matches "
                                          r"no parameter"):
        validate_config(_raw(lr_multipliers={"dense.*": 0.1}))
    with pytest.raises(ConfigError, match=r"model\.lr_multipliers: is a training setting"):
        validate_config({**_raw(), "model": {"lr_multipliers": {"hidden.*": 0.1}}})
    from nnpipe.search import SearchSettings, apply_overrides, parse_space, validate_space

    raw = _raw(lr_multipliers={"hidden*": 1.0})
    space = {"train.lr_multipliers.hidden*": {"type": "float", "low": 0.01, "high": 1.0,
                                              "log": True},
             "train.lr_multipliers": {"type": "categorical",
                                      "choices": [{"hidden*": 0.1}, {"hidden*": 1.0}]}}
    validate_space(raw, SearchSettings(enabled=True, space=space))
    out = apply_overrides(raw, {"train.lr_multipliers.hidden*": 0.05})
    assert validate_config(out).build_estimator().lr_multipliers == {"hidden*": 0.05}
    picked = apply_overrides(raw, {"train.lr_multipliers": '{"hidden*": 0.1}'}, parse_space(space))
    assert picked["train"]["lr_multipliers"] == {"hidden*": 0.1}

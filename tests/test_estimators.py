"""NNClassifier / NNRegressor: every training knob checked by its effect, in numbers."""

import copy

import numpy as np
import pytest
import torch
from skorch.callbacks import Callback
from torch import nn

from nnpipe import DivergenceError, NNClassifier, NNRegressor
from nnpipe.models import MLP


class Recorder(Callback):
    """Records gradient norms / extremes and per-epoch weights (runs after nnpipe's own callbacks)."""

    def on_train_begin(self, net, **kwargs):
        self.grad_norms, self.grad_max, self.weights = [], [], []

    def on_grad_computed(self, net, named_parameters, **kwargs):
        grads = [p.grad for _, p in named_parameters if p.grad is not None]
        self.grad_norms.append(torch.norm(torch.stack([g.norm() for g in grads])).item())
        self.grad_max.append(max(g.abs().max().item() for g in grads))

    def on_epoch_end(self, net, **kwargs):
        self.weights.append(copy.deepcopy(net.module_.state_dict()))


# --------------------------------------------------------------------------- accuracy


def test_cnn2d_reaches_97_percent_on_digits(digits):
    Xtr, Xte, ytr, yte = digits
    clf = NNClassifier("cnn2d", input_shape=(1, 8, 8), max_epochs=20, random_state=0)
    assert clf.fit(Xtr, ytr).score(Xte, yte) >= 0.97


def test_mlp_learns_digits_and_reports_history(digits):
    Xtr, Xte, ytr, yte = digits
    clf = NNClassifier(max_epochs=8, random_state=0).fit(Xtr, ytr)
    assert clf.score(Xte, yte) > 0.92
    assert len(clf.history) == 8
    assert clf.history[-1, "train_loss"] < clf.history[0, "train_loss"]
    assert clf.history[-1, "valid_acc"] > 0.9


def test_string_labels_and_dataframes_round_trip(blobs):
    pd = pytest.importorskip("pandas")
    X, y = blobs
    labels = np.array(["cat", "dog", "eel"])[y]
    df = pd.DataFrame(X, columns=[f"f{i}" for i in range(X.shape[1])])
    clf = NNClassifier(max_epochs=10, lr=1e-2, random_state=0).fit(df, labels)
    assert list(clf.classes_) == ["cat", "dog", "eel"]
    assert list(clf.feature_names_in_) == list(df.columns)
    assert set(clf.predict(df)) <= {"cat", "dog", "eel"}
    assert clf.score(df, labels) > 0.95
    proba = clf.predict_proba(df)
    np.testing.assert_allclose(proba.sum(1), 1, atol=1e-5)


@pytest.mark.parametrize("criterion", ["mse", "mae", "huber"])
def test_regressor_losses_fit_1d_and_2d_targets(criterion):
    rng = np.random.RandomState(0)
    X = rng.normal(size=(400, 4)).astype(np.float32)
    y1 = X @ np.array([1.0, -2.0, 0.5, 0.0])
    reg = NNRegressor(max_epochs=60, lr=1e-2, criterion=criterion, random_state=0).fit(X, y1)
    assert reg.predict(X).shape == (400,)
    assert reg.score(X, y1) > 0.95
    y2 = np.c_[y1, -y1]
    reg2 = NNRegressor(max_epochs=60, lr=1e-2, criterion=criterion, random_state=0).fit(X, y2)
    assert reg2.predict(X).shape == (400, 2)
    assert reg2.score(X, y2) > 0.95


@pytest.mark.parametrize("criterion", ["cross_entropy", "nll", "hinge"])
def test_classification_losses(blobs, criterion):
    X, y = blobs
    clf = NNClassifier(max_epochs=15, lr=1e-2, criterion=criterion, random_state=0).fit(X, y)
    assert clf.score(X, y) > 0.95
    np.testing.assert_allclose(clf.predict_proba(X).sum(1), 1, atol=1e-5)


def test_label_smoothing_bounds_confidence(blobs):
    X, y = blobs
    plain = NNClassifier(max_epochs=40, lr=1e-2, random_state=0).fit(X, y)
    smooth = NNClassifier(max_epochs=40, lr=1e-2, criterion__label_smoothing=0.3,
                          random_state=0).fit(X, y)
    # with smoothing eps over K=3 classes the optimum puts 1 - eps + eps/K = 0.8 on the label
    assert plain.predict_proba(X).max(1).mean() > 0.95
    assert smooth.predict_proba(X).max(1).mean() == pytest.approx(0.8, abs=0.05)


@pytest.mark.parametrize("optimizer", ["sgd", "momentum", "nesterov", "adagrad", "rmsprop",
                                       "adam", "adamax", "nadam", "adamw", torch.optim.Adam])
def test_every_optimizer_trains(blobs, optimizer):
    X, y = blobs
    lr = 0.05 if optimizer in ("sgd", "momentum", "nesterov", "adagrad") else 1e-2
    clf = NNClassifier(max_epochs=10, lr=lr, optimizer=optimizer, random_state=0).fit(X, y)
    assert clf.history[-1, "train_loss"] < 0.5 * clf.history[0, "train_loss"]


def test_optimizer_names_resolve_to_their_settings(blobs):
    X, y = blobs
    nesterov = NNClassifier(max_epochs=1, optimizer="nesterov", lr=0.1,
                            random_state=0).fit(X, y).optimizer_
    assert isinstance(nesterov, torch.optim.SGD)
    assert nesterov.defaults["momentum"] == 0.9 and nesterov.defaults["nesterov"] is True
    custom = NNClassifier(max_epochs=1, optimizer="momentum", optimizer__momentum=0.5,
                          random_state=0).fit(X, y)
    assert custom.optimizer_.defaults["momentum"] == 0.5
    nadam = NNClassifier(max_epochs=1, optimizer="nadam", random_state=0).fit(X, y).optimizer_
    assert isinstance(nadam, torch.optim.NAdam)


# --------------------------------------------------------------------------- same as a hand loop


def test_training_loop_matches_a_hand_written_pytorch_loop(blobs):
    X, y = blobs
    clf = NNClassifier(max_epochs=3, batch_size=32, lr=0.05, optimizer="sgd", train_split=None,
                       module__hidden_sizes=[16], random_state=7).fit(X, y)
    torch.manual_seed(7)
    module = MLP(X.shape[1], 3, hidden_sizes=[16])
    opt = torch.optim.SGD(module.parameters(), lr=0.05)
    Xt, yt = torch.as_tensor(X), torch.as_tensor(y)
    for _ in range(3):
        perm = torch.randperm(len(Xt))
        Xp, yp = Xt[perm], yt[perm]
        for i in range(0, len(Xt), 32):
            opt.zero_grad()
            loss = nn.functional.cross_entropy(module(Xp[i:i + 32]), yp[i:i + 32])
            loss.backward()
            opt.step()
    for (name, ours), theirs in zip(clf.module_.state_dict().items(), module.state_dict().values()):
        torch.testing.assert_close(ours, theirs, msg=name)


# --------------------------------------------------------------------------- reproducibility


def test_same_seed_gives_identical_predictions_and_different_seed_does_not(blobs):
    X, y = blobs
    kw = dict(max_epochs=3, dropout=0.3, activation="rrelu", random_state=3)
    a = NNClassifier(**kw).fit(X, y)
    b = NNClassifier(**kw).fit(X, y)
    np.testing.assert_array_equal(a.predict_proba(X), b.predict_proba(X))
    for wa, wb in zip(a.module_.state_dict().values(), b.module_.state_dict().values()):
        assert torch.equal(wa, wb)
    c = NNClassifier(**{**kw, "random_state": 4}).fit(X, y)
    assert not np.array_equal(a.predict_proba(X), c.predict_proba(X))


def test_fit_does_not_disturb_the_global_torch_rng(blobs):
    X, y = blobs
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    NNClassifier(max_epochs=1, random_state=0).fit(X, y)
    assert torch.equal(torch.rand(3), expected)


# --------------------------------------------------------------------------- regularisation


def test_max_norm_bounds_every_incoming_weight_vector(blobs):
    X, y = blobs
    kw = dict(max_epochs=10, lr=0.05, module__hidden_sizes=[32], random_state=0)
    free = NNClassifier(**kw).fit(X, y)
    bounded = NNClassifier(max_norm=1.0, **kw).fit(X, y)
    free_norms = free.module_.hidden[1].weight.norm(dim=1)
    assert free_norms.max() > 1.5  # the constraint has something to do
    for layer in (bounded.module_.hidden[1], bounded.module_.output):
        assert layer.weight.norm(dim=1).max().item() <= 1.0 + 1e-5


def test_l1_drives_more_weights_to_zero_than_no_penalty(blobs):
    X, y = blobs
    kw = dict(max_epochs=30, lr=1e-2, module__hidden_sizes=[64], random_state=0)
    plain = NNClassifier(**kw).fit(X, y)
    sparse = NNClassifier(l1=1e-3, **kw).fit(X, y)

    def near_zero(clf):
        w = clf.module_.hidden[1].weight.detach().abs()
        return (w < 1e-2).float().mean().item()

    assert near_zero(sparse) > near_zero(plain) + 0.2
    assert sparse.score(X, y) > 0.9


def test_l2_shrinks_weights(blobs):
    X, y = blobs
    kw = dict(max_epochs=20, lr=1e-2, module__hidden_sizes=[64], random_state=0)
    plain = NNClassifier(**kw).fit(X, y)
    shrunk = NNClassifier(l2=1e-2, **kw).fit(X, y)
    assert shrunk.module_.hidden[1].weight.norm() < 0.8 * plain.module_.hidden[1].weight.norm()


def test_gradient_norm_clipping_bounds_the_global_norm(blobs):
    X, y = blobs
    rec = Recorder()
    NNClassifier(max_epochs=3, lr=0.1, optimizer="sgd", callbacks=[rec], random_state=0).fit(X, y)
    assert max(rec.grad_norms) > 0.5  # unclipped gradients exceed the bound
    rec = Recorder()
    NNClassifier(max_epochs=3, lr=0.1, optimizer="sgd", clip_grad_norm=0.5, callbacks=[rec],
                 random_state=0).fit(X, y)
    assert max(rec.grad_norms) <= 0.5 + 1e-5


def test_gradient_value_clipping_bounds_every_component(blobs):
    X, y = blobs
    rec = Recorder()
    NNClassifier(max_epochs=2, lr=0.1, optimizer="sgd", clip_grad_value=0.01, callbacks=[rec],
                 random_state=0).fit(X, y)
    assert max(rec.grad_max) <= 0.01 + 1e-7


def test_dropout_is_active_in_training_only(blobs):
    X, y = blobs
    clf = NNClassifier(max_epochs=2, dropout=0.5, random_state=0).fit(X, y)
    np.testing.assert_array_equal(clf.predict_proba(X), clf.predict_proba(X))  # eval: no dropout
    clf.module_.train()
    with torch.no_grad():
        a, b = clf.module_(torch.as_tensor(X)), clf.module_(torch.as_tensor(X))
    assert not torch.equal(a, b)


# --------------------------------------------------------------------------- early stopping


def test_early_stopping_stops_and_restores_the_best_weights(digits):
    Xtr, _, ytr, _ = digits
    rec = Recorder()
    clf = NNClassifier(max_epochs=60, lr=3e-2, early_stopping=3, callbacks=[rec],
                       random_state=0).fit(Xtr, ytr)
    losses = clf.history[:, "valid_loss"]
    assert len(losses) < 60
    best = int(np.argmin(losses))
    assert best == len(losses) - 4  # stopped after 3 epochs without improvement
    for name, value in clf.module_.state_dict().items():
        assert torch.equal(value, rec.weights[best][name]), name
    assert clf.interrupted_ is False


def test_validation_split_is_stratified(blobs):
    X, y = blobs
    y = np.where(np.arange(300) < 30, 0, 1)  # 10% minority
    clf = NNClassifier(max_epochs=1, train_split=0.2, random_state=0).fit(X, y)
    ds_train, ds_valid = clf.get_split_datasets(*clf._prepare_data(X, y, reset=False))
    assert (ds_valid.y == 0).sum().item() == 6 and len(ds_valid) == 60


# --------------------------------------------------------------------------- transfer learning


def test_freeze_keeps_layers_fixed_and_unfreeze_after_releases_them(blobs, tmp_path):
    X, y = blobs
    rec = Recorder()
    NNClassifier(max_epochs=4, lr=1e-2, freeze="hidden.*", unfreeze_after=2, callbacks=[rec],
                 random_state=0).fit(X, y)
    w = [r["hidden.1.weight"] for r in rec.weights]
    out = [r["output.weight"] for r in rec.weights]
    assert torch.equal(w[0], w[1])  # frozen during epochs 1-2
    assert not torch.equal(w[1], w[2]) and not torch.equal(w[2], w[3])  # trained from epoch 3
    assert not torch.equal(out[0], out[1])


def test_transfer_reuses_all_layers_but_the_output(blobs, tmp_path):
    from nnpipe import save

    X, y = blobs
    source = NNClassifier(max_epochs=5, module__hidden_sizes=[32, 16], random_state=0).fit(X, y)
    save(source, tmp_path / "source")
    y2 = (y == 0).astype(int)  # a new task with 2 classes: the output layer cannot be reused
    target = NNClassifier(max_epochs=10, lr=1e-2, module__hidden_sizes=[32, 16], random_state=1,
                          transfer_from=tmp_path / "source", freeze="hidden.*").fit(X, y2)
    assert target.transferred_ == ["hidden.1.weight", "hidden.1.bias", "hidden.3.weight",
                                   "hidden.3.bias"]
    src = source.module_.state_dict()
    for name in target.transferred_:
        assert torch.equal(target.module_.state_dict()[name], src[name])
    assert target.module_.output.weight.shape == (2, 16)
    assert target.score(X, y2) > 0.9
    # naming the layers, from a fitted estimator
    only_first = NNClassifier(max_epochs=1, module__hidden_sizes=[32, 16], transfer_from=source,
                              transfer_layers=["hidden.1.*"], random_state=1).fit(X, y2)
    assert only_first.transferred_ == ["hidden.1.weight", "hidden.1.bias"]
    with pytest.raises(ValueError, match="differ in shape"):
        NNClassifier(max_epochs=1, module__hidden_sizes=[8], transfer_from=source,
                     transfer_layers=["hidden.1.*"]).fit(X, y2)


# --------------------------------------------------------------------------- failures


def test_divergence_stops_at_once_and_leaves_no_nan_weights(blobs):
    X, y = blobs
    clf = NNClassifier(max_epochs=5, lr=1e6, optimizer="sgd", random_state=0)
    with pytest.raises(DivergenceError, match="exploded to .* at epoch 1, batch 2") as info:
        clf.fit(X, y)  # finite but > 1000x the first batch's loss: stopped before any NaN
    start = clf.history[0]["batches"][0]["train_loss"]
    assert info.value.epoch == 1 and info.value.loss > 1e3 * start == 1e3 * info.value.start
    for name, value in clf.module_.state_dict().items():
        assert torch.isfinite(value.float()).all(), name
    clf.set_params(divergence_factor=None)  # only NaN / inf stop it now
    with pytest.raises(DivergenceError, match="became nan at epoch 1") as info:
        clf.fit(X, y)
    assert not np.isfinite(info.value.loss) and info.value.start is None
    for name, value in clf.module_.state_dict().items():
        assert torch.isfinite(value.float()).all(), name
    with pytest.raises(ValueError, match="divergence_factor must be a finite number > 1"):
        clf.set_params(divergence_factor=0.5).fit(X, y)


class _CtrlC(Callback):
    def on_epoch_end(self, net, **kwargs):
        if len(net.history) == 2:
            raise KeyboardInterrupt


def test_ctrl_c_is_reraised_for_pipelines_and_recorded_otherwise(blobs):
    X, y = blobs
    with pytest.raises(KeyboardInterrupt):
        NNClassifier(max_epochs=5, callbacks=[_CtrlC()], on_interrupt="raise").fit(X, y)
    stopped = NNClassifier(max_epochs=5, callbacks=[_CtrlC()]).fit(X, y)
    assert stopped.interrupted_ is True and len(stopped.history) == 2
    # early stopping also uses KeyboardInterrupt inside skorch: it must not count as Ctrl-C
    es = NNClassifier(max_epochs=50, lr=5e-2, early_stopping=1, on_interrupt="raise",
                      random_state=0).fit(X, y)
    assert es.interrupted_ is False and len(es.history) < 50


@pytest.mark.parametrize("kwargs, match", [
    (dict(lr=-0.1), r"lr must be a finite number > 0, got -0.1"),
    (dict(lr="fast"), r"lr must be .*got 'fast'"),
    (dict(max_epochs=0), r"max_epochs must be an int >= 1, got 0"),
    (dict(batch_size=0), r"batch_size"),
    (dict(dropout=1.5), r"dropout must be a float in \[0, 1\), got 1.5"),
    (dict(batch_norm="middle"), r"batch_norm must be .*got 'middle'"),
    (dict(optimizer="adm"), r"Did you mean 'adam'"),
    (dict(criterion="crossentropy"), r"Did you mean 'cross_entropy'"),
    (dict(activation="rleu"), r"Did you mean 'relu'"),
    (dict(init="glorot"), r"init must be one of"),
    (dict(module="resnet"), r"module must be one of 'cnn1d', 'cnn2d', 'mlp'"),
    (dict(module__hiden_sizes=[3]), r"module__hiden_sizes is not a parameter of MLP.*hidden_sizes"),
    (dict(l1=-1), r"l1 must be a finite number >= 0"),
    (dict(max_norm=0), r"max_norm must be a finite number > 0"),
    (dict(train_split=1.5), r"train_split must be a fraction"),
    (dict(early_stopping=3, train_split=None), r"early_stopping monitors a validation metric"),
    (dict(on_interrupt="ignore"), r"on_interrupt must be 'stop' or 'raise'"),
    (dict(device="cuda"), r"device must be 'cpu' here") if not torch.cuda.is_available()
    else (dict(device="cuda:99"), r"."),
    (dict(lerning_rate=0.1), r"unexpected argument\(s\) lerning_rate"),
    (dict(module=nn.Linear, module__in_features=8, module__out_features=3, dropout=0.5),
     r"\['dropout'\] apply to nnpipe's own networks"),
])
def test_bad_knobs_fail_at_fit_naming_argument_and_value(blobs, kwargs, match):
    X, y = blobs
    clf = NNClassifier(**{"max_epochs": 1, **kwargs})  # __init__ only stores
    with pytest.raises(ValueError, match=match):
        clf.fit(X, y)


def test_bad_data_gets_clear_errors(blobs):
    X, y = blobs
    Xnan = X.copy()
    Xnan[0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        NNClassifier(max_epochs=1).fit(Xnan, y)
    Xinf = X.copy()
    Xinf[0, 0] = np.inf
    with pytest.raises(ValueError, match="infinity"):
        NNClassifier(max_epochs=1).fit(Xinf, y)
    with pytest.raises(ValueError, match="Expected 2D array"):
        NNClassifier(max_epochs=1).fit(X[:, 0], y)
    with pytest.raises(ValueError, match="0 sample"):
        NNClassifier(max_epochs=1).fit(X[:0], y[:0])
    with pytest.raises(ValueError, match="at least 2 classes"):
        NNClassifier(max_epochs=1).fit(X, np.zeros_like(y))
    clf = NNClassifier(max_epochs=1).fit(X, y)
    with pytest.raises(ValueError, match="X has 5 features, but NNClassifier is expecting 8"):
        clf.predict(X[:, :5])
    with pytest.raises(ValueError, match="NaN"):
        clf.predict(Xnan)


def test_user_module_class_is_supported(blobs):
    X, y = blobs

    class Tiny(nn.Module):
        def __init__(self, n_in=8, n_out=3):
            super().__init__()
            self.lin = nn.Linear(n_in, n_out)

        def forward(self, X):
            return self.lin(X)

    clf = NNClassifier(Tiny, max_epochs=20, lr=5e-2, random_state=0).fit(X, y)
    assert clf.score(X, y) > 0.9


def test_verbose_prints_a_table_and_quiet_is_silent(blobs, capsys):
    X, y = blobs
    NNClassifier(max_epochs=2).fit(X, y)
    assert capsys.readouterr().out == ""
    NNClassifier(max_epochs=2, verbose=1).fit(X, y)
    out = capsys.readouterr().out
    assert "train_loss" in out and "valid_acc" in out and "dur" in out

"""Unsupervised pretraining: the autoencoder, its reuse by classifiers, unlabeled data, config."""

import warnings

import numpy as np
import pytest
import torch
from sklearn.decomposition import PCA
from sklearn.metrics import r2_score
from sklearn.utils.estimator_checks import parametrize_with_checks
from torch import nn

from nnpipe import NNClassifier, load, save
from nnpipe.config import ConfigError, validate_config
from nnpipe.data import load_dataset, read_dataset, save_dataset
from nnpipe.models import CNN1d, CNN2d, MLP
from nnpipe.pretrain import AutoEncoder, Pretrainer, fine_tune_params


@pytest.mark.parametrize("network, n_features", [
    (MLP(64, 10, hidden_sizes=[32, 16], batch_norm=True), 64),
    (CNN2d(64, 10, input_shape=(1, 8, 8), channels=[4, 8], hidden_sizes=[16]), 64),
    (CNN2d(147, 10, input_shape=(3, 7, 7), channels=[4, 8], hidden_sizes=()), 147),
    (CNN1d(30, 10, channels=[4], kernel_size=3, stride=2), 30),
])
def test_the_encoder_has_the_classifiers_names_and_shapes(network, n_features):
    reference = {k: v.shape for k, v in network.state_dict().items()
                 if not k.startswith("output.")}
    ae = AutoEncoder(network, n_features)
    encoder = {k: v.shape for k, v in ae.state_dict().items() if not k.startswith("decoder.")}
    assert encoder == reference
    X = torch.randn(5, n_features)
    assert ae(X).shape == (5, n_features)  # the decoder gets back to the input, even 7x7 / L=30
    assert ae.encode(X).reshape(5, -1).shape[1] == network.output.in_features


def test_a_linear_autoencoder_reconstructs_like_pca(digits):
    """The best rank-8 linear reconstruction is PCA's (Eckart-Young); a linear autoencoder with
    8 hidden units trained by skorch must come within 0.02 of its R^2 and cannot beat it."""
    X = digits[0]
    pca = PCA(8).fit(X)
    best = r2_score(X, pca.inverse_transform(pca.transform(X)), multioutput="variance_weighted")
    pre = Pretrainer(module__hidden_sizes=[8], activation="identity", lr=1e-2, max_epochs=60,
                     batch_size=128, train_split=None, random_state=0).fit(X)
    assert best - 0.02 < pre.score(X) <= best + 1e-3
    assert pre.transform(X).shape == (len(X), 8)


def _seen_inputs(pre, X):
    """What the first layer sees in training (noisy) and in predict (clean)."""
    seen = []
    hook = pre.module_.hidden[1].register_forward_pre_hook(lambda m, a: seen.append(a[0].clone()))
    try:
        pre.partial_fit(X)
        train = torch.cat(seen)
        seen.clear()
        pre.predict(X)
        return train, torch.cat(seen)
    finally:
        hook.remove()


def test_noise_corrupts_training_batches_only_and_the_target_stays_clean():
    X = np.ones((512, 16), dtype=np.float32)
    masked = Pretrainer(module__hidden_sizes=[4], noise="mask", noise_level=0.3, max_epochs=1,
                        train_split=None, random_state=0).fit(X)
    train, clean = _seen_inputs(masked, X)
    assert (train == 0).float().mean().item() == pytest.approx(0.3, abs=0.01)
    assert torch.equal(clean, torch.ones_like(clean))
    gauss = Pretrainer(module__hidden_sizes=[4], noise="gaussian", noise_level=0.5,
                       max_epochs=1, train_split=None, random_state=0).fit(X)
    train, clean = _seen_inputs(gauss, X)
    assert (train - 1).std().item() == pytest.approx(0.5, abs=0.01)
    assert torch.equal(clean, torch.ones_like(clean))
    # the loss compares with the clean batch: a perfect reconstruction of ones has loss 0
    pred = torch.ones(4, 16)
    assert gauss.get_loss(pred, torch.zeros(4, 16), X=torch.ones(4, 16), training=True) == 0


def test_seeded_pretraining_is_repeatable(digits):
    X = digits[0][:300]
    fits = [Pretrainer(module__hidden_sizes=[16], noise="mask", noise_level=0.2, max_epochs=3,
                       random_state=7).fit(X).predict(X) for _ in range(2)]
    np.testing.assert_array_equal(*fits)


def test_fine_tuning_reuses_the_frozen_encoder_then_trains_it_gently(digits):
    Xtr, Xte, ytr, yte = digits
    pre = Pretrainer(module__hidden_sizes=[32], noise="mask", noise_level=0.2, max_epochs=5,
                     lr=1e-2, random_state=0).fit(Xtr)
    frozen = NNClassifier(module__hidden_sizes=[32], max_epochs=3, random_state=0,
                          **fine_tune_params(pre, freeze=True)).fit(Xtr[:200], ytr[:200])
    assert frozen.transferred_ == ["hidden.1.weight", "hidden.1.bias"]
    for name in frozen.transferred_:
        assert torch.equal(frozen.module_.state_dict()[name], pre.module_.state_dict()[name])
    params = fine_tune_params(pre, freeze=True, unfreeze_after=1, lr_multiplier=0.1)
    assert params == {"transfer_from": pre, "transfer_layers": ["hidden.*"],
                      "freeze": ["hidden.*"], "unfreeze_after": 1,
                      "lr_multipliers": {"hidden.*": 0.1}}
    tuned = NNClassifier(module__hidden_sizes=[32], max_epochs=3, random_state=0,
                         **params).fit(Xtr[:200], ytr[:200])
    w = "hidden.1.weight"
    assert not torch.equal(tuned.module_.state_dict()[w], pre.module_.state_dict()[w])
    with pytest.raises(ValueError, match="unfreeze_after=2 needs freeze=True"):
        fine_tune_params(pre, unfreeze_after=2)
    with pytest.raises(ValueError, match="transfer_layers names layers that the source model "
                                         "lacks or that differ in shape: hidden.1.weight"):
        NNClassifier(module__hidden_sizes=[16], max_epochs=1,
                     **fine_tune_params(pre)).fit(Xtr[:200], ytr[:200])


def test_saved_pretrainer_loads_and_is_a_transfer_source(digits, tmp_path):
    Xtr, _, ytr, _ = digits
    pre = Pretrainer(module__hidden_sizes=[16], noise="gaussian", noise_level=0.1, max_epochs=2,
                     random_state=0).fit(Xtr)
    path = save(pre, tmp_path / "pre")
    back = load(path)
    assert type(back) is Pretrainer and back.noise == "gaussian" and back.noise_level == 0.1
    np.testing.assert_array_equal(back.predict(Xtr), pre.predict(Xtr))
    np.testing.assert_array_equal(back.transform(Xtr), pre.transform(Xtr))
    params = fine_tune_params(path)
    assert params["transfer_from"] == path
    clf = NNClassifier(module__hidden_sizes=[16], max_epochs=1, random_state=0,
                       **params).fit(Xtr[:100], ytr[:100])
    assert clf.transferred_ == ["hidden.1.weight", "hidden.1.bias"]


def test_cnn2d_pretrains_a_conv_autoencoder_and_transfers_the_feature_extractor(digits):
    Xtr, _, ytr, _ = digits
    pre = Pretrainer("cnn2d", input_shape=(1, 8, 8), module__channels=[8, 16],
                     module__hidden_sizes=[32], max_epochs=10, lr=1e-2, random_state=0).fit(Xtr)
    kinds = [type(m).__name__ for m in pre.module_.decoder]
    assert kinds == ["Linear", "ReLU", "Unflatten", "Upsample", "Conv2d", "ReLU", "Upsample",
                     "Conv2d", "Flatten"]
    assert pre.score(Xtr) > 0.4 and pre.encoder_patterns() == ["features.*", "dense.*"]
    clf = NNClassifier("cnn2d", input_shape=(1, 8, 8), module__channels=[8, 16],
                       module__hidden_sizes=[32], max_epochs=1, random_state=0,
                       **fine_tune_params(pre)).fit(Xtr[:100], ytr[:100])
    assert clf.transferred_ == ["features.0.weight", "features.0.bias", "features.3.weight",
                                "features.3.bias", "dense.1.weight", "dense.1.bias"]


def test_bad_knobs_and_modules_that_cannot_be_split_are_refused(digits):
    X = digits[0][:50]
    with pytest.raises(ValueError, match=r"noise must be None, 'gaussian' or 'mask', got "
                                         r"'gausian'. Did you mean 'gaussian'\?"):
        Pretrainer(noise="gausian").fit(X)
    with pytest.raises(ValueError, match=r"noise_level must be a fraction in \(0, 1\)"):
        Pretrainer(noise="mask", noise_level=1.0).fit(X)
    with pytest.raises(ValueError, match="noise_level must be a finite number > 0"):
        Pretrainer(noise="gaussian", noise_level=0).fit(X)

    class Mine(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(64, 64)

        def forward(self, X):
            return self.lin(X)

    with pytest.raises(ValueError, match="Pretrainer: module=Mine cannot be split into encoder "
                                         "and decoder; pretraining supports nnpipe's own "
                                         "networks 'mlp', 'cnn1d' and 'cnn2d'"):
        Pretrainer(Mine).fit(X)
    with pytest.raises(ValueError, match="the MLP has no hidden layer to pretrain"):
        Pretrainer(module__hidden_sizes=[]).fit(X)
    with pytest.raises(ValueError, match="Did you mean 'max_epochs'"):
        Pretrainer(max_epoch=3).fit(X)


def test_label_fraction_leaves_stratified_unlabeled_rows(tmp_path):
    full = load_dataset("digits")
    ds = load_dataset("digits", label_fraction=0.1)
    assert (len(ds.y_train), len(ds.X_unlabeled)) == (134, 1213)
    assert np.bincount(ds.y_train).min() >= 13  # 10% of each class's ~135 rows
    np.testing.assert_array_equal(ds.X_test, full.X_test)  # the test set keeps every label
    rows = {r.tobytes() for r in full.X_train}
    assert {r.tobytes() for r in np.concatenate([ds.X_train, ds.X_unlabeled])} == rows
    save_dataset(ds, tmp_path)
    np.testing.assert_array_equal(read_dataset(tmp_path).X_unlabeled, ds.X_unlabeled)
    with pytest.raises(ValueError, match="label_fraction=0.005 keeps 6 of 1347 training "
                                         "labels, fewer than the 10 classes"):
        load_dataset("digits", label_fraction=0.005)


TINY = {"data": {"source": "digits", "label_fraction": 0.2},
        "model": {"module": "mlp", "module__hidden_sizes": [16]},
        "train": {"max_epochs": 2, "verbose": 0}}


def test_pretrain_section_is_validated_with_did_you_mean_and_conflicts():
    cfg = validate_config({**TINY, "pretrain": {"enabled": True, "noise": "mask",
                                                "max_epochs": 2, "freeze": True,
                                                "unfreeze_after": 1, "lr_multiplier": 0.1}})
    pre = cfg.build_pretrainer()
    assert (type(pre), pre.noise, pre.max_epochs, pre.module__hidden_sizes) == (
        Pretrainer, "mask", 2, [16])
    assert cfg.fine_tune_kwargs() == {"freeze": True, "unfreeze_after": 1, "lr_multiplier": 0.1}
    assert validate_config({**TINY, "pretrain": None}).pretrain_enabled is False
    cases = {
        "pretrain.noize: unknown key. Did you mean 'noise'?": {"noize": "mask"},
        "pretrain.noise_level: must be a fraction in (0, 1)": {"noise": "mask",
                                                                "noise_level": 2},
        "pretrain.unfreeze_after: needs pretrain.freeze: true": {"unfreeze_after": 3},
        "pretrain.optimizer: must be one of": {"optimizer": "adm"},
        "pretrain.noise_level: has no effect without pretrain.noise": {"noise_level": 0.3},
    }
    for message, section in cases.items():
        with pytest.raises(ConfigError) as err:
            validate_config({**TINY, "pretrain": {"enabled": True, **section}})
        assert message in str(err.value)
    with pytest.raises(ConfigError, match=r"train\.lr_multipliers: conflicts with "
                                          r"pretrain\.enabled"):
        validate_config({**TINY, "train": {"lr_multipliers": {"hidden.*": 1}},
                         "pretrain": {"enabled": True, "lr_multiplier": 0.1}})
    with pytest.raises(ConfigError, match=r"train\.transfer_from: conflicts with "
                                          r"pretrain\.enabled"):
        validate_config({**TINY, "train": {"transfer_from": "x"}, "pretrain": {"enabled": True}})


def test_pretrain_stage_uses_every_row_and_warns_without_unlabeled_ones(tmp_path):
    from pipelines.pretrain import pretrain

    cfg = validate_config({**TINY, "preprocess": ["global_center"],
                           "pretrain": {"enabled": True, "max_epochs": 1, "random_state": 0}})
    ds = load_dataset("digits", label_fraction=0.2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        pre, counts = pretrain(cfg, ds)
    assert counts == {"n_rows": 1347, "n_unlabeled": 1078} and pre.n_features_in_ == 64
    with pytest.warns(UserWarning, match="the data has no unlabeled rows .* pretraining on the "
                                         "1347 labeled rows' features only"):
        _, counts = pretrain(cfg, load_dataset("digits"))
    assert counts == {"n_rows": 1347, "n_unlabeled": 0}



def test_stages_get_the_fine_tuning_params_of_the_pretrained_encoder(tmp_path, capsys):
    """What train, cv and ensemble pass their networks: nothing when pretraining is off, the
    encoder's transfer / freeze params when on, and a clear error without the folder."""
    from pipelines._stage import pretrained_params

    assert pretrained_params(validate_config(TINY), None) == {}
    cfg = validate_config({**TINY, "pretrain": {"enabled": True, "freeze": True,
                                                "lr_multiplier": 0.1}})
    with pytest.raises(ValueError, match=r"pretrain.enabled is true, but .* \(--pretrained "):
        pretrained_params(cfg, None)
    rng = np.random.default_rng(0)
    pre = Pretrainer(max_epochs=1, train_split=None, random_state=0).fit(
        rng.normal(size=(40, 6)).astype(np.float32))
    folder = save(pre, tmp_path / "pretrained")
    reuse = pretrained_params(cfg, str(folder), announce="[cv] every fold")
    assert reuse == {"transfer_from": str(folder), "transfer_layers": ["hidden.*"],
                     "freeze": ["hidden.*"], "lr_multipliers": {"hidden.*": 0.1}}
    assert (f"[cv] every fold starts from the pretrained encoder {folder} (['hidden.*'])"
            in capsys.readouterr().out)


@parametrize_with_checks(
    [Pretrainer(max_epochs=5, lr=1e-2, train_split=None)],
    expected_failed_checks=lambda est: {
        "check_no_attributes_set_in_init": "skorch's NeuralNet.__init__ sets history_, "
                                           "initialized_ and virtual_params_ (as NNRegressor)"},
)
def test_sklearn_estimator_checks(estimator, check):
    check(estimator)

"""nnpipe.export.fold_batchnorm: same predictions with fewer layers, originals untouched."""

import warnings

import numpy as np
import pytest
import torch
from sklearn.exceptions import NotFittedError
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from torch import nn

import nnpipe
from nnpipe import NNClassifier, NNRegressor
from nnpipe.export import FoldingWarning, fold_batchnorm
from nnpipe.models import CNN2d, MLP

SMALL = {
    "mlp": {"module__hidden_sizes": [32, 16]},
    "cnn2d": {"input_shape": (1, 8, 8), "module__channels": [8, 16], "module__hidden_sizes": [32]},
}


def _bns(module):
    return [name for name, m in module.named_modules()
            if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d))]


def _logits(est, X):
    return est.forward(X).numpy()


@pytest.fixture(scope="module")
def fitted(digits):
    """Four small classifiers (MLP / CNN2d, batch norm before / after), 3 epochs on digits."""
    Xtr, _, ytr, _ = digits
    return {(module, bn): NNClassifier(module, batch_norm=bn, dropout=0.1, max_epochs=3,
                                       random_state=0, **SMALL[module]).fit(Xtr, ytr)
            for module in SMALL for bn in ("before", "after")}


@pytest.mark.parametrize("module,bn", [("mlp", "before"), ("mlp", "after"),
                                       ("cnn2d", "before"), ("cnn2d", "after")])
def test_folded_network_predicts_what_the_original_did(fitted, digits, module, bn):
    _, Xte, _, _ = digits
    clf = fitted[module, bn]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fast = fold_batchnorm(clf)
    np.testing.assert_allclose(fast.predict_proba(Xte), clf.predict_proba(Xte), rtol=0, atol=1e-5)
    np.testing.assert_allclose(_logits(fast, Xte), _logits(clf, Xte), rtol=0, atol=1e-4)
    assert (fast.predict(Xte) == clf.predict(Xte)).all()
    if (module, bn) == ("cnn2d", "after"):
        # BN after the 1st conv's ReLU feeds a zero-padded conv: it stays, and the warning says so
        assert _bns(fast.module_) == ["features.2"]
        assert fast.batch_norm == "after" and fast.folded_bn_paths_ == ["features.7", "dense.3"]
        [w] = [str(w.message) for w in caught if issubclass(w.category, FoldingWarning)]
        assert "kept 1 of 3" in w and "features.2" in w and "zero-pads" in w
    else:
        # everything folded: exactly the batch_norm=None network, no warning
        assert _bns(fast.module_) == [] and fast.batch_norm is None
        assert not [w for w in caught if issubclass(w.category, FoldingWarning)]
        fresh = NNClassifier(module, dropout=0.1, **SMALL[module]).set_params(
            max_epochs=1).fit(Xte[:40], np.arange(40) % 10)
        assert [(k, v.shape) for k, v in fast.module_.state_dict().items()] == \
            [(k, v.shape) for k, v in fresh.module_.state_dict().items()]


def test_original_is_left_untouched(fitted, digits):
    _, Xte, _, _ = digits
    clf = fitted["cnn2d", "before"]
    before = {k: v.clone() for k, v in clf.module_.state_dict().items()}
    proba = clf.predict_proba(Xte)
    fast = fold_batchnorm(clf)
    assert fast is not clf and fast.module_ is not clf.module_
    assert clf.batch_norm == "before" and len(_bns(clf.module_)) == 3
    after = clf.module_.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    np.testing.assert_array_equal(clf.predict_proba(Xte), proba)


def test_weights_match_torch_fusion_reference():
    """Ours against PyTorch's own conv/linear + BN fusion (torch.nn.utils.fusion)."""
    from torch.nn.utils.fusion import fuse_conv_bn_eval, fuse_linear_bn_eval

    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(2, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
                        nn.Linear(4 * 4 * 4, 5), nn.BatchNorm1d(5)).eval()
    for bn in (net[1], net[5]):
        bn.running_mean.uniform_(-1, 1), bn.running_var.uniform_(0.5, 2)
        bn.weight.data.uniform_(-2, 2), bn.bias.data.uniform_(-1, 1)
    ref_conv, ref_lin = fuse_conv_bn_eval(net[0], net[1]), fuse_linear_bn_eval(net[4], net[5])
    folded = fold_batchnorm(net)
    assert isinstance(folded[1], nn.Identity) and isinstance(folded[5], nn.Identity)
    for ours, ref in ((folded[0], ref_conv), (folded[4], ref_lin)):
        torch.testing.assert_close(ours.weight, ref.weight, rtol=0, atol=1e-6)
        torch.testing.assert_close(ours.bias, ref.bias, rtol=0, atol=1e-6)
    x = torch.randn(7, 2, 6, 6)
    torch.testing.assert_close(folded(x), net(x), rtol=0, atol=1e-5)
    assert isinstance(net[1], nn.BatchNorm2d)  # the input module is not modified


def _randomise_bn(module, seed=0, negative=False):
    g = torch.Generator().manual_seed(seed)
    for m in module.modules():
        if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
            n = m.num_features
            m.running_mean.copy_(torch.rand(n, generator=g) * 2 - 1)
            m.running_var.copy_(torch.rand(n, generator=g) * 2 + 0.2)
            m.weight.data.copy_(torch.rand(n, generator=g) * 2 + 0.1)
            if negative:
                m.weight.data[0] = -0.5
            m.bias.data.copy_(torch.rand(n, generator=g) * 2 - 1)
    return module.eval()


def test_bn_after_activation_folds_into_next_layer_through_pooling_if_scales_non_negative():
    torch.manual_seed(0)
    x = torch.rand(16, 64)
    net = _randomise_bn(CNN2d(64, 10, input_shape=(1, 8, 8), channels=[4, 6], hidden_sizes=[12],
                              batch_norm="after"))
    with pytest.warns(FoldingWarning, match="features.2: the next layer, Conv2d, zero-pads"):
        folded = fold_batchnorm(net)
    assert _bns(folded) == ["features.2"]
    torch.testing.assert_close(folded(x), net(x), rtol=0, atol=1e-5)

    neg = _randomise_bn(CNN2d(64, 10, input_shape=(1, 8, 8), channels=[4, 6], hidden_sizes=[12],
                              batch_norm="after"), negative=True)
    with pytest.warns(FoldingWarning, match="features.6: a max pooling follows and some of its "
                                            "scales are negative"):
        folded = fold_batchnorm(neg)
    assert _bns(folded) == ["features.2", "features.6"]  # only dense.3 folded
    torch.testing.assert_close(folded(x), neg(x), rtol=0, atol=1e-5)


def test_mlp_module_with_log_softmax_output_folds_completely():
    net = _randomise_bn(MLP(10, 3, hidden_sizes=[8, 8], batch_norm="after", output="log_softmax"))
    folded = fold_batchnorm(net)
    assert _bns(folded) == []
    x = torch.randn(5, 10)
    torch.testing.assert_close(folded(x), net(x), rtol=0, atol=1e-5)


def test_without_batch_norm_it_warns_and_returns_an_equal_copy(blobs):
    X, y = blobs
    reg = NNRegressor(max_epochs=2, random_state=0).fit(X, y.astype(float))
    with pytest.warns(FoldingWarning, match="NNRegressor has no batch-norm layers: nothing"):
        same = fold_batchnorm(reg)
    assert same is not reg and same.module_ is not reg.module_
    np.testing.assert_array_equal(same.predict(X), reg.predict(X))


def test_fully_folded_model_round_trips_through_save_and_load(fitted, digits, tmp_path):
    _, Xte, _, _ = digits
    fast = fold_batchnorm(fitted["mlp", "after"])
    nnpipe.save(fast, tmp_path / "m")
    back = nnpipe.load(tmp_path / "m")
    assert back.batch_norm is None and _bns(back.module_) == []
    np.testing.assert_array_equal(back.predict_proba(Xte), fast.predict_proba(Xte))


def test_partly_folded_model_round_trips_through_save_and_load(fitted, digits, tmp_path):
    _, Xte, _, _ = digits
    with pytest.warns(FoldingWarning):
        fast = fold_batchnorm(fitted["cnn2d", "after"])
    nnpipe.save(fast, tmp_path / "m")
    back = nnpipe.load(tmp_path / "m")
    assert _bns(back.module_) == ["features.2"]
    np.testing.assert_array_equal(back.predict_proba(Xte), fast.predict_proba(Xte))


def test_pipeline_folds_its_final_step(digits):
    Xtr, Xte, ytr, _ = digits
    pipe = make_pipeline(StandardScaler(), NNClassifier(batch_norm=True, max_epochs=2,
                                                        random_state=0, **SMALL["mlp"]))
    pipe.fit(Xtr, ytr)
    fast = fold_batchnorm(pipe)
    assert fast[-1].batch_norm is None and pipe[-1].batch_norm is True
    np.testing.assert_allclose(fast.predict_proba(Xte), pipe.predict_proba(Xte), atol=1e-5)


def test_folded_estimator_keeps_training_its_own_parameters(fitted, digits):
    Xtr, _, ytr, _ = digits
    fast = fold_batchnorm(fitted["mlp", "before"])
    in_optimizer = {id(p) for g in fast.optimizer_.param_groups for p in g["params"]}
    assert in_optimizer == {id(p) for p in fast.module_.parameters()}
    w0 = fast.module_.hidden[1].weight.detach().clone()
    fast.set_params(max_epochs=1).partial_fit(Xtr, ytr)
    assert not torch.equal(w0, fast.module_.hidden[1].weight)


def test_unfitted_or_foreign_input_is_refused():
    with pytest.raises(NotFittedError):
        fold_batchnorm(NNClassifier(batch_norm=True))
    with pytest.raises(TypeError, match="fold_batchnorm takes an NNClassifier.*got str"):
        fold_batchnorm("model")

"""nnpipe.sparsity: magnitude pruning to an exact number of zeros, and counting them."""

import numpy as np
import pytest
import torch
from sklearn.exceptions import NotFittedError
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from torch import nn

import nnpipe
from nnpipe import NNClassifier
from nnpipe.sparsity import prune, sparsity_report

# MLP 64 -> 64 -> 10: hidden.1 has 4096 weights, output 640; 4736 in all
MLP_ARGS = {"module__hidden_sizes": [64], "max_epochs": 15, "random_state": 0}


@pytest.fixture(scope="module")
def mlp(digits):
    Xtr, _, ytr, _ = digits
    return NNClassifier(**MLP_ARGS).fit(Xtr, ytr)


@pytest.fixture(scope="module")
def cnn(digits):
    Xtr, _, ytr, _ = digits
    return NNClassifier("cnn2d", input_shape=(1, 8, 8), module__channels=[4, 8],
                        module__hidden_sizes=[16], batch_norm=True, max_epochs=3,
                        random_state=0).fit(Xtr, ytr)


def _zero_masks(est):
    return {k: (v == 0) for k, v in est.module_.state_dict().items()
            if k.endswith("weight") and v.dim() > 1}


@pytest.mark.parametrize("sparsity", [0.3, 0.5, 0.9])
def test_global_pruning_zeroes_exactly_the_target_count(mlp, sparsity):
    report = sparsity_report(prune(mlp, sparsity))
    assert report["weights"] == 4736
    assert report["zeros"] == round(sparsity * 4736)
    assert abs(report["sparsity"] - sparsity) <= 1 / 4736
    # one threshold for all layers: the smaller-magnitude layer loses more
    assert report["layers"]["hidden.1"]["zeros"] + report["layers"]["output"]["zeros"] == \
        report["zeros"]


@pytest.mark.parametrize("which", ["mlp", "cnn"])
def test_layer_pruning_hits_the_target_in_every_layer(mlp, cnn, which):
    model = {"mlp": mlp, "cnn": cnn}[which]
    report = sparsity_report(prune(model, 0.6, scope="layer"))
    n_layers = {"mlp": 2, "cnn": 4}[which]
    assert len(report["layers"]) == n_layers
    for name, layer in report["layers"].items():
        assert abs(layer["zeros"] - 0.6 * layer["weights"]) <= 1, name
    # batch norm and biases are neither pruned nor counted
    pruned = prune(model, 0.6, scope="layer")
    for name, value in pruned.module_.state_dict().items():
        if not (name.endswith("weight") and value.dim() > 1):
            ref = model.module_.state_dict()[name]
            assert torch.equal(value, ref), name


def test_half_the_weights_cost_little_accuracy_on_digits(mlp, digits):
    Xtr, Xte, ytr, yte = digits
    base = mlp.score(Xte, yte)
    pruned = prune(mlp, 0.5).score(Xte, yte)
    tuned = prune(mlp, 0.5, X=Xtr, y=ytr, fine_tune_epochs=2).score(Xte, yte)
    # measured: 0.938 -> 0.922 pruned -> 0.942 after 2 fine-tuning epochs
    assert base > 0.92
    assert pruned >= base - 0.03
    assert tuned >= base - 0.01
    # 90% is not small: without fine-tuning accuracy collapses (0.50 measured)
    assert prune(mlp, 0.9).score(Xte, yte) < base - 0.2


def test_fine_tuning_keeps_the_zeros_and_trains_the_rest(mlp, digits):
    Xtr, _, ytr, _ = digits
    pruned = prune(mlp, 0.5)
    tuned = prune(mlp, 0.5, X=Xtr, y=ytr, fine_tune_epochs=2)
    masks, tuned_masks = _zero_masks(pruned), _zero_masks(tuned)
    for name, mask in masks.items():
        assert torch.equal(tuned_masks[name], mask), name  # the same weights, still exactly zero
        w0, w1 = pruned.module_.state_dict()[name], tuned.module_.state_dict()[name]
        # the others moved (all but those from pixels that are 0 in every image: 0.85 measured)
        assert (w1[~mask] != w0[~mask]).float().mean() > 0.8
    assert len(tuned.history) == len(mlp.history) + 2
    assert tuned.max_epochs == mlp.max_epochs and tuned.lr == mlp.lr  # params restored
    # pruning is permanent: no masks, no hooks, the same state keys as the dense model
    assert list(tuned.module_.state_dict()) == list(mlp.module_.state_dict())
    assert not any(m._forward_pre_hooks for m in tuned.module_.modules())


def test_the_original_is_left_untouched(mlp):
    before = {k: v.clone() for k, v in mlp.module_.state_dict().items()}
    pruned = prune(mlp, 0.8)
    assert pruned is not mlp
    assert all(torch.equal(before[k], v) for k, v in mlp.module_.state_dict().items())
    assert sparsity_report(mlp)["zeros"] == 0


def test_save_and_load_keep_the_zeros(mlp, digits, tmp_path):
    _, Xte, _, _ = digits
    pruned = prune(mlp, 0.7, scope="layer")
    nnpipe.save(pruned, tmp_path / "m")
    back = nnpipe.load(tmp_path / "m")
    assert sparsity_report(back) == sparsity_report(pruned)
    for name, mask in _zero_masks(pruned).items():
        assert torch.equal(_zero_masks(back)[name], mask)
    np.testing.assert_array_equal(back.predict_proba(Xte), pruned.predict_proba(Xte))


def test_l1_penalty_drives_weights_near_zero_but_not_to_exact_zero(mlp, digits):
    Xtr, _, ytr, _ = digits
    l1 = NNClassifier(**MLP_ARGS, l1=1e-3).fit(Xtr, ytr)
    exact, near = sparsity_report(l1), sparsity_report(l1, threshold=1e-3)
    plain_near = sparsity_report(mlp, threshold=1e-3)
    assert exact["sparsity"] == 0.0  # Adam's steps oscillate around 0, never land on it
    assert near["sparsity"] > 0.25 and plain_near["sparsity"] < 0.01  # 0.33 vs 0.004 measured
    assert near["threshold"] == 1e-3


def test_pipeline_is_pruned_and_fine_tuned_on_its_transformed_input(digits):
    Xtr, Xte, ytr, yte = digits
    pipe = make_pipeline(StandardScaler(), NNClassifier(module__hidden_sizes=[32], max_epochs=5,
                                                        random_state=0)).fit(Xtr, ytr)
    sparse = prune(pipe, 0.5, X=Xtr, y=ytr, fine_tune_epochs=1)
    assert sparsity_report(sparse)["zeros"] == round(0.5 * (64 * 32 + 32 * 10))
    assert sparsity_report(pipe)["zeros"] == 0
    assert sparse.score(Xte, yte) > pipe.score(Xte, yte) - 0.05


def test_zero_sparsity_is_an_unchanged_copy(mlp, digits):
    _, Xte, _, _ = digits
    same = prune(mlp, 0.0)
    np.testing.assert_array_equal(same.predict_proba(Xte), mlp.predict_proba(Xte))


@pytest.mark.parametrize("bad", [1.0, -0.1, 1.5, "half", True, float("nan")])
def test_sparsity_outside_the_unit_interval_is_refused(mlp, bad):
    with pytest.raises(ValueError, match=r"sparsity must be .*\[0, 1\), got " + repr(bad)[:4]):
        prune(mlp, bad)


def test_other_bad_arguments(mlp):
    with pytest.raises(ValueError, match="scope must be 'global' .* or 'layer' .*got 'net'"):
        prune(mlp, 0.5, scope="net")
    with pytest.raises(ValueError, match="fine_tune_epochs=2 needs the training data: pass X"):
        prune(mlp, 0.5, fine_tune_epochs=2)
    with pytest.raises(ValueError, match="fine_tune_epochs must be an int >= 0, got -1"):
        prune(mlp, 0.5, fine_tune_epochs=-1)
    with pytest.raises(ValueError, match="threshold must be a finite float >= 0, got -1"):
        sparsity_report(mlp, threshold=-1)
    with pytest.raises(NotFittedError):
        prune(NNClassifier(), 0.5)
    with pytest.raises(NotFittedError):
        sparsity_report(NNClassifier())


def test_report_reads_a_plain_module():
    net = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.Flatten(), nn.Linear(8, 2))
    with torch.no_grad():
        net[0].weight[0].zero_()
    report = sparsity_report(net)
    assert report["layers"] == {"0": {"zeros": 9, "weights": 18, "sparsity": 0.5},
                                "3": {"zeros": 0, "weights": 16, "sparsity": 0.0}}
    assert report["sparsity"] == 9 / 34


def test_folding_batch_norm_after_pruning_keeps_the_zeros(cnn, digits):
    from nnpipe.export import fold_batchnorm

    _, Xte, _, _ = digits
    sparse = prune(cnn, 0.5)
    fast = fold_batchnorm(sparse)  # folding scales each row: 0 * s stays 0
    assert sparsity_report(fast)["zeros"] == sparsity_report(sparse)["zeros"] == \
        round(0.5 * sparsity_report(cnn)["weights"])
    np.testing.assert_allclose(fast.predict_proba(Xte), sparse.predict_proba(Xte), atol=1e-5)

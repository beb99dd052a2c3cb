"""Routed parameters (``optimizer__*``, ``criterion__*``, ``lr_schedule__*``, ``early_stopping__*``,
``activation__*``) fail before training, naming the key, the value and what the component takes."""

import numpy as np
import pytest
import torch
from torch.optim import lr_scheduler

from nnpipe import NNClassifier, NNRegressor
from nnpipe._routed import accepted_names, check_routed


@pytest.fixture(scope="module")
def blobs():
    rng = np.random.default_rng(0)
    X = rng.normal(size=(120, 6)).astype(np.float32)
    y = (X[:, 0] + 0.5 * X[:, 1] > 0).astype(np.int64)
    y[:12] = 2  # a rare third class
    X[:12] += 3.0
    return X, y


def _fit_error(**params):
    net = NNClassifier(max_epochs=2, random_state=0, **params)
    X, y = np.zeros((8, 4), np.float32), np.array([0, 1] * 4)
    with pytest.raises(ValueError) as info:
        net.fit(X, y)
    assert not getattr(net, "history_", None)  # no epoch ran
    return str(info.value)


@pytest.mark.parametrize("params, message", [
    (dict(optimizer="sgd", optimizer__momentun=0.9),
     "optimizer__momentun is not a parameter of SGD; valid: ['optimizer__dampening', "),
    (dict(optimizer="sgd", optimizer__momentum="x"),
     "optimizer__momentum was rejected by SGD, got 'x'"),
    (dict(optimizer="rmsprop", optimizer__alpha=-1.0),
     "optimizer__alpha was rejected by RMSprop, got -1.0: Invalid alpha value: -1.0."),
    (dict(criterion__reduction="everything"),
     "criterion__reduction was rejected by CrossEntropyLoss, got 'everything'"),
    (dict(criterion__weight=[1.0, 2.0, 3.0]),  # the data has 2 classes
     "criterion__weight was rejected by CrossEntropyLoss, got tensor([1., 2., 3.]): weight "
     "tensor should be defined either for all 2 classes"),
    (dict(criterion="huber", criterion__delta="wide"),
     "criterion__delta was rejected by HuberLoss, got 'wide'"),
    (dict(lr_schedule="cosine", lr_schedule__eta_mni=0.0),
     "lr_schedule__eta_mni is not a parameter of lr_schedule='cosine'; valid: "
     "['lr_schedule__eta_min']. Did you mean 'eta_min'?"),
    (dict(lr_schedule=lr_scheduler.StepLR),
     "lr_schedule__* (the defaults) were rejected together by StepLR"),
    (dict(lr_schedule=lr_scheduler.StepLR, lr_schedule__step_size=2, lr_schedule__gama=0.5),
     "lr_schedule__gama is not a parameter of StepLR"),
    (dict(early_stopping=2, early_stopping__threshold_mode="relative"),
     "early_stopping__threshold_mode was rejected by early stopping, got 'relative': "
     "threshold_mode must be 'rel' or 'abs'"),
    (dict(early_stopping=2.5), "early_stopping must be None, a bool (True: patience 5) or the "
                               "patience, an int >= 1, got 2.5."),
    (dict(activation="leaky_relu", activation__negative_slope="steep"),  # torch checks in forward
     "activation__negative_slope was rejected by LeakyReLU, got 'steep'"),
    (dict(activation="gelu", activation__approximate="exact"),  # torch: a RuntimeError, in forward
     "activation__approximate was rejected by GELU, got 'exact': approximate argument must be "
     "either none or tanh"),
    (dict(activation="elu", activation__alpah=0.5),
     "activation__alpah is not a parameter of ELU; valid: ['activation__alpha', "
     "'activation__inplace']. Did you mean 'alpha'?"),
    (dict(device="gpu"), "device must be a torch device: 'cpu', 'cuda' or 'cuda:<index>', got "
                         "'gpu'."),
])
def test_fit_fails_before_training_naming_the_routed_key(params, message):
    assert message in _fit_error(**params)


def test_a_torch_scheduler_class_takes_its_own_arguments_and_step_every(blobs):
    X, y = blobs
    net = NNClassifier(max_epochs=4, lr=0.1, optimizer="sgd", lr_schedule=lr_scheduler.StepLR,
                       lr_schedule__step_size=2, lr_schedule__gamma=0.5, train_split=None,
                       random_state=0).fit(X, y)
    assert net.optimizer_.param_groups[0]["lr"] == pytest.approx(0.1 * 0.5 ** 2)


def test_class_weights_from_a_yaml_list_become_the_losss_tensor(blobs):
    """params.yaml can only hold a list: ``criterion__weight: [1, 1, 20]`` weights class 2."""
    X, y = blobs
    plain = NNClassifier(max_epochs=1, train_split=None, random_state=0).fit(X, y)
    weighted = NNClassifier(max_epochs=1, train_split=None, random_state=0,
                            criterion__weight=[1.0, 1.0, 20.0]).fit(X, y)
    weight = weighted.criterion_.weight
    assert isinstance(weight, torch.Tensor) and weight.dtype == torch.float32
    assert weight.tolist() == [1.0, 1.0, 20.0]
    # the weighted loss is a weighted mean: the same first batch loss only if weights were unused
    logits = torch.zeros(3, 3)
    target = torch.tensor([0, 1, 2])
    assert weighted.criterion_(logits, target).item() == pytest.approx(np.log(3))
    first = [net.history_[0, "train_loss"] for net in (plain, weighted)]
    assert first[0] != pytest.approx(first[1])


def test_the_blamed_key_is_the_one_rejected_alone():
    seen = []

    def build(kw):
        seen.append(dict(kw))
        if kw.get("b") == "bad":
            raise TypeError("b must be a number")

    with pytest.raises(ValueError, match=r"^thing__b was rejected by Thing, got 'bad': b must be "
                                         r"a number\.$"):
        check_routed("thing", "Thing", {"a": 1, "b": "bad", "c": 3}, build, {"a", "b", "c"})
    assert seen[0] == {"a": 1, "b": "bad", "c": 3}  # first the whole set, then one key at a time
    assert {"b": "bad"} in seen and {"c": 3} not in seen


def test_keys_rejected_only_together_are_named_together():
    def build(kw):
        if kw.get("low", 0) > kw.get("high", 10):
            raise ValueError("low > high")

    with pytest.raises(ValueError, match=r"thing__low=5, thing__high=1\) were rejected together "
                                         r"by Thing: low > high\."):
        check_routed("thing", "Thing", {"low": 5, "high": 1}, build)


def test_accepted_names_reads_signatures():
    assert accepted_names(torch.optim.SGD, skip={"params"}) >= {"lr", "momentum", "nesterov"}
    assert "params" not in accepted_names(torch.optim.SGD, skip={"params"})
    assert accepted_names(lambda **kw: None) is None  # takes anything: not checked by name


def test_valid_routed_params_pass_and_train(blobs):
    X, y = blobs
    net = NNClassifier(max_epochs=3, optimizer="sgd", optimizer__momentum=0.9,
                       optimizer__nesterov=True, lr_schedule="plateau", lr_schedule__factor=0.5,
                       early_stopping=2, early_stopping__monitor="valid_acc",
                       criterion__label_smoothing=0.1, random_state=0).fit(X, y)
    assert net.optimizer_.param_groups[0]["nesterov"] is True
    assert net.criterion_.label_smoothing == 0.1
    reg = NNRegressor(max_epochs=2, criterion="huber", criterion__delta=0.5, random_state=0)
    reg.fit(X, X[:, :1] * 2)
    assert reg.criterion_.delta == 0.5


def test_the_activation_probe_keeps_good_values_and_the_random_state():
    """PReLU's slope count is the layer's width (checked by its first batch, not by a probe of
    another width); an RReLU probe draws from a forked generator, so a seeded fit is unchanged;
    a user's activation class is only built (it may need its own input shape)."""
    torch.manual_seed(1)
    state = torch.get_rng_state()
    for params in (dict(activation="prelu", activation__num_parameters=16),
                   dict(activation="rrelu", activation__lower=0.1, activation__upper=0.2),
                   dict(activation=torch.nn.Softmax2d, module="cnn2d", input_shape=(1, 8, 8))):
        NNClassifier(**params).validate_params(n_features=64, n_outputs=2)
    assert torch.equal(torch.get_rng_state(), state)
    with pytest.raises(ValueError, match="activation__inplace was rejected by Softmax2d, got True"):
        NNClassifier(activation=torch.nn.Softmax2d, activation__inplace=True, module="cnn2d",
                     input_shape=(1, 8, 8)).validate_params(n_features=64, n_outputs=2)

"""nnpipe.models: initialisation variances, activations, normalisation and shapes, in numbers."""

import numpy as np
import pytest
import torch
from torch import nn

from nnpipe.models import CNN1d, CNN2d, INITS, MLP, default_init, init_weights, make_activation

FAN_IN, FAN_OUT = 400, 300


def _weight(init):
    torch.manual_seed(0)
    return init_weights(nn.Linear(FAN_IN, FAN_OUT), init).weight.detach()


@pytest.mark.parametrize("init, expected_var", [
    ("he_normal", 2 / FAN_IN),
    ("he_uniform", 2 / FAN_IN),
    ("lecun_normal", 1 / FAN_IN),
    ("lecun_uniform", 1 / FAN_IN),
    ("glorot_normal", 2 / (FAN_IN + FAN_OUT)),
    ("glorot_uniform", 2 / (FAN_IN + FAN_OUT)),
    ("normal", 0.01 ** 2),
])
def test_init_variance_matches_formula(init, expected_var):
    w = _weight(init)
    assert w.var().item() == pytest.approx(expected_var, rel=0.03)
    assert abs(w.mean().item()) < 0.05 * np.sqrt(expected_var)


def test_uniform_inits_are_bounded_by_the_uniform_limit():
    w = _weight("he_uniform")
    limit = np.sqrt(6 / FAN_IN)  # Var(U(-a, a)) = a^2 / 3 = 2 / fan_in
    assert w.abs().max().item() <= limit
    assert w.abs().max().item() > 0.95 * limit


def test_orthogonal_init_gives_orthonormal_rows():
    w = _weight("orthogonal")  # 300 x 400: rows are orthonormal
    assert torch.allclose(w @ w.T, torch.eye(FAN_OUT), atol=1e-4)


def test_biases_start_at_zero_and_unknown_init_is_rejected():
    layer = init_weights(nn.Linear(10, 5), "glorot_uniform")
    assert torch.count_nonzero(layer.bias) == 0
    with pytest.raises(ValueError, match=r"he_nrmal.*Did you mean 'he_normal'"):
        init_weights(nn.Linear(3, 3), "he_nrmal")


def test_default_init_follows_the_activation():
    assert default_init("relu") == "he_normal"
    assert default_init("leaky_relu") == "he_normal"
    assert default_init("selu") == "lecun_normal"
    assert default_init("tanh") == "glorot_uniform"
    mlp = MLP(FAN_IN, 10, hidden_sizes=[FAN_OUT], activation="relu")
    assert mlp.hidden[1].weight.var().item() == pytest.approx(2 / FAN_IN, rel=0.05)


def test_selu_with_lecun_self_normalises_a_deep_mlp():
    torch.manual_seed(0)
    net = MLP(100, 10, hidden_sizes=[100] * 30, activation="selu")
    x = torch.randn(2000, 100)
    with torch.no_grad():
        h = net.hidden(x)
    assert abs(h.mean().item()) < 0.1
    assert h.var().item() == pytest.approx(1.0, abs=0.2)
    # without SELU's fixed point the signal collapses through 30 tanh layers
    tanh = MLP(100, 10, hidden_sizes=[100] * 30, activation="tanh", init="lecun_normal")
    with torch.no_grad():
        assert tanh.hidden(x).var().item() < 0.5


def test_selu_uses_alpha_dropout_and_relu_plain_dropout():
    selu = MLP(8, 2, hidden_sizes=[4], activation="selu", dropout=0.2)
    relu = MLP(8, 2, hidden_sizes=[4], dropout=0.2)
    assert any(isinstance(m, nn.AlphaDropout) for m in selu.modules())
    assert any(type(m) is nn.Dropout for m in relu.modules())


@pytest.mark.parametrize("where, order", [
    ("before", [nn.Linear, nn.BatchNorm1d, nn.ReLU]),
    ("after", [nn.Linear, nn.ReLU, nn.BatchNorm1d]),
])
def test_batch_norm_before_or_after_activation(where, order):
    mlp = MLP(8, 2, hidden_sizes=[4], batch_norm=where)
    assert [type(m) for m in mlp.hidden[1:4]] == order


@pytest.mark.parametrize("name, cls", [
    ("leaky_relu", nn.LeakyReLU), ("prelu", nn.PReLU), ("rrelu", nn.RReLU), ("elu", nn.ELU),
    ("selu", nn.SELU), ("gelu", nn.GELU), ("tanh", nn.Tanh), ("sigmoid", nn.Sigmoid),
])
def test_activation_registry(name, cls):
    assert isinstance(make_activation(name), cls)


def test_leaky_relu_slope_is_a_knob():
    act = make_activation("leaky_relu", negative_slope=0.2)
    assert act(torch.tensor([-1.0])).item() == pytest.approx(-0.2)
    with pytest.raises(ValueError, match="does not accept"):
        make_activation("relu", negative_slope=0.2)


def test_cnn_shapes_and_input_shape_errors():
    assert CNN1d(32, 3, channels=[4], input_shape=(2, 16))(torch.zeros(5, 32)).shape == (5, 3)
    assert CNN2d(3 * 8 * 8, 4, input_shape=(3, 8, 8))(torch.zeros(2, 192)).shape == (2, 4)
    with pytest.raises(ValueError, match="needs input_shape"):
        CNN2d(64, 10)
    with pytest.raises(ValueError, match="holds 49 values but X has 64"):
        CNN2d(64, 10, input_shape=(1, 7, 7))
    with pytest.raises(ValueError, match="too small"):
        CNN2d(4, 2, input_shape=(1, 2, 2), channels=[4, 4, 4])


def test_registry_lists_every_init():
    assert set(INITS.names()) >= {"glorot_normal", "glorot_uniform", "he_normal", "he_uniform",
                                  "lecun_normal", "lecun_uniform", "orthogonal", "normal"}

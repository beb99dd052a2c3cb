"""Plain ``nn.Module`` networks built from activation / init / normalization / dropout knobs.

The modules here know nothing about skorch: :class:`MLP`, :class:`CNN1d` and :class:`CNN2d` take
their sizes and the training-technique knobs as constructor arguments and return raw scores
(logits) or regression outputs. :mod:`nnpipe.estimators` fills in the data-dependent sizes.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Dict, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from ._registry import Registry, invalid_value

__all__ = [
    "ACTIVATIONS",
    "INITS",
    "MLP",
    "CNN1d",
    "CNN2d",
    "make_activation",
    "init_weights",
    "default_init",
]

# --------------------------------------------------------------------------- activations

ACTIVATIONS = Registry("activation", "an nn.Module class")
for _name, _cls in {
    "relu": nn.ReLU,
    "leaky_relu": nn.LeakyReLU,
    "prelu": nn.PReLU,
    "rrelu": nn.RReLU,
    "elu": nn.ELU,
    "selu": nn.SELU,
    "gelu": nn.GELU,
    "silu": nn.SiLU,
    "tanh": nn.Tanh,
    "sigmoid": nn.Sigmoid,
    "identity": nn.Identity,
}.items():
    ACTIVATIONS.register(_name, _cls)


def _is_module_class(obj: Any) -> bool:
    return isinstance(obj, type) and issubclass(obj, nn.Module)


def make_activation(activation: Any = "relu", **kwargs: Any) -> nn.Module:
    """Instantiate an activation by name (``"leaky_relu"``) or class, with its own kwargs.

    Examples
    --------
    >>> make_activation("leaky_relu", negative_slope=0.2)
    LeakyReLU(negative_slope=0.2)
    """
    cls = ACTIVATIONS.get(activation, accept=_is_module_class)
    try:
        return cls(**kwargs)
    except TypeError as exc:
        raise ValueError(
            f"activation {activation!r} does not accept the arguments {sorted(kwargs)} "
            f"(set through activation__*): {exc}"
        ) from None


def _activation_name(activation: Any) -> str:
    if isinstance(activation, str):
        return activation.lower()
    for name in ACTIVATIONS.names():
        if ACTIVATIONS.get(name) is activation:
            return name
    return ""


# --------------------------------------------------------------------------- initialisation


def _lecun_normal(w: torch.Tensor) -> torch.Tensor:
    return nn.init.kaiming_normal_(w, mode="fan_in", nonlinearity="linear")


def _lecun_uniform(w: torch.Tensor) -> torch.Tensor:
    return nn.init.kaiming_uniform_(w, mode="fan_in", nonlinearity="linear")


INITS = Registry("init", "a callable that fills a weight tensor in place")
for _name, _fn in {
    "glorot_normal": nn.init.xavier_normal_,
    "glorot_uniform": nn.init.xavier_uniform_,
    "he_normal": lambda w: nn.init.kaiming_normal_(w, mode="fan_in", nonlinearity="relu"),
    "he_uniform": lambda w: nn.init.kaiming_uniform_(w, mode="fan_in", nonlinearity="relu"),
    "lecun_normal": _lecun_normal,
    "lecun_uniform": _lecun_uniform,
    "orthogonal": nn.init.orthogonal_,
    "normal": lambda w: nn.init.normal_(w, mean=0.0, std=0.01),
    "torch": None,  # keep PyTorch's own default initialisation
}.items():
    INITS.register(_name, _fn)


def default_init(activation: Any) -> str:
    """The initialisation that suits an activation (Glorot / He / LeCun, as in the literature).

    ReLU and its variants pair with He; SELU with LeCun; tanh, sigmoid and the rest with Glorot.
    """
    name = _activation_name(activation)
    if name in {"relu", "leaky_relu", "prelu", "rrelu", "elu", "gelu", "silu"}:
        return "he_normal"
    if name == "selu":
        return "lecun_normal"
    return "glorot_uniform"


def init_weights(module: nn.Module, init: Any = "he_normal") -> nn.Module:
    """Initialise every Linear / Conv weight of ``module`` with ``init``; biases to zero.

    Examples
    --------
    >>> layer = init_weights(nn.Linear(1000, 500), "he_normal")
    >>> round(layer.weight.var().item() * 1000, 1)  # He: Var(w) = 2 / fan_in
    2.0
    """
    fn = INITS.get(init, accept=callable)
    if fn is None:
        return module
    for sub in module.modules():
        if isinstance(sub, (nn.Linear, nn.Conv1d, nn.Conv2d)):
            fn(sub.weight)
            if sub.bias is not None:
                nn.init.zeros_(sub.bias)
    return module


# --------------------------------------------------------------------------- building blocks

_BATCH_NORM = ("before", "after")


def _check_batch_norm(batch_norm: Any) -> Optional[str]:
    if batch_norm in (None, False, "none"):
        return None
    if batch_norm is True:
        return "before"
    if batch_norm in _BATCH_NORM:
        return batch_norm
    raise invalid_value("batch_norm", batch_norm, "one of None, True, 'before' or 'after'")


def _check_dropout(dropout: Any) -> float:
    dropout = 0.0 if dropout is None else dropout
    if not isinstance(dropout, (int, float)) or isinstance(dropout, bool) or not 0 <= dropout < 1:
        raise invalid_value("dropout", dropout, "a float in [0, 1)")
    return float(dropout)


def _sizes(name: str, sizes: Union[int, Sequence[int]]) -> Tuple[int, ...]:
    given = sizes
    if isinstance(sizes, int):
        sizes = (sizes,)
    elif isinstance(sizes, (list, tuple, range)):
        sizes = tuple(sizes)
    if not (isinstance(sizes, tuple) and
            all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in sizes)):
        raise invalid_value(name, given, "a positive int or a list of positive ints")
    return sizes


class _Knobs:
    """The per-layer knobs shared by all nnpipe networks."""

    def __init__(self, activation, activation_kwargs, batch_norm, dropout):
        self.activation = "relu" if activation is None else activation
        self.activation_kwargs = dict(activation_kwargs or {})
        self.batch_norm = _check_batch_norm(batch_norm)
        self.dropout = _check_dropout(dropout)
        self.selu = _activation_name(self.activation) == "selu"
        make_activation(self.activation, **self.activation_kwargs)  # fail early on bad names

    def block(self, layer: nn.Module, width: int, norm_cls: Callable[[int], nn.Module]) -> list:
        """``layer → [BN] → activation → [BN] → dropout`` (alpha dropout with SELU)."""
        parts = [layer]
        if self.batch_norm == "before":
            parts.append(norm_cls(width))
        parts.append(make_activation(self.activation, **self.activation_kwargs))
        if self.batch_norm == "after":
            parts.append(norm_cls(width))
        if self.dropout > 0:
            parts.append(nn.AlphaDropout(self.dropout) if self.selu else nn.Dropout(self.dropout))
        return parts


def _output_layer(n_in: int, n_outputs: int, output: str) -> nn.Module:
    if output == "log_softmax":
        return nn.Sequential(nn.Linear(n_in, n_outputs), nn.LogSoftmax(dim=-1))
    if output == "linear":
        return nn.Linear(n_in, n_outputs)
    raise invalid_value("output", output, "'linear' or 'log_softmax'")


# --------------------------------------------------------------------------- networks


class MLP(nn.Module):
    """A multilayer perceptron: ``hidden_sizes`` dense blocks, then a linear output layer.

    Parameters
    ----------
    n_features, n_outputs : int
        Input and output widths (filled in by the estimators from the data).
    hidden_sizes : int or sequence of int, default=(256, 128)
    activation : str or nn.Module class, default="relu"
    activation_kwargs : dict, optional
        Arguments of the activation (``{"negative_slope": 0.2}`` for leaky ReLU).
    init : str or callable, optional
        Weight initialisation; ``None`` picks the one that suits ``activation``.
    batch_norm : {None, True, "before", "after"}
        Batch normalisation before or after each activation.
    dropout : float in [0, 1)
        Dropout after each hidden block (alpha dropout when ``activation="selu"``).
    output : {"linear", "log_softmax"}
        The output layer returns raw scores, or log-probabilities for an NLL loss.
    input_shape : tuple, optional
        Ignored by the MLP (inputs are flattened), accepted so every nnpipe network takes it.

    Examples
    --------
    >>> net = MLP(64, 10, hidden_sizes=[32], activation="selu")
    >>> net(torch.zeros(5, 64)).shape
    torch.Size([5, 10])
    """

    def __init__(self, n_features: int, n_outputs: int, hidden_sizes=(256, 128), activation=None,
                 activation_kwargs=None, init=None, batch_norm=None, dropout=None,
                 output: str = "linear", input_shape=None):
        super().__init__()
        knobs = _Knobs(activation, activation_kwargs, batch_norm, dropout)
        layers, width = [nn.Flatten()], int(n_features)
        for size in _sizes("module__hidden_sizes", hidden_sizes):
            layers += knobs.block(nn.Linear(width, size), size, nn.BatchNorm1d)
            width = size
        self.hidden = nn.Sequential(*layers)
        self.output = _output_layer(width, int(n_outputs), output)
        init_weights(self, default_init(knobs.activation) if init is None else init)

    def forward(self, X: torch.Tensor) -> torch.Tensor:
        return self.output(self.hidden(X))


class _CNN(nn.Module):
    _conv: type = nn.Conv1d
    _pool: type = nn.MaxPool1d
    _norm: type = nn.BatchNorm1d
    _ndim: int = 1

    def __init__(self, n_features: int, n_outputs: int, input_shape=None, channels=(32, 64),
                 kernel_size: int = 3, stride: int = 1, pool: Optional[int] = 2,
                 hidden_sizes=(128,), activation=None, activation_kwargs=None, init=None,
                 batch_norm=None, dropout=None, output: str = "linear"):
        super().__init__()
        shape = self._input_shape(input_shape, n_features)
        knobs = _Knobs(activation, activation_kwargs, batch_norm, dropout)
        for name, value in (("module__kernel_size", kernel_size), ("module__stride", stride),
                            ("module__pool", 1 if pool is None else pool)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise invalid_value(name, value, "a positive int" + (
                    " or None" if name == "module__pool" else ""))
        layers, c_in = [], shape[0]
        for c_out in _sizes("module__channels", channels):
            conv = self._conv(c_in, c_out, kernel_size, stride=stride, padding=kernel_size // 2)
            layers += knobs.block(conv, c_out, self._norm)
            if pool and pool > 1:
                layers.append(self._pool(pool))
            c_in = c_out
        self.features = nn.Sequential(*layers)
        try:
            with torch.no_grad():
                n_flat = self.features(torch.zeros(1, *shape)).numel()
        except RuntimeError:
            n_flat = 0
        if n_flat == 0:
            raise ValueError(f"{type(self).__name__}: input_shape {shape} is too small for "
                             f"{len(channels)} conv/pool stages; use fewer channels or pool=None.")
        dense, width = [nn.Flatten()], n_flat
        for size in _sizes("module__hidden_sizes", hidden_sizes or ()):
            dense += knobs.block(nn.Linear(width, size), size, nn.BatchNorm1d)
            width = size
        self.dense = nn.Sequential(*dense)
        self.output = _output_layer(width, int(n_outputs), output)
        self.shape = shape
        init_weights(self, default_init(knobs.activation) if init is None else init)

    def _input_shape(self, input_shape, n_features) -> Tuple[int, ...]:
        name = type(self).__name__
        want = self._ndim + 1
        if input_shape is None:
            if self._ndim == 1:
                return (1, int(n_features))
            raise ValueError(f"{name} needs input_shape=(C, H, W) to reshape the {n_features} "
                             "flat features into images, got None.")
        shape = tuple(int(s) for s in input_shape)
        if len(shape) != want or any(s <= 0 for s in shape):
            raise invalid_value("input_shape", input_shape,
                                f"a tuple of {want} positive ints ({'C, L' if want == 2 else 'C, H, W'}) for {name}")
        if math.prod(shape) != int(n_features):
            raise ValueError(f"input_shape {shape} holds {math.prod(shape)} values but X has "
                             f"{n_features} features.")
        return shape

    def forward(self, X: torch.Tensor) -> torch.Tensor:
        X = X.reshape(X.shape[0], *self.shape)
        return self.output(self.dense(self.features(X)))


class CNN1d(_CNN):
    """A 1-D convolutional network for sequences ``(C, L)`` given as flat feature rows.

    Conv blocks (``channels``, ``kernel_size``, ``stride``; 'same' padding) each followed by
    max-pooling of size ``pool``, then dense ``hidden_sizes`` blocks and the output layer. The other
    knobs are those of :class:`MLP`. ``input_shape=None`` reads the features as one channel.
    """


class CNN2d(_CNN):
    """A 2-D convolutional network for images ``(C, H, W)`` given as flat feature rows.

    Same knobs as :class:`CNN1d`; ``input_shape=(C, H, W)`` is required.

    Examples
    --------
    >>> net = CNN2d(64, 10, input_shape=(1, 8, 8), channels=[8, 16])
    >>> net(torch.zeros(3, 64)).shape
    torch.Size([3, 10])
    """

    _conv, _pool, _norm, _ndim = nn.Conv2d, nn.MaxPool2d, nn.BatchNorm2d, 2


MODULES = Registry("module", "an nn.Module class")
for _name, _cls in {"mlp": MLP, "cnn1d": CNN1d, "cnn2d": CNN2d}.items():
    MODULES.register(_name, _cls)

#: Arguments that only nnpipe's own networks understand (the estimators' architecture knobs).
ARCHITECTURE_KNOBS: Dict[str, str] = {
    "input_shape": "input_shape",
    "activation": "activation",
    "init": "init",
    "batch_norm": "batch_norm",
    "dropout": "dropout",
}

"""Unsupervised pretraining: train a network's lower layers as a (denoising) autoencoder.

:class:`Pretrainer` builds exactly the network a classifier with the same architecture knobs
would build, keeps everything below its output layer as the *encoder* and adds a mirrored
*decoder*; it is trained to reconstruct ``X`` (no labels needed, so every row counts). The
encoder's parameters keep the classifier's names (``hidden.1.weight``, ``features.0.weight``),
so the fitted pretrainer, or its :func:`nnpipe.save` directory, is a ``transfer_from`` for
:class:`~nnpipe.NNClassifier` / :class:`~nnpipe.NNRegressor`; :func:`fine_tune_params` gives
the knobs that reuse it (``transfer_from``, ``transfer_layers``, ``freeze``, ``unfreeze_after``,
``lr_multipliers``).

Training is skorch's (an :class:`~nnpipe.NNRegressor` whose target is ``X`` itself): the noise
of a denoising autoencoder is drawn afresh for every training batch in :meth:`Pretrainer.infer`,
and the loss always compares with the clean batch (:meth:`Pretrainer.get_loss`).
"""

from __future__ import annotations

import inspect
import math
import os
from numbers import Real
from typing import Any, Dict, List, Optional

import numpy as np
import torch
from skorch.utils import to_tensor
from torch import nn

from ._registry import did_you_mean, invalid_value
from .estimators import NNRegressor
from .models import MLP, _CNN, default_init, init_weights, make_activation

__all__ = ["Pretrainer", "AutoEncoder", "NOISES", "fine_tune_params"]

#: Corruptions of a denoising autoencoder: ``noise_level`` is the std of the added Gaussian
#: noise, or the fraction of input values set to zero (masking noise, Vincent et al. 2008).
NOISES = ("gaussian", "mask")


class AutoEncoder(nn.Module):
    """An nnpipe network without its output layer (the encoder) plus a mirrored decoder.

    The encoder's submodules keep their names in ``network`` (``hidden`` for :class:`MLP`;
    ``features`` and ``dense`` for the CNNs), so its state-dict entries match a classifier
    built with the same knobs. The decoder mirrors the encoder: dense layers back to the input
    width (MLP), or dense layers back to the last feature map, then per conv stage an upsampling
    to that stage's input size and a 'same' convolution (CNNs). Its last layer is linear.

    Parameters
    ----------
    network : MLP, CNN1d or CNN2d
        A freshly built nnpipe network; its ``output`` layer is dropped.
    n_features : int
        The input width, which the decoder reconstructs.
    activation, activation_kwargs, init
        The decoder's activation and initialisation (the encoder's, for symmetry).

    Examples
    --------
    >>> ae = AutoEncoder(MLP(64, 1, hidden_sizes=[32, 16]), 64)
    >>> ae(torch.zeros(5, 64)).shape, ae.encode(torch.zeros(5, 64)).shape
    (torch.Size([5, 64]), torch.Size([5, 16]))
    >>> [k for k in ae.state_dict() if k.startswith("hidden")]
    ['hidden.1.weight', 'hidden.1.bias', 'hidden.3.weight', 'hidden.3.bias']
    """

    def __init__(self, network: nn.Module, n_features: int, activation: Any = None,
                 activation_kwargs: Optional[Dict[str, Any]] = None, init: Any = None):
        super().__init__()
        if isinstance(network, MLP):
            self.parts = ("hidden",)
            self.shape = None
        elif isinstance(network, _CNN):
            self.parts = ("features", "dense")
            self.shape = tuple(network.shape)
        else:
            raise ValueError(
                f"Pretrainer: module {type(network).__name__} cannot be split into encoder and "
                "decoder; pretraining supports nnpipe's own networks 'mlp', 'cnn1d' and 'cnn2d'.")
        for name in self.parts:
            setattr(self, name, getattr(network, name))
        activation = "relu" if activation is None else activation
        act = lambda: make_activation(activation, **(activation_kwargs or {}))  # noqa: E731
        widths = [m.out_features for m in self._linears()]
        if self.shape is None and not widths:
            raise ValueError("Pretrainer: the MLP has no hidden layer to pretrain "
                             "(module__hidden_sizes is empty).")
        layers: List[nn.Module] = []
        if self.shape is None:
            targets = widths[-2::-1] + [int(n_features)]
        else:
            stages, fmap = self._conv_stages()
            targets = widths[-2::-1] + ([math.prod(fmap)] if widths else [])
        for i, width in enumerate(targets):
            layers.append(nn.Linear(widths[-1] if i == 0 else targets[i - 1], width))
            if self.shape is not None or i < len(targets) - 1:
                layers.append(act())
        if self.shape is not None:
            layers.append(nn.Unflatten(1, fmap))
            conv = nn.Conv2d if len(self.shape) == 3 else nn.Conv1d
            size = tuple(fmap[1:])
            for j, (c_in, c_out, kernel, in_size) in enumerate(reversed(stages)):
                if tuple(in_size) != size:
                    layers.append(nn.Upsample(size=tuple(in_size), mode="nearest"))
                layers.append(conv(c_out, c_in, kernel, padding="same"))
                if j < len(stages) - 1:
                    layers.append(act())
                size = tuple(in_size)
            layers.append(nn.Flatten())
        self.decoder = nn.Sequential(*layers)
        init_weights(self.decoder, default_init(activation) if init is None else init)

    def _linears(self) -> List[nn.Linear]:
        return [m for name in self.parts for m in getattr(self, name) if isinstance(m, nn.Linear)]

    def _conv_stages(self):
        """``[(c_in, c_out, kernel, input spatial size)]`` per conv, and the last feature map."""
        stages, training = [], self.features.training
        self.features.eval()  # batch norm must not update its statistics here
        try:
            with torch.no_grad():
                x = torch.zeros(1, *self.shape)
                for layer in self.features:
                    if isinstance(layer, (nn.Conv1d, nn.Conv2d)):
                        stages.append((layer.in_channels, layer.out_channels, layer.kernel_size,
                                       tuple(x.shape[2:])))
                    x = layer(x)
        finally:
            self.features.train(training)
        return stages, tuple(x.shape[1:])

    def encode(self, X: torch.Tensor) -> torch.Tensor:
        """The encoder's output: what the classifier's output layer would see."""
        if self.shape is not None:
            X = X.reshape(X.shape[0], *self.shape)
        for name in self.parts:
            X = getattr(self, name)(X)
        return X

    def forward(self, X: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.encode(X)).reshape(X.shape[0], -1)

    def encoder_patterns(self) -> List[str]:
        """fnmatch patterns of the encoder's parameters, one per part that has any."""
        return [f"{name}.*" for name in self.parts
                if any(True for _ in getattr(self, name).parameters())]


class Pretrainer(NNRegressor):
    __doc__ = """Pretrain a network's lower layers as a (denoising) autoencoder on unlabeled rows.

    Takes the architecture knobs of :class:`~nnpipe.NNClassifier` (``module``, ``module__*``,
    ``activation``, ``init``, ``batch_norm``, ``dropout``, ``input_shape``) and builds the same
    network, minus its output layer, plus a mirrored decoder (:class:`AutoEncoder`). ``fit(X)``
    trains it to reconstruct ``X`` (mean squared error by default); ``y`` is ignored. Use the
    fitted pretrainer, or its :func:`nnpipe.save` directory, as a classifier's
    ``transfer_from`` (see :func:`fine_tune_params`).

    Parameters
    ----------
    module : {"mlp", "cnn1d", "cnn2d"}, default="mlp"
        The classifier's network; your own module classes cannot be split into encoder and
        decoder and are refused.
    noise : {None, "gaussian", "mask"}, default=None
        Corrupt each training batch (fresh noise every batch; validation and ``predict`` see
        clean inputs) and learn to reconstruct the clean one: a denoising autoencoder.
    noise_level : float, default=0.1
        The std of the Gaussian noise (in the units of ``X``), or the fraction of input values
        masked to zero, in (0, 1).
    **kwargs
        Every other parameter of :class:`~nnpipe.NNRegressor` (``lr``, ``max_epochs``,
        ``optimizer``, ``lr_schedule``, ``train_split``, ``random_state``, ...), with its default.

    Attributes
    ----------
    module_ : AutoEncoder
        ``module_.encode(X)`` gives the codes; :meth:`transform` does it for arrays.

    Examples
    --------
    >>> from sklearn.datasets import load_digits
    >>> X = load_digits().data / 16
    >>> pre = Pretrainer(module__hidden_sizes=[32], noise="mask", noise_level=0.2,
    ...                  max_epochs=20, lr=1e-2, random_state=0).fit(X)
    >>> pre.transform(X).shape
    (1797, 32)
    >>> pre.score(X) > 0.5  # the fraction of the variance of X reconstructed
    True
    >>> from nnpipe import NNClassifier
    >>> clf = NNClassifier(module__hidden_sizes=[32], max_epochs=1,
    ...                    **fine_tune_params(pre, lr_multiplier=0.1))
    >>> clf.fit(X, load_digits().target).transferred_
    ['hidden.1.weight', 'hidden.1.bias']
    """

    def __init__(self, module="mlp", *, noise=None, noise_level=0.1, **kwargs):
        super().__init__(module, **kwargs)
        self.noise = noise
        self.noise_level = noise_level

    # ----------------------------------------------------------------- checks

    def _check_params(self) -> None:
        super()._check_params()
        if self.noise is not None and self.noise not in NOISES:
            raise ValueError(f"noise must be None, 'gaussian' or 'mask', got {self.noise!r}."
                             + did_you_mean(str(self.noise), NOISES))
        if self.noise is None:
            return
        level = self.noise_level
        ok = isinstance(level, Real) and not isinstance(level, bool) and math.isfinite(level)
        if self.noise == "gaussian" and not (ok and level > 0):
            raise invalid_value("noise_level", level, "a finite number > 0 (the Gaussian noise's "
                                "std) with noise='gaussian'")
        if self.noise == "mask" and not (ok and 0 < level < 1):
            raise invalid_value("noise_level", level, "a fraction in (0, 1) (of inputs masked) "
                                "with noise='mask'")

    def _build_module(self, n_features: int, n_outputs: int) -> nn.Module:
        if not self._own_module():
            name = getattr(self.module, "__name__", repr(self.module))
            raise ValueError(f"Pretrainer: module={name} cannot be split into encoder and "
                             "decoder; pretraining supports nnpipe's own networks 'mlp', "
                             "'cnn1d' and 'cnn2d'.")
        network = super()._build_module(n_features, 1)  # what the classifier would build
        return AutoEncoder(network, n_features, self.activation,
                           self.get_params_for("activation"), self.init)

    # ----------------------------------------------------------------- sklearn API

    def fit(self, X, y=None, **fit_params):
        """Train the autoencoder to reconstruct ``X``; ``y`` is ignored. Returns ``self``."""
        return super().fit(X, X, **fit_params)

    def partial_fit(self, X, y=None, classes=None, **fit_params):
        """Train ``max_epochs`` more epochs on ``X``; ``y`` is ignored."""
        return super().partial_fit(X, X, **fit_params)

    def transform(self, X) -> np.ndarray:
        """The encoder's output for each row, flattened: shape (n_samples, code width)."""
        X = self._prepare_X(X)
        self._set_training(False)
        codes = []
        with torch.no_grad():
            for Xi, _ in self.get_iterator(self.get_dataset(X), training=False):
                code = self.module_.encode(to_tensor(Xi, device=self.device))
                codes.append(code.reshape(len(code), -1).cpu().numpy())
        return np.concatenate(codes)

    def fit_transform(self, X, y=None, **fit_params) -> np.ndarray:
        """``fit(X)``, then the codes of ``X`` (:meth:`transform`)."""
        return self.fit(X, y, **fit_params).transform(X)

    def score(self, X, y=None, sample_weight=None) -> float:
        """The fraction of the variance of ``X`` that the reconstruction explains (R^2 over all
        features, weighted by their variance); ``y`` is ignored."""
        from sklearn.metrics import r2_score

        X = np.asarray(X, dtype=np.float32)
        return float(r2_score(X, self.predict(X), sample_weight=sample_weight,
                              multioutput="variance_weighted"))

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.estimator_type = None
        tags.target_tags.required = False
        from sklearn.utils import TransformerTags

        tags.transformer_tags = TransformerTags(preserves_dtype=["float32"])
        return tags

    # ----------------------------------------------------------------- skorch hooks

    def infer(self, x, **fit_params):
        """The network's output; training batches are corrupted first (denoising)."""
        if self.noise is not None and self.module_.training:
            x = to_tensor(x, device=self.device)
            if self.noise == "gaussian":
                x = x + self.noise_level * torch.randn_like(x)
            else:
                x = x * (torch.rand_like(x) >= self.noise_level).to(x.dtype)
        return super().infer(x, **fit_params)

    def get_loss(self, y_pred, y_true, X=None, training=False):
        # the target is the clean (possibly augmented) batch itself
        if torch.is_tensor(X):
            y_true = X.reshape(len(X), -1)
        return super().get_loss(y_pred, y_true, X=X, training=training)

    def encoder_patterns(self) -> List[str]:
        """fnmatch patterns naming the encoder's layers in the classifier (``["hidden.*"]``)."""
        self.check_is_fitted()
        return self.module_.encoder_patterns()


def _pretrainer_signature() -> inspect.Signature:
    """NNRegressor's signature plus ``noise`` and ``noise_level``, so introspection (clone,
    did-you-mean hints, params.yaml checks) sees every parameter while the defaults stay in
    NNRegressor's signature only."""
    base = list(inspect.signature(NNRegressor.__init__).parameters.values())
    ours = list(inspect.signature(Pretrainer.__init__).parameters.values())
    extra = [p for p in ours if p.name in ("noise", "noise_level")]
    return inspect.Signature(base[:-1] + extra + base[-1:])


Pretrainer.__init__.__signature__ = _pretrainer_signature()


def fine_tune_params(pretrained: Any, *, freeze: bool = False,
                     unfreeze_after: Optional[int] = None,
                     lr_multiplier: Optional[float] = None) -> Dict[str, Any]:
    """Classifier parameters that start from a pretrained encoder.

    Parameters
    ----------
    pretrained : Pretrainer or path
        A fitted :class:`Pretrainer`, or the directory :func:`nnpipe.save` wrote for one.
    freeze : bool, default=False
        Freeze the reused layers (only the new layers above them train at first).
    unfreeze_after : int, optional
        Unfreeze them after this many epochs (needs ``freeze``).
    lr_multiplier : float, optional
        Train the reused layers at ``lr * lr_multiplier`` (e.g. 0.1: fine-tune gently).

    Returns
    -------
    dict
        ``transfer_from``, ``transfer_layers`` (the encoder: every one of its layers must fit the
        classifier) and, as asked, ``freeze``, ``unfreeze_after``, ``lr_multipliers``.
    """
    source = pretrained
    if isinstance(pretrained, (str, os.PathLike)):
        from .persist import load

        source = load(pretrained)
    if not isinstance(source, Pretrainer):
        raise invalid_value("pretrained", pretrained, "a fitted Pretrainer or the directory "
                            "nnpipe.save wrote for one")
    if unfreeze_after is not None and not freeze:
        raise ValueError(f"unfreeze_after={unfreeze_after!r} needs freeze=True: only frozen "
                         "layers can be unfrozen.")
    patterns = source.encoder_patterns()
    params: Dict[str, Any] = {"transfer_from": pretrained, "transfer_layers": patterns}
    if freeze:
        params["freeze"] = patterns
        if unfreeze_after is not None:
            params["unfreeze_after"] = unfreeze_after
    if lr_multiplier is not None:
        params["lr_multipliers"] = {p: lr_multiplier for p in patterns}
    return params

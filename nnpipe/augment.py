"""Batch augmentation, applied by the estimators to training batches only.

Every op works on a whole batch at once, on the batch's device, drawing its per-sample random
parameters from torch's generator (which ``random_state`` seeds inside ``fit``): no per-sample
Python loop. Images are ``(N, C, H, W)`` (colour through kornia; geometry as one fused
``grid_sample``), sequences ``(N, C, L)``. Flat feature rows are reshaped with the estimator's ``input_shape``.

An :class:`Augmenter` composes named ops like an sklearn ``Pipeline`` composes steps, so each op's
probability and range is a parameter (``augment__rotation__degrees``) that YAML files and searches
can address::

    Augmenter([("hflip", HorizontalFlip(p=0.5)), ("rotation", Rotation(degrees=10))])
    Augmenter.from_config({"hflip": {"p": 0.5}, "rotation": {"degrees": 10}})  # same

==================== =========== ============================================================
name                 input       effect
==================== =========== ============================================================
``hflip``/``vflip``  images      mirror left-right / top-bottom
``shift``            both        translate by up to ``max_fraction`` of the size (zero fill)
``crop``             images      zero-pad by ``padding`` pixels, crop back at a random offset
``rotation``         images      rotate by an angle in [-degrees, degrees]
``scale``            images      zoom by a factor in ``range``
``color_jitter``     images      brightness / contrast / saturation / hue jitter
``hsv``              RGB images  Krizhevsky et al.: S, V -> S^a * m + b; H += h
``noise``            both        add Gaussian noise of std ``std``
``cutout``           images      zero a square of side ``size`` x image side
``roll``             sequences   circular shift by up to ``max_fraction`` of the length
``amplitude``        both        multiply by a factor in ``range``
==================== =========== ============================================================
"""

from __future__ import annotations

import math
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
from sklearn.base import BaseEstimator
from sklearn.utils.metaestimators import _BaseComposition

from ._registry import Registry, invalid_value

__all__ = ["Augmenter", "OPS", "preview", "tta_views", "TTA_VIEWS"]


def _uniform(n: int, low: float, high: float, like: torch.Tensor) -> torch.Tensor:
    return torch.rand(n, device=like.device, dtype=like.dtype) * (high - low) + low


class _Op(BaseEstimator):
    """One augmentation: ``p`` is the probability that a sample gets it."""

    spatial_dims: Tuple[int, ...] = (1, 2)  # 1: sequences (C, L); 2: images (C, H, W)
    channels: Optional[int] = None

    def check(self, name: str, shape: Tuple[int, ...]) -> None:
        """Fail with a clear message when this op cannot apply to samples of ``shape``."""
        p = getattr(self, "p", 1.0)
        if not isinstance(p, (int, float)) or isinstance(p, bool) or not 0 <= p <= 1:
            raise invalid_value(f"augment__{name}__p", p, "a probability in [0, 1]")
        kind = {1: "sequences (C, L)", 2: "images (C, H, W)"}
        if len(shape) - 1 not in self.spatial_dims:
            raise ValueError(f"augment op {name!r} works on "
                             f"{' and '.join(kind[d] for d in self.spatial_dims)}, but "
                             f"input_shape={shape} is {kind.get(len(shape) - 1, 'neither')}.")
        channels = self.required_channels()
        if channels is not None and shape[0] != channels:
            raise ValueError(f"augment op {name!r} needs {channels}-channel (RGB) images, "
                             f"but input_shape={shape} has {shape[0]} channel(s).")
        self._check_ranges(name)

    def required_channels(self) -> Optional[int]:
        return self.channels

    def _check_ranges(self, name: str) -> None:
        pass

    def _mask(self, x: torch.Tensor) -> torch.Tensor:
        """Which samples get the op, shaped to broadcast against ``x``."""
        mask = torch.rand(x.shape[0], device=x.device) < self.p
        return mask.view(-1, *([1] * (x.dim() - 1)))

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.p <= 0:
            return x
        out = self.apply(x)
        return out if self.p >= 1 else torch.where(self._mask(x), out, x)

    def apply(self, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError


def _range(name: str, value: Any, low: float = -math.inf, positive: bool = False) -> None:
    ok = (isinstance(value, (list, tuple)) and len(value) == 2
          and all(isinstance(v, (int, float)) for v in value) and value[0] <= value[1]
          and value[0] >= low and (not positive or value[0] > 0))
    if not ok:
        raise invalid_value(name, value, f"a pair [low, high] with {low if not positive else 0}"
                            f" {'<' if positive else '<='} low <= high")


def _nonneg(name: str, value: Any, high: float = math.inf) -> None:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0 <= value <= high:
        raise invalid_value(name, value, f"a number in [0, {high:g}]")


class HorizontalFlip(_Op):
    spatial_dims = (2,)

    def __init__(self, p: float = 0.5):
        self.p = p

    def apply(self, x):
        return x.flip(-1)


class VerticalFlip(HorizontalFlip):
    def apply(self, x):
        return x.flip(-2)


def _warp(x: torch.Tensor, angle=None, scale=None, tx=None, ty=None) -> torch.Tensor:
    """One batched affine warp about the image centre (bilinear, zeros fill the border).

    ``angle`` in degrees, ``scale`` a zoom factor, ``tx``/``ty`` fractions of the width/height.
    Built directly as a sampling grid (``affine_grid`` + ``grid_sample``): the same maths as
    kornia's ``warp_affine``, without its per-call matrix normalisation, which costs 8x more on
    small batches (benchmarks/bench_augment.py).
    """
    n, _, h, w = x.shape
    ones = torch.ones(n, device=x.device, dtype=x.dtype)
    a = torch.deg2rad(angle) if angle is not None else torch.zeros_like(ones)
    s = scale if scale is not None else ones
    cos, sin = torch.cos(a) / s, torch.sin(a) / s
    # output pixel p_out = s R(a) (p_in - c) + c + t  =>  p_in - c = R(-a)/s (p_out - c - t);
    # in align_corners coordinates u = (p - c) / half, with half = ((w-1)/2, (h-1)/2)
    hx, hy = max((w - 1) / 2, 0.5), max((h - 1) / 2, 0.5)
    t_x = (tx * w if tx is not None else 0 * ones)
    t_y = (ty * h if ty is not None else 0 * ones)
    theta = torch.stack([
        torch.stack([cos, sin * hy / hx, -(cos * t_x + sin * t_y) / hx], 1),
        torch.stack([-sin * hx / hy, cos, -(-sin * t_x + cos * t_y) / hy], 1),
    ], 1)
    grid = torch.nn.functional.affine_grid(theta, list(x.shape), align_corners=True)
    return torch.nn.functional.grid_sample(x, grid, mode="bilinear", padding_mode="zeros",
                                           align_corners=True)


class _AffineOp(_Op):
    """A geometric op on images; consecutive ones are fused into a single warp."""

    spatial_dims = (2,)

    def draw(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        """Per-sample parameters (identity for the samples the op skips, chosen with ``p``)."""
        params = self._draw(x)
        if self.p < 1:
            keep = torch.rand(x.shape[0], device=x.device) < self.p
            neutral = {"angle": 0.0, "scale": 1.0, "tx": 0.0, "ty": 0.0}
            params = {k: torch.where(keep, v, torch.full_like(v, neutral[k]))
                      for k, v in params.items()}
        return params

    def __call__(self, x):
        if x.dim() != 4:
            return super().__call__(x)
        return _warp(x, **self.draw(x)) if self.p > 0 else x


def _fused_warp(ops: List["_AffineOp"], x: torch.Tensor) -> torch.Tensor:
    """Apply consecutive affine ops with one warp: angles and shifts add, scales multiply."""
    total: Dict[str, torch.Tensor] = {}
    for op in ops:
        if op.p <= 0:
            continue
        for key, value in op.draw(x).items():
            if key not in total:
                total[key] = value
            else:
                total[key] = total[key] * value if key == "scale" else total[key] + value
    return _warp(x, **total) if total else x


class Shift(_AffineOp):
    spatial_dims = (1, 2)

    def __init__(self, max_fraction: float = 0.1, p: float = 0.5):
        self.max_fraction, self.p = max_fraction, p

    def _check_ranges(self, name):
        _nonneg(f"augment__{name}__max_fraction", self.max_fraction, 1.0)

    def _draw(self, x):
        f, n = self.max_fraction, x.shape[0]
        return {"tx": _uniform(n, -f, f, x), "ty": _uniform(n, -f, f, x)}

    def apply(self, x):
        f = self.max_fraction
        n, _, length = x.shape
        shift = torch.round(_uniform(n, -f, f, x) * length).long()
        src = torch.arange(length, device=x.device)[None] - shift[:, None]
        valid = ((src >= 0) & (src < length)).unsqueeze(1)
        gathered = x.gather(2, src.clamp(0, length - 1).unsqueeze(1).expand_as(x))
        return gathered * valid


class Roll(_Op):
    spatial_dims = (1,)

    def __init__(self, max_fraction: float = 0.1, p: float = 0.5):
        self.max_fraction, self.p = max_fraction, p

    def _check_ranges(self, name):
        _nonneg(f"augment__{name}__max_fraction", self.max_fraction, 1.0)

    def apply(self, x):
        n, _, length = x.shape
        shift = torch.round(_uniform(n, -self.max_fraction, self.max_fraction, x) * length).long()
        src = (torch.arange(length, device=x.device)[None] - shift[:, None]) % length
        return x.gather(2, src.unsqueeze(1).expand_as(x))


class RandomCrop(_Op):
    spatial_dims = (2,)

    def __init__(self, padding: int = 2, p: float = 1.0):
        self.padding, self.p = padding, p

    def _check_ranges(self, name):
        if not isinstance(self.padding, int) or self.padding < 0:
            raise invalid_value(f"augment__{name}__padding", self.padding, "an int >= 0")

    def apply(self, x):
        n, c, h, w = x.shape
        pad = self.padding
        padded = torch.nn.functional.pad(x, (pad, pad, pad, pad))
        oy = torch.randint(0, 2 * pad + 1, (n,), device=x.device)
        ox = torch.randint(0, 2 * pad + 1, (n,), device=x.device)
        rows = (oy[:, None] + torch.arange(h, device=x.device))[:, None, :, None]
        cols = (ox[:, None] + torch.arange(w, device=x.device))[:, None, None, :]
        idx = torch.arange(n, device=x.device)[:, None, None, None]
        ch = torch.arange(c, device=x.device)[None, :, None, None]
        return padded[idx, ch, rows, cols]


class Rotation(_AffineOp):
    def __init__(self, degrees: float = 15.0, p: float = 0.5):
        self.degrees, self.p = degrees, p

    def _check_ranges(self, name):
        _nonneg(f"augment__{name}__degrees", self.degrees, 180)

    def _draw(self, x):
        return {"angle": _uniform(x.shape[0], -self.degrees, self.degrees, x)}


class Scale(_AffineOp):
    def __init__(self, range: Sequence[float] = (0.9, 1.1), p: float = 0.5):  # noqa: A002
        self.range, self.p = range, p

    def _check_ranges(self, name):
        _range(f"augment__{name}__range", self.range, positive=True)

    def _draw(self, x):
        return {"scale": _uniform(x.shape[0], *self.range, x)}


class Amplitude(_Op):
    def __init__(self, range: Sequence[float] = (0.9, 1.1), p: float = 0.5):  # noqa: A002
        self.range, self.p = range, p

    def _check_ranges(self, name):
        _range(f"augment__{name}__range", self.range, positive=True)

    def apply(self, x):
        return x * _uniform(x.shape[0], *self.range, x).view(-1, *([1] * (x.dim() - 1)))


class ColorJitter(_Op):
    spatial_dims = (2,)

    def __init__(self, brightness: float = 0.0, contrast: float = 0.0, saturation: float = 0.0,
                 hue: float = 0.0, p: float = 1.0):
        self.brightness, self.contrast, self.saturation, self.hue, self.p = (
            brightness, contrast, saturation, hue, p)

    def required_channels(self):
        return 3 if (self.saturation or self.hue) else None

    def _check_ranges(self, name):
        for key in ("brightness", "contrast", "saturation"):
            _nonneg(f"augment__{name}__{key}", getattr(self, key), 1.0)
        _nonneg(f"augment__{name}__hue", self.hue, 0.5)

    def apply(self, x):
        from kornia import enhance

        n = x.shape[0]
        if self.brightness:
            x = enhance.adjust_brightness(x, _uniform(n, -self.brightness, self.brightness, x),
                                          clip_output=False)
        if self.contrast:
            x = enhance.adjust_contrast(x, _uniform(n, 1 - self.contrast, 1 + self.contrast, x),
                                        clip_output=False)
        if self.saturation:
            x = enhance.adjust_saturation(x, _uniform(n, 1 - self.saturation,
                                                      1 + self.saturation, x))
        if self.hue:
            x = enhance.adjust_hue(x, _uniform(n, -self.hue, self.hue, x) * 2 * math.pi)
        return x


class HSVJitter(_Op):
    """Krizhevsky et al. (2012) colour augmentation in HSV space (RGB images in [0, 1]).

    S and V become ``x ** a * m + b`` with ``a`` log-uniform in ``power``, ``m`` uniform in
    ``scale`` and ``b`` uniform in ``offset``; H is shifted by a fraction of the circle in
    ``hue_shift``.
    """

    spatial_dims, channels = (2,), 3

    def __init__(self, power=(0.25, 4.0), scale=(0.7, 1.4), offset=(-0.1, 0.1),
                 hue_shift=(-0.1, 0.1), p: float = 1.0):
        self.power, self.scale, self.offset, self.hue_shift, self.p = (
            power, scale, offset, hue_shift, p)

    def _check_ranges(self, name):
        _range(f"augment__{name}__power", self.power, positive=True)
        _range(f"augment__{name}__scale", self.scale, positive=True)
        _range(f"augment__{name}__offset", self.offset)
        _range(f"augment__{name}__hue_shift", self.hue_shift)

    def apply(self, x):
        from kornia.color import hsv_to_rgb, rgb_to_hsv

        n = x.shape[0]
        hsv = rgb_to_hsv(x.clamp(0, 1))
        h, sv = hsv[:, :1], hsv[:, 1:]

        def draw(bounds, log=False):
            lo, hi = (math.log(bounds[0]), math.log(bounds[1])) if log else bounds
            v = _uniform(2 * n, lo, hi, x).view(n, 2, 1, 1)
            return v.exp() if log else v

        sv = (sv.clamp_min(0) ** draw(self.power, log=True) * draw(self.scale)
              + draw(self.offset)).clamp(0, 1)
        shift = _uniform(n, *self.hue_shift, x).view(n, 1, 1, 1) * 2 * math.pi
        h = torch.remainder(h + shift, 2 * math.pi)
        return hsv_to_rgb(torch.cat([h, sv], 1))


class GaussianNoise(_Op):
    def __init__(self, std: float = 0.05, p: float = 1.0):
        self.std, self.p = std, p

    def _check_ranges(self, name):
        _nonneg(f"augment__{name}__std", self.std)

    def apply(self, x):
        return x + torch.randn_like(x) * self.std


class Cutout(_Op):
    spatial_dims = (2,)

    def __init__(self, size: float = 0.25, p: float = 0.5):
        self.size, self.p = size, p

    def _check_ranges(self, name):
        _nonneg(f"augment__{name}__size", self.size, 1.0)

    def apply(self, x):
        n, _, h, w = x.shape
        half_h, half_w = self.size * h / 2, self.size * w / 2
        cy = torch.rand(n, 1, 1, device=x.device) * h
        cx = torch.rand(n, 1, 1, device=x.device) * w
        rows = torch.arange(h, device=x.device).view(1, h, 1) + 0.5
        cols = torch.arange(w, device=x.device).view(1, 1, w) + 0.5
        hole = ((rows - cy).abs() < half_h) & ((cols - cx).abs() < half_w)
        return x * (~hole).unsqueeze(1)


OPS = Registry("augment op", "an augmentation op instance")
for _name, _cls in {
    "hflip": HorizontalFlip, "vflip": VerticalFlip, "shift": Shift, "crop": RandomCrop,
    "rotation": Rotation, "scale": Scale, "color_jitter": ColorJitter, "hsv": HSVJitter,
    "noise": GaussianNoise, "cutout": Cutout, "roll": Roll, "amplitude": Amplitude,
}.items():
    OPS.register(_name, _cls)


class Augmenter(_BaseComposition):
    """A sequence of named augmentation ops, applied in order to each training batch.

    Parameters
    ----------
    ops : list of (name, op)
        Like ``Pipeline.steps``; each op's parameters are reachable as ``<name>__<param>``.

    Examples
    --------
    >>> aug = Augmenter.from_config({"hflip": {"p": 1.0}, "noise": {"std": 0.0}})
    >>> aug.get_params()["hflip__p"]
    1.0
    >>> x = torch.arange(4.0).view(1, 1, 2, 2)
    >>> aug.check_shape((1, 2, 2))
    >>> aug(x).flatten().tolist()
    [1.0, 0.0, 3.0, 2.0]
    """

    def __init__(self, ops: Optional[List[Tuple[str, Any]]] = None):
        self.ops = ops

    @classmethod
    def from_config(cls, config: Dict[str, Optional[Dict[str, Any]]]) -> "Augmenter":
        """Build from ``{name: {param: value}}`` (the ``augment`` section of params.yaml).

        The name is the op's registry name, or any name with ``{"op": "<registry name>"}``
        among its params (to use an op twice).
        """
        if not isinstance(config, dict):
            raise invalid_value("augment", config, "a mapping {op name: {param: value}}")
        ops = []
        for name, params in config.items():
            params = dict(params or {})
            op_cls = OPS.get(params.pop("op", name))
            try:
                ops.append((name, op_cls(**params)))
            except TypeError:
                import inspect

                allowed = sorted(set(inspect.signature(op_cls.__init__).parameters) - {"self"})
                raise ValueError(f"augment op {name!r} takes {allowed}, got {sorted(params)}."
                                 ) from None
        return cls(ops)

    def to_config(self) -> Dict[str, Dict[str, Any]]:
        """The inverse of :meth:`from_config` (JSON-able)."""
        kinds = {OPS.get(n): n for n in OPS.names()}
        config = {}
        for name, op in self.ops or []:
            params = op.get_params(deep=False)
            params = {k: list(v) if isinstance(v, tuple) else v for k, v in params.items()}
            config[name] = {**({"op": kinds[type(op)]} if kinds[type(op)] != name else {}),
                            **params}
        return config

    def get_params(self, deep: bool = True):
        return self._get_params("ops", deep=deep)

    def set_params(self, **params):
        self._set_params("ops", **params)
        return self

    def check_shape(self, shape: Optional[Tuple[int, ...]]) -> None:
        """Check every op against the sample shape ``(C, L)`` / ``(C, H, W)``; raise if unfit."""
        for name, op in self.ops or []:
            if not isinstance(op, _Op):
                raise invalid_value(f"augment op {name!r}", op, "an nnpipe.augment op instance")
            if shape is None:
                raise ValueError(f"augment op {name!r} needs input_shape=(C, L) or (C, H, W) to "
                                 "see the flat feature rows as sequences or images, got None.")
            op.check(name, tuple(shape))

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        pending: List[_AffineOp] = []
        for _, op in self.ops or []:
            if isinstance(op, _AffineOp) and x.dim() == 4:
                pending.append(op)
                continue
            if pending:
                x, pending = _fused_warp(pending, x), []
            x = op(x)
        return _fused_warp(pending, x) if pending else x


# --------------------------------------------------------------------------- test-time views

TTA_VIEWS = {"identity": lambda x: x, "hflip": lambda x: x.flip(-1), "vflip": lambda x: x.flip(-2)}


def tta_views(views: Sequence[str], shape: Tuple[int, ...]):
    """Resolve deterministic test-time views by name; flips need images."""
    resolved = []
    if not isinstance(views, (list, tuple)):
        raise invalid_value("tta", views, f"a list of {sorted(TTA_VIEWS)}")
    for view in views:
        if not isinstance(view, str) or view not in TTA_VIEWS:
            raise invalid_value("tta", view, f"a list of {sorted(TTA_VIEWS)}")
        if view != "identity" and (shape is None or len(shape) != 3):
            raise ValueError(f"tta view {view!r} flips images and needs input_shape=(C, H, W), "
                             f"got {shape}.")
        resolved.append(TTA_VIEWS[view])
    return resolved


# --------------------------------------------------------------------------- preview


def preview(augmenter: Augmenter, X, input_shape, path, n_samples: int = 8, n_views: int = 5,
            random_state: int = 0):
    """Write a PNG grid: each row one sample, the original first, then augmented versions.

    Returns the path. Works for images ``(C, H, W)`` (RGB or grey) and sequences ``(C, L)``.
    """
    import numpy as np
    from matplotlib.figure import Figure  # not pyplot: no global backend switch, no open figure

    shape = tuple(input_shape)
    augmenter.check_shape(shape)
    X = torch.as_tensor(np.asarray(X[:n_samples], dtype=np.float32)).view(-1, *shape)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(random_state)
        views = [X] + [augmenter(X.clone()) for _ in range(n_views)]
    fig = Figure(figsize=(1.6 * len(views), 1.6 * len(X)))
    axes = fig.subplots(len(X), len(views), squeeze=False)
    for i in range(len(X)):
        for j, batch in enumerate(views):
            ax = axes[i, j]
            sample = batch[i].numpy()
            if len(shape) == 3:
                img = sample[0] if shape[0] == 1 else np.clip(sample.transpose(1, 2, 0), 0, 1)
                ax.imshow(img, cmap="gray" if shape[0] == 1 else None)
            else:
                for channel in sample:
                    ax.plot(channel, lw=0.8)
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_title("original" if j == 0 else f"augmented {j}", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return path

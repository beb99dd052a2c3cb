"""Augmentation: what each op does, that it touches training batches only, and its errors."""

import numpy as np
import pytest
import torch
from sklearn.base import clone
from sklearn.model_selection import KFold, cross_validate
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from nnpipe import NNClassifier
from nnpipe.augment import (Augmenter, Cutout, GaussianNoise, HorizontalFlip, HSVJitter, OPS,
                            RandomCrop, Roll, Rotation, Shift, VerticalFlip, _Op, preview)


def _imgs(n=64, c=1, h=8, w=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, c, h, w, generator=g)


def _apply(aug_config, x, shape, seed=0):
    aug = Augmenter.from_config(aug_config)
    aug.check_shape(shape)
    torch.manual_seed(seed)
    return aug(x.clone())


def test_flips_are_exact():
    x = _imgs()
    assert torch.equal(HorizontalFlip(p=1.0)(x), x.flip(-1))
    assert torch.equal(VerticalFlip(p=1.0)(x), x.flip(-2))


def test_probability_is_the_fraction_of_samples_changed():
    torch.manual_seed(0)
    x = _imgs(n=4000)
    out = HorizontalFlip(p=0.3)(x)
    changed = (out != x).flatten(1).any(1).float().mean().item()
    assert changed == pytest.approx(0.3, abs=0.03)
    assert torch.equal(HorizontalFlip(p=0.0)(x), x)


def test_crop_with_padding_is_an_integer_shift_with_zero_fill():
    torch.manual_seed(0)
    x = torch.arange(1, 65, dtype=torch.float32).view(1, 1, 8, 8).repeat(50, 1, 1, 1)
    out = RandomCrop(padding=2, p=1.0)(x)
    for img in out[:, 0]:
        nz = torch.nonzero(img)
        r0, c0 = nz.min(0).values.tolist()
        r1, c1 = nz.max(0).values.tolist()
        window = img[r0:r1 + 1, c0:c1 + 1]
        # the visible part is a contiguous block of the original image, shifted by <= 2 pixels
        first = int(window[0, 0].item()) - 1
        orig = x[0, 0].flatten()
        rr, cc = divmod(first, 8)
        assert torch.equal(window, x[0, 0, rr:rr + window.shape[0], cc:cc + window.shape[1]])
        assert abs(rr - r0) <= 2 and abs(cc - c0) <= 2
        assert orig.numel() == 64


def test_geometric_ops_with_zero_range_are_the_identity():
    x = _imgs()
    for cfg in ({"rotation": {"degrees": 0, "p": 1}}, {"shift": {"max_fraction": 0, "p": 1}},
                {"scale": {"range": [1, 1], "p": 1}}):
        torch.testing.assert_close(_apply(cfg, x, (1, 8, 8)), x, atol=1e-5, rtol=0)


def test_rotation_by_90_degrees_matches_rot90():
    x = _imgs(n=200)
    torch.manual_seed(0)
    op = Rotation(degrees=90, p=1.0)
    params = op.draw(x)
    params["angle"] = torch.full_like(params["angle"], 90.0)
    from nnpipe.augment import _warp

    out = _warp(x, **params)
    expected = torch.rot90(x, k=1, dims=(-2, -1))  # counter-clockwise
    close = [(torch.allclose(o, e, atol=1e-4)) for o, e in zip(out, expected)]
    close_cw = [(torch.allclose(o, e, atol=1e-4))
                for o, e in zip(out, torch.rot90(x, k=-1, dims=(-2, -1)))]
    assert all(close) or all(close_cw)


def test_affine_ops_are_fused_into_one_warp(monkeypatch):
    import nnpipe.augment as augment

    calls = []
    real = augment._warp
    monkeypatch.setattr(augment, "_warp", lambda x, **kw: calls.append(kw) or real(x, **kw))
    out = _apply({"shift": {"p": 1}, "rotation": {"p": 1}, "scale": {"p": 1}}, _imgs(),
                 (1, 8, 8))
    assert len(calls) == 1 and set(calls[0]) == {"tx", "ty", "angle", "scale"}
    assert out.shape == (64, 1, 8, 8)


def test_sequence_shift_zero_fills_and_roll_is_circular():
    x = torch.arange(1.0, 17.0).view(1, 1, 16).repeat(200, 2, 1)
    torch.manual_seed(0)
    shifted = Shift(max_fraction=0.25, p=1.0)(x)
    rolled = Roll(max_fraction=0.25, p=1.0)(x)
    for s, r in zip(shifted, rolled):
        assert torch.equal(torch.sort(r[0]).values, x[0, 0])  # a permutation
        assert torch.equal(s[0], s[1])  # all channels move together
        nonzero = s[0][s[0] != 0]
        assert torch.equal(nonzero, torch.arange(nonzero[0].item(), nonzero[0].item() + len(nonzero)))
        assert len(nonzero) >= 12  # at most 25% of 16 shifted out


def test_noise_has_the_requested_std_and_cutout_the_requested_area():
    torch.manual_seed(0)
    x = torch.zeros(2000, 1, 16, 16)
    assert GaussianNoise(std=0.3)(x).std().item() == pytest.approx(0.3, rel=0.02)
    ones = torch.ones(2000, 1, 16, 16)
    holes = 1 - Cutout(size=0.5, p=1.0)(ones).mean().item()
    assert holes < 0.25 and holes > 0.12  # up to a quarter of the area, less at the borders


def test_hsv_jitter_identity_ranges_and_effect_on_saturation():
    torch.manual_seed(0)
    x = _imgs(n=256, c=3)
    same = HSVJitter(power=(1, 1), scale=(1, 1), offset=(0, 0), hue_shift=(0, 0))(x)
    torch.testing.assert_close(same, x, atol=1e-4, rtol=0)
    from kornia.color import rgb_to_hsv

    dimmed = HSVJitter(power=(1, 1), scale=(0.7, 0.7), offset=(0, 0), hue_shift=(0, 0))(x)
    ratio = rgb_to_hsv(dimmed)[:, 1:].mean() / rgb_to_hsv(x)[:, 1:].mean()
    assert ratio.item() == pytest.approx(0.7, abs=0.01)
    wild = HSVJitter()(x)
    assert wild.min() >= 0 and wild.max() <= 1 and not torch.allclose(wild, x)


def test_color_jitter_brightness_shifts_the_mean():
    torch.manual_seed(0)
    x = _imgs(n=2000, c=3) * 0.5 + 0.25
    out = _apply({"color_jitter": {"brightness": 0.2}}, x, (3, 8, 8))
    shift = (out - x).mean(dim=(1, 2, 3))
    assert shift.abs().max() <= 0.2 + 1e-6 and shift.std() > 0.1


def test_augmentation_is_seeded_by_random_state(digits):
    Xtr, Xte, ytr, _ = digits
    kw = dict(module="cnn2d", input_shape=(1, 8, 8), module__channels=[8], max_epochs=2,
              augment={"rotation": {"degrees": 20}, "noise": {"std": 0.1}}, random_state=0)
    a = NNClassifier(**kw).fit(Xtr, ytr).predict_proba(Xte)
    b = NNClassifier(**kw).fit(Xtr, ytr).predict_proba(Xte)
    np.testing.assert_array_equal(a, b)


class Spy(_Op):
    """Records how many rows it sees; the identity otherwise."""

    seen = []

    def __init__(self, p=1.0):
        self.p = p

    def apply(self, x):
        Spy.seen.append(x.shape[0])
        return x


def test_only_training_batches_are_augmented(blobs):
    X, y = blobs
    Spy.seen = []
    clf = NNClassifier(max_epochs=3, batch_size=50, input_shape=(2, 4), train_split=0.2,
                       augment=Augmenter([("spy", Spy())]), random_state=0).fit(X, y)
    assert sum(Spy.seen) == 3 * 240  # 80% of 300 rows, every epoch; never the 60 valid rows
    before = len(Spy.seen)
    clf.predict_proba(X)
    clf.score(X, y)
    assert len(Spy.seen) == before


class RecordingScaler(StandardScaler):
    fits = []

    def fit(self, X, y=None, sample_weight=None):
        RecordingScaler.fits.append(np.asarray(X).mean(0))
        return super().fit(X, y, sample_weight)


def test_no_leakage_across_cv_folds(blobs):
    X, y = blobs
    RecordingScaler.fits, Spy.seen = [], []
    pipe = make_pipeline(RecordingScaler(), NNClassifier(
        max_epochs=2, batch_size=1000, train_split=None, input_shape=(2, 4),
        augment=Augmenter([("spy", Spy())]), random_state=0))
    folds = list(KFold(3, shuffle=True, random_state=0).split(X))
    cross_validate(pipe, X, y, cv=folds)
    assert len(RecordingScaler.fits) == 3
    for mean, (train, _) in zip(RecordingScaler.fits, folds):
        np.testing.assert_allclose(mean, X[train].mean(0), rtol=1e-6)  # the training fold only
        assert not np.allclose(mean, X.mean(0))
    assert Spy.seen == [200] * 6  # 2 epochs x 3 folds, each on the 200 training rows only


def test_augment_params_are_reachable_through_get_and_set_params():
    clf = NNClassifier(augment=Augmenter.from_config({"hflip": {"p": 0.5}, "rotation": {}}))
    params = clf.get_params()
    assert params["augment__hflip__p"] == 0.5 and params["augment__rotation__degrees"] == 15.0
    clf.set_params(augment__rotation__degrees=5, augment__hflip__p=0.1)
    assert clf.augment.get_params()["rotation__degrees"] == 5
    twin = clone(clf)
    assert twin.get_params()["augment__hflip__p"] == 0.1
    assert twin.augment is not clf.augment


def test_test_time_augmentation_averages_the_views(digits):
    Xtr, Xte, ytr, _ = digits
    clf = NNClassifier("cnn2d", input_shape=(1, 8, 8), module__channels=[8], max_epochs=2,
                       random_state=0).fit(Xtr, ytr)
    plain = clf.predict_proba(Xte)
    flipped = clf.predict_proba(Xte.reshape(-1, 1, 8, 8)[..., ::-1].reshape(len(Xte), -1).copy())
    clf.set_params(tta=["identity", "hflip"])
    np.testing.assert_allclose(clf.predict_proba(Xte), (plain + flipped) / 2, atol=1e-6)


@pytest.mark.parametrize("kwargs, match", [
    (dict(module="cnn1d", augment={"hflip": {}}), r"'hflip' works on images .*input_shape=\(1, 8\)"),
    (dict(augment={"rotation": {}}), r"'rotation' needs input_shape"),
    (dict(input_shape=(2, 2, 2), augment={"hflip": {"p": 1.5}}),
     r"augment__hflip__p must be a probability in \[0, 1\], got 1.5"),
    (dict(input_shape=(2, 2, 2), augment={"hfilp": {}}), r"Did you mean 'hflip'"),
    (dict(input_shape=(2, 2, 2), augment={"hsv": {}}), r"'hsv' needs 3-channel"),
    (dict(input_shape=(2, 2, 2), augment={"rotation": {"angle": 3}}), r"'rotation' takes"),
    (dict(input_shape=(2, 2, 2), augment={"scale": {"range": [2, 1]}}), r"augment__scale__range"),
    (dict(input_shape=(2, 2, 2), augment="flip"), r"augment must be"),
    (dict(input_shape=(2, 4), tta=["hflip"]), r"tta view 'hflip' flips images"),
])
def test_augmentations_that_do_not_fit_the_data_fail_at_fit(blobs, kwargs, match):
    X, y = blobs
    with pytest.raises(ValueError, match=match):
        NNClassifier(max_epochs=1, **kwargs).fit(X, y)


def test_every_registered_op_runs_on_its_kind_of_data():
    for name in OPS.names():
        op = OPS.get(name)()
        shape = (3, 8, 8) if 2 in op.spatial_dims else (2, 16)
        aug = Augmenter([(name, op)])
        aug.check_shape(shape)
        out = aug(torch.rand(4, *shape))
        assert out.shape == (4, *shape) and torch.isfinite(out).all(), name


def test_preview_writes_a_png_grid(tmp_path, digits):
    Xtr = digits[0]
    path = preview(Augmenter.from_config({"rotation": {"degrees": 30, "p": 1}}), Xtr, (1, 8, 8),
                   tmp_path / "preview.png", n_samples=4, n_views=3)
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    import matplotlib.image as mpimg

    img = mpimg.imread(path)
    assert img.shape[0] > 300 and img.shape[1] > 300


def test_preview_leaves_matplotlib_backend_and_pyplot_alone(tmp_path, digits):
    import matplotlib
    import matplotlib.pyplot as plt

    before = matplotlib.get_backend()
    matplotlib.use("svg")
    try:
        preview(Augmenter.from_config({"noise": {}}), digits[0], (1, 8, 8),
                tmp_path / "p.png", n_samples=2, n_views=1)
        assert matplotlib.get_backend() == "svg" and plt.get_fignums() == []
    finally:
        matplotlib.use(before)


def test_fused_warp_matches_kornia_warp_affine():
    """Our grid_sample warp is kornia's affine warp (the reference), on a non-square image."""
    from kornia.geometry.transform import get_affine_matrix2d, warp_affine

    from nnpipe.augment import _warp

    g = torch.Generator().manual_seed(0)
    n, h, w = 16, 9, 7
    x = torch.rand(n, 2, h, w, generator=g)
    ang = torch.rand(n, generator=g) * 40 - 20
    sc = torch.rand(n, generator=g) * 0.4 + 0.8
    tx, ty = (torch.rand(n, generator=g) * 0.2 - 0.1 for _ in range(2))
    center = torch.tensor([(w - 1) / 2, (h - 1) / 2]).expand(n, 2)
    m = get_affine_matrix2d(torch.stack([tx * w, ty * h], 1), center, torch.stack([sc, sc], 1), ang)
    expected = warp_affine(x, m[:, :2], (h, w), align_corners=True)
    torch.testing.assert_close(_warp(x, angle=ang, scale=sc, tx=tx, ty=ty), expected,
                               atol=1e-5, rtol=0)

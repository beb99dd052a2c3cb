"""Tests for nnpipe.data: every source on small data made in tmp_path, the split, the
save/read round trip, the refusal to unpickle, and each error message."""

import json

import numpy as np
import pytest
from PIL import Image
from sklearn.datasets import load_digits

from nnpipe.data import SOURCES, Dataset, load_dataset, read_dataset, save_dataset


class _Payload:
    """Unpickling this would create ``marker``: proof that pickled code ran."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _png(path, size_hw, color, mode="RGB"):
    path.parent.mkdir(parents=True, exist_ok=True)
    h, w = size_hw
    Image.new(mode, (w, h), color).save(path)


@pytest.fixture
def image_folder(tmp_path):
    """2 classes x 6 images of 5x4 (height x width); 'cat' bright red, 'dog' dark, plus noise
    files that must be ignored."""
    root = tmp_path / "imgs"
    for i in range(6):
        _png(root / "cat" / f"c{i}.png", (5, 4), (255, 0, 0))
        _png(root / "dog" / f"d{i}.PNG", (5, 4), (0, 0, 51 * (i % 2)))
    (root / "cat" / "notes.txt").write_text("not an image")
    (root / "README.md").write_text("top-level files are ignored")
    return root


# --- digits ---------------------------------------------------------------------------------

def test_digits_default_split_shapes_scale_and_stratification():
    ds = load_dataset()
    assert isinstance(ds, Dataset) and ds.task == "classification"
    assert ds.X_train.shape == (1347, 64) and ds.X_test.shape == (450, 64)
    assert ds.X_train.dtype == np.float32 and ds.input_shape == (1, 8, 8)
    assert ds.X_train.min() == 0.0 and ds.X_train.max() == 1.0
    assert ds.classes == list(range(10)) and ds.feature_names is None
    X, y = load_digits(return_X_y=True)
    for part, n in ((ds.y_train, 1347), (ds.y_test, 450)):
        for c in range(10):
            expected = (y == c).mean() * n
            assert abs((part == c).sum() - expected) <= 1
    # scaling is exactly /16 and the split is reproducible with the same seed
    assert np.isin(ds.X_train * 16, np.arange(17)).all()
    again = load_dataset("digits", random_state=0)
    assert np.array_equal(again.X_test, ds.X_test) and np.array_equal(again.y_test, ds.y_test)
    assert not np.array_equal(load_dataset(random_state=1).y_test, ds.y_test)


def test_digits_unstratified_and_test_size():
    ds = load_dataset("DIGITS", test_size=0.1, stratify=False)
    assert ds.X_test.shape == (180, 64) and ds.X_train.shape == (1617, 64)


def test_none_means_default_as_from_an_unset_config_value():
    ds = load_dataset(None, test_size=None, task=None, stratify=None, image_size=None,
                      grayscale=None, path=None, target=None)
    ref = load_dataset()
    assert ds.X_train.shape == (1347, 64) and np.array_equal(ds.y_test, ref.y_test)


def test_sources_registry_names():
    assert SOURCES.names() == ["csv", "digits", "images", "npz"]


# --- npz ------------------------------------------------------------------------------------

def test_npz_split_flattens_nd_input(tmp_path):
    rng = np.random.RandomState(0)
    X = rng.rand(40, 2, 3, 4)
    y = np.repeat([0, 1], 20)
    np.savez(tmp_path / "d.npz", X=X, y=y)
    ds = load_dataset("npz", path=tmp_path / "d.npz", test_size=0.25)
    assert ds.input_shape == (2, 3, 4) and ds.X_train.shape == (30, 24)
    assert ds.X_test.shape == (10, 24) and ds.task == "classification"
    assert (ds.y_test == 0).sum() == 5  # stratified
    # every row is an original sample flattened in C, H, W order
    flat = X.reshape(40, -1).astype(np.float32)
    idx = [int(np.flatnonzero((flat == row).all(axis=1))[0]) for row in ds.X_train]
    assert len(set(idx)) == 30 and np.array_equal(y[idx], ds.y_train)


def test_npz_with_own_test_set_and_regression(tmp_path):
    X, Xt = np.arange(20.0).reshape(10, 2), np.arange(6.0).reshape(3, 2)
    y, yt = np.linspace(0, 1, 10), np.array([0.5, 0.25, 0.125])
    np.savez(tmp_path / "r.npz", X=X, y=y, X_test=Xt, y_test=yt)
    ds = load_dataset("npz", path=str(tmp_path / "r.npz"))
    assert ds.task == "regression" and ds.classes is None and ds.input_shape is None
    assert np.array_equal(ds.X_train, X.astype(np.float32)) and np.array_equal(ds.y_test, yt)
    assert np.array_equal(ds.y_train, y)  # no split, order kept


def test_task_inference_and_override(tmp_path):
    X = np.random.RandomState(0).rand(120, 3)
    np.savez(tmp_path / "many.npz", X=X, y=np.arange(120))  # 120 distinct ints -> regression
    assert load_dataset("npz", path=tmp_path / "many.npz").task == "regression"
    np.savez(tmp_path / "few.npz", X=X, y=np.arange(120) % 3)
    assert load_dataset("npz", path=tmp_path / "few.npz").task == "classification"
    np.savez(tmp_path / "flt.npz", X=X, y=(np.arange(120) % 2).astype(float))
    ds = load_dataset("npz", path=tmp_path / "flt.npz", task="classification")
    assert ds.classes == [0, 1] and ds.y_train.dtype == np.int64
    reg = load_dataset("npz", path=tmp_path / "few.npz", task="regression")
    assert reg.y_train.dtype == np.float64 and reg.classes is None


def test_npz_object_array_refused_and_never_unpickled(tmp_path):
    marker = tmp_path / "PWNED"
    payload = np.empty(1, dtype=object)
    payload[0] = _Payload(marker)
    np.savez(tmp_path / "evil.npz", X=np.zeros((1, 2)), y=payload)
    with pytest.raises(ValueError, match=r"'y' .*object array.*unpickle"):
        load_dataset("npz", path=tmp_path / "evil.npz")
    assert not marker.exists()
    # control: the payload is live, so the check above means something
    control = tmp_path / "CONTROL"
    payload[0] = _Payload(control)
    np.savez(tmp_path / "control.npz", y=payload)
    with np.load(tmp_path / "control.npz", allow_pickle=True) as z:
        z["y"][0].close()  # the unpickled "element" is the file object open() returned
    assert control.exists() and not marker.exists()


def test_npz_errors(tmp_path):
    np.savez(tmp_path / "noy.npz", X=np.zeros((4, 2)), yy=np.zeros(4))
    with pytest.raises(ValueError, match=r"no array 'y'.*'yy'.*Did you mean 'yy'"):
        load_dataset("npz", path=tmp_path / "noy.npz")
    np.savez(tmp_path / "half.npz", X=np.zeros((4, 2)), y=[0, 1, 0, 1], X_test=np.zeros((2, 2)))
    with pytest.raises(ValueError, match="both X_test and y_test or neither"):
        load_dataset("npz", path=tmp_path / "half.npz")
    np.savez(tmp_path / "len.npz", X=np.zeros((4, 2)), y=[0, 1, 0])
    with pytest.raises(ValueError, match="same length, got 4 rows in X and 3 in y"):
        load_dataset("npz", path=tmp_path / "len.npz")
    X = np.ones((8, 2))
    X[[2, 5], 1] = np.nan
    np.savez(tmp_path / "nan.npz", X=X, y=[0, 1] * 4)
    with pytest.raises(ValueError, match=r"NaN or infinite values in 2 of 8 rows.*\[2, 5\]"):
        load_dataset("npz", path=tmp_path / "nan.npz")
    np.savez(tmp_path / "one.npz", X=np.ones((6, 2)), y=[7] * 6)
    with pytest.raises(ValueError, match="at least 2 classes.*every label.*is 7"):
        load_dataset("npz", path=tmp_path / "one.npz")
    np.savez(tmp_path / "empty.npz", X=np.zeros((0, 2)), y=np.zeros(0, dtype=int))
    with pytest.raises(ValueError, match="is empty: 0 samples"):
        load_dataset("npz", path=tmp_path / "empty.npz")
    np.savez(tmp_path / "rare.npz", X=np.ones((5, 2)), y=[0, 0, 0, 0, 1])
    with pytest.raises(ValueError, match="class 1 .* has 1; .*stratify=False"):
        load_dataset("npz", path=tmp_path / "rare.npz")
    np.savez(tmp_path / "shp.npz", X=np.zeros((4, 2, 3)), y=[0, 1] * 2,
             X_test=np.zeros((2, 3, 2)), y_test=[0, 1])
    with pytest.raises(ValueError, match=r"per-sample shape \(2, 3\) like X, got \(3, 2\)"):
        load_dataset("npz", path=tmp_path / "shp.npz")
    np.savez(tmp_path / "str.npz", X=np.zeros((4, 2)), y=np.array(["a", "b"] * 2))
    with pytest.raises(ValueError, match="task='regression' needs numeric y, got dtype <U1"):
        load_dataset("npz", path=tmp_path / "str.npz", task="regression")
    np.save(tmp_path / "single.npy", np.zeros(3))
    with pytest.raises(ValueError, match="single array"):
        load_dataset("npz", path=tmp_path / "single.npy")
    (tmp_path / "junk.npz").write_bytes(b"not a zip at all")
    with pytest.raises(ValueError, match="not a readable .npz"):
        load_dataset("npz", path=tmp_path / "junk.npz")


# --- csv ------------------------------------------------------------------------------------

def _write_csv(path, n=20):
    rows = ["height,width,species"] + [
        f"{1.0 + i},{2 * i},{'setosa' if i % 2 else 'virginica'}" for i in range(n)]
    path.write_text("\n".join(rows) + "\n")
    return path


def test_csv_string_labels_and_feature_names(tmp_path):
    ds = load_dataset("csv", path=_write_csv(tmp_path / "d.csv"), target="species")
    assert ds.task == "classification" and ds.classes == ["setosa", "virginica"]
    assert ds.feature_names == ["height", "width"] and ds.input_shape is None
    assert ds.X_train.shape == (15, 2) and ds.X_test.shape == (5, 2)
    assert ds.y_train.dtype.kind == "U"
    for row, label in zip(np.vstack([ds.X_train, ds.X_test]),
                          np.concatenate([ds.y_train, ds.y_test])):
        i = int(row[0]) - 1
        assert row[1] == 2 * i and label == ("setosa" if i % 2 else "virginica")


def test_csv_numeric_target_regression(tmp_path):
    (tmp_path / "r.csv").write_text("a,b,price\n" + "".join(
        f"{i},{i % 3},{i * 1.5}\n" for i in range(12)))
    ds = load_dataset("csv", path=tmp_path / "r.csv", target="price", test_size=0.5)
    assert ds.task == "regression" and ds.y_train.dtype == np.float64
    assert np.allclose(ds.y_train, ds.X_train[:, 0] * 1.5)


def test_csv_errors(tmp_path):
    path = _write_csv(tmp_path / "d.csv")
    with pytest.raises(ValueError, match=r"target 'specie' .*\['height', 'width', 'species'\]"
                                         r".*Did you mean 'species'"):
        load_dataset("csv", path=path, target="specie")
    with pytest.raises(ValueError, match="target is required for source='csv'"):
        load_dataset("csv", path=path)
    (tmp_path / "bad.csv").write_text("x,color,y\n1,red,0\n2,blue,1\n")
    with pytest.raises(ValueError, match="feature column 'color' .* not numeric .*'red'"):
        load_dataset("csv", path=tmp_path / "bad.csv", target="y")
    (tmp_path / "hdr.csv").write_text("x,y\n")
    with pytest.raises(ValueError, match="empty: 0 samples"):
        load_dataset("csv", path=tmp_path / "hdr.csv", target="y")
    (tmp_path / "gap.csv").write_text("x,y\n1,a\n2,\n3,b\n")
    with pytest.raises(ValueError, match="target column 'y' .* missing in 1 rows"):
        load_dataset("csv", path=tmp_path / "gap.csv", target="y")


# --- images ---------------------------------------------------------------------------------

def test_images_rgb(image_folder):
    ds = load_dataset("images", path=image_folder, test_size=1 / 3)
    assert ds.input_shape == (3, 5, 4) and ds.classes == ["cat", "dog"]
    assert ds.X_train.shape == (8, 60) and ds.X_test.shape == (4, 60)
    assert ds.X_train.dtype == np.float32
    assert sorted(ds.y_test.tolist()) == ["cat", "cat", "dog", "dog"]
    for X, y in ((ds.X_train, ds.y_train), (ds.X_test, ds.y_test)):
        assert X.min() >= 0 and X.max() <= 1
        chw = X.reshape(-1, 3, 5, 4)
        cats = chw[y == "cat"]
        assert np.all(cats[:, 0] == 1.0) and np.all(cats[:, 1:] == 0.0)  # red, channel first
        dogs = chw[y == "dog"]
        blue = set(np.unique(dogs[:, 2]).tolist())
        assert np.all(dogs[:, :2] == 0.0) and blue <= {0.0, float(np.float32(51 / 255))}


def test_images_grayscale_and_resize(image_folder):
    ds = load_dataset("images", path=image_folder, grayscale=True)
    assert ds.input_shape == (1, 5, 4) and ds.X_train.shape[1] == 20
    red_luma = round(255 * 299 / 1000) / 255  # ITU-R 601-2 luma of pure red
    cats = ds.X_train[ds.y_train == "cat"]
    assert np.allclose(cats, red_luma, atol=1 / 255)
    small = load_dataset("images", path=image_folder, image_size=(3, 2))
    assert small.input_shape == (3, 3, 2) and small.X_train.shape[1] == 18
    assert np.allclose(small.X_train[small.y_train == "cat"].reshape(-1, 3, 3, 2)[:, 0], 1.0)


def test_images_ragged_then_resized(image_folder):
    _png(image_folder / "dog" / "big.jpg", (7, 9), (0, 0, 0))
    with pytest.raises(ValueError,
                       match=r"same size.*c0\.png' is 5x4 and .*big\.jpg' is 7x9.*image_size"):
        load_dataset("images", path=image_folder)
    ds = load_dataset("images", path=image_folder, image_size=(6, 6), test_size=0.5)
    assert ds.input_shape == (3, 6, 6) and len(ds.X_train) + len(ds.X_test) == 13


def test_images_errors(image_folder, tmp_path):
    (image_folder / "bird").mkdir()
    (image_folder / "bird" / "song.wav").write_bytes(b"RIFF")
    with pytest.raises(ValueError, match="class folder .*bird' has no images"):
        load_dataset("images", path=image_folder)
    (tmp_path / "none").mkdir()
    with pytest.raises(ValueError, match="is empty"):
        load_dataset("images", path=tmp_path / "none")
    solo = tmp_path / "solo"
    for i in range(3):
        _png(solo / "only" / f"{i}.png", (2, 2), (9, 9, 9))
    with pytest.raises(ValueError, match="at least 2 classes.*'only'"):
        load_dataset("images", path=solo)
    with pytest.raises(ValueError, match=r"image_size must be None or a pair .* got 5"):
        load_dataset("images", path=solo, image_size=5)
    (solo / "only" / "broken.png").write_bytes(b"\x89PNG garbage")
    with pytest.raises(ValueError, match="cannot read image .*broken.png"):
        load_dataset("images", path=solo)


# --- common argument errors -----------------------------------------------------------------

def test_argument_errors(tmp_path):
    with pytest.raises(ValueError, match="source must be one of .*got 'digts'.*'digits'"):
        load_dataset("digts")
    for source in ("npz", "csv", "images"):
        with pytest.raises(ValueError, match=f"path is required for source='{source}'"):
            load_dataset(source)
    with pytest.raises(FileNotFoundError, match=r"nope\.npz' for source='npz' does not exist"):
        load_dataset("npz", path=tmp_path / "nope.npz")
    for bad in (0, 1, 1.5, -0.1, True, "0.2"):
        with pytest.raises(ValueError, match=r"test_size must be a fraction in \(0, 1\)"):
            load_dataset(test_size=bad)
    with pytest.raises(ValueError, match="task must be None, 'classification' or 'regression'"
                                         ".*got 'clasification'.*Did you mean"):
        load_dataset(task="clasification")
    with pytest.raises(ValueError, match="stratify=True needs task='classification'"):
        load_dataset(task="regression", stratify=True)
    with pytest.raises(ValueError, match="stratify must be None, True or False"):
        load_dataset(stratify="yes")
    with pytest.raises(ValueError, match="target='label' has no meaning for source='digits'"):
        load_dataset(target="label")


# --- save / read ----------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["digits", "csv"])
def test_save_read_round_trip_exact(tmp_path, kind):
    if kind == "digits":
        ds = load_dataset()
    else:
        ds = load_dataset("csv", path=_write_csv(tmp_path / "d.csv"), target="species")
    save_dataset(ds, tmp_path / "out" / "prepared")
    back = read_dataset(tmp_path / "out" / "prepared")
    for name in ("X_train", "y_train", "X_test", "y_test"):
        a, b = getattr(ds, name), getattr(back, name)
        assert a.dtype == b.dtype and np.array_equal(a, b)
    for name in ("task", "input_shape", "classes", "feature_names"):
        assert getattr(back, name) == getattr(ds, name)
    meta = json.loads((tmp_path / "out" / "prepared" / "meta.json").read_text())
    assert meta["n_train"] == len(ds.X_train) and meta["n_test"] == len(ds.X_test)
    assert set(meta) == {"task", "input_shape", "classes", "feature_names", "n_train", "n_test"}
    with np.load(tmp_path / "out" / "prepared" / "train.npz", allow_pickle=False) as z:
        assert sorted(z.files) == ["X", "y"]
    # byte-reproducible: saving the same dataset again writes identical files
    save_dataset(ds, tmp_path / "again")
    for name in ("train.npz", "test.npz", "meta.json"):
        assert (tmp_path / "again" / name).read_bytes() == \
               (tmp_path / "out" / "prepared" / name).read_bytes()


def test_save_read_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="train.npz' does not exist"):
        read_dataset(tmp_path)
    ds = Dataset(np.zeros((2, 1), np.float32), np.array([object(), 1], dtype=object),
                 np.zeros((1, 1), np.float32), np.array([0]), "classification")
    with pytest.raises(ValueError, match="ds.y_train is an object array"):
        save_dataset(ds, tmp_path / "x")
    good = Dataset(np.zeros((2, 1), np.float32), np.array([0, 1]),
                   np.zeros((1, 1), np.float32), np.array([0]), "classification", None, [0, 1])
    save_dataset(good, tmp_path / "g")
    meta = json.loads((tmp_path / "g" / "meta.json").read_text())
    meta["n_train"] = 5
    (tmp_path / "g" / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="n_train=5; out of sync"):
        read_dataset(tmp_path / "g")

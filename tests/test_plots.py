"""nnpipe.plots: real PNG and CSV files, read back; no figure left open; no backend change."""

import csv
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from nnpipe import plots
from nnpipe.metrics import reliability_curve

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(autouse=True)
def no_open_figures():
    import matplotlib.pyplot as plt

    before = plt.get_fignums()
    yield
    assert plt.get_fignums() == before == []


def assert_png(path, min_side=200):
    import matplotlib.image as mpimg

    assert os.path.isfile(path)
    with open(path, "rb") as handle:
        assert handle.read(8) == PNG_SIGNATURE
    image = mpimg.imread(path)
    assert image.ndim == 3 and image.shape[2] in (3, 4)
    assert min(image.shape[:2]) >= min_side and max(image.shape[:2]) <= 3000
    assert image[..., :3].std() > 0.01  # something was drawn
    return image


def read_csv(path):
    with open(path, newline="") as handle:
        rows = list(csv.reader(handle))
    return rows[0], rows[1:]


@pytest.fixture(scope="module")
def history():
    return [{"epoch": e, "train_loss": 1.0 / e, "valid_loss": 1.2 / e + 0.1,
             "valid_acc": 1 - 0.5 / e, "lr": 0.1 * 0.9 ** e, "dur": 0.5, "batches": [{}]}
            for e in range(1, 13)]


@pytest.fixture(scope="module")
def predictions():
    rng = np.random.default_rng(0)
    proba = rng.dirichlet([0.4] * 4, size=600)
    y = np.minimum((proba.cumsum(1) < rng.random(600)[:, None]).sum(1), 3)
    sharp = proba**3
    sharp /= sharp.sum(1, keepdims=True)
    return y, proba, sharp


# --------------------------------------------------------------------------- learning curves


def test_learning_curves_png_in_new_folders(tmp_path, history):
    path = tmp_path / "a" / "b" / "curves.png"
    out = plots.learning_curves(history, path)
    assert out == str(path)
    assert_png(out)


def test_learning_curves_partial_history(tmp_path):
    # Only train loss; valid loss missing in some rows or None (a skorch run without validation).
    rows = [{"epoch": 1, "train_loss": 1.0}, {"epoch": 2, "train_loss": 0.8, "valid_loss": None},
            {"epoch": 3, "train_loss": 0.7, "valid_loss": 0.9}]
    assert_png(plots.learning_curves(rows, tmp_path / "partial.png", title="partial"))
    assert_png(plots.learning_curves([{"train_loss": 1.0}], tmp_path / "one.png"))


def test_learning_curves_reads_a_skorch_history(tmp_path):
    from skorch.history import History

    h = History()
    for epoch in range(1, 4):
        h.new_epoch()
        h.record("epoch", epoch)
        h.record("train_loss", 1.0 / epoch)
        h.record("valid_loss", 1.5 / epoch)
        h.record("valid_acc", 0.3 * epoch)
    assert_png(plots.learning_curves(h, tmp_path / "skorch.png"))
    header, rows = read_csv(plots.learning_curves_table(h, tmp_path / "skorch.csv"))
    assert header == ["epoch", "train_loss", "valid_loss", "valid_acc"]
    assert rows[2] == ["3", "0.3333333333", "0.5", "0.9"]


def test_learning_curves_errors(tmp_path):
    with pytest.raises(ValueError, match="history_rows must be a non-empty list"):
        plots.learning_curves([], tmp_path / "x.png")
    with pytest.raises(ValueError,
                       match=r"must hold 'train_loss' or 'valid_loss'.*\['dur', 'epoch'\]"):
        plots.learning_curves([{"epoch": 1, "dur": 0.1}], tmp_path / "x.png")
    with pytest.raises(ValueError, match="history_rows must be a list of per-epoch dicts"):
        plots.learning_curves({"epoch": 1, "train_loss": 1.0}, tmp_path / "x.png")
    assert not (tmp_path / "x.png").exists()


def test_learning_curves_table(tmp_path, history):
    out = plots.learning_curves_table(history, tmp_path / "metrics" / "history.csv")
    header, rows = read_csv(out)
    assert header == ["epoch", "train_loss", "valid_loss", "valid_acc", "lr"]
    assert len(rows) == len(history)
    assert [int(r[0]) for r in rows] == list(range(1, 13))
    np.testing.assert_allclose([float(r[1]) for r in rows], [h["train_loss"] for h in history])
    np.testing.assert_allclose([float(r[4]) for r in rows], [h["lr"] for h in history])


def test_learning_curves_table_only_present_columns(tmp_path):
    rows = [{"train_loss": 1.0, "valid_loss": None}, {"train_loss": 0.5, "valid_loss": 0.75}]
    header, body = read_csv(plots.learning_curves_table(rows, tmp_path / "h.csv"))
    assert header == ["epoch", "train_loss", "valid_loss"]
    assert body == [["1", "1", ""], ["2", "0.5", "0.75"]]


# --------------------------------------------------------------------------- confusion


@pytest.mark.parametrize("normalize", [True, False])
def test_confusion_matrix_plot(tmp_path, predictions, normalize):
    y, proba, _ = predictions
    classes = np.array(["airplane", "car", "bird", "cat"])
    out = plots.confusion_matrix_plot(classes[y], classes[proba.argmax(1)], classes,
                                      tmp_path / "cm" / f"cm_{normalize}.png", normalize=normalize)
    assert_png(out)


def test_confusion_matrix_plot_many_classes_and_errors(tmp_path):
    rng = np.random.default_rng(1)
    y = rng.integers(0, 40, 500)
    assert_png(plots.confusion_matrix_plot(y, rng.integers(0, 40, 500), list(range(40)),
                                           tmp_path / "cm40.png"))
    with pytest.raises(ValueError,
                       match=r"y_pred must be values from classes \['a', 'b'\], got \['z'\]"):
        plots.confusion_matrix_plot(["a", "b"], ["a", "z"], ["a", "b"], tmp_path / "bad.png")
    with pytest.raises(ValueError, match="normalize must be True or False, got 'true'"):
        plots.confusion_matrix_plot(["a"], ["a"], ["a"], tmp_path / "bad.png", normalize="true")
    assert not (tmp_path / "bad.png").exists()


def test_save_confusion_csv(tmp_path, predictions):
    y, proba, _ = predictions
    classes = np.array(["airplane", "car", "bird", "cat"])
    out = plots.save_confusion_csv(classes[y], classes[proba.argmax(1)], tmp_path / "c" / "cm.csv")
    header, rows = read_csv(out)
    assert header == ["actual", "predicted"]
    assert len(rows) == len(y)
    assert rows[0] == [classes[y[0]], classes[proba[0].argmax()]]
    with pytest.raises(ValueError,
                       match=r"y_pred must have the shape of y_true \(2,\), got shape \(1,\)"):
        plots.save_confusion_csv([0, 1], [0], tmp_path / "bad.csv")


# --------------------------------------------------------------------------- calibration


def test_reliability_diagram_single_model(tmp_path, predictions):
    y, proba, _ = predictions
    out = plots.reliability_diagram(y, proba, tmp_path / "rel" / "single.png", label="net")
    assert out == str(tmp_path / "rel" / "single.png")
    assert_png(out)


def test_reliability_diagram_two_models(tmp_path, predictions):
    y, proba, sharp = predictions
    out = plots.reliability_diagram(y, {"ensemble": proba, "best single": sharp},
                                    tmp_path / "two.png", n_bins=10)
    assert_png(out)


def test_reliability_diagram_string_labels(tmp_path, predictions):
    y, proba, _ = predictions
    classes = np.array(["d", "c", "b", "a"])
    assert_png(plots.reliability_diagram(classes[y], proba, tmp_path / "s.png", labels=classes))


def test_reliability_diagram_errors(tmp_path, predictions):
    y, proba, _ = predictions
    with pytest.raises(ValueError, match="label must be None when proba is a dict"):
        plots.reliability_diagram(y, {"a": proba}, tmp_path / "x.png", label="a")
    with pytest.raises(ValueError, match="non-empty dict"):
        plots.reliability_diagram(y, {}, tmp_path / "x.png")
    with pytest.raises(ValueError,
                       match=r"proba\['bad'\]: proba must be an array of shape \(600, n_classes\)"):
        plots.reliability_diagram(y, {"good": proba, "bad": proba[:10]}, tmp_path / "x.png")
    assert not (tmp_path / "x.png").exists()


def test_save_calibration_csv(tmp_path, predictions):
    y, proba, _ = predictions
    out = plots.save_calibration_csv(y, proba, tmp_path / "cal" / "calibration.csv")
    header, rows = read_csv(out)
    assert header == ["confidence", "accuracy", "count"]
    conf, acc, count = reliability_curve(y, proba)
    full = count > 0
    assert len(rows) == full.sum()
    assert sum(int(r[2]) for r in rows) == len(y)
    np.testing.assert_allclose([float(r[0]) for r in rows], conf[full], rtol=1e-9)
    np.testing.assert_allclose([float(r[1]) for r in rows], acc[full], rtol=1e-9)
    _, rows5 = read_csv(plots.save_calibration_csv(y, proba, tmp_path / "c5.csv", n_bins=5))
    assert len(rows5) <= 5 and sum(int(r[2]) for r in rows5) == len(y)


# --------------------------------------------------------------------------- side effects


def test_import_is_side_effect_free_and_backend_untouched(tmp_path):
    script = textwrap.dedent(f"""
        import sys
        import nnpipe.metrics, nnpipe.plots
        assert "matplotlib" not in sys.modules, "importing nnpipe.plots imported matplotlib"
        import matplotlib
        matplotlib.use("svg")
        out = nnpipe.plots.learning_curves([{{"train_loss": 1.0}}, {{"train_loss": 0.5}}],
                                           {str(tmp_path / "sub.png")!r})
        assert matplotlib.get_backend() == "svg", matplotlib.get_backend()
        assert open(out, "rb").read(8) == {PNG_SIGNATURE!r}
        print("ok")
    """)
    env = {k: v for k, v in os.environ.items() if k != "MPLBACKEND"}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ok"

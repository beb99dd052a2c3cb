"""nnpipe.save / nnpipe.load: JSON + safetensors, atomic, exact, and never unpickling."""

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import nnpipe
from nnpipe import NNClassifier, NNRegressor, load, save
from nnpipe.persist import UntrustedTypeError


def test_fresh_process_predicts_exactly_what_the_saved_model_did(digits, tmp_path):
    Xtr, Xte, ytr, _ = digits
    clf = NNClassifier("cnn2d", input_shape=(1, 8, 8), module__channels=[8], batch_norm=True,
                       max_epochs=2, random_state=0).fit(Xtr, ytr)
    save(clf, tmp_path / "model")
    np.save(tmp_path / "X.npy", Xte)
    code = ("import sys, numpy as np, nnpipe; m = nnpipe.load(sys.argv[1]); "
            "np.save(sys.argv[2], m.predict_proba(np.load(sys.argv[3])))")
    subprocess.run([sys.executable, "-c", code, str(tmp_path / "model"), str(tmp_path / "p.npy"),
                    str(tmp_path / "X.npy")], check=True)
    np.testing.assert_array_equal(np.load(tmp_path / "p.npy"), clf.predict_proba(Xte))


def test_layout_is_json_plus_safetensors(blobs, tmp_path):
    X, y = blobs
    clf = NNClassifier(max_epochs=2, lr_schedule="cosine", lr_schedule__eta_min=1e-5,
                       random_state=0).fit(X, np.array(["a", "b", "c"])[y])
    save(clf, tmp_path)
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names[0] == "model.json" and re.fullmatch(r"weights-[0-9a-f]{16}\.safetensors", names[1])
    assert len(names) == 2
    manifest = json.loads((tmp_path / "model.json").read_text())
    assert manifest["params"]["lr_schedule__eta_min"] == 1e-5
    assert manifest["fitted"]["classes_inferred_"] == ["a", "b", "c"]
    assert len(manifest["history"]) == 2
    loaded = load(tmp_path)
    assert list(loaded.predict(X[:5])) == list(clf.predict(X[:5]))
    assert loaded.get_params()["lr_schedule"] == "cosine"
    assert loaded.history[-1, "train_loss"] == clf.history[-1, "train_loss"]


def test_regressor_round_trip_and_resave_replaces_weights(tmp_path):
    rng = np.random.RandomState(0)
    X = rng.normal(size=(100, 3)).astype(np.float32)
    reg = NNRegressor(max_epochs=3, random_state=0).fit(X, X.sum(1))
    save(reg, tmp_path)
    first = {p.name for p in tmp_path.glob("weights-*")}
    reg.partial_fit(X, X.sum(1))
    save(reg, tmp_path)
    second = {p.name for p in tmp_path.glob("weights-*")}
    assert first != second and len(second) == 1  # the old weights file is cleaned up
    loaded = load(tmp_path)
    assert loaded.predict(X).shape == (100,)
    np.testing.assert_array_equal(loaded.predict(X), reg.predict(X))


def test_corrupt_weights_are_refused(blobs, tmp_path):
    X, y = blobs
    save(NNClassifier(max_epochs=1).fit(X, y), tmp_path)
    weights = next(tmp_path.glob("weights-*"))
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="checksum"):
        load(tmp_path)


def test_hostile_manifests_are_refused_without_running_code(blobs, tmp_path):
    X, y = blobs
    save(NNClassifier(max_epochs=1).fit(X, y), tmp_path)
    manifest = json.loads((tmp_path / "model.json").read_text())
    evil = dict(manifest, params=dict(manifest["params"], module={"__ref__": "os:system"}))
    (tmp_path / "model.json").write_text(json.dumps(evil))
    with pytest.raises(UntrustedTypeError, match="os:system"):
        load(tmp_path)
    traversal = dict(manifest, weights={"file": "../../etc/passwd", "sha256": "0"})
    (tmp_path / "model.json").write_text(json.dumps(traversal))
    with pytest.raises(ValueError, match="invalid weights file"):
        load(tmp_path)
    (tmp_path / "model.json").write_text('{"format": "nnpipe", "class": "NNClass')
    with pytest.raises(ValueError, match="not valid JSON"):
        load(tmp_path)
    with pytest.raises(FileNotFoundError, match="no model.json"):
        load(tmp_path / "missing")


def test_pickle_in_a_model_directory_is_never_loaded(blobs, tmp_path):
    X, y = blobs
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (Path.touch, (marker,))

    import pickle

    save(NNClassifier(max_epochs=1).fit(X, y), tmp_path / "m")
    weights = next((tmp_path / "m").glob("weights-*"))
    weights.write_bytes(pickle.dumps(Payload()))
    with pytest.raises(ValueError):
        load(tmp_path / "m")
    assert not marker.exists()


def test_package_never_unpickles_user_paths():
    root = Path(nnpipe.__file__).parent
    offenders = []
    for path in root.rglob("*.py"):
        text = path.read_text()
        for pattern in (r"pickle\.loads?\(", r"joblib\.load\(", r"weights_only\s*=\s*False",
                        r"torch\.load\((?![^)]*weights_only\s*=\s*True)"):
            if re.search(pattern, text):
                offenders.append(f"{path.name}: {pattern}")
    assert offenders == []


def test_user_module_needs_to_be_trusted(tmp_path):
    rng = np.random.RandomState(0)
    X = rng.normal(size=(50, 4)).astype(np.float32)
    y = (X[:, 0] > 0).astype(int)
    clf = NNClassifier(_TinyNet, max_epochs=1, random_state=0).fit(X, y)
    save(clf, tmp_path)
    with pytest.raises(UntrustedTypeError, match="trusted=\\['tests.test_persist'\\]"):
        load(tmp_path)
    loaded = load(tmp_path, trusted=["tests.test_persist"])
    np.testing.assert_array_equal(loaded.predict_proba(X), clf.predict_proba(X))


import torch  # noqa: E402


class _TinyNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(4, 2)

    def forward(self, X):
        return self.lin(X)


def test_pipeline_with_preprocessing_round_trips_without_pickle(digits, tmp_path):
    from sklearn.decomposition import PCA
    from sklearn.pipeline import make_pipeline

    from nnpipe.preprocessing import Centerer, ZCAWhitener

    Xtr, Xte, ytr, _ = digits
    pipe = make_pipeline(Centerer("global"), ZCAWhitener(epsilon=0.1), PCA(20, whiten=True),
                         NNClassifier(max_epochs=2, random_state=0)).fit(Xtr, ytr)
    save(pipe, tmp_path)
    loaded = load(tmp_path)
    assert [name for name, _ in loaded.steps] == [name for name, _ in pipe.steps]
    np.testing.assert_array_equal(loaded.predict_proba(Xte), pipe.predict_proba(Xte))
    assert not list(tmp_path.glob("*.pkl"))
    # re-saving replaces the parts and removes the old ones
    pipe.fit(Xtr[:500], ytr[:500])
    save(pipe, tmp_path)
    assert len(list(tmp_path.glob("estimator-*"))) == 1
    assert len(list(tmp_path.glob("preprocess-*"))) == 1
    np.testing.assert_array_equal(load(tmp_path).predict_proba(Xte), pipe.predict_proba(Xte))


def _tree(directory):
    return {p.relative_to(directory).as_posix(): p.read_bytes()
            for p in sorted(Path(directory).rglob("*")) if p.is_file()}


def test_the_same_training_gives_the_same_bytes(blobs, tmp_path):
    """DVC hashes a stage's outputs: an identical rerun must write identical files (no
    wall-clock durations, no memory addresses, no zip timestamps, no random names), or every
    rerun looks like a new model to the stages downstream."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import Pipeline

    from nnpipe.ensemble import EnsembleClassifier
    from nnpipe.preprocessing import Standardizer, ZCAWhitener

    X, y = blobs
    builds = {
        "net": lambda: NNClassifier(max_epochs=3, random_state=0).fit(X, y),
        "pipeline": lambda: Pipeline([("std", Standardizer()), ("zca", ZCAWhitener()),
                                      ("net", NNClassifier(max_epochs=2, random_state=0))]
                                     ).fit(X, y),
        "stacking ensemble": lambda: EnsembleClassifier(
            NNClassifier(max_epochs=2), n_members=2, combine="stacking",
            meta_estimator=LogisticRegression(), validation_fraction=0.25,
            random_state=0).fit(X, y),
    }
    for name, build in builds.items():
        first, second = build(), build()
        save(first, tmp_path / name / "a")
        save(second, tmp_path / name / "b")
        a, b = _tree(tmp_path / name / "a"), _tree(tmp_path / name / "b")
        assert a.keys() == b.keys(), name
        for path in a:
            assert a[path] == b[path], f"{name}: {path} differs"
        np.testing.assert_array_equal(load(tmp_path / name / "a").predict_proba(X),
                                      first.predict_proba(X))
    manifest = json.loads((tmp_path / "net" / "a" / "model.json").read_text())
    assert all("dur" not in row and all("dur" not in b for b in row["batches"])
               for row in manifest["history"])
    assert "train_loss" in manifest["history"][-1]

"""Divergence (``lr=1e6``): training stops within the first epoch with nnpipe's error, a search
records the trial as FAIL with the reason, and no NaN weight reaches a file anywhere."""

import hashlib
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import yaml

from nnpipe import DivergenceError, NNClassifier, save
from nnpipe.data import load_dataset, save_dataset

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="module")
def digits():
    ds = load_dataset("digits")
    return ds.X_train[:600].astype("float32"), ds.y_train[:600]


@pytest.mark.parametrize("module,optimizer", [("mlp", "sgd"), ("cnn2d", "adam")])
def test_lr_1e6_aborts_within_the_first_epoch_with_finite_weights(digits, module, optimizer):
    X, y = digits
    clf = NNClassifier(module=module, input_shape=(1, 8, 8), optimizer=optimizer, lr=1e6,
                       max_epochs=20, random_state=0, verbose=0)
    with pytest.raises(DivergenceError, match=r"training diverged: .* at epoch 1, batch") as info:
        clf.fit(X, y)
    assert info.value.epoch == 1
    assert "Lower lr" in str(info.value)  # it says what to change
    for name, p in clf.module_.state_dict().items():
        assert torch.isfinite(p).all(), name


def test_a_diverging_trial_ends_fail_with_the_reason_and_the_search_goes_on(digits, tmp_path):
    from optuna.trial import TrialState

    from nnpipe.search import run_search

    X, y = digits
    raw = {"model": {"module": "mlp", "module__hidden_sizes": [32]},
           "train": {"max_epochs": 5, "random_state": 0, "verbose": 0, "train_split": None},
           "search": {"enabled": True, "n_trials": 2, "folds": 2, "sampler": "grid",
                      "pruner": "none",
                      "space": {"train.lr": {"type": "categorical", "choices": [1e6, 0.01]}}}}
    study = run_search(raw, X, y, "classification", journal=tmp_path / "j.log")
    by_lr = {t.params["train.lr"]: t for t in study.trials}
    assert by_lr[1e6].state == TrialState.FAIL
    assert "training diverged" in by_lr[1e6].user_attrs["fail_reason"]
    assert by_lr[0.01].state == TrialState.COMPLETE and by_lr[0.01].value > 0.8


def _stage(tmp_path, lr):
    params = {"data": {"source": "digits"}, "preprocess": ["global_center"], "augment": None,
              "model": {"module": "mlp", "module__hidden_sizes": [32]},
              "train": {"max_epochs": 3, "lr": lr, "optimizer": "sgd", "random_state": 0,
                        "verbose": 0},
              "tracking": {"enabled": False}}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    cmd = [sys.executable, "-m", "pipelines.train", "--data", str(tmp_path / "data"),
           "--model", "models/model", "--metrics", "metrics/train.json",
           "--curves", "plots/curves.csv", "--plot", "plots/curves.png"]
    return subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, PYTHONPATH=ROOT))


def _digest(folder):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.slow
def test_a_diverging_train_stage_fails_and_leaves_the_previous_model_untouched(tmp_path):
    save_dataset(load_dataset("digits"), tmp_path / "data")
    good = _stage(tmp_path, 0.05)
    assert good.returncode == 0, good.stderr
    before = _digest(tmp_path / "models/model")
    metrics = (tmp_path / "metrics/train.json").read_bytes()
    bad = _stage(tmp_path, 1e6)
    assert bad.returncode == 1
    assert "DivergenceError: training diverged" in bad.stderr
    assert "No output was written" in bad.stderr
    assert _digest(tmp_path / "models/model") == before
    assert (tmp_path / "metrics/train.json").read_bytes() == metrics
    # no staging folder with a half-trained (or NaN) model was left behind either
    assert [p.name for p in (tmp_path / "models").iterdir()] == ["model"]


def test_nothing_nan_is_ever_saved(digits, tmp_path):
    """A model stopped by divergence holds the start-of-epoch weights: saving it writes only
    finite numbers, and so does every checkpoint written during the run."""
    from safetensors.numpy import load_file

    from nnpipe.checkpoint import Checkpoint

    X, y = digits
    clf = NNClassifier(lr=1e6, optimizer="sgd", max_epochs=5, random_state=0, verbose=0,
                       callbacks=[("ckpt", Checkpoint(tmp_path / "ckpt", monitor=None))])
    with pytest.raises(DivergenceError):
        clf.fit(X, y)
    save(clf, tmp_path / "model")
    files = list(tmp_path.rglob("*.safetensors"))
    assert files
    for path in files:
        for name, array in load_file(path).items():
            assert np.isfinite(array).all(), (path, name)

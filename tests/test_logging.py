"""nnpipe reports through ``logging`` and leaves other libraries' global settings as it found them.

A library configures no handlers (the Python logging HOWTO's advice for libraries: at most a
``NullHandler`` on its own top logger), prints nothing unless asked to (``verbose``), and
restores any process-wide setting it changes (torch's thread count, warnings filters, optuna's
verbosity).
"""

import json
import logging
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from nnpipe import EnsembleClassifier, NNClassifier, save
from nnpipe import checkpoint as checkpoint_module
from nnpipe.callbacks import NNEarlyStopping
from nnpipe.checkpoint import Checkpoint
from nnpipe.ensemble import _fit_member

from ._setter_spy import spy_on_setters

ROOT = Path(__file__).resolve().parents[1]

_IMPORT_PROBE = textwrap.dedent("""
    import importlib, json, logging, pkgutil
    import optuna, torch
    from tests._setter_spy import spy_on_setters

    def state():
        top = logging.getLogger("nnpipe")
        return {
            "root_handlers": [repr(h) for h in logging.root.handlers],
            "root_level": logging.root.level,
            "nnpipe_handlers": [type(h).__name__ for h in top.handlers],
            "nnpipe_level": top.level,
            "optuna_verbosity": optuna.logging.get_verbosity(),
            "torch_threads": torch.get_num_threads(),
        }

    before = state()
    calls = spy_on_setters()
    import nnpipe
    modules = sorted(m.name for m in pkgutil.walk_packages(nnpipe.__path__, "nnpipe."))
    for name in modules:
        importlib.import_module(name)
    after = state()
    loggers = {name: [type(h).__name__ for h in logging.getLogger(name).handlers]
               for name in logging.root.manager.loggerDict if name.startswith("nnpipe")}
    print(json.dumps({"before": before, "after": after, "modules": modules,
                      "loggers": loggers, "calls": calls}))
""")


def test_importing_nnpipe_and_its_submodules_configures_nothing():
    """In a fresh interpreter (pytest's own logging plugin adds root handlers in this one)."""
    done = subprocess.run([sys.executable, "-c", _IMPORT_PROBE], capture_output=True,
                          text=True, timeout=300, check=True, cwd=ROOT)
    report = json.loads(done.stdout.strip().splitlines()[-1])
    before, after = report["before"], report["after"]
    assert "nnpipe.search" in report["modules"] and "nnpipe.callbacks" in report["modules"]
    assert report["calls"] == []
    assert after["root_handlers"] == before["root_handlers"]
    assert after["root_level"] == before["root_level"]
    # a NullHandler on the "nnpipe" logger is what the logging HOWTO allows a library
    assert set(after["nnpipe_handlers"]) <= {"NullHandler"}
    assert after["nnpipe_level"] == logging.NOTSET
    assert all(set(handlers) <= {"NullHandler"} for handlers in report["loggers"].values())
    assert after["optuna_verbosity"] == before["optuna_verbosity"]
    assert after["torch_threads"] == before["torch_threads"]


def _tiny_data(n=120, seed=0):
    rng = np.random.RandomState(seed)
    X = rng.normal(size=(n, 4)).astype(np.float32)
    return X, (X[:, 0] > 0).astype(int)


def _nnpipe_handlers():
    return {name: list(logging.getLogger(name).handlers)
            for name in ["nnpipe", *logging.root.manager.loggerDict] if name.startswith("nnpipe")}


def test_a_fit_leaves_optuna_logging_and_warnings_alone(monkeypatch):
    optuna = pytest.importorskip("optuna")
    X, y = _tiny_data()
    previous = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.DEBUG)  # not optuna's default, not nnpipe's pick
    try:
        handlers, root_level = _nnpipe_handlers(), logging.root.level
        calls = spy_on_setters(monkeypatch.setattr)
        NNClassifier(max_epochs=3, lr_schedule="onecycle", early_stopping=2,
                     random_state=0).fit(X, y)
        assert calls == []
        assert optuna.logging.get_verbosity() == optuna.logging.DEBUG
        assert logging.root.level == root_level
        assert {k: v for k, v in _nnpipe_handlers().items() if k in handlers} == handlers
    finally:
        optuna.logging.set_verbosity(previous)


def test_an_ensemble_fit_with_n_jobs_1_leaves_torch_threads_alone(monkeypatch):
    X, y = _tiny_data()
    previous = torch.get_num_threads()
    torch.set_num_threads(2)  # conftest pins 1; a value of its own shows what is kept
    try:
        calls = spy_on_setters(monkeypatch.setattr)
        EnsembleClassifier(NNClassifier(max_epochs=1), n_members=2, n_jobs=1).fit(X, y)
        assert torch.get_num_threads() == 2
        assert calls == []
    finally:
        torch.set_num_threads(previous)


class _Threads:
    """A skorch callback noting torch's thread count while the net trains."""

    def __new__(cls):
        from skorch.callbacks import Callback

        class Threads(Callback):
            def on_train_begin(self, net, **kwargs):
                self.seen_ = torch.get_num_threads()

        return Threads()


def test_a_member_trained_with_its_own_thread_count_restores_the_count():
    """What a (reused) joblib worker process runs: the member's count, then the old one."""
    X, y = _tiny_data()
    before = torch.get_num_threads()
    spy = _Threads()
    _fit_member(NNClassifier(max_epochs=1, callbacks=[spy]), X, y, seed=0, threads=before + 1)
    assert spy.seen_ == before + 1
    assert torch.get_num_threads() == before


def _stop_early(**knobs):
    # threshold=10: no epoch after the first counts as an improvement, so patience 1 stops at 2
    return NNClassifier(max_epochs=6, early_stopping=1, early_stopping__threshold=10.0,
                        random_state=0, **knobs)


def test_early_stopping_logs_under_nnpipe_instead_of_printing(capsys, caplog):
    X, y = _tiny_data()
    with caplog.at_level(logging.INFO, logger="nnpipe"):
        clf = _stop_early().fit(X, y)
    assert len(clf.history) == 2
    assert capsys.readouterr().out == ""
    messages = [(r.name, r.levelno, r.getMessage()) for r in caplog.records]
    assert ("nnpipe.callbacks", logging.INFO,
            "Stopping since valid_loss has not improved in the last 1 epochs.") in messages


def test_early_stopping_passed_as_a_callback_logs_by_default(capsys, caplog):
    X, y = _tiny_data()
    stopper = NNEarlyStopping(patience=1, threshold=10.0)
    with caplog.at_level(logging.INFO, logger="nnpipe"):
        NNClassifier(max_epochs=6, callbacks=[stopper], random_state=0).fit(X, y)
    assert capsys.readouterr().out == ""
    assert any(r.name == "nnpipe.callbacks" and "Stopping since valid_loss" in r.getMessage()
               for r in caplog.records)


def test_verbose_still_prints_the_stop_with_the_table(capsys):
    X, y = _tiny_data()
    _stop_early(verbose=1).fit(X, y)
    out = capsys.readouterr().out
    assert "train_loss" in out and "Stopping since valid_loss" in out


def test_training_checkpoints_change_no_warnings_filter(tmp_path, monkeypatch):
    """Checkpoint saves every epoch without touching the process-wide warnings filters."""
    X, y = _tiny_data()
    seen = []

    def spy_save(*args, **kwargs):
        seen.append(list(warnings.filters))
        return save(*args, **kwargs)

    monkeypatch.setattr(checkpoint_module, "save", spy_save)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        NNClassifier(max_epochs=2, random_state=0,
                     callbacks=[Checkpoint(tmp_path / "cp", monitor=None)]).fit(X, y)
    assert len(seen) == 2  # a save per epoch, each with no filter of nnpipe's in force
    assert not [f for filters in seen for f in filters if "nnpipe" in repr(f)]
    assert not [w for w in caught if "nnpipe.save: the callbacks" in str(w.message)]


def test_saving_a_net_with_callbacks_still_warns(tmp_path):
    X, y = _tiny_data()
    clf = NNClassifier(max_epochs=1, callbacks=[_Threads()], random_state=0).fit(X, y)
    with pytest.warns(UserWarning, match="nnpipe.save: the callbacks"):
        save(clf, tmp_path / "model")


def test_a_stage_run_in_process_leaves_the_nnpipe_logger_as_it_was(tmp_path, monkeypatch):
    """Stages show progress on stdout while they run, and take their handler away after."""
    from pipelines import prepare

    logger = logging.getLogger("nnpipe")
    before = (list(logger.handlers), logger.level)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "params.yaml").write_text("data: {source: digits}\ntracking: {enabled: false}\n")
    prepare.main(["--out", str(tmp_path / "prepared")])
    assert (tmp_path / "prepared").is_dir()
    assert (list(logger.handlers), logger.level) == before

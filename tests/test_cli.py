"""Every command, end to end, as a user runs it, on the shipped params.yaml and on a CSV
configuration; expected errors print one message, bugs and ``--debug`` a traceback.

The commands run in-process (``nnpipe.cli.main``, ``pipelines.<stage>.main``) in the test's
working directory; one test per kind of entry point (the ``nnpipe`` command, a stage) starts the
real process, to prove exit codes and stderr across the process boundary.
"""

import json
import logging
import os
import re
import runpy
import signal
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import yaml

from nnpipe import config as nnpipe_config
from nnpipe import tracking
from nnpipe.cli import main as cli
from pipelines import _stage
from pipelines.prepare import main as prepare
from pipelines.train import main as train

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = ROOT / "params.yaml"
STAGES = ("prepare", "search", "pretrain", "train", "ensemble", "cv", "evaluate")
TRAIN_OUTS = ["--model", "m", "--metrics", "m.json", "--curves", "c.csv", "--plot", "c.png"]


def run(args, cwd, env=None, **kwargs):
    """``python <args>`` in ``cwd``; the environment without NNPIPE_DEBUG unless ``env`` sets it."""
    base = {k: v for k, v in os.environ.items() if k != "NNPIPE_DEBUG"}
    return subprocess.run([sys.executable, *args], cwd=cwd, env={**base, **(env or {})},
                          capture_output=True, text=True, timeout=300, check=False, **kwargs)


def nnpipe(*args, cwd, env=None):
    return run(["-m", "nnpipe.cli", *args], cwd, env)


def _shipped(tmp_path):
    """The shipped params.yaml, tracking off (the tests must not write an MLflow database)."""
    raw = yaml.safe_load(SHIPPED.read_text())
    raw["tracking"]["enabled"] = False
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def _csv(tmp_path, **sections):
    """A 6-feature, 2-class CSV in ``tmp_path`` and a params.yaml reading it."""
    rng = np.random.RandomState(0)
    y = np.arange(60) % 2
    X = rng.normal(size=(60, 6)) + y[:, None]
    rows = [",".join(f"f{i}" for i in range(6)) + ",label"]
    rows += [",".join(f"{v:.4f}" for v in x) + f",{t}" for x, t in zip(X, y)]
    (tmp_path / "data.csv").write_text("\n".join(rows) + "\n")
    raw = {"data": {"source": "csv", "path": "data.csv", "target": "label"},
           "preprocess": ["standardize"],
           "model": {"module": "mlp", "module__hidden_sizes": [16]},
           "train": {"lr": 0.01, "max_epochs": 2, "batch_size": 16, "random_state": 0},
           "tracking": {"enabled": False}, **sections}
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def _stage_exit(main, argv):
    """The code ``main(argv)``, a stage run in-process, exits with (it exits on failure)."""
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    return exit_.value.code


class _ProcessState:
    """What an in-process stage changes in this process (``pipelines._stage.run`` installs a
    SIGTERM handler and a console handler on the ``nnpipe`` logger), put back by ``restore``."""

    def __init__(self):
        self.sigterm = signal.getsignal(signal.SIGTERM)
        self.logger = logging.getLogger("nnpipe")
        self.handlers, self.level = list(self.logger.handlers), self.logger.level

    def restore(self):
        signal.signal(signal.SIGTERM, self.sigterm)
        self.logger.handlers[:] = self.handlers
        self.logger.setLevel(self.level)


@pytest.fixture
def user(tmp_path, monkeypatch):
    """A user's shell in ``tmp_path``: the working directory, NNPIPE_DEBUG unset, and whatever an
    in-process stage changes in the process put back afterwards."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("NNPIPE_DEBUG", raising=False)
    state = _ProcessState()
    yield tmp_path
    state.restore()


# --------------------------------------------------------------------------- check and schema


def test_check_and_schema_on_the_shipped_params(user, capsys):
    assert cli(["check", str(SHIPPED)]) == 0, capsys.readouterr().err
    assert "OK; checked against digits: 64 features per row, samples of shape (1, 8, 8)" \
        in capsys.readouterr().out
    assert cli(["schema"]) == 0
    out = capsys.readouterr().out
    jsonschema = pytest.importorskip("jsonschema")
    schema = json.loads(out)
    jsonschema.Draft202012Validator.check_schema(schema)
    errors = list(jsonschema.Draft202012Validator(schema).iter_errors(
        yaml.safe_load(SHIPPED.read_text())))
    assert not errors, [e.message for e in errors]


def test_check_on_a_csv_config_reads_the_header_and_catches_what_the_data_decides(user, capsys):
    _csv(user)
    assert cli(["check"]) == 0, capsys.readouterr().err  # params.yaml of the working directory
    assert "checked against csv 'data.csv': 6 features per row" in capsys.readouterr().out
    # the shipped network and augmentation on the tabular rows: caught before any work
    shipped = yaml.safe_load(SHIPPED.read_text())
    _csv(user, model=shipped["model"], augment=shipped["augment"])
    assert cli(["check", "params.yaml"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("nnpipe check: params.yaml: 4 problems\n"), err
    for key in ("model.module: 'cnn2d' does not fit the data", "augment.shift: ",
                "augment.rotation: ", "augment.noise: "):
        assert f"\n  {key}" in err, (key, err)
    assert "Traceback" not in err


# --------------------------------------------------------------------------- lr-range-test


@pytest.fixture(scope="module", params=["shipped", "csv"])
def prepared(request, tmp_path_factory):
    """A folder with a params.yaml (``shipped`` or ``csv``) and the prepare stage's output for it
    in ``prepared/``, made once per module by the stage run in-process."""
    folder = tmp_path_factory.mktemp(request.param)
    params = _shipped(folder) if request.param == "shipped" else _csv(folder)
    state = _ProcessState()
    try:
        with pytest.MonkeyPatch.context() as mp:
            mp.chdir(folder)
            mp.delenv("NNPIPE_DEBUG", raising=False)
            prepare(["--params", str(params), "--out", "prepared"])  # exits only on failure
    finally:
        state.restore()
    return params


def test_lr_range_test_after_prepare(prepared, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(prepared.parent)
    plot = tmp_path / "plots" / "lr.png"
    code = cli(["lr-range-test", "--params", str(prepared), "--data", "prepared", "--plot",
                str(plot), "--num-iter", "8"])
    out, err = capsys.readouterr()
    assert code == 0, err
    suggested = float(re.search(r"suggested train.lr: ([0-9.e+-]+)", out).group(1))
    assert 1e-7 <= suggested <= 10
    assert "params.yaml has" in out
    assert plot.stat().st_size > 1000


# --------------------------------------------------------------------------- sync


@pytest.mark.parametrize("command", [lambda argv: tracking.main(["sync", *argv]),
                                     lambda argv: cli(["sync", *argv])],
                         ids=["tracking", "nnpipe"])
def test_sync_with_nothing_to_sync_and_with_a_bogus_outbox(user, capsys, command):
    (user / "outbox").mkdir()
    uri = f"sqlite:///{user / 'mlflow.db'}"
    assert command(["--outbox", "outbox", "--uri", uri]) == 0, capsys.readouterr().err
    assert "nothing to sync" in capsys.readouterr().out
    assert not (user / "mlflow.db").exists()  # nothing was touched
    assert command(["--outbox", "no/such/outbox", "--uri", uri]) == 1
    err = capsys.readouterr().err
    assert "--outbox 'no/such/outbox' is not a directory" in err
    assert "Traceback" not in err


def test_every_stage_entry_point_answers_help(user, capsys):
    for stage in STAGES:
        # as `python -m pipelines.<stage> --help` runs it: the module as __main__
        with warnings.catch_warnings(), pytest.raises(SystemExit) as exit_:
            # the stage module is imported already (this file imports some): harmless here
            warnings.filterwarnings("ignore", "'pipelines\\..*' found in sys.modules",
                                    RuntimeWarning)
            with pytest.MonkeyPatch.context() as mp:
                mp.setattr(sys, "argv", [stage, "--help"])
                runpy.run_module(f"pipelines.{stage}", run_name="__main__", alter_sys=True)
        assert exit_.value.code == 0, stage
        text = capsys.readouterr().out
        assert text.startswith(f"usage: python -m pipelines.{stage}"), text
        assert "--params" in text, text


# --------------------------------------------------------------------------- errors and --debug


def test_an_expected_error_prints_one_message_and_debug_the_traceback(tmp_path):
    """The ``nnpipe`` command as a process: exit status 1, one message, ``--debug`` the
    traceback (NNPIPE_DEBUG: the next test)."""
    quiet = nnpipe("check", "missing.yaml", cwd=tmp_path)
    assert quiet.returncode == 1
    assert quiet.stderr.startswith("nnpipe check: missing.yaml: no such params file.")
    assert "Traceback" not in quiet.stderr and "--debug" in quiet.stderr
    proc = nnpipe("check", "missing.yaml", "--debug", cwd=tmp_path)
    assert proc.returncode == 1
    assert proc.stderr.startswith("Traceback (most recent call last):"), proc.stderr
    assert "FileNotFoundError: missing.yaml: no such params file." in proc.stderr
    assert proc.stderr.rstrip().endswith("nnpipe check: missing.yaml: no such params file.")


def test_nnpipe_debug_in_the_environment_shows_the_traceback(user, capsys, monkeypatch):
    monkeypatch.setenv("NNPIPE_DEBUG", "1")
    assert cli(["check", "missing.yaml"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("Traceback (most recent call last):"), err
    assert "FileNotFoundError: missing.yaml: no such params file." in err
    assert err.rstrip().endswith("nnpipe check: missing.yaml: no such params file.")


def test_debug_goes_before_or_after_the_command(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("NNPIPE_DEBUG", raising=False)
    for argv in (["--debug", "check", str(tmp_path / "missing.yaml")],
                 ["check", str(tmp_path / "missing.yaml"), "--debug"]):
        assert cli(argv) == 1
        assert capsys.readouterr().err.startswith("Traceback (most recent call last):")
    assert cli(["check", str(tmp_path / "missing.yaml")]) == 1
    assert "Traceback" not in capsys.readouterr().err


def test_a_bug_in_a_command_keeps_its_traceback(user, capsys, monkeypatch):
    def broken(*a, **k):
        raise KeyError("a bug")

    monkeypatch.setattr(nnpipe_config, "load_config", broken)
    # not an expected error: main lets it through, so Python prints its traceback and exits 1
    with pytest.raises(KeyError) as bug:
        cli(["check", "params.yaml"])
    assert str(bug.value) == "'a bug'"
    assert "nnpipe check:" not in capsys.readouterr().err  # not turned into one message


def test_a_stage_prints_invalid_parameters_without_a_traceback(user, capsys):
    bad = user / "bad.yaml"
    bad.write_text("train: {lr: fast}\n")
    assert _stage_exit(train, ["--params", str(bad), "--data", "d", *TRAIN_OUTS]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"[train] invalid parameters:\n{bad}: 1 problem\n")
    assert "train.lr: must be a finite number > 0, got 'fast'" in err and "Traceback" not in err


def test_a_stage_prints_expected_errors_as_one_message(tmp_path):
    """A stage as a process (as dvc runs it): exit status 1, one message, no traceback."""
    good = _csv(tmp_path)
    quiet = run(["-m", "pipelines.train", "--params", str(good), "--data", "no-such-folder",
                 *TRAIN_OUTS], tmp_path)
    assert quiet.returncode == 1
    assert "[train] failed: FileNotFoundError: read_dataset:" in quiet.stderr
    assert "No output was written. (NNPIPE_DEBUG=1 shows the traceback)" in quiet.stderr
    assert "Traceback" not in quiet.stderr


def test_a_stage_shows_the_traceback_of_an_expected_error_with_nnpipe_debug(
        user, capsys, monkeypatch):
    good = _csv(user)
    monkeypatch.setenv("NNPIPE_DEBUG", "1")
    assert _stage_exit(train, ["--params", str(good), "--data", "no-such-folder",
                               *TRAIN_OUTS]) == 1
    err = capsys.readouterr().err
    assert err.startswith("Traceback (most recent call last):"), err
    assert "[train] failed: FileNotFoundError: read_dataset:" in err


def test_a_bug_in_a_stage_keeps_its_traceback(user, capsys):
    params = _csv(user)

    def body(args, cfg, outputs):
        raise TypeError("a bug")

    assert _stage_exit(lambda argv: _stage.run("demo", body, lambda parser: None, argv),
                       ["--params", str(params)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("Traceback (most recent call last):"), err
    assert "[demo] failed: TypeError: a bug\nNo output was written." in err
    assert "NNPIPE_DEBUG" not in err

"""Every command, end to end, as a user runs it: subprocesses on the shipped params.yaml and on a
CSV configuration; expected errors print one message, bugs and ``--debug`` a traceback."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from nnpipe.cli import main as cli

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = ROOT / "params.yaml"
STAGES = ("prepare", "search", "pretrain", "train", "ensemble", "cv", "evaluate")


def run(args, cwd, env=None, **kwargs):
    """``python <args>`` in ``cwd``; the environment without NNPIPE_DEBUG unless ``env`` sets it."""
    base = {k: v for k, v in os.environ.items() if k != "NNPIPE_DEBUG"}
    return subprocess.run([sys.executable, *args], cwd=cwd, env={**base, **(env or {})},
                          capture_output=True, text=True, timeout=300, **kwargs)


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


# --------------------------------------------------------------------------- check and schema


def test_check_and_schema_on_the_shipped_params(tmp_path):
    proc = nnpipe("check", str(SHIPPED), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "OK; checked against digits: 64 features per row, samples of shape (1, 8, 8)" \
        in proc.stdout
    proc = nnpipe("schema", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    jsonschema = pytest.importorskip("jsonschema")
    schema = json.loads(proc.stdout)
    jsonschema.Draft202012Validator.check_schema(schema)
    errors = list(jsonschema.Draft202012Validator(schema).iter_errors(
        yaml.safe_load(SHIPPED.read_text())))
    assert not errors, [e.message for e in errors]


def test_check_on_a_csv_config_reads_the_header_and_catches_what_the_data_decides(tmp_path):
    _csv(tmp_path)
    proc = nnpipe("check", cwd=tmp_path)  # params.yaml of the working directory
    assert proc.returncode == 0, proc.stderr
    assert "checked against csv 'data.csv': 6 features per row" in proc.stdout
    # the shipped network and augmentation on the tabular rows: caught before any work
    shipped = yaml.safe_load(SHIPPED.read_text())
    _csv(tmp_path, model=shipped["model"], augment=shipped["augment"])
    proc = nnpipe("check", "params.yaml", cwd=tmp_path)
    assert proc.returncode == 1
    assert proc.stderr.startswith("nnpipe check: params.yaml: 4 problems\n"), proc.stderr
    for key in ("model.module: 'cnn2d' does not fit the data", "augment.shift: ",
                "augment.rotation: ", "augment.noise: "):
        assert f"\n  {key}" in proc.stderr, (key, proc.stderr)
    assert "Traceback" not in proc.stderr


# --------------------------------------------------------------------------- lr-range-test


@pytest.mark.parametrize("config", ["shipped", "csv"])
def test_lr_range_test_after_prepare(tmp_path, config):
    params = _shipped(tmp_path) if config == "shipped" else _csv(tmp_path)
    proc = run(["-m", "pipelines.prepare", "--params", str(params), "--out", "prepared"],
               tmp_path)
    assert proc.returncode == 0, proc.stderr
    proc = nnpipe("lr-range-test", "--params", str(params), "--data", "prepared", "--plot",
                  "plots/lr.png", "--num-iter", "8", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    suggested = float(re.search(r"suggested train.lr: ([0-9.e+-]+)", proc.stdout).group(1))
    assert 1e-7 <= suggested <= 10
    assert "params.yaml has" in proc.stdout
    assert (tmp_path / "plots" / "lr.png").stat().st_size > 1000


# --------------------------------------------------------------------------- sync


@pytest.mark.parametrize("command", [["-m", "nnpipe.tracking", "sync"],
                                     ["-m", "nnpipe.cli", "sync"]], ids=["tracking", "nnpipe"])
def test_sync_with_nothing_to_sync_and_with_a_bogus_outbox(tmp_path, command):
    (tmp_path / "outbox").mkdir()
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    proc = run([*command, "--outbox", "outbox", "--uri", uri], tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "nothing to sync" in proc.stdout
    assert not (tmp_path / "mlflow.db").exists()  # nothing was touched
    proc = run([*command, "--outbox", "no/such/outbox", "--uri", uri], tmp_path)
    assert proc.returncode == 1
    assert "--outbox 'no/such/outbox' is not a directory" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_every_stage_entry_point_answers_help(tmp_path):
    script = (
        "import contextlib, io, runpy, sys\n"
        f"for stage in {STAGES!r}:\n"
        "    sys.argv = [stage, '--help']\n"
        "    out = io.StringIO()\n"
        "    with contextlib.redirect_stdout(out):\n"
        "        try:\n"
        "            runpy.run_module(f'pipelines.{stage}', run_name='__main__', alter_sys=True)\n"
        "        except SystemExit as exc:\n"
        "            assert exc.code == 0, (stage, exc.code)\n"
        "    text = out.getvalue()\n"
        "    assert text.startswith(f'usage: python -m pipelines.{stage}'), text\n"
        "    assert '--params' in text, text\n"
        "    print(stage, 'ok')\n")
    proc = run(["-c", script], tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == [w for s in STAGES for w in (s, "ok")]


# --------------------------------------------------------------------------- errors and --debug


def test_an_expected_error_prints_one_message_and_debug_the_traceback(tmp_path):
    quiet = nnpipe("check", "missing.yaml", cwd=tmp_path)
    assert quiet.returncode == 1
    assert quiet.stderr.startswith("nnpipe check: missing.yaml: no such params file.")
    assert "Traceback" not in quiet.stderr and "--debug" in quiet.stderr
    for proc in (nnpipe("check", "missing.yaml", "--debug", cwd=tmp_path),
                 nnpipe("check", "missing.yaml", cwd=tmp_path, env={"NNPIPE_DEBUG": "1"})):
        assert proc.returncode == 1
        assert proc.stderr.startswith("Traceback (most recent call last):"), proc.stderr
        assert "FileNotFoundError: missing.yaml: no such params file." in proc.stderr
        assert proc.stderr.rstrip().endswith("nnpipe check: missing.yaml: no such params file.")


def test_debug_goes_before_or_after_the_command(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("NNPIPE_DEBUG", raising=False)
    for argv in (["--debug", "check", str(tmp_path / "missing.yaml")],
                 ["check", str(tmp_path / "missing.yaml"), "--debug"]):
        assert cli(argv) == 1
        assert capsys.readouterr().err.startswith("Traceback (most recent call last):")
    assert cli(["check", str(tmp_path / "missing.yaml")]) == 1
    assert "Traceback" not in capsys.readouterr().err


def test_a_bug_in_a_command_keeps_its_traceback(tmp_path):
    script = ("import sys, nnpipe.config as config\n"
              "def broken(*a, **k):\n"
              "    raise KeyError('a bug')\n"
              "config.load_config = broken\n"
              "from nnpipe.cli import main\n"
              "sys.exit(main(['check', 'params.yaml']))\n")
    proc = run(["-c", script], tmp_path)
    assert proc.returncode == 1
    assert "Traceback (most recent call last):" in proc.stderr
    assert "KeyError: 'a bug'" in proc.stderr


def _train(tmp_path, params, data="prepared", env=None):
    return run(["-m", "pipelines.train", "--params", str(params), "--data", data,
                "--model", "m", "--metrics", "m.json", "--curves", "c.csv", "--plot", "c.png"],
               tmp_path, env)


def test_a_stage_prints_invalid_parameters_without_a_traceback(tmp_path, capsys, monkeypatch):
    from pipelines.train import main as train

    monkeypatch.delenv("NNPIPE_DEBUG", raising=False)
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: {lr: fast}\n")
    with pytest.raises(SystemExit) as exit_:
        train(["--params", str(bad), "--data", "d", "--model", "m", "--metrics", "m.json",
               "--curves", "c.csv", "--plot", "c.png"])
    err = capsys.readouterr().err
    assert exit_.value.code == 1
    assert err.startswith(f"[train] invalid parameters:\n{bad}: 1 problem\n")
    assert "train.lr: must be a finite number > 0, got 'fast'" in err and "Traceback" not in err


def test_a_stage_prints_expected_errors_as_one_message(tmp_path):
    good = _csv(tmp_path)
    quiet = _train(tmp_path, good, data="no-such-folder")
    assert quiet.returncode == 1
    assert "[train] failed: FileNotFoundError: read_dataset:" in quiet.stderr
    assert "No output was written. (NNPIPE_DEBUG=1 shows the traceback)" in quiet.stderr
    assert "Traceback" not in quiet.stderr
    loud = _train(tmp_path, good, data="no-such-folder", env={"NNPIPE_DEBUG": "1"})
    assert loud.returncode == 1
    assert loud.stderr.startswith("Traceback (most recent call last):"), loud.stderr
    assert "[train] failed: FileNotFoundError: read_dataset:" in loud.stderr


def test_a_bug_in_a_stage_keeps_its_traceback(tmp_path):
    params = _csv(tmp_path)
    script = ("from pipelines._stage import run\n"
              "def body(args, cfg, outputs):\n"
              "    raise TypeError('a bug')\n"
              f"run('demo', body, lambda parser: None, ['--params', {str(params)!r}])\n")
    proc = run(["-c", script], tmp_path)
    assert proc.returncode == 1
    assert proc.stderr.startswith("Traceback (most recent call last):"), proc.stderr
    assert "[demo] failed: TypeError: a bug\nNo output was written." in proc.stderr
    assert "NNPIPE_DEBUG" not in proc.stderr

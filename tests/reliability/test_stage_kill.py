"""A stage killed mid-fit (issue #7, item 4): real signals to a real ``dvc repro``.

``kill -9`` of the whole ``dvc repro`` process group (dvc, its shell, the stage), and a terminal's
Ctrl-C (SIGINT to that group), while ``train`` is fitting. After each: ``dvc.lock`` is
byte-identical, ``dvc status`` reports ``train`` as changed, and every published output of
``train`` is either absent or the previous complete version, never a half-written one. After the
kill, a plain rerun works (the dead dvc's entries in ``.dvc/tmp/rwlock`` stay, and DVC drops them,
with a warning, where they are in its way) and gives exactly what a clean run of the same params
gives in a second, fresh repository.

The stage process is the ``python -m pipelines.train`` descendant of ``dvc``; the tests wait for
its second epoch row on stdout, so the signal always lands mid-fit. (tests/pipeline already sends
SIGINT and SIGTERM to the stage process alone.)
"""

import copy
import json
import os
import queue
import re
import shutil
import signal
import subprocess
import threading
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
import yaml

from tests.pipeline.conftest import TINY, make_repo, sh, stage_env

pytestmark = pytest.mark.slow

TRAIN_OUTS = ("models/model", "metrics/train.json", "plots/train/learning_curves.csv",
              "plots/train/learning_curves.png")
EPOCH_ROW = re.compile(r"^\s+(\d+)\s+\S")  # a row of skorch's epoch table


def _params(**train):
    params = copy.deepcopy(TINY)
    params["ensemble"] = {"enabled": False}
    params["tracking"] = {"enabled": False}
    params["train"] = {**params["train"], "max_epochs": 2, **train}
    return params


#: the previous, finished version, then the change that makes `train` re-run: long enough
#: (1000 epochs, about 20 s) that the signal lands mid-fit even on a loaded machine, with the
#: epoch table on stdout to wait for
BEFORE = _params()
AFTER = _params(max_epochs=1000, verbose=1)


def _env(repo, shell=None):
    env = stage_env(repo)
    if shell:
        env["SHELL"] = shell  # dvc runs each stage's cmd with `$SHELL -c` (/bin/sh if unset)
    env["PYTHONUNBUFFERED"] = "1"  # epoch rows reach us as they are printed
    env["OMP_NUM_THREADS"] = "1"  # 2 shared cores: no oversubscribed intra-op threads
    return env


def _set_params(repo, params):
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def _upstream(repo, stage="train"):
    """The stages whose outputs ``stage`` depends on (read from dvc.yaml)."""
    stages = yaml.safe_load((repo / "dvc.yaml").read_text())["stages"]
    deps = set(stages[stage].get("deps", []))
    return [name for name, s in stages.items() if name != stage and deps & {
        o if isinstance(o, str) else next(iter(o)) for o in s.get("outs", [])}]


def _snapshot(repo):
    """Every file of the train stage's outputs: {relative path: bytes}."""
    files = {}
    for out in TRAIN_OUTS:
        path = repo / out
        for f in ([path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())):
            files[f.relative_to(repo).as_posix()] = f.read_bytes()
    return files


def _staging_dirs(repo):
    """Folders where pipelines/_stage.py builds outputs before publishing them."""
    return sorted(p.relative_to(repo).as_posix() for d in ("models", "metrics", "plots/train")
                  if (repo / d).is_dir() for p in (repo / d).glob(".*") if p.is_dir())


_STARTED = []


@pytest.fixture(autouse=True)
def _no_stray_processes():
    """A failed test leaves no `dvc repro` running behind it."""
    yield
    while _STARTED:
        proc = _STARTED.pop()
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def _as_in_a_terminal():
    """Give the child SIGINT's default action, as an interactive shell gives its jobs.

    A CI runner may start the suite with SIGINT ignored (a non-interactive shell's background
    job), and an ignored signal stays ignored across ``exec``: Python then installs no
    KeyboardInterrupt handler at all, and a Ctrl-C could never reach the stage.
    """
    signal.signal(signal.SIGINT, signal.SIG_DFL)


class Repro:
    """``dvc repro train`` in its own process group, its output read line by line."""

    def __init__(self, repo, shell=None):
        self.proc = subprocess.Popen(["dvc", "repro", "train"], cwd=repo, env=_env(repo, shell),
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                     start_new_session=True, preexec_fn=_as_in_a_terminal)
        _STARTED.append(self.proc)
        self.lines, self._rows = [], queue.Queue()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self):
        for line in self.proc.stdout:
            self.lines.append(line)
            match = EPOCH_ROW.match(line)
            if match:
                self._rows.put(int(match.group(1)))
        self._rows.put(None)

    @property
    def output(self):
        return "".join(self.lines)

    def wait_for_epoch(self, epoch, timeout=180):
        deadline = time.monotonic() + timeout
        while True:
            try:
                seen = self._rows.get(timeout=max(0.1, deadline - time.monotonic()))
            except queue.Empty:
                raise AssertionError(f"no epoch {epoch} within {timeout} s:\n{self.output}")
            assert seen is not None, f"dvc repro ended before epoch {epoch}:\n{self.output}"
            if seen >= epoch:
                return

    def stage_process(self):
        """The python process of the stage (not a ``sh -c`` still waiting for it)."""
        for child in psutil.Process(self.proc.pid).children(recursive=True):
            try:
                if child.name().startswith("python") and \
                        "pipelines.train" in " ".join(child.cmdline()):
                    return child
            except psutil.NoSuchProcess:
                continue
        raise AssertionError(f"no pipelines.train process under dvc:\n{self.output}")

    def wait(self, timeout=120):
        self.proc.wait(timeout=timeout)
        self._reader.join(timeout=30)  # the rest of the output
        return self.proc.returncode


def _locked_by(repo, pid):
    """The paths (repo-relative) that process ``pid`` holds in DVC's ``.dvc/tmp/rwlock``."""
    lock = json.loads((repo / ".dvc/tmp/rwlock").read_text())
    held = set()
    for mode in ("read", "write"):
        for path, infos in lock.get(mode, {}).items():
            infos = infos if isinstance(infos, list) else [infos]
            if any(info["pid"] == pid for info in infos):
                held.add(Path(path).relative_to(repo).as_posix())
    return held


def _assert_nothing_half_written(repo, lock, before):
    assert (repo / "dvc.lock").read_bytes() == lock, "dvc.lock changed"
    status = json.loads(sh("dvc status train --json", repo, env=_env(repo)).stdout)
    assert "train" in status, status
    now = _snapshot(repo)
    for out in TRAIN_OUTS:
        present = {k: v for k, v in now.items() if k == out or k.startswith(out + "/")}
        old = {k: v for k, v in before.items() if k == out or k.startswith(out + "/")}
        assert present in ({}, old), f"{out} is neither absent nor its previous version"


@pytest.fixture(scope="module")
def repos(tmp_path_factory):
    """A repository whose `train` stage last finished with BEFORE, and a never-run copy of it.

    The copy is taken before anything runs, so it holds the very same code (the checkout it
    comes from may be edited meanwhile).
    """
    root = tmp_path_factory.mktemp("kill")
    repo = make_repo(root / "repo", BEFORE)
    shutil.copytree(repo, root / "fresh", symlinks=True)
    proc = sh("dvc repro train", repo, env=_env(repo))
    assert "[train] done." in proc.stdout
    return repo, root / "fresh"


@pytest.fixture(scope="module")
def repo(repos):
    return repos[0]


def _change_train_params(repo, params):
    """Write ``params``; returns dvc.lock and train's outputs as they are before train re-runs.

    The stages upstream of train (search also depends on the ``train`` section) are brought up
    to date first, so that the lock recorded here is the one a killed `train` must leave alone,
    byte for byte.
    """
    before = _snapshot(repo)
    _set_params(repo, params)
    sh(["dvc", "repro", *_upstream(repo)], repo, env=_env(repo))
    return (repo / "dvc.lock").read_bytes(), before


def test_kill_9_mid_fit_keeps_the_lock_and_the_rerun_matches_a_clean_run(repos):
    repo, fresh = repos
    lock, before = _change_train_params(repo, AFTER)
    assert before and json.loads(before["metrics/train.json"])["epochs"] == 2

    # dvc, its shell and the stage, all at once (the job, the session or the machine dies)
    repro = Repro(repo)
    repro.wait_for_epoch(2)
    stage = repro.stage_process()
    os.killpg(repro.proc.pid, signal.SIGKILL)
    assert repro.wait() == -signal.SIGKILL
    psutil.wait_procs([stage], timeout=30)
    assert not stage.is_running()
    _assert_nothing_half_written(repo, lock, before)
    assert set(TRAIN_OUTS) <= _locked_by(repo, repro.proc.pid)  # the dead dvc's entries stay

    # a plain rerun works: where the dead pid's entries are in its way (train's outs) dvc sees
    # that the process is gone and drops them with a warning; the stage really runs
    rerun = sh("dvc repro train", repo, env=_env(repo))
    assert "Running stage 'train'" in rerun.stdout and "[train] done." in rerun.stdout
    assert "had been killed. Auto removed it from the lock file" in rerun.stderr + rerun.stdout
    assert not set(TRAIN_OUTS) & _locked_by(repo, repro.proc.pid)
    assert not _staging_dirs(repo)
    assert sh("dvc status train --json", repo, env=_env(repo)).stdout.strip() == "{}"

    # ... and it gives what a clean run of AFTER gives in a fresh repository. It shares the
    # cache, so the stages upstream are restored from the run cache; train runs for real.
    _set_params(fresh, AFTER)
    sh(f"dvc cache dir {repo / '.dvc' / 'cache'}", fresh)
    sh(["dvc", "repro", *_upstream(fresh)], fresh, env=_env(fresh))
    clean = sh("dvc repro --no-run-cache train", fresh, env=_env(fresh))
    assert "Running stage 'train'" in clean.stdout and "[train] done." in clean.stdout
    _assert_same_training(repo, fresh)


def _assert_same_training(a, b):
    got, want = _snapshot(a), _snapshot(b)
    metrics = [json.loads(s[("metrics/train.json")]) for s in (got, want)]
    for m in metrics:
        m.pop("fit_seconds")  # wall time
    assert metrics[0] == metrics[1] and metrics[0]["epochs"] == AFTER["train"]["max_epochs"]
    assert (got["plots/train/learning_curves.csv"]
            == want["plots/train/learning_curves.csv"])  # every epoch's losses, to the digit
    # the saved model byte for byte: same file names (content-addressed), same bytes (no
    # durations, memory addresses or timestamps), so DVC records the same hash for it
    model = {k: v for k, v in got.items() if k.startswith("models/model/")}
    assert model and model == {k: v for k, v in want.items() if k.startswith("models/model/")}
    from safetensors.numpy import load as load_tensors

    weights = [[load_tensors(v) for k, v in sorted(s.items()) if k.endswith(".safetensors")]
               for s in (got, want)]
    assert len(weights[0]) == len(weights[1]) == 1
    (w0,), (w1,) = weights
    assert w0.keys() == w1.keys()
    for name in w0:
        np.testing.assert_array_equal(w0[name], w1[name], err_msg=name)
    import nnpipe
    from nnpipe.data import read_dataset

    ds = read_dataset(b / "data/prepared")
    proba = [nnpipe.load(r / "models/model").predict_proba(ds.X_test) for r in (a, b)]
    np.testing.assert_array_equal(proba[0], proba[1])


#: how dvc reports the stage's end, by the shell it runs the stage's cmd with ($SHELL; /bin/sh,
#: which is dash on Debian, when unset). bash runs a single command in place of itself, so dvc
#: sees the stage's own exit status; dash stays in between, and a non-interactive dash dies of
#: the terminal's SIGINT itself (dvc then reports -2), while the stage, which got the same SIGINT,
#: still cleans up and exits 130 on its own.
SHELLS = {"bash": "exited with 130", "dash": "exited with -2"}


@pytest.mark.parametrize("shell", [pytest.param(s, marks=pytest.mark.skipif(
    not shutil.which(s), reason=f"{s} is not installed")) for s in SHELLS])
def test_ctrl_c_in_the_terminal_exits_nonzero_and_keeps_the_lock(repo, shell):
    """SIGINT to dvc's whole process group, as a terminal's Ctrl-C sends it.

    dvc ignores SIGINT while a stage command runs; the stage gets it, discards what it staged and
    exits 130 (skorch alone would swallow it and save a half-trained model), and dvc fails.
    """
    params = yaml.safe_load((repo / "params.yaml").read_text())
    # a version never run in this repo (one lr per shell), far too long to end before the
    # signal, however loaded the machine (200 epochs of the tiny MLP take 4 s)
    lr = 0.02 + 0.01 * list(SHELLS).index(shell)
    params["train"] = {**AFTER["train"], "lr": lr, "max_epochs": 100_000}
    lock, before = _change_train_params(repo, params)
    repro = Repro(repo, shutil.which(shell))
    repro.wait_for_epoch(2)
    stage = repro.stage_process()
    os.killpg(repro.proc.pid, signal.SIGINT)
    code = repro.wait()
    assert code not in (0, None) and code != -signal.SIGINT, repro.output  # dvc reported it
    # the stage may outlive a dash that died first: it ends on its own, after its cleanup
    _, alive = psutil.wait_procs([stage], timeout=60)
    assert not alive, repro.output
    assert "[train] interrupted: no output was written." in repro.output
    assert SHELLS[shell] in repro.output, repro.output
    assert "[train] done." not in repro.output
    _assert_nothing_half_written(repo, lock, before)
    assert not _staging_dirs(repo)

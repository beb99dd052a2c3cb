"""The tracking server is down, or dies mid-run (issue #7, item 7): training never notices.

The real train stage (``dvc.yaml``'s command, run as a process) logs to an MLflow URL where
nothing listens, or to a real ``mlflow server`` that is SIGKILLed after a few epochs. The stage
exits 0, tells the user how to sync, and keeps what it could not send in
``metrics/mlflow_outbox``. ``python -m nnpipe.tracking sync`` (the command the stage printed) then
puts every epoch on the server exactly once, in the right run; syncing again adds nothing.
"""

import copy
import json
import os
import re
import shlex
import signal
import socket
import sqlite3
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

from tests.pipeline.conftest import TINY, make_repo, sh, stage_env

mlflow = pytest.importorskip("mlflow")
from mlflow.tracking import MlflowClient  # noqa: E402

pytestmark = pytest.mark.slow

EPOCHS = 60
EPOCH_KEYS = ("train_loss", "valid_loss", "valid_acc")
RUN_NAME = "train · mlp · digits · lr=0.01"  # what ran (TINY's model, data and lr)
SYNC = re.compile(r"`(python -m nnpipe\.tracking sync [^`]+)`")


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(repo, uri=None):
    env = stage_env(repo)
    env["OMP_NUM_THREADS"] = "1"  # 2 shared cores: no oversubscribed intra-op threads
    if uri:
        env["MLFLOW_TRACKING_URI"] = uri
    return env


class Server:
    """A real ``mlflow server`` on a sqlite store; it can be SIGKILLed and restarted."""

    def __init__(self, root: Path):
        self.root, self.port = root, _free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.db = root / "m.db"
        self.proc = None

    def start(self, timeout=240):
        env = dict(os.environ, MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false")
        env.pop("MLFLOW_TRACKING_URI", None)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "mlflow", "server", "--backend-store-uri",
             f"sqlite:///{self.db}", "--artifacts-destination", str(self.root / "artifacts"),
             "--host", "127.0.0.1", "--port", str(self.port), "--workers", "1"],
            cwd=self.root, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
            start_new_session=True)
        deadline = time.monotonic() + timeout
        while True:
            try:
                urllib.request.urlopen(self.uri + "/health", timeout=2)
                return self
            except OSError:
                assert self.proc.poll() is None, self.proc.stderr.read().decode()[-3000:]
                assert time.monotonic() < deadline, "mlflow server did not start"
                time.sleep(0.5)

    @property
    def up(self):
        return self.proc is not None and self.proc.poll() is None

    def kill(self):
        """SIGKILL the server and its uvicorn worker: no shutdown, no goodbye."""
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=30)
        self.proc.stderr.close()

    def steps(self, key="train_loss", exclude=()):
        """Steps of ``key`` in the store by run (but runs in ``exclude``), read from its file."""
        found = {}
        try:
            with sqlite3.connect(f"file:{self.db}?mode=ro", uri=True, timeout=1) as db:
                for run, step in db.execute("SELECT run_uuid, step FROM metrics WHERE key = ?",
                                            (key,)):
                    if run not in exclude:
                        found.setdefault(run, []).append(step)
        except sqlite3.OperationalError:  # locked for a moment
            pass
        return {run: sorted(steps) for run, steps in found.items()}


def _upstream(repo, stage="train"):
    """The stages whose outputs ``stage`` depends on (read from dvc.yaml)."""
    stages = yaml.safe_load((repo / "dvc.yaml").read_text())["stages"]
    deps = set(stages[stage].get("deps", []))
    return [name for name, s in stages.items() if name != stage and deps & {
        o if isinstance(o, str) else next(iter(o)) for o in s.get("outs", [])}]


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    params = copy.deepcopy(TINY)
    params["ensemble"] = {"enabled": False}
    params["train"] = {**params["train"], "max_epochs": EPOCHS}
    params["tracking"] = {"enabled": True, "experiment": "tiny"}
    repo = make_repo(tmp_path_factory.mktemp("down") / "repo", params)
    sh(["dvc", "repro", *_upstream(repo)], repo, env=_env(repo))  # train is run by hand
    return repo


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    server = Server(tmp_path_factory.mktemp("mlflow"))
    yield server
    if server.up:
        server.kill()


def _train_cmd(repo):
    """The train stage's command from dvc.yaml, as dvc runs it."""
    cmd = shlex.split(yaml.safe_load((repo / "dvc.yaml").read_text())["stages"]["train"]["cmd"])
    assert cmd[0] == "python"
    return [sys.executable, *cmd[1:]]


def _outbox(repo):
    return sorted((repo / "metrics" / "mlflow_outbox").glob("*.jsonl"))


def _records(path):
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _steps(records, key="train_loss"):
    return sorted(r["step"] for r in records if r["type"] == "metrics" and key in r["metrics"])


def _sync(repo, stderr):
    """Run the sync command the stage printed, as the user would (from the repo root)."""
    commands = set(SYNC.findall(stderr))
    assert len(commands) == 1, stderr  # told once, with one command
    cmd = shlex.split(commands.pop())
    return sh([sys.executable, *cmd[1:]], repo, env=_env(repo))


def _train_runs(client):
    exp = client.get_experiment_by_name("tiny")
    if exp is None:
        return []
    return client.search_runs([exp.experiment_id], "tags.`nnpipe.stage` = 'train'")


def _models(client, run):
    return client.search_logged_models([run.info.experiment_id],
                                       filter_string=f"source_run_id = '{run.info.run_id}'")


def _assert_every_epoch_once(client, run_id, records=None):
    for key in EPOCH_KEYS:
        history = client.get_metric_history(run_id, key)
        assert sorted(m.step for m in history) == list(range(1, EPOCHS + 1)), key
        if records is not None:  # and with the values (and times) the stage logged
            logged = {(r["step"], r["timestamp"], r["metrics"][key]) for r in records
                      if r["type"] == "metrics" and key in r["metrics"]}
            assert logged <= {(m.step, m.timestamp, m.value) for m in history}, key


def test_unreachable_server_keeps_every_epoch_in_the_outbox_and_sync_replays_it_once(
        repo, server):
    assert not server.up  # nothing listens on its port yet
    assert not _outbox(repo)  # nothing went offline before
    proc = sh(_train_cmd(repo), repo, env=_env(repo, server.uri))
    assert "[train] done." in proc.stdout
    assert proc.stderr.count("TrackingWarning") == 1, proc.stderr  # warned once
    assert f"MLflow at {server.uri} failed" in proc.stderr

    # everything is kept on disk
    (path,) = _outbox(repo)
    assert str(path) in proc.stderr
    records = _records(path)
    (run,) = [r for r in records if r["type"] == "run"]
    assert run["name"] == RUN_NAME and run["mlflow_run_id"] is None
    assert run["tags"]["nnpipe.stage"] == "train"
    assert run["params"]["train.max_epochs"] == EPOCHS and "model.module" in run["params"]
    for key in EPOCH_KEYS:
        assert _steps(records, key) == list(range(1, EPOCHS + 1)), key
    curves = (repo / "plots/train/learning_curves.csv").read_text().splitlines()[1:]
    assert [float(line.split(",")[1]) for line in curves] == pytest.approx(
        [r["metrics"]["train_loss"] for r in records if r["type"] == "metrics" and r["step"]])
    assert records[-1]["type"] == "end" and records[-1]["status"] == "FINISHED"
    outbox = path.parent
    kept = {p: p.read_bytes() for p in outbox.rglob("*") if p.is_file()}  # with the model copy
    assert any(p.name == "learning_curves.png" for p in kept), "the plot was not kept"

    server.start()
    synced = _sync(repo, proc.stderr)
    assert "synced 1 run" in synced.stdout and not _outbox(repo)
    client = MlflowClient(server.uri)
    (got,) = _train_runs(client)
    assert got.info.status == "FINISHED" and got.info.run_name == RUN_NAME
    (dataset,) = got.inputs.dataset_inputs  # the training data, logged by the sync too
    assert dataset.dataset.name == "digits" and dataset.tags[0].value == "training"
    assert got.data.params == {k: str(v) for k, v in run["params"].items()}
    _assert_every_epoch_once(client, got.info.run_id, records)
    assert got.data.metrics["final_epochs"] == EPOCHS
    assert {a.path for a in client.list_artifacts(got.info.run_id)} >= {"learning_curves.png"}
    assert len(got.outputs.model_outputs) == 1  # the model, logged by the sync

    # syncing again adds nothing: the outbox is empty; and the same outbox again (as a sync
    # killed after replaying, before deleting its file, leaves it) continues the same run and
    # duplicates nothing
    again = sh([sys.executable, "-m", "nnpipe.tracking", "sync", "--uri", server.uri], repo,
               env=_env(repo))
    assert "synced 0 runs" in again.stdout
    for p, data in kept.items():
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)
    again = sh([sys.executable, "-m", "nnpipe.tracking", "sync", "--uri", server.uri], repo,
               env=_env(repo))
    assert "synced 1 run" in again.stdout and not _outbox(repo)
    assert "no longer exists" not in again.stderr  # the kept model and plot were there
    (same,) = _train_runs(client)
    assert same.info.run_id == got.info.run_id and same.data.params == got.data.params
    _assert_every_epoch_once(client, got.info.run_id, records)
    assert len(same.outputs.model_outputs) == 1 and len(_models(client, same)) == 1


def test_server_killed_mid_run_the_rest_goes_to_the_outbox_and_sync_completes_the_run(
        repo, server):
    if not server.up:
        server.start()
    client = MlflowClient(server.uri)
    runs_before = {r.info.run_id for r in _train_runs(client)}

    stage = subprocess.Popen(_train_cmd(repo), cwd=repo, env=_env(repo, server.uri),
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 300  # a hang guard, not a timing check
        while sum(map(len, server.steps(exclude=runs_before).values())) < 3:  # a few epochs
            assert stage.poll() is None, stage.communicate()
            assert time.monotonic() < deadline, "no epoch reached the server"
            time.sleep(0.1)
        server.kill()
        out, err = stage.communicate(timeout=300)
    finally:
        if stage.poll() is None:
            stage.kill()
            stage.wait()
    assert stage.returncode == 0, err
    assert "[train] done." in out
    assert err.count("TrackingWarning") == 1 and "failed while logging metrics" in err, err

    ((run_id, online),) = server.steps(exclude=runs_before).items()  # read from its file
    (path,) = _outbox(repo)
    records = _records(path)
    (run,) = [r for r in records if r["type"] == "run"]
    assert run["mlflow_run_id"] == run_id  # the outbox continues the run the server has
    offline = _steps(records)
    assert online and offline and offline[-1] == EPOCHS  # the stop really was mid-run
    assert sorted(set(online) | set(offline)) == list(range(1, EPOCHS + 1))

    server.start()  # the same store, the same address
    assert client.get_run(run_id).info.status == "RUNNING"  # its end is in the outbox
    synced = _sync(repo, err)
    assert "synced 1 run" in synced.stdout and not _outbox(repo)
    assert {r.info.run_id for r in _train_runs(client)} - runs_before == {run_id}
    got = client.get_run(run_id)
    assert got.info.status == "FINISHED"
    _assert_every_epoch_once(client, run_id, records)
    assert got.data.metrics["final_epochs"] == EPOCHS
    assert len(got.outputs.model_outputs) == 1

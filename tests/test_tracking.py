"""MLflow tracking: runs, nested runs, epoch metrics, models, and the offline outbox.

Everything is checked through ``MlflowClient`` against a sqlite store in a temporary directory.
The store is created once per module (MLflow's first use of a sqlite file runs its migrations);
each test logs to its own experiment.
"""

import json
import os
import socket
import subprocess
import sys
import time
import uuid
import warnings
from pathlib import Path

import numpy as np
import pytest

mlflow = pytest.importorskip("mlflow")
from mlflow.tracking import MlflowClient  # noqa: E402

import nnpipe  # noqa: E402
from nnpipe import NNClassifier  # noqa: E402
from nnpipe._mlflow import _global_tracking_uri  # noqa: E402
from nnpipe.tracking import (  # noqa: E402
    PARAM_VALUE_LIMIT, Tracker, TrackingWarning, flatten, main, sync_outbox, tracking_uri,
)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """A sqlite tracking store shared by the module's tests: ``(uri, client)``."""
    path = tmp_path_factory.mktemp("mlflow")
    uri = f"sqlite:///{path}/mlflow.db"
    client = MlflowClient(uri)
    client.search_experiments()  # run the migrations once
    return uri, client


@pytest.fixture
def experiment():
    return f"test-{uuid.uuid4().hex[:8]}"


@pytest.fixture
def data():
    rng = np.random.RandomState(0)
    X = rng.normal(size=(80, 5)).astype(np.float32)
    y = (X[:, 0] + X[:, 1] > 0).astype(np.int64)
    return X, y


@pytest.fixture
def down_uri():
    """An http URI on a local port where nothing listens."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}"


def _runs(client, experiment):
    exp = client.get_experiment_by_name(experiment)
    assert exp is not None, f"experiment {experiment} was not created"
    return {r.info.run_name: r for r in client.search_runs([exp.experiment_id])}


def _history(client, run_id, key):
    return [(m.step, m.value) for m in sorted(client.get_metric_history(run_id, key),
                                              key=lambda m: m.step)]


def _git_head():
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True)
    except OSError:
        return None
    return out.stdout.strip() if out.returncode == 0 else None


# --------------------------------------------------------------------------- flatten


def test_flatten_nested_dicts_lists_and_long_values():
    flat = flatten({"train": {"lr": 0.001, "opt": {"name": "adam"}, "layers": [64, 32]},
                    "seed": 0, "aug": (1, "a"), "empty": {}, "path": Path("a/b")})
    assert flat == {"train.lr": 0.001, "train.opt.name": "adam", "train.layers": "[64, 32]",
                    "seed": 0, "aug": '[1, "a"]', "empty": "{}", "path": "a/b"}
    assert flatten({"a": {"b": 1}}, sep="/") == {"a/b": 1}

    from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH

    assert PARAM_VALUE_LIMIT == MAX_PARAM_VAL_LENGTH
    long = flatten({"x": "y" * 10_000})["x"]
    assert len(long) == PARAM_VALUE_LIMIT and "truncated" in long and "10000" in long


def test_flatten_errors_name_the_argument():
    with pytest.raises(ValueError, match="mapping must be a dict"):
        flatten([1, 2])
    with pytest.raises(ValueError, match="sep must be a non-empty string"):
        flatten({}, sep="")


# --------------------------------------------------------------------------- online runs


def test_run_params_epoch_metrics_tags_and_children(store, experiment, data, tmp_path,
                                                    monkeypatch):
    uri, client = store
    X, y = data
    monkeypatch.setenv("DVC_EXP_NAME", "exp-123")
    (tmp_path / "report.txt").write_text("hello")
    with Tracker("train", params={"train": {"lr": 0.01, "layers": [8, 4]}, "seed": 0},
                 experiment=experiment, uri=uri, tags={"owner": "me"},
                 outbox=tmp_path / "outbox") as run:
        clf = NNClassifier(max_epochs=3, random_state=0, callbacks=[run.epoch_logger()])
        clf.fit(X, y)
        run.log_params({"data": {"n": len(X)}})
        run.set_tags({"phase": "fit"})
        run.log_artifact(tmp_path / "report.txt")
        for k in range(2):
            with run.child(f"fold-{k}", params={"fold": k}) as fold:
                fold.log_metrics({"acc": 0.5 + k / 10}, step=k)
    assert not run.offline and not (tmp_path / "outbox").exists()

    runs = _runs(client, experiment)
    assert set(runs) == {"train", "fold-0", "fold-1"}
    parent = runs["train"]
    assert parent.info.run_id == run.run_id and parent.info.status == "FINISHED"
    assert parent.data.params == {"train.lr": "0.01", "train.layers": "[8, 4]", "seed": "0",
                                  "data.n": "80"}
    tags = parent.data.tags
    assert tags["nnpipe.stage"] == "train" and tags["owner"] == "me" and tags["phase"] == "fit"
    assert tags["nnpipe.dvc_experiment"] == "exp-123"
    assert tags.get("mlflow.source.git.commit") == _git_head()
    assert "mlflow.parentRunId" not in tags

    # one point per epoch, step = epoch, values = skorch's history
    train_loss = _history(client, run.run_id, "train_loss")
    assert [s for s, _ in train_loss] == [1, 2, 3]
    assert [v for _, v in train_loss] == list(clf.history[:, "train_loss"])
    assert [s for s, _ in _history(client, run.run_id, "valid_acc")] == [1, 2, 3]
    assert "epoch" not in parent.data.metrics and "valid_loss_best" not in parent.data.metrics
    assert [a.path for a in client.list_artifacts(run.run_id)] == ["report.txt"]

    for k in range(2):
        fold = runs[f"fold-{k}"]
        assert fold.data.tags["mlflow.parentRunId"] == run.run_id
        assert fold.data.tags["nnpipe.stage"] == "train"
        assert fold.data.params == {"fold": str(k)} and fold.info.status == "FINISHED"
        assert _history(client, fold.info.run_id, "acc") == [(k, 0.5 + k / 10)]


def test_epoch_logger_survives_sklearn_clone(store, experiment, tmp_path):
    from sklearn.base import clone

    uri, _ = store
    with Tracker("clone", experiment=experiment, uri=uri, outbox=tmp_path) as run:
        clf = NNClassifier(max_epochs=2, callbacks=[run.epoch_logger(prefix="m/")])
        copy = clone(clf)
        assert copy.callbacks[0].tracker is run and copy.callbacks[0].prefix == "m/"


def test_status_failed_or_killed_when_the_body_raises(store, experiment, tmp_path):
    uri, client = store
    with pytest.raises(ValueError, match="boom"):
        with Tracker("fails", experiment=experiment, uri=uri, outbox=tmp_path) as run:
            run.log_metrics({"loss": 1.0}, step=1)
            with run.child("member-0") as member:
                raise ValueError("boom")
    with pytest.raises(KeyboardInterrupt):
        with Tracker("stopped", experiment=experiment, uri=uri, outbox=tmp_path) as stopped:
            open_child = stopped.child("never-closed")
            open_child.log_metrics({"x": 1.0})  # starts itself; ends with its parent
            raise KeyboardInterrupt
    runs = _runs(client, experiment)
    assert runs["fails"].info.status == "FAILED" and runs["member-0"].info.status == "FAILED"
    assert "ValueError: boom" in runs["fails"].data.tags["nnpipe.error"]
    assert member.status == "FAILED" and run.status == "FAILED"
    assert runs["stopped"].info.status == "KILLED"
    assert runs["never-closed"].info.status == "KILLED"
    assert runs["never-closed"].data.tags["mlflow.parentRunId"] == stopped.run_id


def test_misuse_raises_clear_errors(store, experiment, tmp_path):
    uri, _ = store
    with pytest.raises(ValueError, match="stage must be a non-empty string"):
        Tracker("", uri=uri)
    run = Tracker("misuse", experiment=experiment, uri=uri, outbox=tmp_path)
    with pytest.raises(RuntimeError, match="never started"):
        run.log_metrics({"a": 1.0})
    with run:
        with pytest.raises(ValueError, match=r"metrics\['a'\] must be a real number"):
            run.log_metrics({"a": "high"})
        with pytest.raises(ValueError, match="step must be an int"):
            run.log_metrics({"a": 1.0}, step=1.5)
        with pytest.raises(ValueError, match="path must be an existing file"):
            run.log_artifact(tmp_path / "missing.txt")
    with pytest.raises(RuntimeError, match="has ended"):
        run.log_metrics({"a": 1.0})


def test_rejected_request_warns_and_stays_online(store, experiment, tmp_path):
    uri, client = store
    with Tracker("reject", params={"lr": 0.1}, experiment=experiment, uri=uri,
                 outbox=tmp_path / "outbox") as run:
        with pytest.warns(TrackingWarning, match="rejected"):
            run.log_params({"lr": 0.2})  # MLflow refuses to change a logged param
        run.log_metrics({"after": 1.0})
    assert not run.offline and not (tmp_path / "outbox").exists()
    logged = client.get_run(run.run_id)
    assert logged.data.params["lr"] == "0.1" and logged.data.metrics["after"] == 1.0


# --------------------------------------------------------------------------- models


def test_log_model_loads_as_pyfunc_and_predicts_the_same(store, experiment, data, tmp_path):
    uri, client = store
    X, y = data
    clf = NNClassifier(max_epochs=3, random_state=0).fit(X, y)
    model_dir = nnpipe.save(clf, tmp_path / "model")
    with Tracker("model", experiment=experiment, uri=uri, outbox=tmp_path / "outbox") as run:
        model_uri = run.log_model(model_dir)
    assert model_uri and model_uri.startswith("models:/")
    logged = client.get_run(run.run_id)
    assert logged.info.status == "FINISHED"
    assert [o.model_id for o in logged.outputs.model_outputs] == [model_uri.split("/")[-1]]

    with _global_tracking_uri(uri):  # mlflow.set_tracking_uri(uri), restored afterwards
        model = mlflow.pyfunc.load_model(model_uri)
    np.testing.assert_array_equal(model.predict(X), clf.predict(X))
    import pandas as pd

    np.testing.assert_array_equal(model.predict(pd.DataFrame(X)), clf.predict(X))
    # the artifacts live next to the database, not under the working directory
    artifact_root = Path(uri[len("sqlite:///"):]).parent / "mlruns"
    assert any(artifact_root.rglob("model.json"))


# --------------------------------------------------------------------------- server down


def _fake_stage(uri, outbox, experiment, model_dir=None):
    with Tracker("train", params={"train": {"lr": 0.01}}, experiment=experiment, uri=uri,
                 outbox=outbox) as run:
        for epoch in (1, 2, 3):
            run.log_metrics({"loss": 1.0 / epoch}, step=epoch)
        for k in range(2):
            with run.child(f"fold-{k}", params={"fold": k}) as fold:
                fold.log_metrics({"acc": 0.7 + k / 10}, step=k + 1)
        run.set_tags({"phase": "done"})
        if model_dir is not None:
            assert run.log_model(model_dir) is None
    return run


def test_server_down_goes_offline_then_sync_replays(store, experiment, data, tmp_path,
                                                   down_uri, monkeypatch):
    uri, client = store
    X, y = data
    monkeypatch.delenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", raising=False)
    monkeypatch.delenv("MLFLOW_HTTP_REQUEST_TIMEOUT", raising=False)
    clf = NNClassifier(max_epochs=2, random_state=0).fit(X, y)
    model_dir = nnpipe.save(clf, tmp_path / "model")
    outbox = tmp_path / "outbox"

    start = time.monotonic()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run = _fake_stage(down_uri, outbox, experiment, model_dir)
    elapsed = time.monotonic() - start
    assert elapsed < 20, f"an unreachable server cost {elapsed:.1f} s"
    ours = [w for w in caught if issubclass(w.category, TrackingWarning)]
    assert len(ours) == 1, [str(w.message) for w in ours]  # warned once, for the whole tree
    message = str(ours[0].message)
    assert down_uri in message and str(run.outbox_file) in message
    assert run.offline and run.run_id is None and run.status == "FINISHED"
    # the environment is as it was
    assert "MLFLOW_HTTP_REQUEST_MAX_RETRIES" not in os.environ
    assert "MLFLOW_HTTP_REQUEST_TIMEOUT" not in os.environ

    files = list(outbox.glob("*.jsonl"))
    assert files == [run.outbox_file]
    records = [json.loads(line) for line in files[0].read_text().splitlines()]
    assert {r["type"] for r in records} == {"run", "metrics", "tags", "model", "end"}
    assert sum(r["type"] == "run" for r in records) == 3

    assert sync_outbox(outbox, uri=uri) == 3
    assert not list(outbox.glob("*.jsonl"))
    runs = _runs(client, experiment)
    assert set(runs) == {"train", "fold-0", "fold-1"}
    parent = runs["train"]
    assert parent.info.status == "FINISHED"
    assert parent.data.params == {"train.lr": "0.01"} and parent.data.tags["phase"] == "done"
    assert _history(client, parent.info.run_id, "loss") == [(1, 1.0), (2, 0.5), (3, 1 / 3)]
    for k in range(2):
        fold = runs[f"fold-{k}"]
        assert fold.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert fold.info.status == "FINISHED" and fold.data.params == {"fold": str(k)}
        assert _history(client, fold.info.run_id, "acc") == [(k + 1, 0.7 + k / 10)]
    assert len(parent.outputs.model_outputs) == 1  # the model was logged by the sync
    assert sync_outbox(outbox, uri=uri) == 0


def test_a_server_that_never_answers_costs_one_timeout(tmp_path, monkeypatch, experiment):
    monkeypatch.delenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", raising=False)
    monkeypatch.delenv("MLFLOW_HTTP_REQUEST_TIMEOUT", raising=False)
    with socket.socket() as server:  # accepts connections (backlog), never replies
        server.bind(("127.0.0.1", 0))
        server.listen(16)
        uri = f"http://127.0.0.1:{server.getsockname()[1]}"
        start = time.monotonic()
        with pytest.warns(TrackingWarning, match="failed while creating run"):
            run = _fake_stage(uri, tmp_path / "outbox", experiment)
        elapsed = time.monotonic() - start
    assert elapsed < 15, f"a silent server cost {elapsed:.1f} s"  # one 5 s timeout, then offline
    assert run.offline and run.outbox_file.exists()


def test_user_http_settings_are_kept(tmp_path, down_uri, monkeypatch, experiment):
    monkeypatch.delenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", raising=False)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "7")
    with pytest.warns(TrackingWarning, match="failed while creating run"):
        with Tracker("env", experiment=experiment, uri=down_uri, outbox=tmp_path) as run:
            assert os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] == "0"
            assert os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] == "7"
            run.log_metrics({"a": 1.0})
    assert "MLFLOW_HTTP_REQUEST_MAX_RETRIES" not in os.environ
    assert os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] == "7"


def test_server_lost_mid_run_sync_continues_the_same_run(store, experiment, tmp_path):
    uri, client = store
    outbox = tmp_path / "outbox"
    with Tracker("train", experiment=experiment, uri=uri, outbox=outbox) as run:
        run.log_metrics({"loss": 1.0}, step=1)

        def down(*args, **kwargs):
            raise ConnectionError("connection reset by peer")

        run._tree.client().log_batch = down  # the server goes away
        with pytest.warns(TrackingWarning, match="connection reset"):
            run.log_metrics({"loss": 0.5}, step=2)
        with run.child("fold-0") as fold:
            fold.log_metrics({"acc": 0.9}, step=1)
    assert run.offline
    assert client.get_run(run.run_id).info.status == "RUNNING"  # the end went to the outbox

    assert sync_outbox(outbox, uri=uri) == 2
    runs = _runs(client, experiment)
    assert set(runs) == {"train", "fold-0"}  # continued, not duplicated
    assert runs["train"].info.run_id == run.run_id and runs["train"].info.status == "FINISHED"
    assert _history(client, run.run_id, "loss") == [(1, 1.0), (2, 0.5)]
    assert runs["fold-0"].data.tags["mlflow.parentRunId"] == run.run_id
    assert _history(client, runs["fold-0"].info.run_id, "acc") == [(1, 0.9)]


def test_sync_leaves_a_live_stage_file_alone_and_cli(store, experiment, tmp_path, down_uri,
                                                     capsys):
    uri, client = store
    outbox = tmp_path / "outbox"
    with pytest.warns(TrackingWarning):
        with Tracker("live", experiment=experiment, uri=down_uri, outbox=outbox) as run:
            run.log_metrics({"a": 1.0}, step=1)
            if sys.platform != "win32":
                with pytest.warns(TrackingWarning, match="being written"):
                    assert sync_outbox(outbox, uri=uri) == 0
                assert run.outbox_file.exists()
    assert main(["sync", "--outbox", str(outbox), "--uri", uri]) == 0
    assert "synced 1 run from" in capsys.readouterr().out
    assert not run.outbox_file.exists()
    assert _history(client, _runs(client, experiment)["live"].info.run_id, "a") == [(1, 1.0)]


# --------------------------------------------------------------------------- tracking_uri


def test_tracking_uri_env_wins(monkeypatch, tmp_path):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://tracking:5000")
    assert tracking_uri(tmp_path) == "http://tracking:5000"


def test_tracking_uri_is_absolute_sqlite_at_git_root(monkeypatch, tmp_path):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path.parent))
    if subprocess.run(["git", "init", "-q", str(tmp_path)], capture_output=True).returncode:
        pytest.skip("git is not available")
    sub = tmp_path / "src" / "deep"
    sub.mkdir(parents=True)
    expected = f"sqlite:///{tmp_path.resolve()}/mlflow.db"
    assert tracking_uri(sub) == expected
    monkeypatch.chdir(sub)
    assert tracking_uri() == expected
    assert expected.startswith("sqlite:////")  # absolute path: four slashes


def test_tracking_uri_inside_a_dvc_queue_copy_points_to_the_original_repo(monkeypatch, tmp_path):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    temp_copy = tmp_path / ".dvc" / "tmp" / "exps" / "tmpabc"
    (temp_copy / "stage").mkdir(parents=True)
    subprocess.run(["git", "init", "-q", str(temp_copy)], capture_output=True)  # a git clone
    expected = f"sqlite:///{tmp_path.resolve()}/mlflow.db"
    assert tracking_uri(temp_copy) == expected
    assert tracking_uri(temp_copy / "stage") == expected


def test_a_stage_in_a_dvc_queue_copy_keeps_its_outbox_in_the_original_repo(
        store, experiment, monkeypatch, tmp_path, down_uri, capsys):
    """`dvc exp run --queue` runs stages in .dvc/tmp/exps/<copy>, deleted afterwards: offline
    records go to the original repository's metrics/mlflow_outbox, where a plain `sync` there
    finds them."""
    uri, client = store
    root = tmp_path.resolve()
    temp_copy = root / ".dvc" / "tmp" / "exps" / "tmpabc"
    temp_copy.mkdir(parents=True)
    subprocess.run(["git", "init", "-q", str(temp_copy)], capture_output=True)
    monkeypatch.chdir(temp_copy)
    with pytest.warns(TrackingWarning):
        with Tracker("queued", experiment=experiment, uri=down_uri) as run:
            run.log_metrics({"a": 2.0}, step=1)
    assert run.offline and run.outbox_file.parent == root / "metrics" / "mlflow_outbox"
    assert run.outbox_file.exists() and not (temp_copy / "metrics").exists()
    monkeypatch.chdir(root)
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(root.parent))
    assert main(["sync", "--uri", uri]) == 0
    assert f"synced 1 run from {root / 'metrics' / 'mlflow_outbox'}" in capsys.readouterr().out
    assert _history(client, _runs(client, experiment)["queued"].info.run_id, "a") == [(1, 2.0)]
    with pytest.raises(ValueError, match=r"outbox.*a directory path or None"):
        Tracker("bad", uri=uri, outbox=3)


def test_tracking_uri_outside_git_is_the_start_directory(monkeypatch, tmp_path):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path))
    plain = tmp_path / "plain"
    plain.mkdir()
    assert tracking_uri(plain) == f"sqlite:///{plain.resolve()}/mlflow.db"


def test_importing_nnpipe_does_not_import_mlflow():
    code = ("import sys, nnpipe, nnpipe.tracking; "
            "assert 'mlflow' not in sys.modules, 'mlflow imported at import time'")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]

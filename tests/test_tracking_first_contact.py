"""MLflow tracking as a user first meets it (issue #12): runs named by what ran, child statuses,
the dataset and source columns, per-epoch metrics that change per epoch, a model that refuses
input it was not trained on, and an experiment named after the data.

Everything is read back with ``MlflowClient`` from a sqlite store in a temporary directory.
"""

import socket
import uuid
from pathlib import Path

import numpy as np
import pytest
import yaml

mlflow = pytest.importorskip("mlflow")
from mlflow.tracking import MlflowClient  # noqa: E402

import nnpipe  # noqa: E402
from nnpipe import NNClassifier  # noqa: E402
from nnpipe._mlflow import _global_tracking_uri  # noqa: E402
from nnpipe.config import load_config  # noqa: E402
from nnpipe.tracking import Tracker, TrackingWarning, epoch_metrics, sync_outbox  # noqa: E402
from pipelines._stage import NullTracker, log_history, tracker_for  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    path = tmp_path_factory.mktemp("mlflow")
    uri = f"sqlite:///{path}/mlflow.db"
    client = MlflowClient(uri)
    client.search_experiments()  # the migrations, once
    return uri, client


@pytest.fixture
def experiment():
    return f"test-{uuid.uuid4().hex[:8]}"


@pytest.fixture(scope="module")
def digits():
    """The embedded digits, scaled to [0, 1] as the prepare stage does: (X, y)."""
    from sklearn.datasets import load_digits

    X, y = load_digits(return_X_y=True)
    return (X[:300] / 16.0).astype(np.float32), y[:300].astype(np.int64)


def _runs(client, experiment):
    exp = client.get_experiment_by_name(experiment)
    assert exp is not None, f"experiment {experiment} was not created"
    return {r.info.run_name: r for r in client.search_runs([exp.experiment_id])}


def _config(tmp_path, uri, **sections):
    params = {"data": {"source": "digits"}, "model": {"module": "cnn2d"},
              "train": {"lr": 0.005}, "tracking": {"enabled": True, "uri": uri}}
    params.update(sections)
    path = tmp_path / f"params-{uuid.uuid4().hex[:6]}.yaml"
    path.write_text(yaml.safe_dump(params))
    return load_config(path)


# --------------------------------------------------------------------------- 1. names, status


def test_stage_runs_are_named_by_what_ran_with_the_stage_and_source_as_tags(store, tmp_path):
    uri, client = store
    cfg = _config(tmp_path, uri, cv={"folds": 3},
                  ensemble={"enabled": True, "kind": "seeds", "n_members": 4})
    for stage in ("train", "cv", "ensemble"):
        with tracker_for(cfg, stage) as run:
            run.log_metrics({"x": 1.0})
    runs = _runs(client, "nnpipe-digits")
    names = {"train": "train · cnn2d · digits · lr=0.005",
             "cv": "cv · 3 folds · cnn2d · digits · lr=0.005",
             "ensemble": "ensemble · seeds×4 · cnn2d · digits · lr=0.005"}
    for stage, name in names.items():
        tags = runs[name].data.tags
        assert tags["nnpipe.stage"] == stage
        assert tags["mlflow.source.name"] == f"pipelines/{stage}.py"
        assert tags["mlflow.source.type"] == "JOB"


def test_child_status_is_how_a_clean_block_ends_and_a_raise_still_fails(store, experiment,
                                                                       tmp_path):
    uri, client = store
    with Tracker("search", experiment=experiment, uri=uri, outbox=tmp_path,
                 tags={"mlflow.source.name": "pipelines/search.py"}) as run:
        with run.child("pruned", status="KILLED") as pruned:
            pruned.log_metrics({"acc": 0.5}, step=1)
        with run.child("failed", status="FAILED"):
            pass
        with pytest.raises(ValueError, match="boom"):
            with run.child("raised", status="FINISHED"):
                raise ValueError("boom")
        run.child("never-entered", status="KILLED").log_metrics({"a": 1.0})
    runs = _runs(client, experiment)
    assert runs["search"].info.status == "FINISHED"
    assert runs["pruned"].info.status == "KILLED"
    assert runs["failed"].info.status == "FAILED"
    assert runs["raised"].info.status == "FAILED"
    assert runs["never-entered"].info.status == "KILLED"
    for child in ("pruned", "failed", "raised", "never-entered"):  # the source is inherited
        assert runs[child].data.tags["mlflow.source.name"] == "pipelines/search.py"


def test_child_status_refuses_other_values_naming_them(store, experiment, tmp_path):
    uri, _ = store
    allowed = r"one of 'FINISHED', 'FAILED', 'KILLED' or None, got 'PRUNED'"
    with Tracker("bad-status", experiment=experiment, uri=uri, outbox=tmp_path) as run:
        with pytest.raises(ValueError, match=allowed):
            run.child("trial-0", status="PRUNED")
    with pytest.raises(ValueError, match=allowed):
        NullTracker().child("trial-0", status="PRUNED")
    with NullTracker().child("trial-0", params={"a": 1}, status="KILLED") as child:
        child.log_metrics({"a": 1.0})


def test_a_run_left_by_an_error_exit_fails_and_by_a_signal_is_killed(store, experiment,
                                                                    tmp_path):
    uri, client = store
    with pytest.raises(SystemExit):
        with Tracker("exit-1", experiment=experiment, uri=uri, outbox=tmp_path):
            raise SystemExit(1)
    with pytest.raises(SystemExit):
        with Tracker("sigterm", experiment=experiment, uri=uri, outbox=tmp_path):
            raise SystemExit(143)
    runs = _runs(client, experiment)
    assert runs["exit-1"].info.status == "FAILED"
    assert runs["sigterm"].info.status == "KILLED"


# --------------------------------------------------------------------------- 2. dataset


def test_log_dataset_fills_the_dataset_column(store, experiment, digits, tmp_path):
    uri, client = store
    X, y = digits
    with Tracker("data", experiment=experiment, uri=uri, outbox=tmp_path) as run:
        run.log_dataset(X, y, name="digits", source=tmp_path / "train.npz")
        run.log_dataset(X[:50], y[:50], name="digits", source=tmp_path / "test.npz",
                        context="test")
    inputs = client.get_run(run.run_id).inputs.dataset_inputs
    by_context = {i.tags[0].value: i.dataset for i in inputs}
    assert set(by_context) == {"training", "test"}
    train, test = by_context["training"], by_context["test"]
    assert train.name == test.name == "digits"
    assert train.digest and train.digest != test.digest
    assert str(tmp_path / "train.npz") in train.source and train.source_type == "local"
    assert '"shape": [-1, 64]' in train.schema.replace("\\", "")


def test_a_dataset_that_cannot_be_described_warns_and_the_run_goes_on(store, experiment,
                                                                      tmp_path):
    uri, client = store
    with Tracker("empty-data", experiment=experiment, uri=uri, outbox=tmp_path) as run:
        with pytest.warns(TrackingWarning, match=r"could not describe dataset 'digits'.*\(0, 3\)"):
            run.log_dataset(np.empty((0, 3)), name="digits", source=tmp_path / "train.npz")
        run.log_metrics({"after": 1.0})
    logged = client.get_run(run.run_id)
    assert logged.info.status == "FINISHED" and logged.data.metrics["after"] == 1.0
    assert not logged.inputs.dataset_inputs
    with pytest.raises(ValueError, match="context must be a non-empty string"):
        run.log_dataset(np.ones((2, 2)), name="digits", source="x.npz", context="")


def test_the_dataset_and_the_signed_model_go_through_the_outbox(store, experiment, digits,
                                                                tmp_path):
    uri, client = store
    X, y = digits
    model_dir = nnpipe.save(NNClassifier(max_epochs=1, random_state=0, verbose=0).fit(X, y),
                            tmp_path / "model")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        down = f"http://127.0.0.1:{sock.getsockname()[1]}"
    with pytest.warns(TrackingWarning):
        with Tracker("offline", experiment=experiment, uri=down, outbox=tmp_path / "box") as run:
            run.log_dataset(X, y, name="digits", source=tmp_path / "train.npz")
            assert run.log_model(model_dir, X_train=X) is None
    assert run.offline
    assert sync_outbox(tmp_path / "box", uri=uri) == 1
    (synced,) = _runs(client, experiment).values()
    (dataset_input,) = synced.inputs.dataset_inputs
    assert dataset_input.dataset.name == "digits" and dataset_input.tags[0].value == "training"
    (model_output,) = synced.outputs.model_outputs
    with _global_tracking_uri(uri):
        info = mlflow.models.get_model_info(f"models:/{model_output.model_id}")
    assert info.signature is not None and info.saved_input_example_info is not None


# --------------------------------------------------------------------------- 3. epoch metrics


def test_only_what_changes_per_epoch_is_a_per_epoch_metric(store, experiment, digits, tmp_path):
    uri, client = store
    X, y = digits
    with Tracker("epochs", experiment=experiment, uri=uri, outbox=tmp_path) as run:
        with run.child("cosine") as cosine:  # the schedule changes lr every epoch
            NNClassifier(max_epochs=3, lr_schedule="cosine", random_state=0, verbose=0,
                         callbacks=[cosine.epoch_logger()]).fit(X, y)
        with run.child("plateau") as plateau:  # lr is recorded, but never changes
            NNClassifier(max_epochs=3, lr_schedule="plateau", lr_schedule__patience=50,
                         random_state=0, verbose=0,
                         callbacks=[plateau.epoch_logger()]).fit(X, y)
    for child in (cosine, plateau):
        logged = client.get_run(child.run_id).data.metrics
        assert not [k for k in logged if "batch" in k], logged  # batch counts are no metrics
        for key in ("train_loss", "valid_loss", "valid_acc", "dur"):
            steps = [m.step for m in client.get_metric_history(child.run_id, key)]
            assert sorted(steps) == [1, 2, 3], key
    lr = sorted((m.step, m.value) for m in client.get_metric_history(cosine.run_id, "lr"))
    assert [s for s, _ in lr] == [1, 2, 3] and lr[0][1] > lr[1][1] > lr[2][1]
    constant = client.get_metric_history(plateau.run_id, "lr")
    assert [(m.step, m.value) for m in constant] == [(3, 0.001)]  # once, as a final value


def test_log_history_logs_changes_per_epoch_and_constants_once():
    rows = [{"epoch": e, "lr": 0.01, "momentum": 0.9 - e / 10, "train_batch_count": 7,
             "valid_batch_count": 2, "dur": 0.1 * e, "train_loss": 1.0 / e,
             "valid_loss_best": True} for e in (1, 2, 3)]

    class Recorder:
        def __init__(self):
            self.calls = []

        def log_metrics(self, metrics, step=None):
            self.calls.append((step, dict(metrics)))

    recorder = Recorder()
    log_history(recorder, rows)
    per_epoch = [c for c in recorder.calls if "train_loss" in c[1]]
    assert [step for step, _ in per_epoch] == [1, 2, 3]
    assert all(set(m) == {"momentum", "dur", "train_loss"} for _, m in per_epoch)
    assert (3, {"lr": 0.01}) in recorder.calls and len(recorder.calls) == 4
    changing = [dict(r, lr=0.01 / r["epoch"]) for r in rows]
    assert all("lr" in m for _, m in epoch_metrics(changing)[0])


# --------------------------------------------------------------------------- 4. signature


def test_logged_model_has_a_signature_and_refuses_input_it_was_not_trained_on(
        store, experiment, digits, tmp_path):
    from mlflow.exceptions import MlflowException

    uri, _ = store
    X, y = digits
    clf = NNClassifier(max_epochs=2, random_state=0, verbose=0).fit(X, y)
    model_dir = nnpipe.save(clf, tmp_path / "model")
    with Tracker("signed", experiment=experiment, uri=uri, outbox=tmp_path) as run:
        model_uri = run.log_model(model_dir, X_train=X)
    with _global_tracking_uri(uri):
        info = mlflow.models.get_model_info(model_uri)
        model = mlflow.pyfunc.load_model(model_uri)
    assert info.signature is not None
    assert not any(k in MlflowClient(uri).get_run(run.run_id).data.params
                   for k in ("input_range", "range_factor"))  # the range is no run param
    (spec,) = info.signature.inputs.inputs
    assert str(spec.type) == "float32" and tuple(spec.shape) == (-1, 64)
    assert info.saved_input_example_info is not None

    np.testing.assert_array_equal(model.predict(X), clf.predict(X))  # scaled: as in training
    raw = X * 16.0  # raw 0-16 pixels: the mistake the signature alone does not catch
    with pytest.raises(ValueError, match=r"span \[0, 16\].*trained on, \[0, 1\]"):
        model.predict(raw)
    np.testing.assert_array_equal(model.predict(raw, params={"range_factor": 0}),
                                  clf.predict(raw))  # the margin is an inference parameter
    model.predict(raw, params={"range_factor": 20.0})
    with pytest.raises(ValueError, match=r"within \[-2, 2\]"):
        model.predict(X * 2.5, params={"range_factor": 2.0})
    with pytest.raises(MlflowException, match=r"float32.*-1, 64|-1, 64.*float32"):
        model.predict(X[:, :10])  # wrong number of columns
    with pytest.raises(MlflowException, match="float64.*float32"):
        model.predict(X.astype(np.float64))  # wrong dtype
    bad = X[:3].copy()
    bad[1, 5] = np.nan
    with pytest.raises(ValueError, match=r"1 non-finite value.*\(1, 5\)"):
        model.predict(bad)


# --------------------------------------------------------------------------- 5. experiment


def test_the_default_experiment_follows_the_data(store, tmp_path):
    uri, client = store
    csv = tmp_path / "churn.csv"
    csv.write_text("a,b,label\n1,2,0\n3,4,1\n")
    cfg = _config(tmp_path, uri, data={"source": "csv", "path": str(csv), "target": "label"})
    assert cfg.tracking.experiment is None
    with tracker_for(cfg, "train") as run:
        run.log_metrics({"x": 1.0})
    assert run.experiment == "nnpipe-churn"
    assert run.name == "train · cnn2d · churn · lr=0.005"
    assert client.get_run(run.run_id).info.experiment_id == \
        client.get_experiment_by_name("nnpipe-churn").experiment_id
    placeholder = _config(tmp_path, uri, data={"source": "digits", "path": str(tmp_path)})
    assert tracker_for(placeholder, "train").experiment == "nnpipe-digits"  # path: unread
    named = _config(tmp_path, uri, tracking={"enabled": True, "uri": uri, "experiment": "mine"})
    assert tracker_for(named, "train").experiment == "mine"


def test_the_shipped_params_do_not_pin_the_experiment_to_digits():
    tracking = yaml.safe_load((ROOT / "params.yaml").read_text())["tracking"]
    assert "experiment" not in (tracking or {})


# --------------------------------------------------------------------------- the train stage


@pytest.mark.slow  # the real prepare and train stages: ~20 s on 2 shared cores
def test_the_train_stage_logs_a_named_run_its_dataset_and_a_signed_model(store, tmp_path,
                                                                        monkeypatch):
    """The wiring: the real prepare and train stages, read back from the store."""
    from pipelines import prepare, train

    uri, client = store
    monkeypatch.chdir(tmp_path)
    params = {"data": {"source": "digits", "random_state": 0},
              "model": {"module": "mlp", "module__hidden_sizes": [16]},
              "train": {"max_epochs": 2, "lr": 0.02, "lr_schedule": "cosine", "verbose": 0},
              "tracking": {"enabled": True, "uri": uri}}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    data = tmp_path / "data"
    config = ["--params", str(tmp_path / "params.yaml")]
    prepare.main([*config, "--out", str(data)])
    train.main([*config, "--data", str(data), "--model", str(tmp_path / "model"),
                "--metrics", str(tmp_path / "train.json"), "--curves", str(tmp_path / "c.csv"),
                "--plot", str(tmp_path / "c.png")])
    runs = _runs(client, "nnpipe-digits")
    run = runs["train · mlp · digits · lr=0.02"]
    assert run.data.tags["nnpipe.stage"] == "train" and run.info.status == "FINISHED"
    assert run.data.tags["mlflow.source.name"] == "pipelines/train.py"
    (dataset,) = run.inputs.dataset_inputs
    assert dataset.dataset.name == "digits" and dataset.tags[0].value == "training"
    assert str(data / "train.npz") in dataset.dataset.source
    assert [m.step for m in client.get_metric_history(run.info.run_id, "lr")] == [1, 2]
    assert "train_batch_count" not in run.data.metrics
    (model_output,) = run.outputs.model_outputs
    with _global_tracking_uri(uri):
        model = mlflow.pyfunc.load_model(f"models:/{model_output.model_id}")
    X = np.load(data / "test.npz")["X"]
    assert model.metadata.signature is not None
    model.predict(X)
    with pytest.raises(ValueError, match="far outside the range"):
        model.predict(X * 16)

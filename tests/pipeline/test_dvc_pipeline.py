"""The declarative pipeline end to end: dvc repro, caching, exp run, metrics, plots, MLflow."""

import json
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import yaml

from .conftest import ROOT, TINY, sh, stage_env

pytestmark = pytest.mark.slow


def test_repro_runs_every_stage_and_writes_the_declared_outputs(tiny_repo):
    repo, proc = tiny_repo
    for stage in ("prepare", "search", "pretrain", "train", "ensemble", "cv", "evaluate"):
        assert f"Running stage '{stage}'" in proc.stdout
    assert json.loads((repo / "search/best_params.json").read_text()) == {}
    assert json.loads((repo / "models/pretrained/disabled.json").read_text()) == {"enabled": False}
    assert json.loads((repo / "reports/train.json").read_text())["transferred_tensors"] == 0
    ev = json.loads((repo / "reports/evaluate.json").read_text())  # every detail
    assert len(ev["members"]) == 2 and ev["best_single"]["member"] in (0, 1)
    assert ev["ensemble"]["nll"] <= max(m["nll"] for m in ev["members"])
    assert (repo / "models/ensemble/model.json").exists()
    for out in ("data/prepared/train.npz", "models/model/model.json", "metrics/train.json",
                "metrics/cv.json", "metrics/evaluate.json", "models/cv_oof.npz",
                "reports/train.json", "reports/cv.json", "reports/evaluate.json",
                "plots/train/learning_curves.csv", "plots/train/learning_curves.png",
                "plots/evaluate/confusion.csv", "plots/evaluate/reliability.png",
                "plots/cv/folds.csv"):
        assert (repo / out).exists(), out
    summary = json.loads((repo / "metrics/evaluate.json").read_text())  # the headline numbers
    assert set(summary) == {"accuracy", "balanced_accuracy", "nll", "brier", "ece", "ensemble",
                            "mean_member"}
    assert summary["ensemble"] == {k: ev["ensemble"][k] for k in summary["ensemble"]}
    assert {"accuracy", "nll", "brier", "ece"} <= set(ev) and ev["accuracy"] > 0.85
    assert ev["sparsity"] == 0.0  # a dense model: no exact zeros
    pruned = ev["pruned"]  # evaluate.prune: half the weights zeroed, then one fine-tune epoch
    assert pruned["sparsity"] == pytest.approx(0.5, abs=1e-3)
    assert pruned["accuracy_cost"] == pytest.approx(ev["accuracy"] - pruned["accuracy"])
    assert pruned["accuracy"] > 0.8
    folded = ev["folded"]  # the tiny MLP has no batch norm: folding is a no-op, same outputs
    assert folded["max_abs_diff"] == 0.0
    assert folded["folded_us_per_sample_bs256"] > 0 and folded["unfolded_us_per_sample_bs1"] > 0
    cv = json.loads((repo / "metrics/cv.json").read_text())
    assert set(cv) == {"mean", "std"} and set(cv["std"]) == {"accuracy", "nll", "ece"}
    assert 0 < cv["std"]["accuracy"] < 0.1
    cv_report = json.loads((repo / "reports/cv.json").read_text())
    assert len(cv_report["folds"]) == 2 and cv_report["mean"]["nll"] == cv["mean"]["nll"]
    assert json.loads((repo / "metrics/train.json").read_text())["epochs"] == 3
    oof = np.load(repo / "models/cv_oof.npz")
    assert oof["oof"].shape == (1347, 10) and set(oof["fold"]) == {0, 1}
    np.testing.assert_allclose(oof["oof"].sum(1), 1, atol=1e-4)
    curves = (repo / "plots/train/learning_curves.csv").read_text().splitlines()
    assert curves[0].startswith("epoch") and len(curves) == 1 + TINY["train"]["max_epochs"]


def test_second_repro_runs_nothing_and_an_evaluate_key_reruns_only_evaluate(tiny_repo):
    repo, _ = tiny_repo
    env = stage_env(repo)
    again = sh("dvc repro", repo, env=env)
    assert "Running stage" not in again.stdout
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["evaluate"]["ece_bins"] = 10
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    changed = sh("dvc repro", repo, env=env)
    assert "Running stage 'evaluate'" in changed.stdout
    for stage in ("prepare", "search", "pretrain", "train", "ensemble", "cv"):
        assert f"Running stage '{stage}'" not in changed.stdout


def _readme_exp_show_command():
    """The `dvc exp show` line the README documents for reading results."""
    readme = (ROOT / "README.md").read_text()
    return re.search(r"^(dvc exp show --no-pager .*?)\s*(#.*)?$", readme, re.M).group(1)


def test_metrics_and_plots_render(tiny_repo):
    repo, _ = tiny_repo
    shown = sh("dvc metrics show", repo, env=stage_env(repo)).stdout.splitlines()
    columns = shown[0].split()
    assert columns[0] == "Path" and "accuracy" in columns and "ensemble.nll" in columns
    assert len(columns) - 1 <= 25, columns  # a table a person reads (was 115 columns)
    assert {line.split()[0] for line in shown[1:]} == {
        "metrics/train.json", "metrics/cv.json", "metrics/evaluate.json"}

    # the documented exp show line fits a 120-column terminal, every cell printed in full
    env = dict(stage_env(repo), COLUMNS="120")
    table = sh(_readme_exp_show_command(), repo, env=env).stdout
    lines = [line for line in table.splitlines() if line.strip()]
    assert max(map(len, lines)) <= 120, table
    assert "\u2026" not in table, table  # rich squeezes a table too wide into "…" cells
    header = lines[1].split()
    assert header[0] == "Experiment" and set(header[1:]) == {
        "accuracy", "nll", "ece", "ensemble.accuracy", "mean.accuracy", "train.lr"}
    assert re.search(r"workspace\s+0\.\d+", table), table

    out = repo / "plots_html"
    sh(f"dvc plots show -o {out}", repo, env=stage_env(repo))
    html = (out / "index.html").read_text()
    assert not re.search(r"<script[^>]*src=[\"']?https?:", html)  # renders offline
    images = re.findall(r'<img src="([^"]+)"', html)
    assert len(images) == 3 and all((out / src).stat().st_size > 0 for src in images)
    for name in ("learning_curves", "confusion", "reliability"):
        assert sum(name in src for src in images) == 1, images


def test_mlflow_holds_one_run_per_stage_with_nested_folds_and_a_servable_model(tiny_repo):
    from mlflow.tracking import MlflowClient

    repo, _ = tiny_repo
    client = MlflowClient(f"sqlite:///{repo}/mlflow.db")
    exp = client.get_experiment_by_name("tiny")
    runs = client.search_runs([exp.experiment_id])
    by_stage = {}
    for r in runs:
        by_stage.setdefault(r.data.tags.get("nnpipe.stage"), []).append(r)
    assert {"prepare", "train", "ensemble", "cv", "evaluate"} <= set(by_stage)
    ens_parent = [r for r in by_stage["ensemble"] if "mlflow.parentRunId" not in r.data.tags][0]
    assert len([r for r in runs
                if r.data.tags.get("mlflow.parentRunId") == ens_parent.info.run_id]) == 2
    train = by_stage["train"][0]
    assert train.data.params["train.lr"] == "0.01"
    assert train.data.tags.get("mlflow.source.git.commit")
    history = client.get_metric_history(train.info.run_id, "train_loss")
    assert [m.step for m in history] == [1, 2, 3]
    cv_parent = [r for r in by_stage["cv"] if "mlflow.parentRunId" not in r.data.tags][0]
    folds = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == cv_parent.info.run_id]
    assert len(folds) == 2
    import mlflow.pyfunc

    import nnpipe
    from nnpipe.data import read_dataset

    import mlflow

    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(f"sqlite:///{repo}/mlflow.db")
    try:
        mlflow_model = mlflow.pyfunc.load_model(f"runs:/{train.info.run_id}/model")
    finally:
        mlflow.set_tracking_uri(previous)
    ds = read_dataset(repo / "data/prepared")
    local = nnpipe.load(repo / "models/model")
    np.testing.assert_array_equal(np.asarray(mlflow_model.predict(ds.X_test)),
                                  local.predict(ds.X_test))


def test_exp_run_with_a_set_param(tiny_repo):
    repo, _ = tiny_repo
    # only train (and the search it reads, off here) for a target: evaluate, cv and the ensemble
    # would rerun too and prove nothing more about -S
    proc = sh("dvc exp run -S train.lr=0.02 train", repo, env=stage_env(repo))
    assert "Running stage 'train'" in proc.stdout
    assert "Running stage 'prepare'" not in proc.stdout
    shown = sh("dvc exp show --json", repo, env=stage_env(repo)).stdout
    assert "0.02" in shown


def test_interrupted_stage_exits_nonzero_and_leaves_no_output(tiny_repo, tmp_path):
    repo, _ = tiny_repo
    # far too long to end before the signal (the tiny MLP does about 50 epochs a second);
    # verbose, so the first epoch's line says when training (and the stage's handler) is on
    params = dict(TINY, train={**TINY["train"], "max_epochs": 100_000, "verbose": 1},
                  tracking={"enabled": False})
    (tmp_path / "p.yaml").write_text(yaml.safe_dump(params))
    out = tmp_path / "model"
    cmd = [sys.executable, "-m", "pipelines.train", "--params", str(tmp_path / "p.yaml"),
           "--data", "data/prepared", "--model", str(out), "--metrics", str(tmp_path / "m.json"),
           "--curves", str(tmp_path / "c.csv"), "--plot", str(tmp_path / "c.png")]
    for sig, code in ((signal.SIGINT, 130), (signal.SIGTERM, 143)):
        # SIGINT's default action, as a terminal gives it: a CI runner may start the suite
        # with SIGINT ignored, and an ignored signal stays ignored across exec
        proc = subprocess.Popen(cmd, cwd=repo, env=dict(stage_env(repo), PYTHONUNBUFFERED="1"),
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        # wait for an epoch row (imports can take many seconds on a loaded machine; a signal
        # then would hit Python's default handler, not the stage's)
        for line in proc.stdout:
            if re.match(r"\s*\d+\s", line):
                break
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == code, err
        assert not out.exists() and not (tmp_path / "m.json").exists()
        assert not list(tmp_path.glob(".*"))  # no staging folders left behind


def test_failing_stage_exits_nonzero_with_the_reason(tiny_repo, tmp_path):
    repo, _ = tiny_repo
    bad = dict(TINY, train={**TINY["train"], "lr": -1})
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(bad))
    proc = sh([sys.executable, "-m", "pipelines.train", "--params", str(tmp_path / "bad.yaml"),
               "--data", "data/prepared", "--model", str(tmp_path / "m"), "--metrics",
               str(tmp_path / "m.json"), "--curves", str(tmp_path / "c.csv"), "--plot",
               str(tmp_path / "c.png")], repo, check=False, env=stage_env(repo))
    assert proc.returncode == 1
    assert "train.lr: must be a finite number > 0, got -1" in proc.stderr
    assert not (tmp_path / "m").exists()


def _free_port():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_mlflow_server_serves_the_pipeline_runs_and_model_over_rest(tiny_repo):
    import urllib.request

    repo, _ = tiny_repo
    port = _free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--backend-store-uri",
         f"sqlite:///{repo}/mlflow.db", "--host", "127.0.0.1", "--port", str(port),
         "--workers", "1"], cwd=repo, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    base = f"http://127.0.0.1:{port}"

    def call(path, body=None):
        req = urllib.request.Request(base + path, method="POST" if body is not None else "GET",
                                     data=json.dumps(body).encode() if body is not None else None,
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=10) as resp:
            return json.loads(resp.read() or b"{}")

    try:
        deadline = time.time() + 120
        while True:
            try:
                urllib.request.urlopen(base + "/health", timeout=2)
                break
            except OSError:
                assert server.poll() is None, server.stderr.read().decode()
                assert time.time() < deadline, "mlflow server did not start"
                time.sleep(1)
        exp = call("/api/2.0/mlflow/experiments/get-by-name?experiment_name=tiny")["experiment"]
        runs = call("/api/2.0/mlflow/runs/search",
                    {"experiment_ids": [exp["experiment_id"]], "max_results": 100})["runs"]
        stages = {t["value"] for r in runs for t in r["data"].get("tags", [])
                  if t["key"] == "nnpipe.stage"}
        assert {"prepare", "train", "cv", "evaluate"} <= stages
        models = call("/api/2.0/mlflow/logged-models/search",
                      {"experiment_ids": [exp["experiment_id"]]})["models"]
        assert any(m["info"]["name"] == "model" for m in models)
    finally:
        server.terminate()
        server.wait(timeout=30)


def test_repro_with_pretraining_trains_from_the_pretrained_encoder(search_pretrain_repo):
    """20% of the training labels kept; the encoder, pretrained on all 1347 training rows and
    kept frozen, reaches the saved classifier and every ensemble member unchanged, and cv's
    folds start from it too (the search, also on, changes train.lr only)."""
    import nnpipe

    repo, proc, _ = search_pretrain_repo
    assert "Running stage 'pretrain'" in proc.stdout
    meta = json.loads((repo / "data/prepared/meta.json").read_text())
    assert (meta["n_train"], meta["n_unlabeled"]) == (269, 1078)  # 20% of 1347 labels kept
    pre = nnpipe.load(repo / "models/pretrained")
    assert type(pre).__name__ == "Pretrainer" and len(pre.history) == 3
    assert pre.n_features_in_ == 64 and pre.encoder_patterns() == ["hidden.*"]
    assert ("[train] started from the pretrained encoder models/pretrained: 2 tensors "
            "transferred (['hidden.*'])") in proc.stdout
    assert json.loads((repo / "reports/train.json").read_text())["transferred_tensors"] == 2
    assert ("[cv] every fold starts from the pretrained encoder models/pretrained "
            "(['hidden.*'])") in proc.stdout
    assert ("[ensemble] every member starts from the pretrained encoder models/pretrained "
            "(['hidden.*'])") in proc.stdout
    ensemble = nnpipe.load(repo / "models/ensemble")
    nets = [nnpipe.load(repo / "models/model")[-1]] + [m[-1] for m in ensemble.members_]
    assert len(nets) == 3
    for clf in nets:
        assert clf.transfer_from == "models/pretrained" and clf.freeze == ["hidden.*"]
        for name in ("hidden.1.weight", "hidden.1.bias"):  # frozen: exactly the pretrained values
            torch_equal = np.array_equal(clf.module_.state_dict()[name].numpy(),
                                         pre.module_.state_dict()[name].numpy())
            assert torch_equal, name
    # the heads (trained, from different seeds) differ between the members
    heads = [m[-1].module_.state_dict()["output.weight"].numpy() for m in ensemble.members_]
    assert not np.array_equal(heads[0], heads[1])
    assert json.loads((repo / "metrics/cv.json").read_text())


def test_enabling_the_search_feeds_its_best_params_to_train_and_cv(search_pretrain_repo):
    """The fixture ran prepare with the search off, then switched it on: the search, and every
    stage after it, reran; prepare did not."""
    import nnpipe

    repo, proc, params = search_pretrain_repo
    assert "Running stage 'prepare'" not in proc.stdout
    for stage in ("search", "train", "cv", "evaluate"):
        assert f"Running stage '{stage}'" in proc.stdout
    best = json.loads((repo / "search/best_params.json").read_text())
    assert set(best) == {"train.lr"}
    assert f"[best params] train.lr={best['train.lr']}" in proc.stdout
    # the best lr reached the saved classifier, every ensemble member and cv (its only source:
    # params.yaml's train section leaves lr out)
    ensemble = nnpipe.load(repo / "models/ensemble")
    for clf in [nnpipe.load(repo / "models/model")[-1]] + [m[-1] for m in ensemble.members_]:
        assert clf.lr == pytest.approx(best["train.lr"])
    n = params["search"]["n_trials"]
    trials = (repo / "search/results/trials.csv").read_text().splitlines()
    assert len(trials) == 1 + n and (trials[0].startswith("duration_s") or "number" in trials[0])
    assert (repo / "search/results/plots/optimization_history.png").exists()
    assert (repo / "search/journal/study.log").stat().st_size > 0
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{repo}/mlflow.db")
    exp = client.get_experiment_by_name("tiny")
    runs = client.search_runs([exp.experiment_id])
    parent = [r for r in runs if r.data.tags.get("nnpipe.stage") == "search"
              and "mlflow.parentRunId" not in r.data.tags][-1]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert len(children) == n and all("train.lr" in c.data.params for c in children)
    for stage in ("train", "cv"):  # both stages ran with the best lr
        run = [r for r in runs if r.data.tags.get("nnpipe.stage") == stage
               and "mlflow.parentRunId" not in r.data.tags][-1]
        assert float(run.data.params["train.lr"]) == pytest.approx(best["train.lr"]), stage
    # re-running resumes the study: the trials already run count, only the one added runs
    params = dict(params, search={**params["search"], "n_trials": n + 1})
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    again = sh("dvc repro search", repo, env=stage_env(repo))
    assert again.stdout.count("[search] trial") == 1

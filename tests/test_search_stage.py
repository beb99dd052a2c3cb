"""The ``search`` DVC stage (``pipelines.search.main``) run in a temporary folder: explicit
values of searched keys, stale studies, a configuration that cannot train, MLflow trial runs."""

import json
import logging

import numpy as np
import optuna
import pandas as pd
import pytest
import yaml
from optuna.trial import TrialState

from nnpipe.config import load_config, with_overrides
from nnpipe.data import load_dataset, save_dataset
from nnpipe.search import storage_from_url
from pipelines import search as stage

LR = {"type": "float", "low": 1e-3, "high": 3e-2, "log": True}
DROPOUT = {"type": "float", "low": 0.0, "high": 0.3}


@pytest.fixture
def nnpipe_logger():
    """The stage adds a console handler to the ``nnpipe`` logger: take it away afterwards."""
    top = logging.getLogger("nnpipe")
    handlers, level = list(top.handlers), top.level
    yield
    top.handlers[:] = handlers
    top.setLevel(level)


@pytest.fixture(scope="module")
def tabular(tmp_path_factory):
    """A prepared tabular (CSV) dataset: 240 rows, 6 features, 3 classes."""
    folder = tmp_path_factory.mktemp("tabular")
    rng = np.random.RandomState(0)
    y = rng.randint(0, 3, size=240)
    X = rng.normal(scale=3.0, size=(3, 6))[y] + rng.normal(size=(240, 6))
    frame = pd.DataFrame(X, columns=[f"f{i}" for i in range(6)]).assign(label=y)
    frame.to_csv(folder / "data.csv", index=False)
    save_dataset(load_dataset("csv", path=folder / "data.csv", target="label"),
                 folder / "prepared")
    return folder / "prepared"


def _params(tmp_path, train=None, space=None, tracking=None, **search):
    params = {
        "data": {"source": "csv", "target": "label"},
        "model": {"module": "mlp", "module__hidden_sizes": [8]},
        "train": {"max_epochs": 2, "random_state": 0, "verbose": 0, **(train or {})},
        "search": {"enabled": True, "n_trials": 2, "holdout": 0.25, "random_state": 0,
                   "pruner": "none", "space": space or {"train.lr": LR}, **search},
        "tracking": tracking or {"enabled": False},
    }
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    return path


def _run(tmp_path, data, params, *extra):
    stage.main(["--params", str(params), "--data", str(data), "--best", str(tmp_path / "best.json"),
                "--results", str(tmp_path / "results"),
                "--journal", str(tmp_path / "journal" / "study.log"), *extra])
    return json.loads((tmp_path / "best.json").read_text())


def _studies(tmp_path):
    storage = storage_from_url(None, tmp_path / "journal" / "study.log")
    return {s.study_name: s.n_trials for s in optuna.get_all_study_summaries(storage)}


def test_an_explicit_value_of_a_searched_key_wins_over_the_study(tmp_path, tabular, capsys,
                                                                nnpipe_logger):
    """`dvc exp run -S train.lr=0.003` on a search over train.lr: train gets 0.003."""
    space = {"train.lr": LR, "model.dropout": DROPOUT}
    (tmp_path / "searched").mkdir()
    searched = _run(tmp_path / "searched", tabular, _params(tmp_path / "searched", space=space))
    assert set(searched) == {"train.lr", "model.dropout"}
    capsys.readouterr()
    (tmp_path / "fixed").mkdir()
    params = _params(tmp_path / "fixed", train={"lr": 0.003}, space=space)
    fixed = _run(tmp_path / "fixed", tabular, params)
    out = capsys.readouterr().out
    assert "[search] train.lr: fixed at 0.003 by params.yaml, not searched; remove it from " \
           "`train` to search it" in out
    assert set(fixed) == {"model.dropout"}
    assert with_overrides(load_config(params), fixed).train["lr"] == 0.003
    assert with_overrides(load_config(params), searched).train["lr"] != 0.003


def test_replacing_a_searched_key_leaves_no_stale_best_param(tmp_path, tabular, nnpipe_logger):
    """The old study (with model.dropout) stays in the journal, best_params.json comes from a new
    one over the current space, and a worker joins that new study."""
    first = _run(tmp_path, tabular, _params(tmp_path, space={"train.lr": LR,
                                                              "model.dropout": DROPOUT}))
    assert "model.dropout" in first
    params = _params(tmp_path, space={"train.lr": LR, "train.batch_size": {
        "type": "categorical", "choices": [16, 32]}})
    second = _run(tmp_path, tabular, params)
    assert set(second) == {"train.lr", "train.batch_size"}
    studies = _studies(tmp_path)
    assert sorted(studies.values()) == [2, 2]
    # a worker with a larger budget resumes the current study, not the old one
    _params(tmp_path, space={"train.lr": LR, "train.batch_size": {
        "type": "categorical", "choices": [16, 32]}}, n_trials=3)
    stage.main(["--params", str(params), "--data", str(tabular), "--worker",
                "--journal", str(tmp_path / "journal" / "study.log")])
    after = _studies(tmp_path)
    assert set(after) == set(studies) and sorted(after.values()) == [2, 3]


def test_a_configuration_that_cannot_train_fails_the_stage_at_once(tmp_path, tabular, capsys,
                                                                   nnpipe_logger):
    """PCA to more components than the 6 features: valid params.yaml, but no trial can run (an
    image augmentation on this data is caught earlier, by the params.yaml checks)."""
    params = _params(tmp_path, n_trials=10)
    raw = yaml.safe_load(params.read_text())
    raw["preprocess"] = [{"pca_whiten": {"n_components": 50}}]
    params.write_text(yaml.safe_dump(raw))
    with pytest.raises(SystemExit) as info:
        _run(tmp_path, tabular, params)
    assert info.value.code == 1
    err = capsys.readouterr().err
    assert "search: the configuration fails before any trial: ValueError" in err
    assert "n_components=50" in err
    assert sum(_studies(tmp_path).values()) <= 1
    assert not (tmp_path / "best.json").exists()


@pytest.mark.slow
def test_trial_runs_end_with_the_trial_state_and_are_logged_once(tmp_path, tabular,
                                                                nnpipe_logger):
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    tracking = {"enabled": True, "experiment": "search-runs", "uri": uri}
    # a diverging learning rate fails its trial; the grid visits 1e7 first
    space = {"train.optimizer": {"type": "categorical", "choices": ["sgd"]},
             "train.lr": {"type": "categorical", "choices": [1e7, 0.01, 0.02]}}
    for n_trials in (2, 3):  # the second run resumes the study and runs one more trial
        _run(tmp_path, tabular, _params(tmp_path, space=space, tracking=tracking,
                                        n_trials=n_trials, sampler="grid"))
    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("search-runs").experiment_id])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    (study_name,) = _studies(tmp_path)
    assert len(parents) == 2
    assert {r.info.run_name for r in parents} == {
        f"search · {study_name} · {n} trials" for n in (2, 3)}
    assert {r.data.tags["optuna.study"] for r in parents} == {study_name}
    trials = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert sorted(r.info.run_name for r in trials) == ["trial-0", "trial-1", "trial-2"]
    study = optuna.load_study(study_name=study_name,
                              storage=storage_from_url(None, tmp_path / "journal" / "study.log"))
    expected = {"COMPLETE": "FINISHED", "FAIL": "FAILED", "PRUNED": "KILLED"}
    for r in trials:
        t = study.trials[int(r.info.run_name.split("-")[1])]
        assert r.info.status == expected[t.state.name], (r.info.run_name, t.state)
    assert TrialState.FAIL in {t.state for t in study.trials}


def test_a_pruned_trial_run_ends_killed(tmp_path):
    from mlflow.tracking import MlflowClient

    from nnpipe.tracking import Tracker

    study = optuna.create_study(study_name="s", direction="maximize")
    dist = {"x": optuna.distributions.FloatDistribution(0, 1)}
    for state, value in ((TrialState.COMPLETE, 0.5), (TrialState.PRUNED, None),
                         (TrialState.FAIL, None)):
        study.add_trial(optuna.trial.create_trial(state=state, value=value, params={"x": 0.1},
                                                  distributions=dist,
                                                  intermediate_values={1: 0.2}))
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    with Tracker("search", experiment="pruned", uri=uri, outbox=tmp_path / "outbox") as run:
        assert stage.log_trials(run, study, "accuracy") == [0, 1, 2]
        study.set_user_attr(stage.LOGGED_ATTR, [0, 1, 2])
        assert stage.log_trials(run, study, "accuracy") == [0, 1, 2]  # nothing new
    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("pruned").experiment_id])
    status = {r.info.run_name: r.info.status for r in runs}
    assert status == {"search": "FINISHED", "trial-0": "FINISHED", "trial-1": "KILLED",
                      "trial-2": "FAILED"}

"""Optuna search: the declared space, pruning with CV, failures, budgets, storage and resuming."""

import time

import numpy as np
import optuna
import pytest
from optuna.trial import TrialState

from nnpipe.config import ConfigError, validate_config
from nnpipe.search import (SearchSettings, apply_overrides, best_overrides, parse_space,
                           run_search, save_plots, storage_from_url, suggest, top_trials,
                           trials_table)

# no train.lr: the tests search it, and a searched key set in its section is fixed, not searched
BASE = {
    "model": {"module": "mlp", "module__hidden_sizes": [16]},
    "train": {"max_epochs": 4, "random_state": 0, "verbose": 0, "train_split": None},
}


def _raw(**search):
    return {**BASE, "search": {"enabled": True, "folds": 2, "random_state": 0, **search}}


def _settings(raw, task="classification"):
    return SearchSettings.from_section(raw["search"], task)


@pytest.mark.parametrize("space, match", [
    ({"train.lr": {"type": "float", "low": 1.0, "high": 0.1}}, "low must be < high"),
    ({"train.lr": {"type": "float", "low": 0.0, "high": 0.1, "log": True}}, "log=true needs low > 0"),
    ({"train.max_epochs": {"type": "int", "low": 1.5, "high": 3}}, "whole numbers"),
    ({"train.optimizer": {"type": "categorical", "choices": []}}, "non-empty list"),
    ({"train.lr": {"type": "uniform", "low": 0, "high": 1}}, "type must be one of"),
    ({"train.lr": {"type": "float", "low": 0.1, "high": 1, "choices": [1]}}, "unknown keys"),
    # sections a trial never reads: searching them would silently do nothing
    ({"pretrain.lr": {"type": "float", "low": 0.001, "high": 0.1}},
     r"'pretrain' key would have no effect.*trials train from scratch"),
    ({"ensemble.n_members": {"type": "int", "low": 2, "high": 5}},
     r"from preprocess, augment, model, train only.*'ensemble'"),
    ({"lr": {"type": "float", "low": 0.001, "high": 0.1}}, r"'lr' key would have no effect"),
])
def test_bad_space_entries_fail_naming_the_entry(space, match):
    with pytest.raises(ValueError, match=match) as info:
        parse_space(space)
    assert f"search.space.{next(iter(space))}" in str(info.value)


def test_an_entry_naming_a_missing_parameter_fails_before_any_trial():
    raw = _raw(space={"train.lrr": {"type": "float", "low": 0.001, "high": 0.1}})
    with pytest.raises(ConfigError, match=r"search.space.train.lrr.*Did you mean 'lr'"):
        validate_config(raw)
    raw = _raw(space={"augment.rotation.degres": {"type": "int", "low": 0, "high": 10}})
    with pytest.raises(ConfigError, match="rotation"):
        validate_config(raw)


@pytest.mark.parametrize("search, key", [
    ({"sampler": "tpee"}, "search.sampler"), ({"pruner": "medain"}, "search.pruner"),
    ({"n_trials": 0}, "search.n_trials"), ({"timeout": -1}, "search.timeout"),
    ({"metric": "acuracy"}, "search.metric"), ({"storage": "sqlite:///s.db", "n_jobs": 2},
                                                "search.storage"),
    ({"ntrials": 5}, "search.ntrials"), ({"metric": "r2"}, "search.metric"),
])
def test_bad_search_settings_fail_naming_the_key(search, key):
    with pytest.raises(ConfigError) as info:
        validate_config({**BASE, "search": search})
    assert any(path == key for path, _ in info.value.problems), info.value


def test_unreachable_storage_fails_before_training(tmp_path):
    start = time.monotonic()
    with pytest.raises(ValueError, match="cannot be reached"):
        storage_from_url("postgresql://postgres@127.0.0.1:1/test", tmp_path / "j")
    assert time.monotonic() - start < 15


def test_conditional_entries_and_nested_overrides():
    space = parse_space({
        "train.optimizer": {"type": "categorical", "choices": ["adam", "sgd"]},
        "train.optimizer__momentum": {"type": "float", "low": 0.5, "high": 0.99,
                                      "condition": {"train.optimizer": "sgd"}},
        "model.module__hidden_sizes": {"type": "categorical", "choices": [[8], [16, 8]]},
        "augment.rotation.degrees": 7,
    })
    adam = suggest(optuna.trial.FixedTrial({"train.optimizer": "adam",
                                            "model.module__hidden_sizes": "[8]"}), space, BASE)
    assert "train.optimizer__momentum" not in adam and adam["augment.rotation.degrees"] == 7
    sgd = suggest(optuna.trial.FixedTrial({"train.optimizer": "sgd",
                                           "train.optimizer__momentum": 0.9,
                                           "model.module__hidden_sizes": "[16, 8]"}), space, BASE)
    assert sgd["train.optimizer__momentum"] == 0.9
    raw = apply_overrides(BASE, sgd, space)
    assert raw["model"]["module__hidden_sizes"] == [16, 8]
    assert raw["augment"] == {"rotation": {"degrees": 7}}
    assert BASE["model"]["module__hidden_sizes"] == [16]  # the input is not modified


def test_search_runs_resumes_and_counts_finished_trials_toward_the_budget(blobs, tmp_path):
    X, y = blobs
    raw = _raw(n_trials=4, space={"train.lr": {"type": "float", "low": 1e-3, "high": 3e-2,
                                               "log": True}})
    study = run_search(raw, X, y, "classification", journal=tmp_path / "j.log")
    done = study.get_trials(states=(TrialState.COMPLETE, TrialState.PRUNED))
    assert len(done) == 4
    best = best_overrides(study)
    assert set(best) == {"train.lr"} and 1e-3 <= best["train.lr"] <= 3e-2
    assert study.best_value == max(t.value for t in done if t.state == TrialState.COMPLETE)
    rows = trials_table(study)
    assert {"number", "state", "value", "duration_s", "epochs", "params.train.lr"} <= set(rows[0])
    assert all(r["epochs"] == 8 for r in rows if r["state"] == "COMPLETE")  # 2 folds x 4 epochs
    # re-running with a larger budget resumes the same study: 4 old + 2 new trials
    raw["search"]["n_trials"] = 6
    again = run_search(raw, X, y, "classification", journal=tmp_path / "j.log")
    assert len(again.get_trials()) == 6
    assert [t.number for t in again.get_trials()] == list(range(6))
    top = top_trials(again, 3)
    assert len(top) == 3 and top[0]["value"] >= top[-1]["value"]


def test_a_diverging_trial_fails_with_its_reason_and_the_study_goes_on(blobs, tmp_path):
    X, y = blobs
    raw = _raw(n_trials=2, sampler="grid", pruner="none", space={
        "train.optimizer": "sgd", "train.lr": {"type": "categorical", "choices": [1e7, 1e-2]}})
    study = run_search(raw, X, y, "classification", journal=tmp_path / "j.log")
    failed = study.get_trials(states=(TrialState.FAIL,))
    complete = study.get_trials(states=(TrialState.COMPLETE,))
    assert len(failed) == 1 and len(complete) == 1
    assert "diverged" in failed[0].user_attrs["fail_reason"]
    assert complete[0].params["train.lr"] == 1e-2


def test_pruning_on_fold_zero_stops_bad_trials_early(blobs, tmp_path):
    X, y = blobs
    raw = _raw(n_trials=9, sampler="grid", pruner="median", space={
        "train.optimizer": "sgd",
        "train.max_epochs": 6,
        "train.lr": {"type": "categorical",
                     "choices": [3e-2, 2.5e-2, 2e-2, 1.5e-2, 1e-2, 8e-3, 1e-6, 2e-6, 3e-6]}})
    study = run_search(raw, X, y, "classification", journal=tmp_path / "j.log")
    pruned = study.get_trials(states=(TrialState.PRUNED,))
    assert pruned, "no trial was pruned"
    assert any(t.params["train.lr"] < 1e-5 for t in pruned)  # hopeless learning rates go
    assert study.best_trial.params["train.lr"] > 1e-3
    for t in pruned:
        assert t.user_attrs["epochs"] < 6  # stopped inside fold 0, never trained fold 1
        assert max(t.intermediate_values) < 6
    complete = study.get_trials(states=(TrialState.COMPLETE,))
    assert all(t.user_attrs["epochs"] == 12 for t in complete)


def test_regression_search_and_plots(tmp_path):
    rng = np.random.RandomState(0)
    X = rng.normal(size=(200, 4)).astype(np.float32)
    y = X @ np.array([1.0, -1.0, 0.5, 2.0])
    raw = {**BASE, "data": {"task": "regression"},
           "search": {"enabled": True, "n_trials": 3, "folds": 2, "metric": "rmse",
                      "space": {"train.lr": {"type": "float", "low": 1e-3, "high": 1e-1,
                                             "log": True}}}}
    study = run_search(raw, X, y, "regression", journal=tmp_path / "j.log")
    assert study.direction.name == "MINIMIZE" and study.best_value < np.std(y)
    written = save_plots(study, tmp_path / "plots")
    assert "optimization_history" in written
    assert (tmp_path / "plots" / "optimization_history.png").read_bytes()[:4] == b"\x89PNG"
    assert (tmp_path / "plots" / "optimization_history.html").stat().st_size > 1000


def test_two_workers_share_one_journal_and_stop_at_the_budget(blobs, tmp_path, caplog):
    import logging

    X, y = blobs
    raw = _raw(n_trials=6, n_jobs=2, pruner="none",
               space={"train.lr": {"type": "float", "low": 1e-3, "high": 3e-2, "log": True}})
    caplog.set_level(logging.INFO, logger="nnpipe")
    study = run_search(raw, X, y, "classification", journal=tmp_path / "j.log")
    trials = study.get_trials()
    assert len(trials) == 6 and sorted(t.number for t in trials) == list(range(6))
    assert all(t.state == TrialState.COMPLETE for t in trials)
    # the spawned worker's progress lines reach this process's logging too
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("[search] trial")]
    assert sorted(int(line.split()[2].rstrip(":")) for line in lines) == list(range(6))

"""Which study a search runs in, which keys it samples, and when it stops (the library).

- a study is resumed only for the same data and trial settings (its fingerprint);
- a searched key set explicitly in its params.yaml section is fixed, not searched;
- a failure that does not depend on the sampled values stops the search at once;
- Optuna is used through its public API, and nnpipe reports through ``logging``.
"""

import logging
import math
import re
from pathlib import Path

import numpy as np
import optuna
import pytest
from optuna.trial import TrialState

from nnpipe.estimators import DivergenceError
from nnpipe.search import (FINGERPRINT_ATTR, SearchError, SearchSettings, best_overrides,
                           fingerprint, fixed_by_params, make_study, optimize, parse_space,
                           run_search, storage_from_url)

LR = {"type": "float", "low": 1e-3, "high": 3e-2, "log": True}
DROPOUT = {"type": "float", "low": 0.0, "high": 0.3}


def _raw(train=None, space=None, **search):
    return {"model": {"module": "mlp", "module__hidden_sizes": [8]},
            "train": {"max_epochs": 2, "random_state": 0, "verbose": 0, "train_split": None,
                      **(train or {})},
            "search": {"enabled": True, "n_trials": 2, "holdout": 0.25, "random_state": 0,
                       "pruner": "none", "space": space or {"train.lr": LR}, **search}}


def _search(raw, X, y, journal):
    return run_search(raw, X, y, "classification", input_shape=(X.shape[1],), journal=journal)


def _messages(caplog):
    return [r.getMessage() for r in caplog.records if r.name.startswith("nnpipe.")]


def _studies(journal):
    storage = storage_from_url(None, journal)
    return {s.study_name: s.n_trials for s in optuna.get_all_study_summaries(storage)}


# --------------------------------------------------------------------------- 1. stale studies


def test_the_fingerprint_ignores_the_budget_but_not_the_data_or_trial_settings(blobs):
    X, y = blobs

    def fp(raw, X=X, y=y, task="classification", shape=(8,)):
        return fingerprint(raw, X, y, task, shape,
                           SearchSettings.from_section(raw["search"], task))

    base = fp(_raw())
    same = [_raw(n_trials=50), _raw(timeout=60), _raw(n_jobs=3),
            _raw(storage="postgresql://x/y"), _raw(top_k=2)]
    assert all(fp(raw) == base for raw in same)
    changed = {
        "X": fp(_raw(), X=X + 1), "X dtype": fp(_raw(), X=X.astype(np.float64)),
        "y": fp(_raw(), y=np.roll(y, 1)), "input_shape": fp(_raw(), shape=(2, 4)),
        "train": fp(_raw(train={"max_epochs": 3})),
        "model": fp({**_raw(), "model": {"module": "mlp", "module__hidden_sizes": [9]}}),
        "augment": fp({**_raw(), "augment": {"noise": {"std": 0.1}}}),
        "preprocess": fp({**_raw(), "preprocess": ["global_center"]}),
        "space": fp(_raw(space={"train.lr": LR, "model.dropout": DROPOUT})),
        "metric": fp(_raw(metric="nll")), "holdout": fp(_raw(holdout=0.3)),
        "folds": fp(_raw(holdout=None, folds=2)), "seed": fp(_raw(random_state=1)),
        "sampler": fp(_raw(sampler="random")), "pruner": fp(_raw(pruner="median")),
    }
    assert base not in changed.values(), [k for k, v in changed.items() if v == base]
    assert len(set(changed.values())) == len(changed)


def test_new_data_starts_a_new_study_and_keeps_the_old_one(blobs, tmp_path, caplog):
    X, y = blobs
    journal = tmp_path / "j.log"
    caplog.set_level(logging.INFO, logger="nnpipe")
    first = _search(_raw(), X, y, journal)
    assert first.study_name.startswith("nnpipe-") and len(first.trials) == 2
    assert any(m == f"[search] new study {first.study_name}" for m in _messages(caplog))
    caplog.clear()
    # other data (as after switching data.source): the search runs its trials anew
    other = _search(_raw(), X[:200] * 2.0, y[:200], journal)
    assert other.study_name != first.study_name and len(other.trials) == 2
    assert other.user_attrs[FINGERPRINT_ATTR].startswith(other.study_name.rsplit("-", 1)[1])
    assert f"[search] new study {other.study_name}: data or trial settings changed since " \
           f"study {first.study_name} (kept in the journal)" in _messages(caplog)
    assert _studies(journal) == {first.study_name: 2, other.study_name: 2}


def test_a_larger_budget_resumes_the_same_study(blobs, tmp_path, caplog):
    X, y = blobs
    journal = tmp_path / "j.log"
    first = _search(_raw(), X, y, journal)
    caplog.set_level(logging.INFO, logger="nnpipe")
    again = _search(_raw(n_trials=3, timeout=600), X, y, journal)
    assert again.study_name == first.study_name
    assert [t.number for t in again.trials] == [0, 1, 2]
    assert f"[search] resuming study {first.study_name}: 2 of 3 trials done" in _messages(caplog)
    assert list(_studies(journal)) == [first.study_name]


def test_best_params_hold_only_keys_of_the_current_space(blobs, tmp_path):
    X, y = blobs
    study = _search(_raw(space={"train.lr": LR, "model.dropout": DROPOUT}), X, y,
                    tmp_path / "j.log")
    assert set(best_overrides(study)) == {"train.lr", "model.dropout"}
    assert set(best_overrides(study, parse_space({"train.lr": LR}))) == {"train.lr"}


# --------------------------------------------------------------------------- 2. explicit values


def test_fixed_by_params_finds_searched_keys_set_in_their_section():
    space = parse_space({"train.lr": LR, "model.dropout": DROPOUT, "train.optimizer": {
        "type": "categorical", "choices": ["adam", "sgd"]}, "augment.rotation.degrees": {
        "type": "int", "low": 0, "high": 10}, "model.batch_norm": True})
    raw = {"train": {"lr": 0.003, "max_epochs": 2}, "model": {"batch_norm": False},
           "augment": {"rotation": {"degrees": 5}}}
    assert fixed_by_params(raw, space) == {"train.lr": 0.003, "augment.rotation.degrees": 5}


def test_a_searched_key_set_in_params_is_fixed_for_every_trial(blobs, tmp_path, caplog):
    X, y = blobs
    caplog.set_level(logging.INFO, logger="nnpipe")
    space = {"train.lr": LR, "model.dropout": DROPOUT}
    study = _search(_raw(train={"lr": 0.003}, space=space), X, y, tmp_path / "j.log")
    assert "[search] train.lr: fixed at 0.003 by params.yaml, not searched; remove it from " \
           "`train` to search it" in _messages(caplog)
    assert len(study.trials) == 2
    for t in study.trials:
        assert set(t.params) == {"model.dropout"}
        assert set(t.user_attrs["overrides"]) == {"model.dropout"}
    assert set(best_overrides(study)) == {"model.dropout"}


# --------------------------------------------------------------------------- 3. stop at once


def test_a_configuration_that_cannot_train_stops_before_any_trial(blobs, tmp_path):
    """Tabular data with an image augmentation: every trial would fail the same way."""
    X, y = blobs
    raw = {**_raw(n_trials=10), "augment": {"rotation": {"degrees": 10}}}
    with pytest.raises(SearchError, match=r"search: the configuration fails before any trial: "
                                          r"ValueError: augment op 'rotation'.*input_shape=\(8,\)"):
        _search(raw, X, y, tmp_path / "j.log")
    assert sum(_studies(tmp_path / "j.log").values()) <= 1


def _study(tmp_path, n_trials=10):
    settings = SearchSettings.from_section({"n_trials": n_trials, "sampler": "random",
                                            "pruner": "none"}, "classification")
    return make_study(settings, tmp_path / "j.log"), settings


def test_the_same_error_twice_in_a_row_stops_the_search(tmp_path):
    study, settings = _study(tmp_path)

    def objective(trial):
        x = trial.suggest_float("x", 0, 1)
        raise KeyError(f"no column {x:.6f} in batch {trial.number}")  # numbers differ

    with pytest.raises(SearchError, match=r"trials 0 and 1 failed with the same error.*KeyError"):
        optimize(study, objective, settings, tmp_path / "j.log")
    assert [t.state for t in study.trials] == [TrialState.FAIL] * 2


def test_divergence_is_not_taken_for_a_broken_configuration(tmp_path):
    study, settings = _study(tmp_path)

    def objective(trial):
        trial.suggest_float("x", 0, 1)
        raise DivergenceError(1, 2, math.nan)

    with pytest.raises(SearchError, match="3 trials failed in a row"):
        optimize(study, objective, settings, tmp_path / "j.log", max_failures=3)
    assert len(study.trials) == 3


# --------------------------------------------------------------------------- 4. and 5.


def test_search_uses_only_optunas_public_api():
    root = Path(__file__).resolve().parents[1] / "nnpipe"
    private = re.compile(r"\._storage\b|\._trial_id\b|_all_grids|\._thread_local|\._study_id")
    for name in ("search.py", "reliability.py"):
        hits = [line for line in (root / name).read_text().splitlines() if private.search(line)]
        assert not hits, (name, hits)


def test_search_logs_progress_and_leaves_optuna_verbosity_alone(blobs, tmp_path, caplog,
                                                                   capsys):
    X, y = blobs
    previous = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.DEBUG)
    try:
        caplog.set_level(logging.INFO, logger="nnpipe")
        _search(_raw(), X, y, tmp_path / "j.log")
        assert optuna.logging.get_verbosity() == optuna.logging.DEBUG
    finally:
        optuna.logging.set_verbosity(previous)
    trials = [r for r in caplog.records if r.getMessage().startswith("[search] trial")]
    assert len(trials) == 2 and {r.name for r in trials} == {"nnpipe.search"}
    assert "[search]" not in capsys.readouterr().out  # logged, not printed

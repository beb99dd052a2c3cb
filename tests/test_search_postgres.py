"""Distributed search for real: several worker processes against the PostgreSQL server."""

import subprocess
import sys
import uuid

import pytest
import yaml

pytestmark = pytest.mark.slow

def test_workers_on_postgres_finish_exactly_the_budget_with_no_trial_lost(pg_url, tmp_path):
    import optuna
    from optuna.trial import TrialState

    from nnpipe.data import load_dataset, save_dataset

    save_dataset(load_dataset("digits"), tmp_path / "data")
    study_name = f"pg-{uuid.uuid4().hex[:8]}"
    params = {
        "model": {"module": "mlp", "module__hidden_sizes": [16]},
        "train": {"max_epochs": 2, "random_state": 0, "verbose": 0, "train_split": None},
        "search": {"enabled": True, "n_trials": 9, "folds": 2, "pruner": "none",
                   "storage": pg_url, "study_name": study_name,
                   "space": {"train.lr": {"type": "float", "low": 1e-3, "high": 3e-2,
                                          "log": True}}},
        "tracking": {"enabled": False},
    }
    (tmp_path / "p.yaml").write_text(yaml.safe_dump(params))
    cmd = [sys.executable, "-m", "pipelines.search", "--worker", "--params",
           str(tmp_path / "p.yaml"), "--data", str(tmp_path / "data")]
    workers = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
               for _ in range(3)]
    outputs = [w.communicate(timeout=600)[0] for w in workers]
    assert all(w.returncode == 0 for w in workers), outputs
    # the workers ran one study: <study_name>-<fingerprint of the data and trial settings>
    (name,) = [n for n in optuna.get_all_study_names(pg_url) if n.startswith(study_name + "-")]
    study = optuna.load_study(study_name=name, storage=pg_url)
    trials = study.get_trials()
    assert len(trials) == 9
    assert sorted(t.number for t in trials) == list(range(9))
    assert all(t.state == TrialState.COMPLETE for t in trials)
    ran = sum(out.count("[search] trial") for out in outputs)
    assert ran == 9  # every trial ran in exactly one worker
    assert sum(1 for out in outputs if "[search] trial" in out) >= 2  # the work was shared

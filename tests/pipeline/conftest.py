"""A temporary git + DVC repository holding this project's dvc.yaml, pipelines and a tiny config."""

import os
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]

TINY = {
    # dvc.yaml's prepare depends on ${data.path}: for digits the placeholder folder data/raw
    "data": {"source": "digits", "path": "data/raw", "test_size": 0.25, "random_state": 0},
    "preprocess": ["global_center"],
    "augment": None,  # dvc.yaml tracks every section: an unused one stays, empty
    "model": {"module": "mlp", "module__hidden_sizes": [32]},
    "train": {"max_epochs": 3, "lr": 0.01, "random_state": 0, "verbose": 0},
    "pretrain": {"enabled": False},
    "search": {"enabled": False},
    "ensemble": {"enabled": True, "kind": "seeds", "n_members": 2, "n_jobs": 1},
    "cv": {"folds": 2, "random_state": 0},
    "evaluate": {"ece_bins": 15, "prune": {"sparsity": 0.5, "fine_tune_epochs": 1},
                 "fold_batchnorm": True},
    "tracking": {"enabled": True, "experiment": "tiny"},
}


def sh(cmd, cwd, check=True, env=None, timeout=600):
    proc = subprocess.run(cmd, cwd=cwd, shell=isinstance(cmd, str), capture_output=True,
                          text=True, env=env, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{cmd} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


def make_repo(path: Path, params: dict) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    for name in ("dvc.yaml", ".gitignore"):
        shutil.copy(ROOT / name, path / name)
    for pkg in ("pipelines", "nnpipe", "data/raw"):
        shutil.copytree(ROOT / pkg, path / pkg, ignore=shutil.ignore_patterns("__pycache__"))
    (path / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    sh("git init -q && git config user.email t@t && git config user.name t", path)
    sh("dvc init -q && dvc config core.analytics false && dvc config core.autostage true", path)
    sh("git add -A && git commit -qm init", path)
    return path


def stage_env(repo: Path):
    env = dict(os.environ)
    env.pop("MLFLOW_TRACKING_URI", None)
    # the stages import nnpipe from the copy inside the repo, as a user's checkout would
    env["PYTHONPATH"] = str(repo)
    return env


@pytest.fixture(scope="module")
def tiny_repo(tmp_path_factory):
    repo = make_repo(tmp_path_factory.mktemp("tiny") / "repo", TINY)
    proc = sh("dvc repro", repo, env=stage_env(repo))
    return repo, proc


#: TINY with 20% of the labels kept and a frozen pretrained encoder; the search stays off until
#: SEARCH is switched on (the smallest search: two trials on one holdout split, one process)
PRETRAIN = dict(TINY, data={**TINY["data"], "label_fraction": 0.2},
                pretrain={"enabled": True, "noise": "mask", "noise_level": 0.2,
                          "max_epochs": 3, "random_state": 0, "freeze": True})
SEARCH = {"enabled": True, "n_trials": 2, "n_jobs": 1, "holdout": 0.25, "random_state": 0,
          "space": {"train.lr": {"type": "float", "low": 0.001, "high": 0.05, "log": True}}}


@pytest.fixture(scope="module")
def search_pretrain_repo(tmp_path_factory):
    """One repository for both the search and pretraining: ``dvc repro prepare`` with the search
    off, then the search switched on (``train.lr`` left out of ``train``, so it is searched, not
    fixed) and a full ``dvc repro``. Returns the repository, that repro and its params."""
    repo = make_repo(tmp_path_factory.mktemp("search_pretrain") / "repo", PRETRAIN)
    env = stage_env(repo)
    sh("dvc repro prepare", repo, env=env)
    params = dict(PRETRAIN, train={k: v for k, v in PRETRAIN["train"].items() if k != "lr"},
                  search=SEARCH)
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    proc = sh("dvc repro", repo, env=env)
    return repo, proc, params

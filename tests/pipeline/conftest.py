"""A temporary git + DVC repository holding this project's dvc.yaml, pipelines and a tiny config."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]

TINY = {
    "data": {"source": "digits", "test_size": 0.25, "random_state": 0},
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
    for pkg in ("pipelines", "nnpipe"):
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

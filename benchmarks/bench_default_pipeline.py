"""Wall time of the shipped default pipeline (params.yaml as committed), end to end.

Run from the repository root::

    python benchmarks/bench_default_pipeline.py

Copies dvc.yaml, params.yaml, pipelines/ and nnpipe/ into a fresh git + DVC repository in a
temporary folder, runs ``dvc repro`` there (tracking into that folder's mlflow.db) and prints the
time of each stage and the total. Target: <= 15 minutes on a 2-core CPU.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        repo = Path(tmp) / "repo"
        repo.mkdir()
        for name in ("dvc.yaml", "params.yaml", ".gitignore"):
            shutil.copy(ROOT / name, repo / name)
        for pkg in ("pipelines", "nnpipe", "data/raw"):  # data/raw: prepare's ${data.path}
            shutil.copytree(ROOT / pkg, repo / pkg, ignore=shutil.ignore_patterns("__pycache__"))
        env = {**os.environ, "PYTHONPATH": str(repo)}
        env.pop("MLFLOW_TRACKING_URI", None)
        for cmd in ("git init -q", "git config user.email b@b", "git config user.name b",
                    "dvc init -q", "dvc config core.analytics false", "git add -A",
                    "git commit -qm init"):
            subprocess.run(cmd, shell=True, cwd=repo, check=True, env=env)
        start = time.perf_counter()
        proc = subprocess.Popen(["dvc", "repro"], cwd=repo, env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)
        stages, current, t0 = {}, None, start
        for line in proc.stdout:
            match = re.match(r"Running stage '(\w+)'", line)
            if match:
                now = time.perf_counter()
                if current:
                    stages[current] = now - t0
                current, t0 = match.group(1), now
            if line.startswith(("[", "Running", "ERROR")):
                print(line.rstrip())
        proc.wait()
        total = time.perf_counter() - start
        if current:
            stages[current] = time.perf_counter() - t0
        if proc.returncode:
            sys.exit(f"dvc repro failed with exit code {proc.returncode}")
        print("\nstage       seconds")
        for name, seconds in stages.items():
            print(f"{name:10s} {seconds:8.1f}")
        print(f"{'total':10s} {total:8.1f}   (target <= 900 s on 2 cores)")
        import json

        ev = json.loads((repo / "metrics" / "evaluate.json").read_text())
        print(f"\ntest accuracy: single model {ev['accuracy']:.4f}", end="")
        if "ensemble" in ev:
            print(f", ensemble {ev['ensemble']['accuracy']:.4f}, mean member "
                  f"{ev['mean_member']['accuracy']:.4f}; NLL ensemble {ev['ensemble']['nll']:.4f}"
                  f" vs mean member {ev['mean_member']['nll']:.4f}")
        cv = json.loads((repo / "metrics" / "cv.json").read_text())
        print(f"cv accuracy {cv['mean']['accuracy']:.4f} +- {cv['std']['accuracy']:.4f}")


if __name__ == "__main__":
    main()

"""What dvc.yaml declares, checked without running the whole pipeline: the raw data and the code
each stage runs are dependencies, metrics files hold a summary, plots are declared once and render
offline. Each test takes seconds (the CSV one runs the real prepare stage)."""

import ast
import json
import re
import shutil
from pathlib import Path

import pytest
import yaml

from nnpipe.config import load_config
from pipelines.evaluate import summary
from pipelines.prepare import dataset_kwargs

from .conftest import ROOT, sh, stage_env

DVC_YAML = yaml.safe_load((ROOT / "dvc.yaml").read_text())
STAGES = DVC_YAML["stages"]
PACKAGES = ("nnpipe", "pipelines")


def _paths(entries):
    """The paths of a dvc.yaml list of outs / deps / metrics (plain or with options)."""
    return [next(iter(e)) if isinstance(e, dict) else e for e in entries or []]


def _git_dvc_repo(path: Path, params: dict) -> Path:
    """A git + DVC repo with this project's dvc.yaml, code and ``params``."""
    path.mkdir(parents=True, exist_ok=True)
    shutil.copy(ROOT / "dvc.yaml", path / "dvc.yaml")
    for pkg in ("pipelines", "nnpipe", "data/raw"):
        shutil.copytree(ROOT / pkg, path / pkg, ignore=shutil.ignore_patterns("__pycache__"),
                        dirs_exist_ok=True)
    (path / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    sh("git init -q && git config user.email t@t && git config user.name t", path)
    sh("dvc init -q && dvc config core.analytics false", path)
    sh("git add -A && git commit -qm init", path)
    return path


# --------------------------------------------------------------------------- 1. the raw data


def test_prepare_depends_on_the_raw_data_path_from_params():
    assert "${data.path}" in STAGES["prepare"]["deps"]
    shipped = load_config(ROOT / "params.yaml")  # digits with the placeholder folder validates
    assert shipped.data.source == "digits"
    assert (ROOT / shipped.data.path).is_dir()
    assert (ROOT / shipped.data.path / "README.md").is_file()  # in git: the dependency exists


def test_digits_ignores_its_placeholder_folder_but_refuses_a_data_file(tmp_path):
    assert dataset_kwargs({"source": "digits", "path": str(tmp_path), "test_size": 0.5}) == \
        {"source": "digits", "test_size": 0.5}
    assert dataset_kwargs({"path": str(tmp_path)}) == {}  # source left out: digits
    assert dataset_kwargs({"source": "csv", "path": "x.csv", "target": "y"}) == \
        {"source": "csv", "path": "x.csv", "target": "y"}
    table = tmp_path / "train.csv"
    table.write_text("a,y\n1,0\n")
    with pytest.raises(ValueError, match=r"data.path: '.*train.csv' is a file, but data.source "
                                         r"is 'digits'"):
        dataset_kwargs({"source": "digits", "path": str(table)})


@pytest.mark.slow  # the real prepare stage under dvc: about 20 s, a minute on a busy machine
def test_appending_a_row_to_the_csv_makes_prepare_changed(tmp_path):
    rows = [f"{i % 7},{(i * 3) % 5},{i % 2}" for i in range(40)]
    params = {"data": {"source": "csv", "path": "data/raw/table.csv", "target": "y",
                       "test_size": 0.25, "random_state": 0},
              "tracking": {"enabled": False}}
    repo = tmp_path / "repo"
    (repo / "data/raw").mkdir(parents=True)
    (repo / "data/raw/table.csv").write_text("a,b,y\n" + "\n".join(rows) + "\n")
    _git_dvc_repo(repo, params)
    sh("dvc repro prepare", repo, env=stage_env(repo))
    assert json.loads(sh("dvc status prepare --json", repo).stdout) == {}
    with (repo / "data/raw/table.csv").open("a") as fh:
        fh.write("3,4,1\n")
    status = json.loads(sh("dvc status prepare --json", repo).stdout)
    assert status == {"prepare": [{"changed deps": {"data/raw/table.csv": "modified"}}]}


# --------------------------------------------------------------------------- 2. the code


def _module_file(name: str):
    base = ROOT.joinpath(*name.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def _imported(path: Path):
    """The project modules ``path`` imports anywhere (top level or inside a function)."""
    package = ".".join(path.relative_to(ROOT).with_suffix("").parts)
    if path.name != "__init__.py":
        package = package.rpartition(".")[0]
    else:
        package = package[: -len(".__init__")]
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parent + ([base] if base else []))
            names.add(base)
            names.update(f"{base}.{a.name}" for a in node.names)  # submodules
    return {n for n in names if n.split(".")[0] in PACKAGES}


def _closure(module: str):
    """Every project file ``module`` runs, following imports (and parent packages)."""
    files, todo = set(), [module]
    while todo:
        name = todo.pop()
        parts = name.split(".")
        for i in range(1, len(parts) + 1):  # importing a.b.c runs a/__init__ and a/b/__init__
            file = _module_file(".".join(parts[:i]))
            if file is not None and file not in files:
                files.add(file)
                todo.extend(_imported(file))
    return files


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_every_stage_depends_on_the_project_code_it_runs(stage):
    module = re.search(r"python -m (\S+)", STAGES[stage]["cmd"]).group(1)
    deps = [ROOT / d for d in _paths(STAGES[stage]["deps"]) if "${" not in d]
    runs = _closure(module) - {ROOT / "pipelines/__init__.py"}  # a docstring, nothing to run
    missing = sorted(str(f.relative_to(ROOT)) for f in runs
                     if not any(f == d or d in f.parents for d in deps))
    assert not missing, f"stage {stage!r} runs these files but does not depend on them"


# --------------------------------------------------------------------------- 3. metrics


def test_metrics_files_hold_only_summaries_and_the_details_are_plain_outputs():
    for name, stage in STAGES.items():
        for path in _paths(stage.get("metrics")):
            assert path.startswith("metrics/"), (name, path)
        reports = [p for p in _paths(stage.get("outs")) if p.startswith("reports/")]
        for entry in stage.get("outs") or []:
            if isinstance(entry, dict) and next(iter(entry)) in reports:
                assert entry[next(iter(entry))] == {"cache": False}
    assert {"reports/train.json", "reports/cv.json", "reports/evaluate.json"} <= {
        p for s in STAGES.values() for p in _paths(s.get("outs"))}


def test_evaluate_keeps_the_headline_numbers_and_leaves_the_details_to_the_report():
    scores = {"accuracy": 0.9, "balanced_accuracy": 0.89, "nll": 0.3, "brier": 0.15, "ece": 0.02}
    result = {**scores, "per_class": {"0": {"precision": 1.0, "support": 3}},
              "ensemble": dict(scores), "mean_member": dict(scores),
              "members": [dict(scores)] * 5, "best_single": {"member": 2, **scores},
              "pruned": {"sparsity": 0.5, "layer_sparsity": {"a": 0.5}, **scores},
              "folded": {"max_abs_diff": 0.0, "folded_us_per_sample_bs1": 3.0},
              "sparsity": 0.0}
    assert summary(result) == {**scores, "ensemble": scores, "mean_member": scores}
    regression = {"r2": 0.8, "rmse": 1.0, "mae": 0.7, "members": [{"r2": 0.7}], "sparsity": 0.0}
    assert summary(regression) == {"r2": 0.8, "rmse": 1.0, "mae": 0.7}


# --------------------------------------------------------------------------- 4. plots


def test_each_plot_is_declared_once_at_the_top_level_and_is_an_image():
    assert not [name for name, stage in STAGES.items() if "plots" in stage]
    plots = DVC_YAML["plots"]
    assert all(isinstance(p, str) for p in plots), "only image files: no Vega (CDN) plots"
    assert len(plots) == len(set(plots))
    assert all(Path(p).suffix in (".png", ".svg", ".jpg") for p in plots)
    outs = {p for s in STAGES.values() for p in _paths(s.get("outs"))}
    for plot in plots:  # each is written by a stage, as a plain output or inside one
        assert any(plot == o or plot.startswith(o.rstrip("/") + "/") for o in outs), plot


def test_plots_show_renders_each_plot_once_without_any_script(tmp_path):
    repo = _git_dvc_repo(tmp_path / "repo", {"data": {"source": "digits", "path": "data/raw"}})
    from nnpipe.plots import confusion_matrix_plot

    for plot in DVC_YAML["plots"]:  # any PNG will do: dvc shows the file as it is
        confusion_matrix_plot([0, 1], [0, 1], [0, 1], repo / plot)
    sh("dvc plots show -o out", repo)
    html = (repo / "out/index.html").read_text()
    assert "<script" not in html and "https://" not in html and "http://" not in html
    images = re.findall(r'<img src="([^"]+)"', html)
    assert len(images) == len(DVC_YAML["plots"])
    assert all((repo / "out" / src).is_file() for src in images)

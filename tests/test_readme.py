"""The README's examples run as written and print what the README says."""

import contextlib
import io
import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def _block(heading: str) -> str:
    text = README.read_text()
    section = text.split(f"## {heading}\n", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_quickstart_runs_and_reaches_the_documented_accuracy():
    code = _block("Quickstart")
    claimed = float(re.search(r"print\(clf.score\(X_test, y_test\)\)\s+# ([0-9.]+)", code).group(1))
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(code, "README-quickstart", "exec"), {})
    score = float(out.getvalue().strip().splitlines()[-1])
    assert abs(score - claimed) < 0.006
    assert score >= 0.97


def _section_block(heading: str) -> str:
    text = README.read_text()
    section = re.split(rf"^#+ {re.escape(heading)}\n", text, maxsplit=1, flags=re.M)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def _run(code: str, name: str, tmp_path, monkeypatch) -> list:
    monkeypatch.chdir(tmp_path)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(code, name, "exec"), {})
    return out.getvalue().strip().splitlines()


@pytest.mark.slow
def test_the_learning_rate_finder_example_prints_what_the_readme_says(tmp_path, monkeypatch):
    code = _section_block("Choosing the learning rate and reading the curves")
    lines = _run(code, "README-lr-finder", tmp_path, monkeypatch)
    claimed = re.search(r"print\(result\)\s+# (.*)", code).group(1)
    assert lines[0] == claimed
    assert lines[1] == "diagnostics: no problems found"
    assert lines[2] == "diagnostics: 1 finding" and "[warning] flat_loss" in lines[3]
    assert (tmp_path / "lr_range_test.png").exists() and (tmp_path / "curves.png").exists()


@pytest.mark.slow
def test_the_folding_and_pruning_example_prints_what_the_readme_says(tmp_path, monkeypatch):
    code = _section_block("Faster and smaller models: batch-norm folding and pruning")
    lines = _run(code, "README-compress", tmp_path, monkeypatch)
    assert lines[0] == "None True"
    assert float(lines[1]) == 0.5
    claimed = re.search(r"# ([0-9.]+) ([0-9.]+)\n", code).groups()
    assert lines[2].split() == list(claimed)


@pytest.mark.slow
def test_the_pretraining_example_prints_what_the_readme_says(tmp_path, monkeypatch):
    code = _section_block("Pretraining with few labels")
    lines = _run(code, "README-pretrain", tmp_path, monkeypatch)
    assert lines[0] == "6 tensors reused"
    claimed = re.search(r"\n# ([0-9.]+) ([0-9.]+)\n", code).groups()
    assert lines[1].split() == list(claimed)

"""The install story: what nnpipe imports is declared, bounds and pins agree, CI runs the README."""

from __future__ import annotations

import ast
import re
import sys
import tomllib
from importlib.metadata import packages_distributions
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
CORE = {canonicalize_name(Requirement(d).name): Requirement(d) for d in PYPROJECT["dependencies"]}
EXTRAS = {name: [Requirement(d) for d in deps]
          for name, deps in PYPROJECT["optional-dependencies"].items()}
# Libraries whose private API nnpipe touches: each must have an upper bound.
PRIVATE_API_USERS = ["skorch", "optuna", "mlflow", "scikit-learn", "skops"]


def _third_party_imports(folder: Path) -> dict:
    """Top-level modules imported by the ``.py`` files under ``folder`` -> first file."""
    stdlib = set(sys.stdlib_module_names)
    found = {}
    for path in sorted(folder.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                top = name.split(".")[0]
                if top not in stdlib and top not in ("nnpipe", "pipelines", "__future__"):
                    found.setdefault(top, path.relative_to(ROOT))
    return found


@pytest.mark.parametrize("folder", ["nnpipe", "pipelines"])
def test_every_imported_library_is_a_declared_core_dependency(folder):
    dists = packages_distributions()
    for module, where in _third_party_imports(ROOT / folder).items():
        names = {canonicalize_name(d) for d in dists.get(module, [])}
        assert names, f"{where} imports {module!r}, which no installed distribution provides"
        assert names & set(CORE), (
            f"{where} imports {module!r} (from {sorted(names)}), not declared in "
            f"pyproject.toml's dependencies")


def test_server_clients_are_extras_and_dev_installs_them():
    assert "psycopg" not in CORE and "dask" not in CORE
    assert [r.name for r in EXTRAS["postgres"]] == ["psycopg"]
    assert [r.name for r in EXTRAS["dask"]] == ["dask"]
    dev_self = [r for r in EXTRAS["dev"] if r.name == "nnpipe"]
    assert dev_self and dev_self[0].extras == {"postgres", "dask"}
    assert CORE["sqlalchemy"].specifier.contains("2.1.0") and not CORE["sqlalchemy"].specifier.contains("2.0.40")


@pytest.mark.parametrize("name", PRIVATE_API_USERS)
def test_libraries_whose_private_api_we_use_have_an_upper_bound(name):
    ops = {s.operator for s in CORE[canonicalize_name(name)].specifier}
    assert "<" in ops or "<=" in ops, f"{name} needs an upper bound in pyproject.toml"


def _pins() -> dict:
    pins = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            req = Requirement(line)
            (spec,) = req.specifier
            assert spec.operator == "==", f"constraints.txt: {line!r} is not an exact pin"
            pins[canonicalize_name(req.name)] = spec.version
    return pins


def test_constraints_pin_every_declared_dependency_within_its_bounds():
    pins = _pins()
    assert "torch" not in pins, "torch is installed first (CPU or CUDA build), never pinned"
    declared = list(CORE.values()) + [r for deps in EXTRAS.values() for r in deps
                                      if r.name != "nnpipe"]
    for req in declared:
        name = canonicalize_name(req.name)
        if name == "torch":
            continue
        assert name in pins, f"constraints.txt does not pin {req.name}"
        assert req.specifier.contains(pins[name], prereleases=True), (
            f"constraints.txt pins {req.name}=={pins[name]}, outside pyproject's {req}")


def _fenced(section: str, lang: str = "bash") -> list:
    text = (ROOT / "README.md").read_text()
    body = re.split(rf"^## {section}\n", text, maxsplit=1, flags=re.M)[1]
    block = re.search(rf"```{lang}\n(.*?)```", body, re.S).group(1)
    return [line.strip() for line in block.splitlines() if line.strip()]


def test_ci_runs_exactly_the_readme_install_and_test_commands():
    ci = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()
          if line.strip() and not line.startswith("#")
          and not line.startswith(("set ", "cd "))]
    readme = [re.sub(r"^pip ", "python -m pip ", c) for c in _fenced("Install")]
    assert ci == readme + _fenced("Test")


def test_a_postgresql_url_without_its_client_names_the_key_and_the_extra(monkeypatch):
    import importlib.util

    from nnpipe.exceptions import MissingClientError, check_server_client
    from nnpipe.search import storage_from_url

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "psycopg" else real(name, *a))
    url = "postgresql://postgres:secret@127.0.0.1:5432/test"
    with pytest.raises(MissingClientError, match=r"search\.storage=.*nnpipe\[postgres\]") as err:
        storage_from_url(url, "unused.log")
    assert "secret" not in str(err.value)          # the password is not echoed
    assert isinstance(err.value, ValueError)
    with pytest.raises(MissingClientError, match="tracking.uri"):
        check_server_client("postgresql+nosuchdriver://h/db", "tracking.uri")
    check_server_client("sqlite:///x.db", "tracking.uri")


def test_a_tracker_on_postgresql_without_its_client_fails_at_once(monkeypatch, tmp_path):
    import importlib.util

    from nnpipe.exceptions import MissingClientError
    from nnpipe.tracking import Tracker

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "psycopg" else real(name, *a))
    with pytest.raises(MissingClientError, match=r"tracking\.uri=.*nnpipe\[postgres\]"):
        Tracker("train", uri="postgresql://postgres@127.0.0.1/test", outbox=tmp_path)
    assert not any(tmp_path.iterdir())   # nothing went to the outbox as if the server were down

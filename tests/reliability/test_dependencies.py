"""The pinned minimums of the tracking and serialization stack are past every known advisory."""

import json
import re
from importlib.metadata import version
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[2]
ADVISORIES = json.loads((Path(__file__).with_name("advisories.json")).read_text())
STACK = [k for k in ADVISORIES if not k.startswith("_")]


def _minimums():
    import tomllib

    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    out = {}
    for dep in deps:
        req = Requirement(dep)
        lows = [Version(s.version) for s in req.specifier if s.operator in (">=", "==", "~=")]
        out[req.name.lower()] = max(lows) if lows else None
    return out


@pytest.mark.parametrize("package", STACK)
def test_the_pinned_minimum_is_past_every_fixed_advisory(package):
    minimums = _minimums()
    fixed = [a for a in ADVISORIES[package] if a["fixed_in"]]
    if package not in minimums:
        assert not fixed, f"{package} has advisories but no minimum in pyproject.toml"
        return  # a transitive dependency with nothing to pin
    low = minimums[package]
    assert low is not None, f"{package} has no minimum version in pyproject.toml"
    for advisory in fixed:
        assert low >= Version(advisory["fixed_in"]), (
            f"pyproject.toml allows {package}>={low}, affected by {advisory['id']} "
            f"({advisory['summary']}); fixed in {advisory['fixed_in']}")


@pytest.mark.parametrize("package", STACK)
def test_the_installed_version_is_past_every_fixed_advisory(package):
    try:
        installed = Version(version(package))
    except Exception:  # noqa: BLE001 - not installed here
        pytest.skip(f"{package} is not installed")
    for advisory in ADVISORIES[package]:
        if advisory["fixed_in"]:
            assert installed >= Version(advisory["fixed_in"]), (package, advisory["id"])


def test_every_advisory_entry_is_well_formed():
    for package in STACK:
        for advisory in ADVISORIES[package]:
            assert re.match(r"^(CVE|GHSA|PYSEC)-", advisory["id"]), advisory
            assert advisory["summary"]
            if advisory["fixed_in"]:
                Version(advisory["fixed_in"])


def test_the_readme_binds_mlflow_to_localhost_and_says_how_to_enable_auth():
    readme = (ROOT / "README.md").read_text()
    commands = re.findall(r"^\s*(mlflow (?:ui|server)\b.*)$", readme, flags=re.M)
    assert commands, "the README shows no mlflow ui / server command"
    for cmd in commands:
        assert "--host 127.0.0.1" in cmd, f"README: {cmd!r} does not bind to 127.0.0.1"
    assert "--app-name basic-auth" in readme and "mlflow[auth]" in readme
    assert "MLFLOW_TRACKING_USERNAME" in readme

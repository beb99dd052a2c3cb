#!/usr/bin/env bash
# Audit the minimum versions pyproject.toml allows, and the installed environment, with pip-audit.
# Needs the advisory services pip-audit queries (PyPI's JSON API or osv.dev); on a machine that
# reaches only a package mirror, tests/reliability/test_dependencies.py checks the same minimums
# against tests/reliability/advisories.json instead.
set -euo pipefail
cd "$(dirname "$0")/.."
pip install -q pip-audit
python - <<'PY' > /tmp/nnpipe-minimums.txt
import tomllib
from packaging.requirements import Requirement
for dep in tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"]:
    req = Requirement(dep)
    low = [s.version for s in req.specifier if s.operator == ">="]
    if low:
        print(f"{req.name}=={low[0]}")
PY
echo "== the minimums pyproject.toml allows"
pip-audit --no-deps --disable-pip -r /tmp/nnpipe-minimums.txt
echo "== the installed environment"
pip-audit

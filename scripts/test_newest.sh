#!/usr/bin/env bash
# Try nnpipe against the NEWEST versions its bounds allow, in a brand-new virtualenv, without
# constraints.txt (non-blocking: CI tests the pinned set; run this on purpose, e.g. weekly).
#   scripts/test_newest.sh              install the newest versions, run the quick suite
#   scripts/test_newest.sh --refresh    ... run the full suite and, if it passes, rewrite constraints.txt
set -euo pipefail
cd "$(dirname "$0")/.."
venv=$(mktemp -d)/venv
python -m venv "$venv"
# shellcheck disable=SC1091
. "$venv/bin/activate"
python -m pip install torch==2.13.0 --extra-index-url https://download.pytorch.org/whl/cpu
python -m pip install --upgrade --upgrade-strategy eager -e ".[dev]"
python -m pip freeze --exclude-editable | grep -vE '^(torch|nnpipe)==' > "$venv/../freeze.txt"
echo "newest versions installed: $venv/../freeze.txt"
if [ "${1:-}" = "--refresh" ]; then
  python -m pytest -n 2
  { sed -n '1,3p' constraints.txt; cat "$venv/../freeze.txt"; } > constraints.txt.new
  mv constraints.txt.new constraints.txt
  echo "constraints.txt refreshed: review 'git diff constraints.txt' and commit it"
else
  python -m pytest -n 2 -m "not slow"
fi

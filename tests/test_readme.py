"""The README's quickstart runs as written and prints what the README says."""

import contextlib
import io
import re
from pathlib import Path

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

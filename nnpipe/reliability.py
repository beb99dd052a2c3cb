"""Guards for files that crashes can tear: the Optuna journal.

An append cut short by a crash leaves a journal whose last line is incomplete; Optuna would then
fail on a later open with a ``JSONDecodeError``, or append after the torn bytes. nnpipe checks the
journal before opening it: a torn last line is cut off (the intact part is kept byte for byte,
the torn bytes are saved beside it as ``<journal>.torn``) and the user is warned.
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

__all__ = ["check_journal", "JournalRepairWarning"]


class JournalRepairWarning(UserWarning):
    """A torn journal was repaired."""


def check_journal(path: os.PathLike) -> bool:
    """Repair a journal whose last line was cut mid-write; return True if it was repaired.

    Raises ``ValueError`` when a line *before* the last one is not valid JSON: that is not a torn
    append but a damaged file, and nnpipe refuses to guess.
    """
    path = Path(path)
    if not path.exists() or path.stat().st_size == 0:
        return False
    data = path.read_bytes()
    lines = data.split(b"\n")
    complete, tail = lines[:-1], lines[-1]  # tail is b"" when the file ends with a newline
    for number, line in enumerate(complete, 1):
        if not line.strip():
            continue
        try:
            json.loads(line)
        except ValueError:
            if number == len(complete) and not tail:
                # the last full line is garbage: a torn write followed by a newline
                tail, complete = line + b"\n", complete[:-1]
                break
            raise ValueError(f"{path}: line {number} is not valid JSON; the journal is damaged "
                             "beyond a torn last write. Restore it from a backup or start a new "
                             "study (search.study_name / a new journal file).") from None
    if not tail:
        return False
    keep = b"".join(line + b"\n" for line in complete)
    Path(f"{path}.torn").write_bytes(tail)
    tmp = path.with_name(f".{path.name}.repair")
    tmp.write_bytes(keep)
    os.replace(tmp, path)
    warnings.warn(f"{path}: the last journal entry was cut mid-write (a crash during append); "
                  f"removed its {len(tail)} bytes (kept in {path}.torn). Completed trials are "
                  "intact.", JournalRepairWarning, stacklevel=2)
    return True

"""Shared helpers of the search benchmarks (data, quiet runs, trial bookkeeping)."""

from __future__ import annotations

import contextlib
import os
import sys
from typing import Iterator, Tuple

import numpy as np


def digits_train() -> Tuple[np.ndarray, np.ndarray]:
    """The 75 % stratified training part of digits (``X / 16`` as float32, seed 0); searches use
    only this part, never the 25 % test rows."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    X, y = load_digits(return_X_y=True)
    Xtr, _, ytr, _ = train_test_split((X / 16).astype(np.float32), y, test_size=0.25,
                                      stratify=y, random_state=0)
    return Xtr, ytr


@contextlib.contextmanager
def quiet(enabled: bool = True) -> Iterator[None]:
    """Send stdout to /dev/null at the file-descriptor level, so that the one-line-per-trial
    prints of ``run_search`` go away, including those of spawned worker processes (they inherit
    the descriptor when they start, which happens inside ``run_search``)."""
    if not enabled:
        yield
        return
    sys.stdout.flush()
    saved = os.dup(1)
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 1)
        yield
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)
        os.close(devnull)


def trial_epochs(trial) -> int:
    """Epochs a trial trained, all folds together (a pruned trial: its partial fold 0; a failed
    one: what it trained before failing)."""
    return int(trial.user_attrs.get("epochs") or 0)

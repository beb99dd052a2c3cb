"""Spy on the process-wide setters a library must not call (used by ``tests/test_logging.py``,
in this interpreter and in a fresh one)."""

import logging
import sys
import warnings
from typing import Callable, List

import optuna
import torch

#: setters of other libraries' global state; a library that needs a different value for a block
#: restores the old one (``warnings.catch_warnings``, a try/finally), and nnpipe needs neither
SETTERS = [(warnings, "filterwarnings"), (warnings, "simplefilter"), (warnings, "resetwarnings"),
           (logging, "basicConfig"), (logging, "disable"), (logging.Logger, "setLevel"),
           (torch, "set_num_threads"), (torch, "set_num_interop_threads"),
           (optuna.logging, "set_verbosity")]


def spy_on_setters(patch: Callable = setattr) -> List[str]:
    """Wrap every setter in :data:`SETTERS`; the list returned fills with ``"module: setter"``
    for each call made directly from a module of nnpipe. ``patch`` installs a wrapper
    (``monkeypatch.setattr`` undoes it after the test)."""
    calls: List[str] = []

    def wrap(owner, name):
        original = getattr(owner, name)

        def wrapper(*args, **kwargs):
            caller = sys._getframe(1).f_globals.get("__name__", "")
            if caller.split(".")[0] == "nnpipe":
                calls.append(f"{caller}: {getattr(owner, '__name__', owner)}.{name}")
            return original(*args, **kwargs)

        patch(owner, name, wrapper)

    for owner, name in SETTERS:
        wrap(owner, name)
    return calls

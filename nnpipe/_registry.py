"""Named registries with loud failures.

Every knob that takes a name (``"he_normal"``, ``"nadam"``, ``"cosine"``) resolves it through a
:class:`Registry`. An unknown name raises :class:`ValueError` that names the argument, the value
received, every valid name and the nearest match.
"""

from __future__ import annotations

import difflib
from typing import Any, Callable, Dict, Iterable, Optional


def did_you_mean(value: str, choices: Iterable[str]) -> str:
    """Return ``" Did you mean 'x'?"`` for the closest choice, or ``""`` when none is close."""
    close = difflib.get_close_matches(str(value), list(choices), n=1, cutoff=0.5)
    return f" Did you mean {close[0]!r}?" if close else ""


def invalid_value(argument: str, value: Any, allowed: str) -> ValueError:
    """Build the project's standard error: what is wrong, where, and what is allowed."""
    return ValueError(f"{argument} must be {allowed}, got {value!r}.")


class Registry:
    """A mapping from documented names to objects, with did-you-mean errors.

    Parameters
    ----------
    argument : str
        Name of the estimator argument this registry serves (used in error messages).
    kind : str
        What the objects are, e.g. ``"an optimizer class"`` (used in error messages).

    Examples
    --------
    >>> reg = Registry("activation", "an nn.Module class")
    >>> import torch
    >>> _ = reg.register("relu", torch.nn.ReLU)
    >>> reg.get("relu") is torch.nn.ReLU
    True
    >>> reg.get("rleu")
    Traceback (most recent call last):
    ...
    ValueError: activation must be one of 'relu' or an nn.Module class, got 'rleu'. Did you mean 'relu'?
    """

    def __init__(self, argument: str, kind: str):
        self.argument = argument
        self.kind = kind
        self._items: Dict[str, Any] = {}

    def register(self, name: str, obj: Any) -> Any:
        self._items[name] = obj
        return obj

    def names(self) -> list:
        return sorted(self._items)

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def get(self, name: Any, *, accept: Optional[Callable[[Any], bool]] = None) -> Any:
        """Resolve ``name``; non-strings are returned as they are if ``accept(name)`` holds."""
        if isinstance(name, str):
            key = name.lower()
            if key in self._items:
                return self._items[key]
            raise ValueError(self._message(name) + did_you_mean(key, self._items))
        if accept is not None and accept(name):
            return name
        raise ValueError(self._message(name))

    def _message(self, value: Any) -> str:
        valid = ", ".join(repr(n) for n in self.names())
        return f"{self.argument} must be one of {valid} or {self.kind}, got {value!r}."

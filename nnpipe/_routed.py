"""Early checks of skorch's routed parameters (``optimizer__momentum``, ``criterion__weight``...).

skorch passes ``<prefix>__<name>`` on to the component it builds at ``fit``; a misspelt name or
a value of the wrong type would otherwise surface only then (or, for a value only compared
later, in the middle of training), as the component's own ``TypeError``. :func:`check_routed`
builds the component once, on throw-away inputs, and turns what goes wrong into a
``ValueError`` that starts with the offending ``prefix__name``, says the value received and what
the component accepts.
"""

from __future__ import annotations

import inspect
from typing import Any, Callable, Dict, Iterable, Optional

from ._registry import did_you_mean

__all__ = ["accepted_names", "check_routed"]

#: what building a component can raise when an argument is wrong (torch raises RuntimeError for
#: some values, IndexError for a too-short ``betas``)
_REJECTED = (TypeError, ValueError, RuntimeError, AssertionError, IndexError, KeyError)


def accepted_names(target: Callable, skip: Iterable[str] = ()) -> Optional[set]:
    """The keyword names ``target`` (a class or function) accepts; ``None`` when it takes any
    (``**kwargs``) or its signature cannot be read."""
    try:
        params = inspect.signature(target).parameters
    except (TypeError, ValueError):
        return None
    if any(p.kind is p.VAR_KEYWORD for p in params.values()):
        return None
    skip = set(skip)
    return {n for n, p in params.items()
            if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and n not in skip}


def check_routed(prefix: str, owner: str, kwargs: Dict[str, Any], build: Callable[[dict], Any],
                 accepted: Optional[set] = None) -> None:
    """Raise ``ValueError`` naming the first ``prefix__name`` that ``build`` cannot take.

    ``owner`` names the component in messages (``"SGD"``); ``accepted`` is the set of names it
    takes (``None``: any). Unknown names are reported with the valid ones and a did-you-mean;
    a value the component rejects is reported with the component's own reason.
    """
    if accepted is not None:
        for key in kwargs:
            if key not in accepted:
                raise ValueError(f"{prefix}__{key} is not a parameter of {owner}; valid: "
                                 f"{sorted(f'{prefix}__{a}' for a in accepted)}."
                                 + did_you_mean(key, accepted))
    try:
        build(dict(kwargs))
        return
    except _REJECTED as exc:
        whole = exc
    # find the key to blame: the first that is rejected on its own
    for key, value in kwargs.items():
        try:
            build({key: value})
        except _REJECTED as exc:
            if str(exc).startswith(f"{prefix}__{key} "):  # it names the key already
                raise ValueError(str(exc)) from None
            raise ValueError(f"{prefix}__{key} was rejected by {owner}, got {value!r}: "
                             f"{_reason(exc)}") from None
    names = ", ".join(f"{prefix}__{k}={v!r}" for k, v in kwargs.items()) or "the defaults"
    raise ValueError(f"{prefix}__* ({names}) were rejected together by {owner}: "
                     f"{_reason(whole)}") from None


def _reason(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text if text.endswith(".") else text + "."

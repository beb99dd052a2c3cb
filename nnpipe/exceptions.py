"""nnpipe's error types, and which errors a command reports without a traceback.

Every error nnpipe raises on purpose derives from :class:`NnpipeError` (``ConfigError``,
``DivergenceError``) or from :class:`ValueError` (a bad argument, named with its value and
what is allowed). The command line (``nnpipe``) and the DVC stages print such *expected*
errors as one message and exit 1; any other exception is a bug and keeps its traceback.
``--debug`` (``nnpipe``) or ``NNPIPE_DEBUG=1`` (both; the way in for stages run by ``dvc``)
prints the traceback of expected errors too.
"""

from __future__ import annotations

import importlib.util
import os
from typing import Mapping, Optional

__all__ = ["NnpipeError", "EXPECTED_ERRORS", "debug_requested", "check_server_client",
           "MissingClientError"]


class NnpipeError(Exception):
    """Base class of the errors nnpipe raises on purpose."""


#: errors a command reports as a message (exit 1) rather than with a traceback
EXPECTED_ERRORS = (NnpipeError, ValueError, FileNotFoundError)

_OFF = ("", "0", "false", "no", "off")


def debug_requested(flag: bool = False, environ: Optional[Mapping[str, str]] = None) -> bool:
    """Whether to print tracebacks of expected errors: ``flag`` (``--debug``) or the
    environment variable ``NNPIPE_DEBUG`` set to anything but ``0`` / ``false`` / ``no`` /
    ``off`` / empty.

    Examples
    --------
    >>> debug_requested(environ={"NNPIPE_DEBUG": "1"}), debug_requested(environ={})
    (True, False)
    >>> debug_requested(True, environ={"NNPIPE_DEBUG": "0"})
    True
    """
    environ = os.environ if environ is None else environ
    return bool(flag) or environ.get("NNPIPE_DEBUG", "").strip().lower() not in _OFF


class MissingClientError(NnpipeError, ValueError):
    """A URL names a server whose client library is not installed (an extra of nnpipe's)."""


#: URL scheme prefix -> (the module SQLAlchemy needs for it, the extra that installs it)
_SERVER_CLIENTS = {"postgresql": ("psycopg", "postgres")}


def check_server_client(url: Optional[str], key: str) -> None:
    """Refuse a database URL whose client library is not installed, naming ``key`` and the
    install command (``postgresql://`` means psycopg 3 from SQLAlchemy 2.1 on).

    Examples
    --------
    >>> check_server_client("sqlite:///mlflow.db", "tracking.uri")  # no client needed
    >>> check_server_client(None, "search.storage")
    """
    if not url:
        return
    scheme = url.split(":", 1)[0]
    dialect, _, driver = scheme.partition("+")
    if dialect not in _SERVER_CLIENTS:
        return
    module, extra = _SERVER_CLIENTS[dialect]
    module = driver or module
    if importlib.util.find_spec(module) is None:
        raise MissingClientError(
            f"{key}={url.split('@')[-1]!r} needs the {module!r} client library, which is not "
            f"installed: pip install \"nnpipe[{extra}]\"")

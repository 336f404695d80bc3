"""User errors, and the one place that prints `thresher: error: ...`.

A low-floor module: it imports nothing of the app, so every module may raise a UserError. What it
prints is redacted by the function that app.secrets registers with `redact_with` when it is
imported; a process can hold a secret only through app.secrets, so none is printed unredacted.
"""
from __future__ import annotations

import os
import sys
import traceback
from typing import Callable


class UserError(Exception):
    """A mistake in what the user asked for: reported as one line, exit code 2, no traceback."""


def _unchanged(text: str) -> str:
    return text


_redact: Callable[[str], str] = _unchanged


def redact_with(function: Callable[[str], str]) -> None:
    """Pass everything `print_error` prints through `function` (app.secrets' redact)."""
    global _redact
    _redact = function


def print_error(message: str) -> None:
    """`thresher: error: MESSAGE` on stderr, secrets redacted."""
    print(f"thresher: error: {_redact(message)}", file=sys.stderr)


def print_user_error(error: UserError) -> None:
    """A user error as its one line; with HYDRA_FULL_ERROR=1 its traceback first, as Hydra shows."""
    if os.environ.get("HYDRA_FULL_ERROR") == "1":
        sys.stderr.write(_redact("".join(traceback.format_exception(error))))
    print_error(str(error))

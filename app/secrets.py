"""Secrets: read from the environment (or a *_FILE, the Docker secrets convention), kept out of
every log, saved config, report and error message by redacting their values wherever text leaves
the process."""
from __future__ import annotations

import logging
import os
import re
from pathlib import Path
from typing import List, Optional, Sequence, Set

from app.errors import UserError, redact_with

REDACTED = "***"
# Config key -> environment variable that carries it (a `key=value` override is taken off argv).
SECRET_VARIABLES = {"token": "THRESHER_TOKEN"}
# Every variable the shipped configuration reads through `${secret:NAME}`, registered for redaction
# at start so that nothing prints them even before the config is resolved.
KNOWN_SECRETS = ("THRESHER_TOKEN", "WANDB_API_KEY", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
                 "AWS_SESSION_TOKEN", "AZURE_STORAGE_ACCOUNT_KEY", "AZURE_STORAGE_CONNECTION_STRING",
                 "AZURE_STORAGE_SAS_TOKEN")
_REQUIRED = object()
_OVERRIDE = re.compile(r"^\+{0,2}(?P<key>[A-Za-z_][\w.]*)=(?P<value>.*)$", re.DOTALL)

_secret_values: Set[str] = set()


def register_secret(value: Optional[str]) -> None:
    """Remember a secret value so that `redact` hides it from then on."""
    if value:
        _secret_values.add(value)
        stripped = value.strip()
        if stripped:
            _secret_values.add(stripped)


def redact(text: str) -> str:
    for value in sorted(_secret_values, key=len, reverse=True):
        text = text.replace(value, REDACTED)
    return text


# Every `thresher: error: ...` line (app.errors) goes through redact: a process that holds a secret
# has imported this module to register it.
redact_with(redact)


def take_secret_overrides(argv: Sequence[str]) -> List[str]:
    """Remove `token=...` style overrides from argv before Hydra sees them.

    Hydra would write them to overrides.yaml, hydra.yaml and its error banner; instead the value
    travels as the secret's environment variable, the one channel the rest of the code reads.
    """
    kept = []
    for arg in argv:
        match = _OVERRIDE.match(arg)
        if match and match["key"] in SECRET_VARIABLES:
            value = match["value"]
            if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
                value = value[1:-1]
            register_secret(value)
            os.environ[SECRET_VARIABLES[match["key"]]] = value
            continue
        kept.append(arg)
    return kept


def read_secret(variable: str) -> Optional[str]:
    """The value of VARIABLE, else the contents of the file named by VARIABLE_FILE, else None."""
    value = os.environ.get(variable)
    if value:
        register_secret(value)
        return value
    file_name = os.environ.get(f"{variable}_FILE")
    if file_name:
        path = Path(file_name)
        if not path.is_file():
            raise UserError(f"{variable}_FILE={file_name!r} is not a readable file: "
                            f"point it at the file holding the secret (e.g. /run/secrets/...)")
        value = path.read_text().strip()
        register_secret(value)
        return value or None
    return None


def resolve_secret(variable: str, default=_REQUIRED):
    """The `${secret:NAME}` resolver: NAME from the environment or the file named by NAME_FILE,
    registered for redaction. `${secret:NAME,null}` is optional; without a default a missing secret
    is a user error that names the variable (never a value)."""
    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", str(variable)):
        raise UserError(f"${{secret:{variable}}}: not an environment variable name (use letters, digits, _)")
    value = read_secret(str(variable))
    if value:
        return value
    if default is _REQUIRED:
        raise UserError(f"the secret {variable} is required and not set: export {variable}, or "
                        f"{variable}_FILE naming a file that holds it (docker run -e {variable} ..., "
                        f"or a Docker secret)")
    return default


def register_secret_resolver() -> None:
    from omegaconf import OmegaConf

    if not OmegaConf.has_resolver("secret"):
        OmegaConf.register_new_resolver("secret", resolve_secret)


def check_secrets(cfg) -> None:
    """Resolve every `${secret:...}` in `cfg` now, so a missing one stops the run at start with a
    UserError naming the variable rather than somewhere in a later stage."""
    from omegaconf import DictConfig, ListConfig
    from omegaconf.errors import InterpolationResolutionError

    def walk(node, prefix: str) -> None:
        keys = range(len(node)) if isinstance(node, ListConfig) else list(node.keys())
        for key in keys:
            child = node._get_node(key)
            full = f"{prefix}{key}"
            if isinstance(child, (DictConfig, ListConfig)):
                walk(child, f"{full}.")
                continue
            raw = child._value() if child is not None else None
            if isinstance(raw, str) and "${secret:" in raw:
                try:
                    node[key]
                except InterpolationResolutionError as error:
                    message = str(error).split("raised while resolving interpolation: ", 1)[-1]
                    raise UserError(f"{full}: {redact(message.splitlines()[0])}") from None

    walk(cfg, "")


def register_environment_secrets() -> None:
    """Register every known secret present in the environment, so nothing prints it."""
    for variable in dict.fromkeys([*SECRET_VARIABLES.values(), *KNOWN_SECRETS]):
        try:
            read_secret(variable)
        except UserError:
            pass  # reported later, when the secret is actually read


class RedactingFilter(logging.Filter):
    """Rewrites each record's message (and traceback) with secret values replaced."""

    def filter(self, record: logging.LogRecord) -> bool:
        if _secret_values:
            record.msg = redact(record.getMessage())
            record.args = None
            if record.exc_info:
                record.exc_text = redact(logging.Formatter().formatException(record.exc_info))
                record.exc_info = None
        return True


class RedactingStream:
    """A stdout/stderr stand-in that redacts secrets from everything written through it."""

    def __init__(self, stream):
        self._stream = stream

    def write(self, text):
        return self._stream.write(redact(text) if _secret_values and isinstance(text, str) else text)

    def __getattr__(self, name):
        return getattr(self._stream, name)


def install_redaction() -> None:
    """Wrap stdout/stderr and every current root-logger handler."""
    import sys

    if not isinstance(sys.stdout, RedactingStream):
        sys.stdout = RedactingStream(sys.stdout)
    if not isinstance(sys.stderr, RedactingStream):
        sys.stderr = RedactingStream(sys.stderr)
    for handler in logging.getLogger().handlers:
        if not any(isinstance(f, RedactingFilter) for f in handler.filters):
            handler.addFilter(RedactingFilter())

"""The `thresher` command: Hydra's entrypoint, kept thin.

Before Hydra runs, secrets are taken off the command line and the overrides are composed and
checked once, so a user error exits 2 with one line, before any heavy import or any file is
written.
"""
from __future__ import annotations

import os
import re
import sys
from pathlib import Path
from typing import List, Optional, Sequence

import hydra
from omegaconf import DictConfig

from app.config import (UserError, did_you_mean, register_configs, register_resolvers, run_directory_path,
                         validate)
from app.secrets import install_redaction, redact, register_environment_secrets, take_secret_overrides


def find_conf_dir() -> Path:
    """conf/ beside the package in a checkout, or app/conf inside an installed wheel."""
    package_dir = Path(__file__).resolve().parent
    for candidate in (package_dir.parent / "conf", package_dir / "conf"):
        if (candidate / "config.yaml").is_file():
            return candidate
    raise FileNotFoundError(f"thresher's conf/ folder is missing beside {package_dir}")


CONF_DIR = find_conf_dir()
GROUPS = ("model", "data", "sampler", "hardware", "logger", "experiment")


def fail(message: str, code: int = 2) -> None:
    print(f"thresher: error: {redact(message)}", file=sys.stderr)
    sys.exit(code)


def main(argv: Optional[Sequence[str]] = None) -> None:
    args = take_secret_overrides(sys.argv[1:] if argv is None else argv)
    register_environment_secrets()
    install_redaction()
    register_configs()
    register_resolvers()
    try:
        preflight(args)
    except UserError as error:
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        fail(str(error))
    sys.argv = [sys.argv[0], *args]
    try:
        hydra_entry()
    except BrokenPipeError:  # `thresher --help | head`: the reader left, nothing is wrong
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


@hydra.main(config_path=str(CONF_DIR), config_name="config", version_base="1.3")
def hydra_entry(cfg: DictConfig) -> None:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    from app.run import execute

    hydra_cfg = HydraConfig.get()
    code = execute(cfg, Path(hydra_cfg.runtime.output_dir), hydra_cfg)
    # In a sweep one failed job must not end the others: its summary.json records the failure.
    if code and hydra_cfg.mode != RunMode.MULTIRUN:
        sys.exit(code)


# ---------------------------------------------------------------------------------------------
# Checking the overrides before Hydra runs
# ---------------------------------------------------------------------------------------------
def preflight(args: List[str]) -> None:
    """Compose the config the way Hydra will and check it; raises UserError."""
    from hydra._internal.utils import get_args_parser

    parsed = get_args_parser().parse_args(args)
    if (parsed.help or parsed.hydra_help or parsed.info or parsed.shell_completion or parsed.multirun
            or parsed.config_path or parsed.config_name or parsed.config_dir):
        return  # Hydra answers these itself; each job of a sweep checks its own config
    cfg = compose(parsed.overrides)
    validate(cfg)
    if cfg.run_directory and not parsed.cfg:  # refuse before Hydra touches the old run's folder
        from app.run import SUMMARY, Summary, refuse_finished_run

        run_dir = Path(run_directory_path(cfg.work_dir, cfg.note, cfg.run_directory))
        refuse_finished_run(Summary.load(run_dir / SUMMARY), cfg.overwrite, cfg.resume)


def compose(overrides: List[str]) -> DictConfig:
    try:
        return compose_quietly(overrides)
    except Exception as error:  # Hydra's and OmegaConf's own exceptions, made readable
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        raise UserError(explain_compose_error(error, overrides)) from None


def explain_compose_error(error: Exception, overrides: List[str]) -> str:
    from hydra.errors import MissingConfigException, OverrideParseException
    from omegaconf.errors import ConfigKeyError, ValidationError

    if isinstance(error, OverrideParseException):
        return f"could not parse the override: {_first_line(error)}"
    if isinstance(error, MissingConfigException):
        match = re.search(r"Could not find '([^'/]+)/([^']+)'", str(error))
        if match and match[1] in GROUPS:
            group, option = match[1], match[2]
            options = group_options(group)
            return (f"{group}={option} is not an option: choose from {', '.join(options)}"
                    f"{did_you_mean(option, options)}")
        return _first_line(error)

    cause = error
    while cause is not None and not isinstance(cause, (ConfigKeyError, ValidationError)):
        cause = cause.__cause__ or cause.__context__
    if isinstance(cause, ConfigKeyError):
        key = cause.full_key or cause.key or _key_in_message(str(error))
        value = _override_value(key, overrides)
        shown = f"{key}={value}" if value is not None else f"'{key}'"
        return f"{shown}: no such key{did_you_mean(key, known_keys(overrides))}"
    if isinstance(cause, ValidationError):
        key = cause.full_key
        value = _override_value(key, overrides)
        match = re.search(r"converted to (\w+)", cause.msg or "")
        allowed = f"expected {match[1].lower()}" if match else _first_line(cause)
        allowed = {"expected integer": "expected an integer", "expected float": "expected a number",
                   "expected boolean": "expected true or false"}.get(allowed, allowed)
        return f"{key}={value if value is not None else cause.value!r} is not allowed: {allowed}"

    message = _first_line(error)
    match = re.search(r"Could not override '([^']+)'", str(error))
    if match or "No match in the defaults list" in str(error):
        key = match[1] if match else _key_in_message(str(error))
        value = _override_value(key, overrides)
        shown = f"{key}={value}" if value is not None else f"'{key}'"
        kind = "key" if "." in key else "key or group"
        return f"{shown}: no such {kind}{did_you_mean(key, known_keys(overrides))}"
    return message


def group_options(group: str) -> List[str]:
    return sorted(path.stem for path in (CONF_DIR / group).glob("*.yaml"))


def known_keys(overrides: List[str]) -> List[str]:
    """Every dotted key of the config the user's group choices compose, plus the group names."""
    choices = [o for o in overrides if re.match(r"^\w+=", o) and o.split("=", 1)[0] in GROUPS]
    for attempt in (choices, []):
        try:
            cfg = compose_quietly(attempt)
            break
        except Exception:
            continue
    else:
        return list(GROUPS)
    keys = list(GROUPS)

    def walk(node, prefix: str) -> None:
        for key in node:
            full = f"{prefix}{key}"
            keys.append(full)
            child = node._get_node(key)
            if isinstance(child, DictConfig):
                walk(child, f"{full}.")

    walk(cfg, "")
    return keys


def compose_quietly(overrides: List[str]) -> DictConfig:
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3", job_name="thresher"):
            return hydra_compose(config_name="config", overrides=overrides)
    finally:
        GlobalHydra.instance().clear()


def _override_value(key: Optional[str], overrides: List[str]) -> Optional[str]:
    for override in overrides:
        name, _, value = override.lstrip("+~").partition("=")
        if name == key:
            return value
    return None


def _key_in_message(message: str) -> str:
    match = re.search(r"'([^']+)'", message)
    return match[1] if match else "?"


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


if __name__ == "__main__":
    main()

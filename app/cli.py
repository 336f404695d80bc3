"""The `thresher` command: Hydra's entrypoint, kept thin.

Before Hydra runs, secrets are taken off the command line, the Lightly Worker's `lightly.*` and
`scorer_config.*` keys are rewritten to thresher's (app.lightly_keys), and the overrides are composed and
checked once, so a user error exits 2 with one line before any file is written. Only a run that
trains imports torch here, to try its optimizer and scheduler; `--cfg` never does.
"""
from __future__ import annotations

import argparse
import logging
import os
import re
import sys
from pathlib import Path
from typing import List, Optional, Sequence

import hydra
from hydra.errors import CompactHydraException
from omegaconf import DictConfig, OmegaConf, open_dict

from app.config import register_configs, register_resolvers, run_directory_path, trains, validate
from app.config_checks import did_you_mean
from app.errors import UserError, print_error, print_user_error
from app.lightly_keys import Rewritten, rewrite_worker_keys
from app.secrets import install_redaction, redact, register_environment_secrets, take_secret_overrides


def find_conf_dir() -> Path:
    """conf/ beside the package in a checkout, or app/conf inside an installed wheel."""
    package_dir = Path(__file__).resolve().parent
    for candidate in (package_dir.parent / "conf", package_dir / "conf"):
        if (candidate / "config.yaml").is_file():
            return candidate
    raise FileNotFoundError(f"thresher's conf/ folder is missing beside {package_dir}")


CONF_DIR = find_conf_dir()
GROUPS = ("model", "data", "sampler", "scorer", "hardware", "logger", "executor", "experiment")
# Whether preflight checked the config of the single run that Hydra starts next in this process,
# so that the run does not check it again; each job of a sweep is checked by the run itself.
_checked_by_preflight = False
# The Lightly Worker keys this command's overrides were rewritten from, logged by each job.
_worker_keys = Rewritten([])


def fail(message: str, code: int = 2) -> None:
    print_error(message)
    sys.exit(code)


def main(argv: Optional[Sequence[str]] = None) -> None:
    global _checked_by_preflight, _worker_keys
    args = take_secret_overrides(sys.argv[1:] if argv is None else argv)
    register_environment_secrets()
    install_redaction()
    register_configs()
    register_resolvers()
    _worker_keys = Rewritten(list(args))
    try:
        _worker_keys = rewrite_worker_keys(args)  # lightly.* and scorer_config.*: thresher's keys
        args = _worker_keys.args
        parsed = preflight(args)
    except UserError as error:
        print_user_error(_worker_keys.explain(error))  # with its traceback under HYDRA_FULL_ERROR=1
        sys.exit(2)
    _checked_by_preflight = parsed is not None and not parsed.cfg
    if parsed is not None and parsed.cfg == "hydra" and parsed.resolve:
        show_resolved_hydra_config(parsed.overrides, parsed.package)
        return
    sys.argv = [sys.argv[0], *args]
    try:
        hydra_entry()
    except BrokenPipeError:  # `thresher --help | head`: the reader left, nothing is wrong
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


class JobFailed(CompactHydraException):
    """A failed job of a sweep, as Hydra's JobReturn holds it (one line, no traceback): the other
    jobs of the batch still run, and the sweeper sees the failure."""


@hydra.main(config_path=str(CONF_DIR), config_name="config", version_base="1.3")
def hydra_entry(cfg: DictConfig) -> Optional[float]:
    """One job. Returns the run's key metric (the train stage's key_metric_value in summary.json)
    for Hydra's sweepers to optimise, as lightning-hydra-template's train() does, or None for a
    run that trains nothing (the Optuna sweeper records that trial as failed and goes on). A single
    run that fails exits with its code. A failed job of a sweep (its error printed, and recorded in
    its summary.json when the run got that far) raises JobFailed: Hydra runs the other jobs of the
    batch, the Optuna sweeper marks the trial failed (and stops past hydra.sweeper.max_failure_rate),
    and `thresher -m` exits 1 at the end. An interrupted job (Ctrl-C, SIGTERM) ends a sweep at once."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    from app.run import execute, key_metric_of

    hydra_cfg = HydraConfig.get()
    run_dir = Path(hydra_cfg.runtime.output_dir)
    for level, line in _worker_keys.messages:  # here, so that the run's log file has them too
        logging.getLogger("thresher").log(level, line)
    checked = _checked_by_preflight and hydra_cfg.mode != RunMode.MULTIRUN
    code = execute(cfg, run_dir, hydra_cfg, checked=checked)
    if code and (hydra_cfg.mode != RunMode.MULTIRUN or code >= 128):
        sys.exit(code)
    if code:
        raise JobFailed(f"job {hydra_cfg.job.num} failed (exit code {code}); its run directory: {run_dir}")
    return key_metric_of(run_dir)


# ---------------------------------------------------------------------------------------------
# Checking the overrides before Hydra runs
# ---------------------------------------------------------------------------------------------
def preflight(args: List[str]) -> Optional[argparse.Namespace]:
    """Compose the config the way Hydra will and check it; raises UserError. Returns the parsed
    arguments, or None when Hydra answers them itself."""
    from hydra._internal.utils import get_args_parser

    parsed = get_args_parser().parse_args(args)
    if (parsed.help or parsed.hydra_help or parsed.info or parsed.shell_completion
            or parsed.config_path or parsed.config_name or parsed.config_dir):
        return None  # Hydra answers these itself
    if parsed.multirun:
        for overrides in sweep_samples(parsed.overrides):
            validate(compose(overrides))
        return None  # each job checks its own run directory and training settings
    cfg = compose(parsed.overrides)
    validate(cfg)
    if not parsed.cfg:  # refuse before Hydra creates the folder and opens its log file there
        from app.run import SUMMARY, Summary, check_run_directory, refuse_finished_run

        run_dir = Path(run_directory_path(cfg.work_dir, cfg.note, cfg.run_directory))
        check_run_directory(run_dir, cfg.work_dir, cfg.run_directory)
        refuse_finished_run(Summary.load(run_dir / SUMMARY), cfg.overwrite, cfg.resume)
        if trains(cfg) and not cfg.sanity_check:  # what torch refuses too; the run imports it next anyway
            from app.train.loop import check_train_config

            check_train_config(cfg)
    return parsed


# A sweep's combinations are all composed up to this many; past it, one per value of its longest
# sweep (the i-th combination takes each sweep's i-th value, cycling), so every value is checked.
MAX_COMBINATIONS_CHECKED = 16


def sweep_samples(overrides: List[str]) -> List[List[str]]:
    """Override lists without sweeps, one per combination the preflight composes for `thresher -m`:
    a typo in a swept key or value is refused with one line before Hydra starts any job. An
    interval (Optuna) is checked at its start; a glob at the group options it matches."""
    from itertools import product

    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.core.override_parser.types import Glob, IntervalSweep

    try:
        parsed = OverridesParser.create().parse_overrides(overrides)
    except Exception as error:
        raise UserError(explain_compose_error(error, overrides)) from error
    fixed, sweeps, intervals = [], [], []
    for override in parsed:
        if not override.is_sweep_override():
            fixed.append(override.input_line)
            continue
        head, value = override.input_line.split("=", 1)[0], override.value()
        if isinstance(value, IntervalSweep):
            intervals.append(override.input_line)
            start = float(value.start)  # Hydra keeps interval(1,10)'s ends as floats; an int key takes "1"
            values = [str(int(start)) if start.is_integer() else str(start)]
        elif isinstance(value, Glob):
            values = value.filter(group_options(override.key_or_group)) if override.key_or_group in GROUPS else []
        else:
            values = list(override.sweep_string_iterator())
        if values:
            sweeps.append([f"{head}={choice}" for choice in values])
    if intervals:
        sweeper = compose(fixed, with_hydra=True).hydra.sweeper.get("_target_", "")
        if "optuna" not in sweeper.lower():
            raise UserError(f"{intervals[0]}: an interval is for the Optuna sweeper: add hydra/sweeper=optuna "
                            f"(Hydra's basic sweeper takes a list a,b,c or range(start,stop))")
    if not sweeps:
        return [fixed]
    n_product = 1
    for values in sweeps:
        n_product *= len(values)
    if n_product <= MAX_COMBINATIONS_CHECKED:
        combinations = list(product(*sweeps))
    else:
        longest = max(len(values) for values in sweeps)
        combinations = [tuple(values[i % len(values)] for values in sweeps) for i in range(longest)]
    return [[*fixed, *combination] for combination in combinations]


def show_resolved_hydra_config(overrides: List[str], package: Optional[str]) -> None:
    """`--cfg hydra --resolve` as Hydra prints it, but resolved while the job's keys are still
    there: Hydra drops them first, and hydra.run.dir is made of work_dir, note and run_directory."""
    cfg = compose_quietly(overrides, with_hydra=True)
    with open_dict(cfg.hydra):
        del cfg.hydra["help"], cfg.hydra["hydra_help"]
    OmegaConf.resolve(cfg.hydra)
    shown = OmegaConf.create({"hydra": cfg.hydra})
    if package and package != "_global_":
        shown = OmegaConf.select(shown, package)
        if shown is None:
            fail(f"--package {package}: no such key in the Hydra config")
        if not isinstance(shown, DictConfig):
            print(redact(str(shown)))
            return
        print(f"# @package {package}")
    sys.stdout.write(redact(OmegaConf.to_yaml(shown)))


def compose(overrides: List[str], with_hydra: bool = False) -> DictConfig:
    try:
        return compose_quietly(overrides, with_hydra=with_hydra)
    except Exception as error:  # Hydra's and OmegaConf's own exceptions, made readable
        raise UserError(explain_compose_error(error, overrides)) from error


def explain_compose_error(error: Exception, overrides: List[str]) -> str:
    from hydra.errors import MissingConfigException, OverrideParseException
    from omegaconf.errors import ConfigKeyError, ConfigTypeError, ValidationError

    if isinstance(error, OverrideParseException):
        tilde = next((o for o in overrides if re.match(r"^[+~]*[\w.]+=~", o)), None)
        if tilde is not None:  # the shell expands ~ only at a word's start, so Hydra sees it
            key, _, value = tilde.partition("=")
            return (f"could not parse the override {tilde}: Hydra does not expand '~'; write "
                    f"{key}=$HOME{value[1:]}")
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
    while cause is not None and not isinstance(cause, (ConfigKeyError, ConfigTypeError, ValidationError)):
        cause = cause.__cause__ or cause.__context__
    merging = re.search(r"Error merging override ([^=\s]+)=(.*)", str(error))
    if isinstance(cause, ConfigTypeError) and merging:  # a list given for a mapping, or the reverse
        given = merging[2].lstrip()
        allowed = ("expected a list such as [a,b], not a mapping" if given.startswith("{") else
                   "expected a mapping such as {name: value}, not a list" if given.startswith("[") else
                   _first_line(cause))
        return f"{merging[1]}={merging[2]} is not allowed: {allowed}"
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
        if _in_open_mapping(key, overrides):
            return f"{shown}: no such key yet: add it with +{key}={value if value is not None else '...'}"
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


def compose_quietly(overrides: List[str], with_hydra: bool = False) -> DictConfig:
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3", job_name="thresher"):
            return hydra_compose(config_name="config", overrides=overrides, return_hydra_config=with_hydra)
    finally:
        GlobalHydra.instance().clear()


def _in_open_mapping(key: str, overrides: List[str]) -> bool:
    """Whether `key` lies in a free mapping (trainer.optimizer.params, storage_options), where a new
    key is added with `+key=value`; under a schema it would be a typo."""
    parent = key.rpartition(".")[0]
    choices = [o for o in overrides if re.match(r"^\w+=", o) and o.split("=", 1)[0] in GROUPS]
    try:
        node = OmegaConf.select(compose_quietly(choices), parent) if parent else None
    except Exception:
        return False
    return isinstance(node, DictConfig) and OmegaConf.get_type(node) is dict


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

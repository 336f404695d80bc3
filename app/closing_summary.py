"""The few lines a finished run ends with: what was seen and selected, how well the model did,
where to look, and what to try next. Built from summary.json's stage records and the artifacts,
so it says the same for a run whose stages finished in an earlier attempt."""
from __future__ import annotations

import json
import logging
import shlex
from pathlib import Path
from typing import Any, Dict, List, Optional

from omegaconf import DictConfig, OmegaConf

from app.artifacts import (CORRUPT_FILES, DUPLICATE_FILES, HYDRA_CONFIGS, METRICS_JSON, REPORT_HTML, SCORES,
                           count_listed)
from app.hostpaths import on_host
from app.secrets import REDACTED

# Overrides a "next command" sets itself, so the run's own values of them are left out.
NEXT_COMMAND_KEYS = ("run_directory", "resume", "overwrite", "trainer.epochs", "stages", "hydra.run.dir")


def closing_lines(summary: Dict[str, Any], run_dir: Path, cfg: DictConfig, duration_s: float) -> List[str]:
    stages = summary.get("stages", {})
    lines = [f"thresher: finished in {duration_s:.1f} s"]
    scan, score, select, train, profile = (stages.get(name) or {} for name in ("scan", "score", "select", "train",
                                                                                "profile"))
    if scan.get("status") == "finished":
        # the file lists, not the scan's counts: the embed stage adds the corrupt files it finds
        corrupt, duplicates = count_listed(run_dir, CORRUPT_FILES), count_listed(run_dir, DUPLICATE_FILES)
        lines.append(f"  images    {scan.get('n_files', 0):,} seen: {corrupt:,} corrupt, {duplicates:,} exact "
                     f"duplicates (filenames/)")
    if score.get("status") == "finished":
        lines.append(f"  scored    {score['n_scored']:,} images by scorer={score['method']} of {score['checkpoint']} "
                     f"(mean {_fmt(score['score_mean'])}, max {_fmt(score['score_max'])}; {SCORES})")
    if select.get("status") == "finished":
        lines.append(f"  selected  {select['n_selected']:,} of {select['n_candidates']:,} by "
                     f"sampler={select['method']} ({stopping(cfg, select.get('stopped_by'))})")
    if train.get("status") == "finished":
        lines.append(f"  model     {train_line(train, run_dir)}")
    if profile.get("status") == "finished" and profile.get("recommended"):
        lines.append(f"  profile   recommended: {profile['recommended']}")
    lines.append(f"  run       {run_dir}")
    if (run_dir / REPORT_HTML).is_file():
        lines.append(f"  report    {run_dir / REPORT_HTML}")
    suggestion = next_command(cfg, run_dir, stages)
    if suggestion:
        lines.append(f"  next      {suggestion}")
    return [on_host(line) for line in lines]


def stopping(cfg: DictConfig, stopped_by: Optional[str]) -> str:
    """Which stopping condition ended the selection, with its value."""
    condition = cfg.sampler.get("stopping_condition")
    if stopped_by in ("n_samples", "min_distance") and condition is not None:
        return f"stopped by stopping_condition.{stopped_by}={condition[stopped_by]}"
    if stopped_by == "exhausted":
        return "every candidate taken"
    return f"stopped by {stopped_by}" if stopped_by else "no stopping condition"


def train_line(train: Dict[str, Any], run_dir: Path) -> str:
    metric, value, epochs = train.get("key_metric"), train.get("key_metric_value"), train.get("epochs")
    n_epochs = f"{epochs} epoch" + ("" if epochs == 1 else "s")
    shown = f"{train.get('model')}: {metric} {_fmt(value)} after {n_epochs}"
    if metric is None:  # no validation set
        shown = f"{train.get('model')}: {n_epochs}, no validation set (no key metric, no best.pt)"
    best = _best(run_dir)
    if best and best.get("epoch") is not None:
        if best["epoch"] != epochs:
            shown += f" (best {_fmt(best.get('value'))} at epoch {best['epoch']}, checkpoints/best.pt)"
        else:
            shown += " (the best epoch, checkpoints/best.pt)"
    return shown


def next_command(cfg: DictConfig, run_dir: Path, stages: Dict[str, Any]) -> Optional[str]:
    """One command worth trying next: your own images after the built-in example; more epochs on the
    same selection after training; training after a selection; the profile's recommendation."""
    if cfg.data.name == "shapes":
        return "your own images (a folder of class sub-folders): thresher data=folder data.input_dir=PATH"
    overrides = _run_overrides(run_dir)
    if overrides is None:
        return None
    again = [*overrides, f"run_directory={_run_directory_value(cfg, run_dir)}", "resume=true"]
    if (stages.get("train") or {}).get("status") == "finished":
        return "train longer on this selection: " + _command([*again, f"trainer.epochs={2 * cfg.trainer.epochs}"])
    if (stages.get("select") or {}).get("status") == "finished":
        wanted = [stage for stage in ("scan", "embed", "score", "select") if stage in cfg.stages] + ["train"]
        return "train on this selection: " + _command([*again, f"stages=[{','.join(wanted)}]"])
    return None


def _run_overrides(run_dir: Path) -> Optional[List[str]]:
    """The command-line overrides of this run, as .hydra/overrides.yaml keeps them; None when one of
    them held a secret (a command cannot be shown without it)."""
    path = run_dir / HYDRA_CONFIGS / "overrides.yaml"
    if not path.is_file():
        return []
    overrides = [str(o) for o in OmegaConf.to_container(OmegaConf.load(path)) or []]
    if any(REDACTED in o for o in overrides):
        return None
    return [o for o in overrides if o.lstrip("+~").split("=", 1)[0] not in NEXT_COMMAND_KEYS]


def _run_directory_value(cfg: DictConfig, run_dir: Path) -> str:
    """run_directory relative to work_dir when the run lies directly in it (portable between a
    container and its host), else the absolute path."""
    try:
        work_dir = Path(str(cfg.work_dir)).resolve()
    except (OSError, RuntimeError):
        return str(run_dir)
    return run_dir.name if run_dir.resolve().parent == work_dir else str(run_dir)


def _command(overrides: List[str]) -> str:
    return " ".join(["thresher", *(shlex.quote(o) for o in overrides)])


def _best(run_dir: Path) -> Optional[Dict[str, Any]]:
    try:
        return json.loads((run_dir / METRICS_JSON).read_text()).get("best")
    except (OSError, ValueError):
        return None


def _fmt(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def print_closing_summary(lines: List[str]) -> None:
    """On stdout, plain (no log prefix); and into thresher.log through its file handlers only."""
    print("\n".join(lines), flush=True)
    logger = logging.getLogger("thresher")
    record = logger.makeRecord(logger.name, logging.INFO, __file__, 0, "summary:\n%s", ("\n".join(lines),), None)
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.FileHandler):
            handler.handle(record)

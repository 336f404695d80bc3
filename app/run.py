"""One run: the run directory (lock, state, redacted configs), the stage order, summary.json.

Stages talk only through artifacts in the run directory, so each can be resumed, skipped or fed
with files a user brings.
"""
from __future__ import annotations

import fcntl
import importlib
import json
import logging
import os
import shutil
import signal
import sys
import time
from dataclasses import asdict, dataclass, field, is_dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Dict, List, Optional

from omegaconf import DictConfig, OmegaConf

from app import atomic
from app.config import STAGES, UserError, validate
from app.secrets import REDACTED, install_redaction, read_secret, redact, register_secret

log = logging.getLogger("thresher")

SUMMARY = "summary.json"
LOCK = ".lock"
# stage -> (module, function); imported only when the stage runs, since they pull in torch.
STAGE_FUNCTIONS = {
    "scan": ("app.data.scan", "scan_stage"),
    "embed": ("app.sampling.embed", "embed_stage"),
    "select": ("app.sampling.select", "select_stage"),
    "profile": ("app.profile.stage", "profile_stage"),
    "train": ("app.train.loop", "train_stage"),
}
# Artifacts a stage needs, and the stage that writes them.
STAGE_INPUTS = {
    "embed": [("data/input_files.csv", "scan")],
    "select": [("data/embeddings.csv", "embed")],
    "profile": [("data/input_files.csv", "scan"), ("data/dataset.json", "scan")],
    "train": [("data/input_files.csv", "scan"), ("data/dataset.json", "scan")],
}


class Interrupted(BaseException):
    """SIGTERM or SIGINT arrived: stop, save what can be saved, exit 128 + signal number."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def _raise_interrupted(signum, _frame) -> None:
    raise Interrupted(signum)


def install_signal_handlers() -> None:
    """PID 1 in a container ignores SIGTERM unless it handles it: `docker stop` needs this."""
    signal.signal(signal.SIGTERM, _raise_interrupted)
    signal.signal(signal.SIGINT, _raise_interrupted)


def utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


@dataclass
class Summary:
    """What happened in a run, rewritten atomically after every stage."""

    path: Path
    data: Dict[str, Any] = field(default_factory=dict)

    @classmethod
    def load(cls, path: Path) -> "Summary":
        data = json.loads(path.read_text()) if path.is_file() else {}
        return cls(path, data)

    @property
    def status(self) -> Optional[str]:
        return self.data.get("status")

    def stage_finished(self, stage: str) -> bool:
        return self.data.get("stages", {}).get(stage, {}).get("status") == "finished"

    def save(self) -> None:
        atomic.write_text(self.path, redact(json.dumps(self.data, indent=2) + "\n"))


def refuse_finished_run(summary: Summary, overwrite: bool, resume: bool) -> None:
    """A finished run is not silently added to or replaced: the user says which."""
    if summary.status == "finished" and not (overwrite or resume):
        raise UserError(f"run_directory={str(summary.path.parent)!r} holds a finished run: pass resume=true "
                        f"to reuse its finished stages, overwrite=true to start it again, or choose "
                        f"another run_directory")


class RunDirectory:
    """Owns a run directory for the life of the run: refuses a busy or finished one."""

    def __init__(self, path: Path, node_suffix: str = ""):
        # Other nodes of a multi-node run share the folder but keep their own lock and summary.
        self.path, self.lock_name, self.summary_name = path, LOCK + node_suffix, f"summary{node_suffix}.json"
        self._lock_file = None

    def acquire(self, overwrite: bool, resume: bool) -> Summary:
        self.path.mkdir(parents=True, exist_ok=True)
        self._lock_file = open(self.path / self.lock_name, "a+")
        try:
            fcntl.flock(self._lock_file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._lock_file.seek(0)
            holder = self._lock_file.read().strip() or "another process"
            raise UserError(f"run_directory={str(self.path)!r} is in use by a running thresher "
                            f"({holder}): wait for it, or choose another run_directory") from None
        self._lock_file.seek(0)
        self._lock_file.truncate()
        self._lock_file.write(f"pid {os.getpid()}\n")
        self._lock_file.flush()

        summary = Summary.load(self.path / self.summary_name)
        refuse_finished_run(summary, overwrite, resume)
        if overwrite and summary.data:
            self._clear()
            summary = Summary(self.path / self.summary_name)
        elif summary.data and not resume:
            log.info("run directory holds an unfinished run (status %s): resuming it", summary.status)
        return summary

    def _clear(self) -> None:
        """Remove a previous run's artifacts; the lock and the open log file stay."""
        for child in self.path.iterdir():
            if child.name.startswith(LOCK) or child.suffix == ".log":
                continue
            shutil.rmtree(child) if child.is_dir() else child.unlink()

    def release(self) -> None:
        if self._lock_file is not None:
            fcntl.flock(self._lock_file.fileno(), fcntl.LOCK_UN)
            self._lock_file.close()
            self._lock_file = None


def take_secrets(cfg: DictConfig) -> Optional[str]:
    """Read the token and leave only a placeholder in the config that stages and files see."""
    token = cfg.token or read_secret("THRESHER_TOKEN")
    register_secret(token)
    OmegaConf.update(cfg, "token", REDACTED if token else None)
    return token


def save_configs(cfg: DictConfig, run_dir: Path, hydra_cfg: Any) -> None:
    """Hydra's .hydra/ files, written by us so that every secret is redacted first."""
    hydra_dir = run_dir / ".hydra"
    atomic.write_text(hydra_dir / "config.yaml", redact(OmegaConf.to_yaml(cfg)))
    overrides = list(hydra_cfg.overrides.task) if hydra_cfg is not None else []
    atomic.write_text(hydra_dir / "overrides.yaml", redact(OmegaConf.to_yaml(overrides)))
    if hydra_cfg is not None:
        atomic.write_text(hydra_dir / "hydra.yaml", redact(OmegaConf.to_yaml({"hydra": hydra_cfg})))


def stages_to_run(cfg: DictConfig, run_dir: Path) -> List[str]:
    """The stages asked for, plus the scan that `stages=[profile]` needs on a fresh run directory:
    profiling wants the file list, and the scan is what sets corrupt files aside."""
    stages = list(cfg.stages)
    if "profile" in stages and "scan" not in stages and not (run_dir / STAGE_INPUTS["profile"][0][0]).is_file():
        log.info("stages=%s: scanning the input first, as the profile needs its file list", stages)
        stages.insert(0, "scan")
    return stages


def check_stage_inputs(cfg: DictConfig, run_dir: Path, stages: List[str]) -> None:
    """A stage whose input artifact is neither there nor made by an earlier stage: say so now."""
    for stage in stages:
        for artifact, producer in STAGE_INPUTS.get(stage, []):
            if stage == "select" and cfg.sampler.method == "none":
                continue
            if producer not in stages and not (run_dir / artifact).is_file():
                raise UserError(f"stages={list(cfg.stages)} needs {artifact} from the {producer} stage, "
                                f"which is not in {run_dir}: add {producer} to stages, or set "
                                f"run_directory to a run that has it (with resume=true)")


def _as_dict(result: Any) -> Dict[str, Any]:
    if result is None:
        return {}
    return asdict(result) if is_dataclass(result) else dict(result)


def node_suffix(cfg: DictConfig) -> str:
    """'' on the first (or only) node; '.nodeN' on node N > 0 of a multi-node run."""
    hardware = cfg.get("hardware")
    if hardware is not None and hardware.get("nnodes", 1) > 1 and hardware.get("node_rank", 0) > 0:
        return f".node{hardware.node_rank}"
    return ""


def execute(cfg: DictConfig, run_dir: Path, hydra_cfg: Any = None) -> int:
    """Run the configured stages in `run_dir`; returns the process exit code."""
    install_redaction()  # Hydra configured its log handlers after the CLI installed it
    started = time.perf_counter()
    run = RunDirectory(run_dir, node_suffix(cfg))
    summary: Optional[Summary] = None
    try:
        take_secrets(cfg)
        validate(cfg)
        fetch_from_bucket(cfg, run_dir)
        summary = run.acquire(cfg.overwrite, cfg.resume)
        # resume=true, or a rerun in the directory of an interrupted or failed run
        resuming = bool(summary.data) and not cfg.overwrite
        save_configs(cfg, run_dir, hydra_cfg)
        stages = stages_to_run(cfg, run_dir)
        check_stage_inputs(cfg, run_dir, stages)
        training = "train" in stages or ("profile" in stages and cfg.profile.mode == "train")
        if training and not cfg.sanity_check:
            from app.train.loop import check_train_config

            check_train_config(cfg)
        install_signal_handlers()
        summary.data.update(status="running", started_at=utc_now(), run_directory=str(run_dir),
                            stages_requested=list(cfg.stages))
        if stages != list(cfg.stages):
            summary.data["stages_run"] = stages
        summary.data.setdefault("stages", {})
        summary.save()

        from app.device import resolve_device

        device = resolve_device(cfg.hardware.device)
        log.info("run directory: %s", run_dir)
        log.info("device: %s", device)
        if cfg.sanity_check:
            from app.sanity import sanity_check

            summary.data["sanity_check"] = sanity_check(cfg, run_dir, device)
        else:
            run_stages(cfg, run_dir, device, summary, resuming, stages)
        summary.data.update(status="finished", finished_at=utc_now(),
                            duration_s=round(time.perf_counter() - started, 3))
        summary.save()
        log.info("finished in %.1fs: %s", time.perf_counter() - started, run_dir / SUMMARY)
        return 0
    except UserError as error:
        _record_failure(summary, "failed", str(error))
        print(f"thresher: error: {redact(str(error))}", file=sys.stderr)
        return 2
    except Interrupted as stop:
        _record_failure(summary, "interrupted", f"stopped by {stop}")
        log.warning("stopped by %s; resume with run_directory=%s", stop, run_dir)
        return 128 + stop.signum
    except Exception as error:
        log.exception("run failed")
        _record_failure(summary, "failed", f"{type(error).__name__}: {error}")
        print(f"thresher: error: {type(error).__name__}: {redact(str(error))} "
              f"(traceback in {run_dir / 'thresher.log'})", file=sys.stderr)
        return 1
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        try:
            sync_to_bucket(cfg, run_dir)  # the final summary.json and log, whatever the outcome
        except Exception as error:
            log.warning("could not copy %s to work_dir=%s: %s", run_dir, cfg.work_dir, redact(str(error)))
        run.release()


def sync_to_bucket(cfg: DictConfig, run_dir: Path) -> None:
    """work_dir=s3://... (gs://, az://): the run directory is a local staging folder, copied up
    after every stage, so the bucket holds every finished stage's artifacts."""
    from app.config import is_url

    if is_url(cfg.work_dir):
        from app.data.sources import upload_run_directory

        copied = upload_run_directory(run_dir, cfg.work_dir)
        log.info("copied %d files of %s to work_dir=%s", copied, run_dir.name, cfg.work_dir)


def fetch_from_bucket(cfg: DictConfig, run_dir: Path) -> None:
    """A bucket run directory that this machine has not staged (a new container resuming it):
    bring its files down first, so that resume and the finished-run checks see them."""
    from app.config import is_url

    if is_url(cfg.work_dir) and not (run_dir / SUMMARY).is_file():
        from app.data.sources import download_run_directory

        fetched = download_run_directory(run_dir, cfg.work_dir)
        if fetched:
            log.info("fetched %d files of %s from work_dir=%s", fetched, run_dir.name, cfg.work_dir)


def run_stages(cfg: DictConfig, run_dir: Path, device: Any, summary: Summary, resuming: bool,
               stages: List[str]) -> None:
    rerun_from_here = False
    for stage in STAGES:
        if stage not in stages:
            continue
        if stage == "embed" and cfg.sampler.method == "none":
            log.info("stage embed: skipped, sampler=none needs no embeddings")
            summary.data["stages"][stage] = {"status": "skipped"}
            continue
        if resuming and not rerun_from_here and summary.stage_finished(stage):
            if not more_epochs_wanted(stage, cfg, summary):
                log.info("stage %s: finished in an earlier run, skipped", stage)
                continue
            log.info("stage train: %d epochs finished in an earlier run; continuing to trainer.epochs=%d",
                     summary.data["stages"]["train"]["epochs"], cfg.trainer.epochs)
        rerun_from_here = True  # a stage that runs again makes the later ones' artifacts stale
        module_name, function_name = STAGE_FUNCTIONS[stage]
        stage_function = getattr(importlib.import_module(module_name), function_name)
        log.info("stage %s: started", stage)
        summary.data["stages"][stage] = {"status": "running", "started_at": utc_now()}
        summary.save()
        seed_everything(cfg.seed)  # each stage alike whether it runs fresh or after a resume
        began = time.perf_counter()
        result = stage_function(cfg, run_dir, device)
        duration = round(time.perf_counter() - began, 3)
        details = _as_dict(result)
        summary.data["stages"][stage] = {"status": "finished", "duration_s": duration, **details}
        summary.data.setdefault("counts", {}).update(
            {key: value for key, value in details.items() if key.startswith("n_")})
        summary.save()
        sync_to_bucket(cfg, run_dir)
        log.info("stage %s: finished in %.1fs %s", stage, duration, _as_dict(result))


def more_epochs_wanted(stage: str, cfg: DictConfig, summary: Summary) -> bool:
    """`resume=true trainer.epochs=N` on a finished run trains on from its last.pt up to N epochs."""
    finished = summary.data.get("stages", {}).get(stage, {}).get("epochs")
    return stage == "train" and bool(cfg.resume) and finished is not None and cfg.trainer.epochs > finished


def seed_everything(seed: int) -> None:
    import random

    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _record_failure(summary: Optional[Summary], status: str, message: str) -> None:
    if summary is None:
        return
    for stage in summary.data.get("stages", {}).values():
        if stage.get("status") == "running":
            stage["status"] = status
    summary.data.update(status=status, error=redact(message), finished_at=utc_now())
    try:
        summary.save()
    except OSError:
        log.warning("could not write %s", summary.path)

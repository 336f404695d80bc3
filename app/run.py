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
import re
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field, is_dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Dict, List, Optional

from omegaconf import DictConfig, OmegaConf

from app import atomic
from app.artifacts import (CONTAINER_LOG, HYDRA_CONFIGS, HYDRA_LOG, INPUT_FILES, LOCK, MARKER, NODE_SUMMARY,
                           RUN_OUTPUTS, STAGE_ARTIFACTS, SUMMARY, producer_of, read_run_id, summary_file)
from app.closing_summary import closing_lines, print_closing_summary
from app.config import STAGES, trains, validate
from app.data.locations import is_url, staging_dir
from app.data.sources import configure_storage_for
from app.errors import UserError, print_error, print_user_error
from app.fingerprints import describe_change, stage_fingerprint
from app.hostpaths import install_host_paths
from app.lifecycle import Interrupted, install_signal_handlers, restore_default_signal_handlers, seed_everything
from app.sampling.samplers import embeddings_wanted_by, get_sampler, needs_embeddings
from app.secrets import REDACTED, install_redaction, read_secret, redact, register_secret

log = logging.getLogger("thresher")

# Written by thresher before the run's own process starts (Hydra's log; the docker launcher's copy
# of the container's output), so they may stand in a folder that has no marker yet.
WRITTEN_BEFORE_THE_RUN = (HYDRA_LOG, CONTAINER_LOG)
# RUN_OUTPUTS (app.artifacts): the top-level names the stages declare they write, and .hydra;
# overwrite=true removes these and nothing else.
# What atomic.atomic_path leaves behind when its process is killed mid-write.
STALE_TEMPORARY = re.compile(r"^\..+\.[A-Za-z0-9_]{8}\.tmp$")
# stage -> (module, function); imported only when the stage runs, since they pull in torch.
STAGE_FUNCTIONS = {
    "scan": ("app.data.scan", "scan_stage"),
    "embed": ("app.sampling.embed", "embed_stage"),
    "score": ("app.scoring.stage", "score_stage"),
    "select": ("app.sampling.select", "select_stage"),
    "profile": ("app.profile.stage", "profile_stage"),
    "train": ("app.train.loop", "train_stage"),
}
# Artifacts a stage needs, and the stage that writes them: from the stages' declarations.
STAGE_INPUTS = {stage: [(name, producer_of(name)) for name in declared.needs]
                for stage, declared in STAGE_ARTIFACTS.items() if declared.needs}
# A stage that runs again from the start first removes what a resume would pick up.
STAGE_RESUME_STATE = {stage: declared.resume_state for stage, declared in STAGE_ARTIFACTS.items()
                      if declared.resume_state}


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


def check_run_directory(run_dir: Path, work_dir: Optional[str], run_directory: Optional[str] = None) -> None:
    """Refuse a run directory that is not thresher's to write: a folder with files thresher did not
    create (no marker), work_dir itself, a folder inside another run or the datapool, a path that
    climbs out of work_dir with '..'. Nothing is created or written here."""
    shown = f"run_directory={run_directory!r}" if run_directory else f"the run directory {str(run_dir)!r}"
    if run_directory and ".." in Path(str(run_directory)).parts:
        raise UserError(f"{shown}: '..' is not allowed; a relative run_directory lies inside work_dir, "
                        f"an absolute one where it says")
    path = Path(os.path.abspath(run_dir))
    resolved = path.resolve()
    if work_dir is not None:
        work = Path(os.path.abspath(local_work_dir(work_dir))).resolve()
        if resolved == work:
            raise UserError(f"{shown} is work_dir itself ({work}), which holds other runs: name a folder "
                            f"inside it, e.g. run_directory=my_run")
        pools = work / "datapool"
        if resolved == pools or pools in resolved.parents:
            raise UserError(f"{shown} lies inside the datapool folder {pools}: choose another run_directory")
    for parent in resolved.parents:
        if (parent / MARKER).is_file():
            raise UserError(f"{shown} lies inside the run directory {parent}: choose a folder outside it")
    if path.exists() and not path.is_dir():
        raise UserError(f"{shown} is a file, not a folder: choose another run_directory")
    if path.is_dir() and not (path / MARKER).is_file():
        try:
            foreign = sorted(entry.name for entry in path.iterdir() if entry.name not in WRITTEN_BEFORE_THE_RUN)
        except OSError as error:
            raise UserError(f"{shown} cannot be read ({error.strerror}): choose another run_directory") from None
        if foreign:
            raise UserError(f"{shown} holds files thresher did not create ({', '.join(foreign[:3])}"
                            f"{', ...' if len(foreign) > 3 else ''}) and has no {MARKER} marker: thresher writes "
                            f"only into new or empty folders and its own runs; choose another run_directory")


def local_work_dir(work_dir: str) -> str:
    """work_dir, or for a bucket work_dir the local folder its run directories are staged in."""
    if is_url(work_dir):
        return str(staging_dir(str(work_dir)))
    return str(work_dir)


class RunDirectory:
    """Owns a run directory for the life of the run: refuses a folder that is not thresher's, a
    busy one or a finished one; marks a new one as thresher's."""

    def __init__(self, path: Path, node_suffix: str = ""):
        # Other nodes of a multi-node run share the folder but keep their own lock and summary.
        self.path, self.lock_name, self.summary_name = path, LOCK + node_suffix, summary_file(node_suffix)
        self.node_suffix = node_suffix
        self.run_id: Optional[str] = None
        self._lock_file = None

    def acquire(self, overwrite: bool, resume: bool, work_dir: Optional[str] = None,
                run_directory: Optional[str] = None) -> Summary:
        check_run_directory(self.path, work_dir, run_directory)
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
        self.run_id = self._mark()
        self._remove_stale_temporaries()

        summary = Summary.load(self.path / self.summary_name)
        refuse_finished_run(summary, overwrite, resume)
        if overwrite and summary.data:
            self._clear()
            summary = Summary(self.path / self.summary_name)
        elif summary.data and not resume:
            log.info("run directory holds an unfinished run (status %s): resuming it", summary.status)
        return summary

    def _mark(self) -> str:
        """The run id from the marker, writing the marker first in a new folder. Linking a complete
        temporary file into place means that concurrent nodes agree on one marker."""
        marker = self.path / MARKER
        if not marker.is_file():
            import tempfile
            from uuid import uuid4

            from app.config import run_stamp

            record = {"created_by": "thresher", "run_id": f"{run_stamp()}-{uuid4().hex[:8]}",
                      "created_at": utc_now(), "host": os.uname().nodename}
            fd, tmp = tempfile.mkstemp(prefix=f"{MARKER}.", suffix=".tmp", dir=self.path)
            try:
                with os.fdopen(fd, "w") as handle:
                    handle.write(json.dumps(record, indent=2) + "\n")
                os.chmod(tmp, 0o644)
                os.link(tmp, marker)
            except FileExistsError:
                pass
            finally:
                os.unlink(tmp)
        run_id = read_run_id(self.path)
        if run_id is None:
            raise UserError(f"{marker} is damaged: it is not the marker thresher writes; choose another "
                            f"run_directory")
        return run_id

    def _remove_stale_temporaries(self) -> None:
        """Half-written files of an earlier, killed run in this folder (its lock is ours now). Other
        nodes' files (`.node<N>` in the name) may be in flight and are left to them."""
        removed = 0
        for folder, dirs, files in os.walk(self.path):
            for name in files:
                if STALE_TEMPORARY.match(name) and ".node" not in name:
                    try:
                        os.unlink(os.path.join(folder, name))
                        removed += 1
                    except OSError:
                        pass
        if removed:
            log.info("removed %d temporary file(s) an interrupted run left in %s", removed, self.path)

    def _clear(self) -> None:
        """overwrite=true: remove what thresher writes here, nothing else; the marker, the locks and
        the open log file stay."""
        left_alone = []
        for child in sorted(self.path.iterdir()):
            if child.name in RUN_OUTPUTS or child.name == self.summary_name:
                shutil.rmtree(child) if child.is_dir() and not child.is_symlink() else child.unlink()
            elif not (child.name.startswith(LOCK) or child.name in (MARKER, *WRITTEN_BEFORE_THE_RUN)
                      or NODE_SUMMARY.fullmatch(child.name)):
                left_alone.append(child.name)
        if left_alone:
            log.warning("overwrite=true: left alone %d entries thresher did not write in %s: %s", len(left_alone),
                        self.path, ", ".join(left_alone[:5]))

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
    hydra_dir = run_dir / HYDRA_CONFIGS
    atomic.write_text(hydra_dir / "config.yaml", redact(OmegaConf.to_yaml(cfg)))
    overrides = list(hydra_cfg.overrides.task) if hydra_cfg is not None else []
    atomic.write_text(hydra_dir / "overrides.yaml", redact(OmegaConf.to_yaml(overrides)))
    if hydra_cfg is not None:
        atomic.write_text(hydra_dir / "hydra.yaml", redact(OmegaConf.to_yaml({"hydra": hydra_cfg})))


def stages_to_run(cfg: DictConfig, run_dir: Path) -> List[str]:
    """The stages asked for, plus the scan that `stages=[profile]` needs on a fresh run directory:
    profiling wants the file list, and the scan is what sets corrupt files aside."""
    stages = list(cfg.stages)
    if "profile" in stages and "scan" not in stages and not (run_dir / INPUT_FILES).is_file():
        log.info("stages=%s: scanning the input first, as the profile needs its file list", stages)
        stages.insert(0, "scan")
    return stages


def check_stage_inputs(cfg: DictConfig, run_dir: Path, stages: List[str], summary: Summary) -> None:
    """A stage whose input artifact is neither there nor made by an earlier stage, or was made by a
    stage with other settings than this run's: say so now, before any stage runs."""
    for stage in stages:
        for artifact, producer in STAGE_INPUTS.get(stage, []):
            if producer == "embed" and not needs_embeddings(cfg):
                continue  # the embed stage is skipped: what it writes is needed by no one
            if producer in stages:
                continue
            if not (run_dir / artifact).is_file():
                raise UserError(f"stages={list(cfg.stages)} needs {artifact} from the {producer} stage, "
                                f"which is not in {run_dir}: add {producer} to stages, or set "
                                f"run_directory to a run that has it (with resume=true)")
            recorded = summary.data.get("stages", {}).get(producer, {})
            if "fingerprint" in recorded:
                current = stage_fingerprint(producer, cfg, recorded_fingerprints(summary))
                if current.digest != recorded["fingerprint"]:
                    raise UserError(f"stages={list(cfg.stages)} would use {artifact}, which the {producer} stage "
                                    f"made with other settings ({describe_change(recorded.get('depends_on', {}), current.values)}): "
                                    f"add {producer} to stages to make it again, or go back to its settings")


def recorded_fingerprints(summary: Summary) -> Dict[str, Optional[str]]:
    return {stage: record.get("fingerprint") for stage, record in summary.data.get("stages", {}).items()}


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


def execute(cfg: DictConfig, run_dir: Path, hydra_cfg: Any = None, checked: bool = False) -> int:
    """Run the configured stages in `run_dir`; returns the process exit code. `checked`: the CLI
    checked this config in this process already (validate, and the torch checks of training)."""
    install_redaction()  # Hydra configured its log handlers after the CLI installed it
    install_host_paths()
    degrade_log_files_quietly()
    if "app.models" in sys.modules:  # a sweep's next job in this process says its warnings again
        sys.modules["app.models"].forget_warnings()
    started = time.perf_counter()
    run = RunDirectory(run_dir, node_suffix(cfg))
    summary: Optional[Summary] = None
    try:
        take_secrets(cfg)
        if not checked:
            validate(cfg)
            if trains(cfg) and not cfg.sanity_check:  # values torch refuses, before anything is written
                from app.train.loop import check_train_config

                check_train_config(cfg)
        # every stage of this process (and its forked loader workers) reaches the buckets with these
        configure_storage_for(cfg)
        fetch_from_bucket(cfg, run_dir)
        summary = run.acquire(cfg.overwrite, cfg.resume, cfg.work_dir, cfg.run_directory)
        # resume=true, or a rerun in the directory of an interrupted or failed run
        resuming = bool(summary.data) and not cfg.overwrite
        save_configs(cfg, run_dir, hydra_cfg)
        stages = stages_to_run(cfg, run_dir)
        check_stage_inputs(cfg, run_dir, stages, summary)
        install_signal_handlers()
        for stale in ("error", "finished_at", "duration_s"):  # an earlier attempt's, not this one's
            summary.data.pop(stale, None)
        summary.data.update(status="running", started_at=utc_now(), run_directory=str(run_dir),
                            run_id=run.run_id, stages_requested=list(cfg.stages))
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
        duration = time.perf_counter() - started
        summary.data.update(status="finished", finished_at=utc_now(), duration_s=round(duration, 3))
        summary.save()
        if not cfg.sanity_check:
            print_closing_summary(closing_lines(summary.data, run_dir, cfg, duration))
        else:
            log.info("finished in %.1fs: %s", duration, run_dir / SUMMARY)
        return 0
    except UserError as error:
        _record_failure(summary, "failed", str(error))
        print_user_error(error)
        return 2
    except Interrupted as stop:
        _record_failure(summary, "interrupted", f"stopped by {stop}")
        log.warning("stopped by %s; resume with run_directory=%s", stop, run_dir)
        return 128 + stop.signum
    except OSError as error:  # a full disk, a vanished mount, a permission taken away mid-run
        reason = describe_os_error(error)
        log.error("run failed: %s", reason)
        _record_failure(summary, "failed", reason)
        print_error(reason)
        return 1
    except Exception as error:
        log.exception("run failed")
        _record_failure(summary, "failed", f"{type(error).__name__}: {error}")
        print_error(f"{type(error).__name__}: {error} (traceback in {run_dir / HYDRA_LOG})")
        return 1
    finally:
        restore_default_signal_handlers()
        if "ray" in sys.modules:  # executor=ray: leave the cluster (a Ray started for the run stops)
            from app.executors.ray_session import disconnect

            disconnect()
        try:
            sync_to_bucket(cfg, run_dir)  # the final summary.json and log, whatever the outcome
        except Exception as error:
            log.warning("could not copy %s to work_dir=%s: %s", run_dir, cfg.work_dir, redact(str(error)))
        run.release()


def key_metric_of(run_dir: Path) -> Optional[float]:
    """The run's key metric, for Hydra's sweepers: the train stage's key_metric_value in
    summary.json (trainer.key_metric, val_top1 by default). None when the run did not finish
    training, or trained without a validation set (no key metric: a sweeper records the job as
    returning nothing, the Optuna sweeper as a failed trial, rather than optimise training loss)."""
    train = Summary.load(Path(run_dir) / SUMMARY).data.get("stages", {}).get("train", {})
    value = train.get("key_metric_value")
    return float(value) if train.get("status") == "finished" and value is not None else None


def describe_os_error(error: OSError) -> str:
    """'No space left on device (ENOSPC): /runs/x/checkpoints/last.pt', one line."""
    import errno as errno_names

    cause = error.strerror or str(error) or type(error).__name__
    code = f" ({errno_names.errorcode[error.errno]})" if error.errno in errno_names.errorcode else ""
    where = error.filename if error.filename is not None else "(no path given)"
    return f"{cause}{code}: {where}"


class _QuietFileHandlerErrors:
    """A log file that cannot be written (a full disk) is given up with one line on stderr, instead
    of logging's traceback for every record."""

    def __init__(self, handler: logging.Handler):
        self.handler = handler

    def __call__(self, record: logging.LogRecord) -> None:
        error = sys.exc_info()[1]
        for logger in (logging.getLogger(), log):
            logger.removeHandler(self.handler)
        try:
            self.handler.close()
        except Exception:
            pass
        reason = describe_os_error(error) if isinstance(error, OSError) else type(error).__name__
        print(f"thresher: warning: stopped writing the log file: {redact(reason)}", file=sys.stderr)


def degrade_log_files_quietly() -> None:
    for logger in (logging.getLogger(), log):
        for handler in logger.handlers:
            if isinstance(handler, logging.FileHandler) and not isinstance(handler.handleError,
                                                                          _QuietFileHandlerErrors):
                handler.handleError = _QuietFileHandlerErrors(handler)


def sync_to_bucket(cfg: DictConfig, run_dir: Path) -> None:
    """work_dir=s3://... (gs://, az://): the run directory is a local staging folder, copied up
    after every stage, so the bucket holds every finished stage's artifacts."""
    if is_url(cfg.work_dir):
        from app.data.sources import upload_run_directory

        copied = upload_run_directory(run_dir, cfg.work_dir)
        log.info("copied %d files of %s to work_dir=%s", copied, run_dir.name, cfg.work_dir)


def fetch_from_bucket(cfg: DictConfig, run_dir: Path) -> None:
    """A bucket run directory that this machine has not staged (a new container resuming it):
    bring its files down first, so that resume and the finished-run checks see them."""
    if is_url(cfg.work_dir) and not (run_dir / SUMMARY).is_file():
        from app.data.sources import download_run_directory

        fetched = download_run_directory(run_dir, cfg.work_dir)
        if fetched:
            log.info("fetched %d files of %s from work_dir=%s", fetched, run_dir.name, cfg.work_dir)


def run_stages(cfg: DictConfig, run_dir: Path, device: Any, summary: Summary, resuming: bool,
               stages: List[str]) -> None:
    """Each stage in order; one finished earlier is reused only when its fingerprint (the settings
    and files it read, and the stages before it) is unchanged. A stage that runs again makes the
    later ones' artifacts stale, so they run again too."""
    rerun_from_here = False
    for stage in STAGES:
        if stage not in stages:
            if stage == "score" and cfg.scorer.method != "none":
                log.warning("stage score: not in stages=[%s], so scorer=%s does not run here; the select stage "
                            "reads the data/scores.csv an earlier run of this directory wrote, if any",
                            ",".join(stages), cfg.scorer.method)
            continue
        if stage == "embed" and not log_why_embed_runs(cfg):
            summary.data["stages"][stage] = {"status": "skipped"}
            continue
        if stage == "score" and cfg.scorer.method == "none":
            log.info("stage score: skipped, scorer=none (no active-learning scores)")
            summary.data["stages"][stage] = {"status": "skipped"}
            continue
        recorded = summary.data["stages"].get(stage, {})
        fingerprint = stage_fingerprint(stage, cfg, recorded_fingerprints(summary))
        unchanged = recorded.get("fingerprint") == fingerprint.digest
        if recorded.get("status") not in (None, "skipped") and not unchanged:
            why = (describe_change(recorded.get("depends_on", {}), fingerprint.values) if "fingerprint" in recorded
                   else "it recorded no fingerprint")
            log.info("stage %s: ran before with other inputs (%s): running it%s again", stage, why,
                     " and the later stages" if stage != stages[-1] else "")
            discard_resume_state(stage, run_dir)
        if resuming and not rerun_from_here and unchanged and summary.stage_finished(stage):
            if not more_epochs_wanted(stage, cfg, summary):
                log.info("stage %s: finished in an earlier run, skipped (its inputs are unchanged)", stage)
                continue
            log.info("stage train: %d epochs finished in an earlier run; continuing to trainer.epochs=%d",
                     summary.data["stages"]["train"]["epochs"], cfg.trainer.epochs)
        rerun_from_here = True
        module_name, function_name = STAGE_FUNCTIONS[stage]
        stage_function = getattr(importlib.import_module(module_name), function_name)
        log.info("stage %s: started", stage)
        # recorded at the start, so that an interrupted stage resumes only under the same inputs
        summary.data["stages"][stage] = {"status": "running", "started_at": utc_now(),
                                         "fingerprint": fingerprint.digest, "depends_on": fingerprint.values}
        summary.save()
        seed_everything(cfg.seed)  # each stage alike whether it runs fresh or after a resume
        began = time.perf_counter()
        result = stage_function(cfg, run_dir, device)
        duration = round(time.perf_counter() - began, 3)
        details = _as_dict(result)
        summary.data["stages"][stage] = {"status": "finished", "duration_s": duration, **details,
                                         "fingerprint": fingerprint.digest, "depends_on": fingerprint.values}
        summary.data.setdefault("counts", {}).update(
            {key: value for key, value in details.items() if key.startswith("n_")})
        summary.save()
        sync_to_bucket(cfg, run_dir)
        log.info("stage %s: finished in %.1fs %s", stage, duration, _as_dict(result))


def log_why_embed_runs(cfg: DictConfig) -> bool:
    """Whether the embed stage runs; for a sampler that picks without embeddings (random), the
    log says what needs them, or that nothing does."""
    reasons = embeddings_wanted_by(cfg)
    if not reasons:
        log.info("stage embed: skipped, sampler=%s picks without embeddings and nothing else needs them",
                 cfg.sampler.method)
    elif get_sampler(cfg.sampler.method).optional_embeddings:
        log.info("stage embed: runs although sampler=%s picks without embeddings: %s", cfg.sampler.method,
                 "; ".join(reasons))
    return bool(reasons)


def discard_resume_state(stage: str, run_dir: Path) -> None:
    """What a stage would resume from (train's last.pt) is stale once its inputs changed."""
    for pattern in STAGE_RESUME_STATE.get(stage, ()):
        for path in run_dir.glob(pattern):
            shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()


def more_epochs_wanted(stage: str, cfg: DictConfig, summary: Summary) -> bool:
    """`resume=true trainer.epochs=N` on a finished run trains on from its last.pt up to N epochs."""
    finished = summary.data.get("stages", {}).get(stage, {}).get("epochs")
    return stage == "train" and bool(cfg.resume) and finished is not None and cfg.trainer.epochs > finished


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

"""Hydra's `hydra/launcher=docker`: one container of the thresher image per job of a sweep.

Each job runs `thresher <its overrides>` in its own container, with the host's work_dir mounted at
/data/output and the job's data.input_dir read-only at /data/input, so that its run directory lands
exactly where a local multirun would put it (`<sweep dir>/<job num>`). Every other path the job's
config reads (app.data.inputs: data.root, data.annotations, embeddings, ...) that lies outside those
two is mounted read-only under /data/inputs, and the job's overrides name the container's paths.
Secrets travel by variable name through the SDK, GPUs are handed out round-robin as device
requests, at most max_parallel containers run at once, and SIGINT/SIGTERM stop and remove every
container the sweep started.
`sweep_summary.json` in the sweep directory gathers every job's exit code and key metrics.
"""
from __future__ import annotations

import codecs
import copy
import logging
import os
import re
import signal
import subprocess
import sys
import threading
import uuid
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

from hydra.errors import CompactHydraException
from omegaconf import DictConfig, open_dict, read_write

from hydra_plugins.thresher_docker_launcher.config import DockerLauncherConf
from app import atomic
from app.artifacts import CONTAINER_LOG, METRICS_JSON, SUMMARY
from app.errors import UserError
from app.hostpaths import CONTAINER_INPUT, CONTAINER_OUTPUT
from app.secrets import redact, register_secret

log = logging.getLogger("thresher.launcher")

CONTAINER_WORK_DIR = CONTAINER_OUTPUT  # the image's mounts (app.hostpaths)
CONTAINER_INPUT_DIR = CONTAINER_INPUT
CONTAINER_RUN_DIR = "/data/run"  # the job's run directory, when it lies outside work_dir
# Any other path a job reads: /data/inputs/<config key> (a folder), /data/inputs/<config key>/<name> (a file).
CONTAINER_INPUTS_DIR = "/data/inputs"
SECRETS_DIR = "/run/secrets"
SWEEP_SUMMARY = "sweep_summary.json"
LABEL_LAUNCHER = "thresher.launcher"
LABEL_SWEEP_DIR = "thresher.sweep_dir"
LABEL_JOB = "thresher.job_num"
_VARIABLE_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


class JobFailed(CompactHydraException):
    """What Hydra's JobReturn holds for a job whose container did not exit 0; compact, so that
    Hydra prints its one line rather than a traceback of its own frames."""


class SweepInterrupted(BaseException):
    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


# ---------------------------------------------------------------------------------------------
# Options
# ---------------------------------------------------------------------------------------------
@dataclass
class LauncherOptions(DockerLauncherConf):
    """The launcher's options (hydra.launcher.*, documented in the plugin's config), checked."""
    image: str = "thresher:latest"

    @classmethod
    def from_config(cls, options: Dict[str, Any]) -> "LauncherOptions":
        known = {key: value for key, value in options.items() if not key.startswith("_")}
        parsed = cls(**known)
        if parsed.gpus_per_job < 0:
            raise UserError(f"hydra.launcher.gpus_per_job={parsed.gpus_per_job} is not allowed: "
                            f"use 0 for CPU jobs or the number of GPUs each job gets")
        if parsed.max_parallel is not None and parsed.max_parallel < 1:
            raise UserError(f"hydra.launcher.max_parallel={parsed.max_parallel} is not allowed: "
                            f"use a number >= 1, or null for one job per GPU group (1 on CPU)")
        for entry in parsed.environment:
            name = str(entry).split("=", 1)[0]
            if "=" in str(entry):  # never echo the value: it is likely a secret
                raise UserError(f"hydra.launcher.environment entry {name}=... carries a value: list "
                                f"variable names only and set the value in this shell's environment")
            if not _VARIABLE_NAME.match(name):
                raise UserError(f"hydra.launcher.environment entry {name!r} is not a variable name")
        return parsed

    def container_user(self) -> str:
        return self.user or f"{os.getuid()}:{os.getgid()}"


# ---------------------------------------------------------------------------------------------
# One job: where it runs and what the container gets
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class InputMount:
    """A host folder or file a job reads, mounted read-only at `target`."""
    source: Path
    target: str


@dataclass
class InputPlan:
    """What a job's container gets for the paths its config reads: the mounts beyond /data/input
    and /data/output, and each config key's path in the container."""
    mounts: List[InputMount]
    values: Dict[str, str]


@dataclass
class Job:
    num: int
    overrides: List[str]
    sweep_dir: Path
    host_run_dir: Path
    host_work_dir: Path
    host_input_dir: Optional[Path]
    container_run_dir: str
    command: List[str]
    config: DictConfig = field(repr=False, default=None)
    input_mounts: List[InputMount] = field(default_factory=list)

    @property
    def log_path(self) -> Path:
        return self.host_run_dir / CONTAINER_LOG

    def describe(self) -> str:
        return " ".join(self.overrides) or "(no overrides)"


def _key_of(override: str) -> str:
    return override.lstrip("+~").split("=", 1)[0]


# In a quoted Hydra value a backslash escapes only a quote, `${` (else an interpolation), or the
# backslashes before those and before the closing quote; anywhere else it is itself.
_HYDRA_ESCAPED = re.compile(r"(\\*)('|\$\{|$)")


def _hydra_value(text: str) -> str:
    """A path as a Hydra override value: quoted when it holds characters the grammar treats specially."""
    if re.fullmatch(r"[\w./:-]+", text):
        return text
    return "'" + _HYDRA_ESCAPED.sub(lambda m: m[1] * 2 + ("\\" + m[2] if m[2] else ""), text) + "'"


def _host_path(value: str) -> Path:
    """A path from the job's config as the host reads it: `~` expanded, relative to the launch folder."""
    return Path(os.path.abspath(os.path.expanduser(value)))


def _container_path(path: Path, mapping: Sequence[Tuple[Path, str]]) -> Optional[str]:
    """Where the container sees host `path`: under the first mount that holds it (or is it); None if none does."""
    for host_dir, container_dir in mapping:
        if path == host_dir or host_dir in path.parents:
            return str(Path(container_dir) / path.relative_to(host_dir))
    return None


def _translate_path(value: str, mapping: Sequence[Tuple[Path, str]]) -> str:
    """An absolute host path under a mounted folder, as the container sees it; anything else as is."""
    raw = value.strip("'\"")
    if not raw.startswith(("/", "~")):
        return value
    translated = _container_path(_host_path(raw), mapping)
    return value if translated is None else _hydra_value(translated)


def plan_input_mounts(inputs: Sequence[Tuple[str, Path, str]], mounted: Sequence[Tuple[Path, str]]) -> InputPlan:
    """Container paths for the host paths a job reads, given as (config key, absolute host path,
    folder or file). A path under a folder already mounted (`mounted`: host folder, container
    folder; the first that holds it wins) is only translated. Otherwise the outermost of the
    folders, and each file outside them, gets a read-only mount of its own, named for the first
    key that reads it: /data/inputs/<key>, or /data/inputs/<key>/<file name>; a path inside
    another, or named twice, is mounted once. A path that does not exist on the host is left
    as it is, so that the job's own config check names it."""
    from app.data.inputs import FILE

    own: List[Tuple[Path, str]] = []
    candidates = [(key, path, kind) for key, path, kind in inputs
                  if _container_path(path, mounted) is None and path.exists()]
    for key, path, kind in sorted(candidates, key=lambda item: len(item[1].parts)):  # outermost first
        if _container_path(path, own) is None:
            target = f"{CONTAINER_INPUTS_DIR}/{key}"
            own.append((path, f"{target}/{path.name}" if kind == FILE else target))
    mapping = [*mounted, *own]
    values = {}
    for key, path, _ in inputs:
        translated = _container_path(path, mapping)
        if translated is not None:
            values[key] = translated
    return InputPlan(mounts=[InputMount(source, target) for source, target in own], values=values)


def container_command(overrides: Sequence[str], host_work_dir: Path, host_input_dir: Optional[Path],
                      container_run_dir: str, inputs: Optional[InputPlan] = None) -> List[str]:
    """The job's overrides for `thresher` in the container, pointed at the mounts: work_dir,
    data.input_dir and every key of `inputs` set to the container's path, and any other absolute
    host path under a mount translated."""
    inputs = inputs or InputPlan(mounts=[], values={})
    mapping = [(host_work_dir, CONTAINER_WORK_DIR), *((m.source, m.target) for m in inputs.mounts)]
    if host_input_dir is not None:
        mapping.insert(0, (host_input_dir, CONTAINER_INPUT_DIR))
    replaced = {"work_dir", "hydra.run.dir", *inputs.values} | \
        ({"data.input_dir"} if host_input_dir is not None else set())
    command = []
    for override in overrides:
        if _key_of(override) in replaced:
            continue
        key, sep, value = override.partition("=")
        command.append(f"{key}{sep}{_translate_path(value, mapping)}" if sep else override)
    command.append(f"work_dir={CONTAINER_WORK_DIR}")
    if host_input_dir is not None:
        command.append(f"data.input_dir={CONTAINER_INPUT_DIR}")
    command += [f"{key}={_hydra_value(value)}" for key, value in inputs.values.items()]
    command.append(f"hydra.run.dir={_hydra_value(container_run_dir)}")
    return command


def plan_job(sweep_config: DictConfig, overrides: Sequence[str], num: int) -> Job:
    """Where job `num` of the sweep writes and reads, on the host and in the container."""
    from app.data.inputs import run_inputs
    from app.data.locations import is_url

    if is_url(sweep_config.work_dir):
        raise UserError(f"work_dir={sweep_config.work_dir} is a bucket: hydra/launcher=docker mounts a "
                        f"local work_dir at {CONTAINER_WORK_DIR} so that every job's run directory lands "
                        f"under the sweep directory; use a local folder (a bucket data.input_dir works)")
    sweep_dir = Path(os.path.abspath(str(sweep_config.hydra.sweep.dir)))
    host_run_dir = sweep_dir / str(sweep_config.hydra.sweep.subdir)
    host_work_dir = Path(os.path.abspath(os.path.expanduser(str(sweep_config.work_dir))))
    host_input_dir = None
    data = sweep_config.get("data")
    # A bucket input_dir is read by the job itself (credentials by name in launcher.environment).
    if data is not None and data.get("input_dir") is not None and not is_url(data.input_dir):
        host_input_dir = Path(os.path.abspath(os.path.expanduser(str(data.input_dir))))
        if not host_input_dir.is_dir():
            raise UserError(f"data.input_dir={str(data.input_dir)!r} is not a folder on this host: the "
                            f"docker launcher mounts it read-only at {CONTAINER_INPUT_DIR}; point it at "
                            f"the images")
    if host_work_dir == host_run_dir or host_work_dir in host_run_dir.parents:
        container_run_dir = str(Path(CONTAINER_WORK_DIR) / host_run_dir.relative_to(host_work_dir))
    else:  # hydra.sweep.dir set outside work_dir: the run directory gets a mount of its own
        container_run_dir = CONTAINER_RUN_DIR
    mounted = [(host_work_dir, CONTAINER_WORK_DIR)]
    if host_input_dir is not None:
        mounted.insert(0, (host_input_dir, CONTAINER_INPUT_DIR))
    # Every other path the job reads (a bucket URL is the job's to read) goes in with it.
    inputs = plan_input_mounts([(path.key, _host_path(path.value), path.kind) for path in run_inputs(sweep_config)
                                if path.key != "data.input_dir" and not path.is_url], mounted)
    return Job(num=num, overrides=list(overrides), sweep_dir=sweep_dir, host_run_dir=host_run_dir,
               host_work_dir=host_work_dir, host_input_dir=host_input_dir,
               container_run_dir=container_run_dir,
               command=container_command(overrides, host_work_dir, host_input_dir, container_run_dir, inputs),
               config=sweep_config, input_mounts=inputs.mounts)


def secret_environment(names: Sequence[str], environ: Dict[str, str]) -> Tuple[Dict[str, str], List[Any]]:
    """The variables the container gets by name, and read-only mounts for NAME_FILE secrets.

    Values go to the engine through the SDK only: never into the command, a log or a config.
    """
    from docker.types import Mount

    environment, mounts = {}, []
    for name in names:
        if environ.get(name):
            register_secret(environ[name])
            environment[name] = environ[name]
        elif environ.get(f"{name}_FILE"):
            host_file = Path(os.path.expanduser(environ[f"{name}_FILE"])).resolve()
            if not host_file.is_file():
                raise UserError(f"{name}_FILE={environ[f'{name}_FILE']!r} is not a readable file: point "
                                f"it at the file holding the secret")
            container_file = f"{SECRETS_DIR}/{name.lower()}"
            mounts.append(Mount(target=container_file, source=str(host_file), type="bind", read_only=True))
            environment[f"{name}_FILE"] = container_file
    return environment, mounts


def parse_volume(spec: str) -> Any:
    from docker.types import Mount

    parts = str(spec).split(":")
    if len(parts) not in (2, 3) or (len(parts) == 3 and parts[2] not in ("ro", "rw")):
        raise UserError(f"hydra.launcher.volumes entry {spec!r} is not host_path:container_path[:ro]")
    source = os.path.abspath(os.path.expanduser(parts[0]))
    if not os.path.exists(source):
        raise UserError(f"hydra.launcher.volumes entry {spec!r}: {source} does not exist on this host")
    return Mount(target=parts[1], source=source, type="bind", read_only=len(parts) == 3 and parts[2] == "ro")


def container_kwargs(job: Job, options: LauncherOptions, gpu_ids: Sequence[str],
                     environment: Dict[str, str], secret_mounts: Sequence[Any]) -> Dict[str, Any]:
    """Everything `containers.create` gets for one job."""
    from docker.types import DeviceRequest, Mount

    mounts = [Mount(target=CONTAINER_WORK_DIR, source=str(job.host_work_dir), type="bind")]
    if job.container_run_dir == CONTAINER_RUN_DIR:
        mounts.append(Mount(target=CONTAINER_RUN_DIR, source=str(job.host_run_dir), type="bind"))
    if job.host_input_dir is not None:
        mounts.append(Mount(target=CONTAINER_INPUT_DIR, source=str(job.host_input_dir), type="bind",
                            read_only=True))
    mounts += [Mount(target=mount.target, source=str(mount.source), type="bind", read_only=True)
               for mount in job.input_mounts]
    mounts += [*secret_mounts, *(parse_volume(spec) for spec in options.volumes)]
    kwargs: Dict[str, Any] = dict(
        image=options.image,
        command=list(job.command),
        name=f"thresher-job{job.num}-{uuid.uuid4().hex[:8]}",
        labels={LABEL_LAUNCHER: "docker", LABEL_SWEEP_DIR: str(job.sweep_dir), LABEL_JOB: str(job.num),
                **{str(k): str(v) for k, v in options.labels.items()}},
        # the job's log lines name the host's folders, not the mounts (app.hostpaths)
        environment={**environment, "THRESHER_HOST_OUTPUT": str(job.host_work_dir),
                     **({"THRESHER_HOST_INPUT": str(job.host_input_dir)} if job.host_input_dir is not None else {})},
        user=options.container_user(),
        mounts=mounts,
        shm_size=options.shm_size,
        init=True,  # reaps data-loader workers and forwards docker stop's SIGTERM
        detach=True,
    )
    if options.network_mode:
        kwargs["network_mode"] = options.network_mode
    if gpu_ids:  # a host without the NVIDIA runtime refuses any device request, so CPU jobs get none
        kwargs["device_requests"] = [DeviceRequest(device_ids=[str(g) for g in gpu_ids],
                                                   capabilities=[["gpu"]])]
    kwargs.update(options.create_kwargs)
    return kwargs


# ---------------------------------------------------------------------------------------------
# GPUs
# ---------------------------------------------------------------------------------------------
def host_gpu_ids() -> List[str]:
    try:
        listed = subprocess.run(["nvidia-smi", "--query-gpu=index", "--format=csv,noheader"],
                                capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return []
    return [line.strip() for line in listed.stdout.splitlines() if line.strip()] if listed.returncode == 0 else []


class GpuPool:
    """Groups of gpus_per_job GPUs, handed out round-robin to the least busy group."""

    def __init__(self, gpu_ids: Sequence[str], gpus_per_job: int):
        ids = [str(g) for g in gpu_ids]
        if gpus_per_job > len(ids):
            raise UserError(f"hydra.launcher.gpus_per_job={gpus_per_job} is more than the {len(ids)} GPUs "
                            f"available ({','.join(ids) or 'none'}): lower it or set hydra.launcher.gpu_ids")
        self.groups = [ids[i:i + gpus_per_job] for i in range(0, len(ids) - gpus_per_job + 1, gpus_per_job)]
        self.busy = [0] * len(self.groups)
        self._next = 0
        self._lock = threading.Lock()

    def acquire(self) -> Tuple[int, List[str]]:
        with self._lock:
            order = [(self._next + k) % len(self.groups) for k in range(len(self.groups))]
            index = min(order, key=lambda i: self.busy[i])
            self.busy[index] += 1
            self._next = (index + 1) % len(self.groups)
            return index, self.groups[index]

    def release(self, index: int) -> None:
        with self._lock:
            self.busy[index] -= 1


# ---------------------------------------------------------------------------------------------
# Running the containers
# ---------------------------------------------------------------------------------------------
@dataclass
class JobOutcome:
    job: Job
    status: str  # finished, failed, interrupted, not started
    exit_code: Optional[int] = None
    container: Optional[str] = None
    gpus: List[str] = field(default_factory=list)
    error: Optional[str] = None


class SweepRunner:
    """Runs jobs in containers, at most max_parallel at once; stops them all on a signal."""

    def __init__(self, client: Any, options: LauncherOptions, environment: Dict[str, str],
                 secret_mounts: Sequence[Any], gpu_pool: Optional[GpuPool], out=None):
        self.client = client
        self.options = options
        self.environment = environment
        self.secret_mounts = list(secret_mounts)
        self.gpu_pool = gpu_pool
        self.out = out or sys.stdout
        self.containers: Dict[int, Any] = {}
        self.started: List[str] = []
        self.stopping = False
        self.hurry = False
        self._lock = threading.Lock()
        self._print_lock = threading.Lock()

    # -- one job, in a worker thread ------------------------------------------------------------
    def run_job(self, job: Job) -> JobOutcome:
        import docker

        group, gpus = self.gpu_pool.acquire() if self.gpu_pool else (None, [])
        container = None
        try:
            job.host_run_dir.mkdir(parents=True, exist_ok=True)
            if self.options.user and self.options.user != f"{os.getuid()}:{os.getgid()}":
                job.host_run_dir.chmod(0o777)  # another UID writes the run directory we made
            with self._lock:
                if self.stopping:
                    return JobOutcome(job, "not started")
                container = self.client.containers.create(
                    **container_kwargs(job, self.options, gpus, self.environment, self.secret_mounts))
                self.containers[job.num] = container
                self.started.append(container.name)
            outcome = JobOutcome(job, "failed", container=container.name, gpus=list(gpus))
            gpu_note = f" on GPU {','.join(gpus)}" if gpus else ""
            self.say(f"[job {job.num}] {container.name}{gpu_note}: thresher {job.describe()}")
            with open(job.log_path, "ab") as log_file:
                container.start()
                self.stream_logs(job, container, log_file)
                outcome.exit_code = int(container.wait().get("StatusCode", -1))
                container.reload()
                if container.attrs.get("State", {}).get("OOMKilled"):
                    outcome.error = "killed: out of memory"
            outcome.status = "finished" if outcome.exit_code == 0 else "failed"
            if self.stopping:
                outcome.status = "interrupted"
            return outcome
        except (docker.errors.DockerException, OSError) as error:
            if self.stopping:
                return JobOutcome(job, "interrupted", container=getattr(container, "name", None))
            message = redact(_docker_message(error))
            if "could not select device driver" in message:
                message += " (no NVIDIA container runtime on this engine: hydra.launcher.gpus_per_job=0 runs on CPU)"
            self.say(f"[job {job.num}] could not run: {message}")
            try:
                with open(job.log_path, "a") as log_file:
                    log_file.write(f"thresher docker launcher: could not run the container: {message}\n")
            except OSError:
                pass
            return JobOutcome(job, "failed", container=getattr(container, "name", None), gpus=list(gpus),
                              error=message)
        finally:
            if group is not None:
                self.gpu_pool.release(group)
            if container is not None and not self.stopping:
                _remove(container)
                with self._lock:
                    self.containers.pop(job.num, None)

    def stream_logs(self, job: Job, container: Any, log_file) -> None:
        """Copy the container's output to <run dir>/container.log and to stdout, one prefixed line at a time."""
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        pending = ""
        try:
            for chunk in container.logs(stream=True, follow=True, stdout=True, stderr=True):
                text = redact(decoder.decode(chunk))
                log_file.write(text.encode())
                log_file.flush()
                pending += text
                *lines, pending = re.split(r"\r\n|\n|\r", pending)
                for line in lines:
                    if line.strip():
                        self.say(f"[job {job.num}] {line}")
        except Exception:  # the stream ends abruptly when the container is removed under it
            if not self.stopping:
                raise
        if pending.strip():
            self.say(f"[job {job.num}] {pending}")

    def say(self, line: str) -> None:
        with self._print_lock:
            self.out.write(line + "\n")
            self.out.flush()

    # -- the whole sweep, in the main thread -----------------------------------------------------
    def run_all(self, jobs: Sequence[Job], max_parallel: int) -> Tuple[List[JobOutcome], Optional[int]]:
        """Outcomes in job order, and the signal number that stopped the sweep (None if none did)."""
        handlers = {signum: signal.signal(signum, self._interrupt) for signum in (signal.SIGINT, signal.SIGTERM)}
        pool = ThreadPoolExecutor(max_workers=max_parallel, thread_name_prefix="thresher-job")
        futures = [pool.submit(self.run_job, job) for job in jobs]
        stopped_by = None
        try:
            try:
                pending = set(futures)
                while pending:  # a timeout so that the signal handler gets to run
                    _, pending = wait(pending, timeout=1.0)
                pool.shutdown(wait=True)
            except SweepInterrupted as stop:
                stopped_by = stop.signum
                for signum in handlers:
                    signal.signal(signum, self._hurry)
                self.stop_all()
                pool.shutdown(wait=True, cancel_futures=True)
        finally:
            for signum, handler in handlers.items():
                signal.signal(signum, handler)
        outcomes = []
        for job, future in zip(jobs, futures):
            if future.cancelled():
                outcomes.append(JobOutcome(job, "not started"))
            elif future.exception() is not None:
                error = future.exception()
                outcomes.append(JobOutcome(job, "interrupted" if stopped_by else "failed",
                                           error=redact(f"{type(error).__name__}: {error}")))
            else:
                outcomes.append(future.result())
        return outcomes, stopped_by

    def _interrupt(self, signum, _frame) -> None:
        raise SweepInterrupted(signum)

    def _hurry(self, signum, _frame) -> None:
        self.hurry = True  # a second Ctrl-C: no more grace, kill now

    def stop_all(self) -> None:
        """SIGTERM to every container (thresher saves and exits 143), then remove them all."""
        import docker

        with self._lock:
            self.stopping = True
            containers = list(self.containers.values())
        if containers:
            self.say(f"stopping {len(containers)} container(s) (up to {self.options.stop_timeout_s}s each "
                     f"to save their state; Ctrl-C again to kill them now)")
        for container in containers:
            try:
                container.kill(signal="SIGTERM")
            except docker.errors.DockerException:
                pass  # created but never started, or already gone
        for container in containers:
            if self.hurry:
                break
            try:
                container.wait(timeout=self.options.stop_timeout_s)
            except Exception:
                pass  # the grace time ran out: removal below kills it
        for container in containers:
            _remove(container)


def _remove(container: Any) -> None:
    import docker

    try:
        container.remove(force=True)
    except docker.errors.NotFound:
        pass
    except docker.errors.APIError as error:
        if "already in progress" not in str(error):
            log.warning("could not remove container %s: %s", container.name, _docker_message(error))


def _docker_message(error: BaseException) -> str:
    explanation = getattr(error, "explanation", None)
    text = explanation.decode(errors="replace") if isinstance(explanation, bytes) else explanation
    return str(text or error).strip().splitlines()[0] if str(text or error).strip() else type(error).__name__


# ---------------------------------------------------------------------------------------------
# sweep_summary.json
# ---------------------------------------------------------------------------------------------
def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _numbers(node: Any, prefix: str) -> Dict[str, Any]:
    """Numeric leaves of nested dicts as dotted keys; lists are skipped (per-epoch histories)."""
    found = {}
    if isinstance(node, dict):
        for key, value in node.items():
            if _is_number(value):
                found[f"{prefix}{key}"] = value
            elif isinstance(value, dict):
                found.update(_numbers(value, f"{prefix}{key}."))
    return found


_read_json = atomic.read_json_object


def job_metrics(run_dir: Path) -> Dict[str, Any]:
    """Every number a job reported: summary.json's stages.<stage>.* and metrics.json's, read
    defensively since their keys change with the stages."""
    summary = _read_json(run_dir / SUMMARY)
    metrics: Dict[str, Any] = {}
    stages = summary.get("stages")
    if isinstance(stages, dict):
        for stage, details in stages.items():
            metrics.update(_numbers(details, f"{stage}."))
    if _is_number(summary.get("duration_s")):
        metrics["duration_s"] = summary["duration_s"]
    metrics.update(_numbers(_read_json(run_dir / METRICS_JSON), "metrics."))
    return metrics


def summary_row(outcome: JobOutcome) -> Dict[str, Any]:
    job = outcome.job
    run_status = _read_json(job.host_run_dir / SUMMARY).get("status")
    row = {"job": job.num, "overrides": [redact(o) for o in job.overrides], "status": outcome.status,
           "exit_code": outcome.exit_code, "run_status": run_status, "run_directory": str(job.host_run_dir),
           "log": str(job.log_path), "container": outcome.container, "gpus": outcome.gpus,
           "metrics": job_metrics(job.host_run_dir)}
    if outcome.error:
        row["error"] = outcome.error
    return row


def write_sweep_summary(sweep_dir: Path, image: str, outcomes: Sequence[JobOutcome]) -> Path:
    """One row per job; rows of earlier batches of the same sweep are kept."""
    path = sweep_dir / SWEEP_SUMMARY
    rows = {row["job"]: row for row in _read_json(path).get("jobs", []) if isinstance(row, dict)}
    rows.update({outcome.job.num: summary_row(outcome) for outcome in outcomes})
    jobs = [rows[num] for num in sorted(rows)]
    atomic.write_json(path, {"sweep_dir": str(sweep_dir), "launcher": "docker", "image": image,
                             "n_jobs": len(jobs), "n_failed": sum(row["status"] != "finished" for row in jobs),
                             "jobs": jobs})
    return path


# ---------------------------------------------------------------------------------------------
# Hydra's entry: Launcher.launch
# ---------------------------------------------------------------------------------------------
def docker_client() -> Any:
    try:
        import docker
    except ImportError:
        raise UserError("hydra/launcher=docker needs the docker package on this host: "
                        "pip install 'thresher[docker]'") from None
    try:
        client = docker.from_env()
        client.ping()
    except docker.errors.DockerException as error:
        raise UserError(f"hydra/launcher=docker: no Docker engine reachable ({_docker_message(error)}): "
                        f"start dockerd or set DOCKER_HOST") from None
    return client


def check_image(client: Any, image: str) -> None:
    import docker

    try:
        client.images.get(image)
    except docker.errors.ImageNotFound:
        raise UserError(f"hydra.launcher.image={image!r} is not on the Docker engine: build it "
                        f"(docker build -t {image} .) or set THRESHER_IMAGE") from None


def job_return(job: Job, outcome: JobOutcome) -> Any:
    """Hydra's record of a job: a finished job returns its key metric, as a local job does, so
    sweepers (Optuna) work with containers too."""
    from hydra.core.utils import JobReturn, JobStatus

    from app.run import key_metric_of

    task_cfg = copy.deepcopy(job.config)
    with read_write(task_cfg), open_dict(task_cfg):
        del task_cfg["hydra"]
    finished = outcome.status == "finished"
    reason = outcome.error or (f"exited {outcome.exit_code}" if outcome.exit_code is not None else outcome.status)
    return JobReturn(overrides=list(job.overrides), cfg=task_cfg, hydra_cfg=job.config,
                     working_dir=str(job.host_run_dir), task_name=str(job.config.hydra.job.name),
                     status=JobStatus.COMPLETED if finished else JobStatus.FAILED,
                     _return_value=key_metric_of(job.host_run_dir) if finished else
                     JobFailed(f"job {job.num} {reason}; its log: {job.log_path}"))


def launch(options: Dict[str, Any], config: DictConfig, hydra_context: Any,
           job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> List[Any]:
    from hydra.core.hydra_config import HydraConfig
    from hydra.core.utils import configure_log, setup_globals

    from app.config import register_resolvers
    from app.secrets import install_redaction

    setup_globals()
    register_resolvers()
    configure_log(config.hydra.hydra_logging, config.hydra.verbose)
    install_redaction()
    try:
        parsed = LauncherOptions.from_config(options)
        client = docker_client()
        check_image(client, parsed.image)
        environment, secret_mounts = secret_environment(parsed.environment, dict(os.environ))
        gpu_pool = None
        if parsed.gpus_per_job:
            gpu_pool = GpuPool(parsed.gpu_ids if parsed.gpu_ids is not None else host_gpu_ids(),
                               parsed.gpus_per_job)
        jobs = []
        for index, overrides in enumerate(job_overrides):
            num = initial_job_idx + index
            sweep_config = hydra_context.config_loader.load_sweep_config(config, list(overrides))
            with open_dict(sweep_config):
                sweep_config.hydra.job.id = f"docker_{num}"
                sweep_config.hydra.job.num = num
            HydraConfig.instance().set_config(sweep_config)
            jobs.append(plan_job(sweep_config, overrides, num))
    except UserError as error:
        print(f"thresher: error: {redact(str(error))}", file=sys.stderr)
        sys.exit(2)

    max_parallel = parsed.max_parallel or (len(gpu_pool.groups) if gpu_pool else 1)
    sweep_dir = jobs[0].sweep_dir if jobs else Path(os.path.abspath(str(config.hydra.sweep.dir)))
    log.info("Launching %d jobs in containers of %s, at most %d at a time", len(jobs), parsed.image,
             max_parallel)
    for job in jobs:
        log.info("\t#%d : %s", job.num, job.describe())
    for job in jobs:
        job.host_work_dir.mkdir(parents=True, exist_ok=True)

    runner = SweepRunner(client, parsed, environment, secret_mounts, gpu_pool)
    outcomes, stopped_by = runner.run_all(jobs, max_parallel)
    summary_path = write_sweep_summary(sweep_dir, parsed.image, outcomes)

    if stopped_by is not None:
        print(f"thresher: sweep stopped by {signal.Signals(stopped_by).name}: removed "
              f"{len(runner.started)} container(s); {summary_path}", file=sys.stderr)
        sys.exit(128 + stopped_by)
    failed = [outcome for outcome in outcomes if outcome.status != "finished"]
    if failed:
        lines = [f"{len(failed)} of {len(outcomes)} jobs failed:"]
        for outcome in failed:
            reason = outcome.error or f"exit {outcome.exit_code}"
            lines.append(f"  job {outcome.job.num} ({outcome.job.describe()}): {reason}; log: {outcome.job.log_path}")
        print(redact("\n".join(lines)), file=sys.stderr)
    log.info("sweep summary: %s", summary_path)
    return [job_return(job, outcome) for job, outcome in zip(jobs, outcomes)]

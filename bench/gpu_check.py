"""Every CUDA path of thresher, once, with figures to paste into BENCHMARKS.md.

    bash bench/gpu_check.sh --device cuda            # a GPU machine: under 8 minutes
    bash bench/gpu_check.sh --device cpu --quick     # the same steps on the CPU, tiny sizes (CI)

GPU machines are lent rarely and briefly, so one script runs every path that only a GPU exercises
and keeps going when one breaks: the coreset on the device (its picks checked against the CPU's),
the embed stage, training in float32, bf16 and fp16, the profile stage with NVML's utilisation,
and training under torchrun. Each step runs in its own process group under a timeout (a hung
CUDA call cannot stall the rest, and a timed-out step's thresher and loader workers go with it);
a failure is recorded with its last error line. Prints a markdown table and writes the figures
as JSON to $OUT/gpu_check.json when $OUT is set (the device tool brings $OUT back), else to
runs/gpu_check.json. Exit code 1 when a step failed, timed out or was skipped for lack of time.
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import re
import resource
import signal
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

# Statuses that are not failures: "refused" and "fell back" are thresher saying, as designed,
# that a setting does not apply to this device (fp16 needs CUDA).
GOOD_STATUSES = ("ok", "refused", "fell back")


@dataclass(frozen=True)
class Sizes:
    coreset_n: int
    coreset_d: int
    coreset_k: int
    prefix_picks: int          # CPU picks compared with the device's at full size
    check_n: int               # a size where every pick is compared
    check_k: int
    embed_images: int
    embed_image_size: int
    embed_batch: int
    shapes_image_size: int
    train_images: int
    train_image_size: int
    train_batch: int
    epochs: int
    profile_batch_sizes: str
    profile_num_workers: str
    profile_steps: int
    budget_s: Optional[float]  # the whole check (steps that would start past it are skipped); None: no limit


# Sized for one H200 and 16 cores (estimated, not yet measured: about 6 minutes, within budget_s);
# the shapes images are generated once into $THRESHER_CACHE_DIR and reused by later checks.
FULL = Sizes(coreset_n=1_000_000, coreset_d=512, coreset_k=10_000, prefix_picks=300, check_n=100_000,
             check_k=1_000, embed_images=10_000, embed_image_size=224, embed_batch=256, shapes_image_size=96,
             train_images=5_000, train_image_size=128, train_batch=64, epochs=2,
             profile_batch_sizes="[64,256]", profile_num_workers="[8]", profile_steps=20, budget_s=450)
# The conftest's small shapes (45 images, 48 px): a test session generates them once.
QUICK = Sizes(coreset_n=5_000, coreset_d=32, coreset_k=100, prefix_picks=100, check_n=2_000, check_k=100,
              embed_images=45, embed_image_size=32, embed_batch=64, shapes_image_size=48,
              train_images=45, train_image_size=32, train_batch=32, epochs=1,
              profile_batch_sizes="[8]", profile_num_workers="[0]", profile_steps=2, budget_s=None)


class StepFailed(Exception):
    """A step's own verdict: what went wrong, in one line."""


@dataclass
class Context:
    device: str                # cuda or cpu
    sizes: Sizes
    work_dir: Path             # thresher's work_dir: one run directory per step

    @property
    def hardware(self) -> str:
        return "hardware=gpu" if self.device == "cuda" else "hardware=cpu"


# ---------------------------------------------------------------------------------------------
# Running thresher, as a user would, and reading what it reports
# ---------------------------------------------------------------------------------------------
def thresher(ctx: Context, run_name: str, overrides: List[str]) -> subprocess.CompletedProcess:
    """`thresher OVERRIDES run_directory=RUN_NAME overwrite=true`; its output goes to this step's log."""
    env = {**os.environ, "THRESHER_WORK_DIR": str(ctx.work_dir), "PYTHONUNBUFFERED": "1"}
    command = [sys.executable, "-m", "app", *overrides, f"run_directory={run_name}", "overwrite=true"]
    return run_logged(command, env)


def run_logged(command: List[str], env: dict) -> subprocess.CompletedProcess:
    """Run `command`, echoing its output (stderr too, in `stdout`) into this step's log line by line,
    so that a step killed at its timeout still shows how far it got."""
    print("$ " + " ".join(command), flush=True)
    lines = []
    with subprocess.Popen(command, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True, errors="replace") as process:
        for line in process.stdout:
            sys.stdout.write(line)
            sys.stdout.flush()
            lines.append(line)
    return subprocess.CompletedProcess(command, process.returncode, "".join(lines), "")


def last_error_line(text: str) -> str:
    """The line that says what went wrong: thresher's `error:` line, else a Python exception's,
    else the last line."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    for pattern in (r"thresher: error:", r"^[\w.]*(Error|Exception)\b", r"(?i)error", r"(?i)fail"):
        matching = [line for line in lines if re.search(pattern, line)]
        if matching:
            return matching[-1][:300]
    return last_line(text)


def last_line(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1][:300] if lines else "no output"


def finished_summary(ctx: Context, run_name: str, done: subprocess.CompletedProcess) -> dict:
    if done.returncode != 0:
        raise StepFailed(f"thresher exit code {done.returncode}: {last_error_line(done.stdout)}")
    return json.loads((ctx.work_dir / run_name / "summary.json").read_text())


def peak_child_rss_mb() -> float:
    """Peak RSS of the largest process this step waited for (thresher, or a loader worker)."""
    return round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024, 1)


def amp_warnings(output: str) -> List[str]:
    """thresher's warnings that it trains in another precision than trainer.amp asks for."""
    return [line.split(" - ", 1)[-1] for line in output.splitlines() if "WARNING" in line and "trainer.amp" in line]


def picked(figures: dict, record: dict, keys: List[str], prefix: str = "") -> None:
    """Copy the numeric fields `keys` of a summary record into `figures`."""
    for key in keys:
        value = record.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            figures[prefix + key] = value


# ---------------------------------------------------------------------------------------------
# The steps
# ---------------------------------------------------------------------------------------------
def coreset_step(kind: str) -> Callable[[Context], dict]:
    def run(ctx: Context) -> dict:
        import numpy as np
        import torch

        from app.sampling.coreset import select_coreset
        from bench_coreset import make_points

        s, device = ctx.sizes, torch.device(ctx.device)
        figures: Dict[str, float] = {"n": s.coreset_n, "d": s.coreset_d, "k": s.coreset_k}
        points = make_points(kind, s.coreset_n, s.coreset_d, clusters=1000, seed=0)
        if device.type == "cuda":
            select_coreset(points[:10_000], 10, device=device)  # CUDA context and cuBLAS, not timed
            torch.cuda.reset_peak_memory_stats(device)
        started = time.perf_counter()
        on_device = select_coreset(points, s.coreset_k, seed=0, device=device)
        figures[f"{ctx.device}_s"] = round(time.perf_counter() - started, 2)
        if device.type == "cuda":
            figures["gpu_memory_peak_mb"] = round(torch.cuda.max_memory_allocated(device) / 2 ** 20, 1)
        prefix = min(s.prefix_picks, s.coreset_k)
        started = time.perf_counter()
        on_cpu = select_coreset(points, prefix, seed=0, device=torch.device("cpu"))
        figures.update(cpu_prefix_picks=prefix, cpu_prefix_s=round(time.perf_counter() - started, 2))
        differs_at(on_device, on_cpu, prefix, f"n={s.coreset_n}")
        del points

        check = make_points(kind, s.check_n, s.coreset_d, clusters=1000, seed=1)
        started = time.perf_counter()
        check_device = select_coreset(check, s.check_k, seed=1, device=device)
        figures.update(check_n=s.check_n, check_k=s.check_k)
        figures[f"check_{ctx.device}_s"] = round(time.perf_counter() - started, 2)
        started = time.perf_counter()
        check_cpu = select_coreset(check, s.check_k, seed=1, device=torch.device("cpu"))
        figures["check_cpu_s"] = round(time.perf_counter() - started, 2)
        figures["check_cpu_over_device"] = round(figures["check_cpu_s"] / max(figures[f"check_{ctx.device}_s"], 1e-9), 2)
        differs_at(check_device, check_cpu, s.check_k, f"n={s.check_n}")
        same = "the CPU compared with itself: plumbing only" if device.type == "cpu" else "= CPU"
        notes = (f"{kind}; picks {same} (first {prefix} at n={s.coreset_n}; all {s.check_k} with distances "
                 f"bit for bit at n={s.check_n}); threads {torch.get_num_threads()}; numpy {np.__version__}")
        return {"figures": figures, "notes": notes}
    return run


def differs_at(on_device, on_cpu, count: int, where: str) -> None:
    """Raise at the first pick (or distance) where the device and the CPU disagree."""
    for i in range(count):
        if (on_device.indices[i], on_device.distances[i]) != (on_cpu.indices[i], on_cpu.distances[i]):
            raise StepFailed(f"device picks differ from the CPU's at pick {i} ({where}): "
                             f"{on_device.indices[i]} ({on_device.distances[i]!r}) vs "
                             f"{on_cpu.indices[i]} ({on_cpu.distances[i]!r})")


def embed_step(ctx: Context) -> dict:
    s = ctx.sizes
    done = thresher(ctx, "embed", ["stages=[scan,embed,select]", ctx.hardware, f"data.n_images={s.embed_images}",
                                   f"data.shapes_image_size={s.shapes_image_size}",
                                   f"data.image_size={s.embed_image_size}", f"sampler.batch_size={s.embed_batch}"])
    stages = finished_summary(ctx, "embed", done)["stages"]
    figures = {"images": s.embed_images, "image_size": s.embed_image_size}
    picked(figures, stages["embed"], ["images_per_s", "compute_efficiency", "duration_s"])
    picked(figures, stages["scan"], ["duration_s"], "scan_")
    picked(figures, stages["select"], ["duration_s", "n_selected"], "select_")
    figures["peak_rss_mb"] = peak_child_rss_mb()
    return {"figures": figures, "notes": f"sampler.batch_size={s.embed_batch}, resnet18, coreset select on the device"}


def train_overrides(ctx: Context) -> List[str]:
    """The training data and schedule, shared by the train, profile and torchrun steps."""
    s = ctx.sizes
    return [f"data.n_images={s.train_images}", f"data.shapes_image_size={s.shapes_image_size}",
            f"data.image_size={s.train_image_size}", f"trainer.batch_size={s.train_batch}",
            f"trainer.epochs={s.epochs}"]


def train_step(amp: Optional[str]) -> Callable[[Context], dict]:
    def run(ctx: Context) -> dict:
        name = f"train_{amp or 'fp32'}"
        done = thresher(ctx, name, ["stages=[scan,embed,select,train]", ctx.hardware, *train_overrides(ctx),
                                    f"trainer.amp={amp or 'null'}"])
        refusal = last_error_line(done.stdout)
        if done.returncode == 2 and ctx.device == "cpu" and amp == "fp16" and "trainer.amp" in refusal:
            return {"status": "refused", "figures": {}, "notes": refusal}
        record = finished_summary(ctx, name, done)["stages"]["train"]
        figures = {"epochs": ctx.sizes.epochs, "image_size": ctx.sizes.train_image_size}
        picked(figures, record, ["images_per_s", "compute_efficiency", "train_loss", "key_metric_value",
                                 "n_train", "duration_s"])
        figures["peak_rss_mb"] = peak_child_rss_mb()
        warnings = amp_warnings(done.stdout)
        notes = f"trainer.amp={amp or 'null'}, batch {ctx.sizes.train_batch}"
        if warnings and amp is not None:
            return {"status": "fell back", "figures": figures, "notes": f"{notes}; thresher: {warnings[-1]}"}
        return {"figures": figures, "notes": notes}
    return run


def nvml_state() -> str:
    """What NVML says here, as torch.cuda.utilization (which the profile stage samples) reads it."""
    try:
        import pynvml
    except ImportError as error:
        return f"pynvml not importable ({error})"
    try:
        pynvml.nvmlInit()
        try:
            driver = pynvml.nvmlSystemGetDriverVersion()
            count = pynvml.nvmlDeviceGetCount()
        finally:
            pynvml.nvmlShutdown()
    except Exception as error:  # no driver: NVMLError_LibraryNotFound and kin
        return f"pynvml imported, NVML not usable ({type(error).__name__}: {error})"
    return f"NVML: driver {driver}, {count} GPU(s)"


def profile_step(ctx: Context) -> dict:
    s = ctx.sizes
    done = thresher(ctx, "profile", ["stages=[profile]", ctx.hardware, *train_overrides(ctx),
                                     f"profile.batch_sizes={s.profile_batch_sizes}",
                                     f"profile.num_workers={s.profile_num_workers}",
                                     "profile.warmup_steps=" + str(min(5, s.profile_steps)),
                                     f"profile.steps={s.profile_steps}"])
    record = finished_summary(ctx, "profile", done)["stages"]["profile"]
    figures: Dict[str, float] = {}
    picked(figures, record, ["best_samples_per_s", "settings_ok", "settings_oom", "settings_failed", "duration_s"])
    rows = json.loads((ctx.work_dir / "profile" / "profile" / "measurements.json").read_text())["rows"]
    measured = [row for row in rows if row.get("status") == "ok"]
    if not measured:
        raise StepFailed(f"no setting measured: {[row.get('status') for row in rows]}")
    best = max(measured, key=lambda row: row["samples_per_s"])
    figures.update(best_batch_size=best["batch_size"], best_num_workers=best["num_workers"])
    picked(figures, best, ["compute_efficiency", "host_rss_peak_mb", "gpu_memory_peak_mb",
                           "gpu_utilization_pct"])
    nvml = nvml_state()
    if ctx.device == "cuda" and best.get("gpu_utilization_pct") is None:
        nvml += "; the profile recorded no GPU utilisation (torch.cuda.utilization gave nothing)"
    elif ctx.device == "cpu":
        nvml += "; GPU figures not applicable on the CPU"
    return {"figures": figures, "notes": f"{record.get('recommended')}; {nvml}"}


def torchrun_step(ctx: Context) -> dict:
    """thresher starts torchrun only for more than one process, so a 1-GPU machine never takes that
    path by itself: select as usual, then start the training worker under torchrun with one process,
    with the command and the config file that app.train.distributed would write."""
    from omegaconf import OmegaConf

    from app import atomic, cli
    from app.artifacts import WORKER_CONFIG
    from app.config import register_configs, register_resolvers
    from app.secrets import redact
    from app.train.distributed import result_path, torchrun_command

    hardware = ["hardware=multi_gpu", "hardware.nproc_per_node=1"] if ctx.device == "cuda" else ["hardware=cpu"]
    overrides = [*hardware, *train_overrides(ctx)]
    finished_summary(ctx, "torchrun", thresher(ctx, "torchrun", ["stages=[scan,embed,select]", *overrides]))
    run_dir = ctx.work_dir / "torchrun"
    os.environ["THRESHER_WORK_DIR"] = str(ctx.work_dir)
    register_configs()
    register_resolvers()
    cfg = cli.compose(["stages=[train]", *overrides, "run_directory=torchrun"])
    config_path = run_dir / WORKER_CONFIG.format(node="")
    atomic.write_text(config_path, redact(OmegaConf.to_yaml(cfg, resolve=False)))
    command = torchrun_command(cfg.hardware, 1, run_dir, config_path)
    started = time.perf_counter()
    done = run_logged(command, {**os.environ, "PYTHONUNBUFFERED": "1"})
    wall_s = round(time.perf_counter() - started, 2)
    if done.returncode != 0 or not result_path(run_dir, 0).is_file():
        raise StepFailed(f"torchrun exit code {done.returncode}: {last_error_line(done.stdout)}")
    result = json.loads(result_path(run_dir, 0).read_text())
    figures = {"epochs": ctx.sizes.epochs, "torchrun_wall_s": wall_s}
    picked(figures, result, ["processes", "images_per_s", "compute_efficiency", "train_loss", "key_metric_value"])
    figures["peak_rss_mb"] = peak_child_rss_mb()
    backend = cfg.hardware.ddp_backend or ("nccl" if ctx.device == "cuda" else "gloo")
    return {"figures": figures, "notes": f"DDP, {backend}, 1 process ({' '.join(hardware)})"}


@dataclass(frozen=True)
class Step:
    name: str
    run: Callable[[Context], dict]
    timeout_s: float           # on the GPU; --quick gives every step QUICK_TIMEOUT_S, for hangs only


# CI machines are slow and shared: in --quick mode a timeout catches a hang, it is not a speed test.
QUICK_TIMEOUT_S = 300
# The most telling first: when the GPU check runs short of time, the last steps are skipped.
STEPS = (
    Step("coreset isotropic", coreset_step("isotropic"), 150),
    Step("embed", embed_step, 150),
    Step("train fp32", train_step(None), 90),
    Step("train bf16", train_step("bf16"), 90),
    Step("train fp16", train_step("fp16"), 90),
    Step("profile (NVML)", profile_step, 90),
    Step("torchrun, 1 process", torchrun_step, 120),
    Step("coreset clustered", coreset_step("clustered"), 120),
)


# ---------------------------------------------------------------------------------------------
# One step, in its own process
# ---------------------------------------------------------------------------------------------
def run_one(name: str, ctx: Context, result_file: Path) -> int:
    step = next(step for step in STEPS if step.name == name)
    try:
        outcome = step.run(ctx)
        outcome.setdefault("status", "ok")
    except StepFailed as error:
        outcome = {"status": "failed", "figures": {}, "error": str(error)}
    except Exception as error:  # recorded, so that the other steps still run
        traceback.print_exc()
        outcome = {"status": "failed", "figures": {}, "error": last_error_line(f"{type(error).__name__}: {error}")}
    result_file.write_text(json.dumps(outcome))
    return 0


def run_isolated(step: Step, ctx: Context, timeout_s: float, quick: bool) -> dict:
    """The step in a child process of its own session, killed with everything it started when its
    time is up."""
    slug = re.sub(r"[^a-z0-9]+", "_", step.name.lower()).strip("_")
    log_path, result_file = ctx.work_dir / f"{slug}.log", ctx.work_dir / f"{slug}.result.json"
    result_file.unlink(missing_ok=True)
    command = [sys.executable, str(Path(__file__).resolve()), "--step", step.name, "--device", ctx.device,
               "--work-dir", str(ctx.work_dir), "--result", str(result_file), *(["--quick"] if quick else [])]
    started = time.perf_counter()
    with open(log_path, "w") as log:
        child = subprocess.Popen(command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            child.wait(timeout=timeout_s)
            timed_out = False
        except subprocess.TimeoutExpired:
            timed_out = True
            stop_group(child)
    outcome = {"step": step.name, "seconds": round(time.perf_counter() - started, 1),
               "load_1min": round(os.getloadavg()[0], 2), "log": str(log_path)}
    log_text = log_path.read_text(errors="replace")
    if timed_out:
        return {**outcome, "status": "timeout", "figures": {},
                "error": f"no result after {timeout_s:.0f} s; last line: {last_line(log_text)}"}
    if not result_file.is_file():
        return {**outcome, "status": "failed", "figures": {},
                "error": f"exit code {child.returncode}: {last_error_line(log_text)}"}
    return {**outcome, **json.loads(result_file.read_text())}


def stop_group(child: subprocess.Popen) -> None:
    """SIGTERM to the step's process group (thresher stops at a safe point and passes it on to
    torchrun), SIGKILL to whatever of it is left after 15 s."""
    for signum, grace_s in ((signal.SIGTERM, 15), (signal.SIGKILL, 5)):
        try:
            os.killpg(child.pid, signum)
        except ProcessLookupError:
            break
        deadline = time.monotonic() + grace_s
        while time.monotonic() < deadline and group_alive(child):
            time.sleep(0.2)
    child.wait()


def group_alive(child: subprocess.Popen) -> bool:
    child.poll()  # reap the leader, so that its zombie does not count
    try:
        os.killpg(child.pid, 0)
        return True
    except ProcessLookupError:
        return False


# ---------------------------------------------------------------------------------------------
# The whole check
# ---------------------------------------------------------------------------------------------
def machine(device: str) -> dict:
    import torch

    info = {"date_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "host_cores": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__,
            "cuda": torch.version.cuda}
    if device == "cuda":
        info["gpu"] = torch.cuda.get_device_name(0)
        info["gpu_count"] = torch.cuda.device_count()
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT, capture_output=True,
                           text=True)
    info["commit"] = (commit.stdout.strip() or "unknown") + (" (with uncommitted changes)" if dirty.stdout.strip() else "")
    return info


def add_ratios(rows: List[dict]) -> None:
    """Throughput relative to float32 training, measured in the same check on the same data."""
    by_name = {row["step"]: row for row in rows}
    baseline = by_name.get("train fp32", {}).get("figures", {}).get("images_per_s")
    if not baseline:
        return
    for name in ("train bf16", "train fp16", "torchrun, 1 process"):
        figures = by_name.get(name, {}).get("figures", {})
        if figures.get("images_per_s"):
            figures["images_per_s_over_fp32"] = round(figures["images_per_s"] / baseline, 2)


def markdown(report: dict) -> str:
    info = report["machine"]
    lines = [f"### GPU check: `bash bench/gpu_check.sh --device {report['device']}"
             f"{' --quick' if report['quick'] else ''}`", "",
             f"- {info['date_utc']}, commit {info['commit']}; {info.get('gpu', 'no GPU')}, {info['host_cores']} cores; "
             f"torch {info['torch']}, CUDA {info['cuda']}, Python {info['python']}",
             f"- 1-minute load average {report['load_1min_before']} before, {report['load_1min_after']} after; "
             f"{report['seconds']} s in all", "",
             "| step | status | s | figures | notes |", "|---|---|--:|---|---|"]
    for row in report["steps"]:
        status = row["status"] if row["status"] in GOOD_STATUSES else "**FAILED**" + (
            "" if row["status"] == "failed" else f" ({row['status']})")
        figures = ", ".join(f"{key} {value:g}" if isinstance(value, float) else f"{key} {value}"
                            for key, value in row["figures"].items())
        notes = (row.get("error") or row.get("notes") or "").replace("|", "\\|")
        lines.append(f"| {row['step']} | {status} | {row['seconds']} | {figures} | {notes} |")
    return "\n".join(lines)


def default_json_path() -> Path:
    return Path(os.environ["OUT"]) / "gpu_check.json" if os.environ.get("OUT") else ROOT / "runs" / "gpu_check.json"


def check(device: str, quick: bool, work_dir: Path, json_path: Path) -> int:
    sizes = QUICK if quick else FULL
    ctx = Context(device, sizes, work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    report = {"device": device, "quick": quick, "machine": machine(device), "sizes": sizes.__dict__,
              "work_dir": str(work_dir), "load_1min_before": round(os.getloadavg()[0], 2), "steps": []}
    started = time.perf_counter()
    for index, step in enumerate(STEPS, 1):
        left = math.inf if sizes.budget_s is None else sizes.budget_s - (time.perf_counter() - started)
        if left < 20:
            row = {"step": step.name, "status": "skipped", "seconds": 0, "figures": {},
                   "error": f"the check's {sizes.budget_s:.0f} s were spent"}
        else:
            row = run_isolated(step, ctx, min(QUICK_TIMEOUT_S if quick else step.timeout_s, left), quick)
        report["steps"].append(row)
        print(f"[{index}/{len(STEPS)}] {step.name}: {row['status']} in {row['seconds']} s"
              f"{': ' + row['error'] if row.get('error') else ''}", flush=True)
    add_ratios(report["steps"])
    report.update(seconds=round(time.perf_counter() - started, 1), load_1min_after=round(os.getloadavg()[0], 2))
    table = markdown(report)
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(report, indent=2))
    json_path.with_suffix(".md").write_text(table + "\n")
    print("\n" + table + f"\n\nfigures: {json_path}")
    return 0 if all(row["status"] in GOOD_STATUSES for row in report["steps"]) else 1


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--quick", action="store_true", help="tiny sizes: every step in about a minute (CI)")
    parser.add_argument("--json", type=Path, default=None, help="default: $OUT/gpu_check.json, else runs/gpu_check.json")
    parser.add_argument("--work-dir", type=Path, default=None,
                        help="thresher's work_dir for the steps' runs (default: $THRESHER_WORK_DIR/gpu_check, "
                             "else runs/gpu_check)")
    parser.add_argument("--step", help=argparse.SUPPRESS)
    parser.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    work_dir = (args.work_dir or Path(os.environ.get("THRESHER_WORK_DIR", ROOT / "runs")) / "gpu_check").resolve()
    if args.step:
        return run_one(args.step, Context(args.device, QUICK if args.quick else FULL, work_dir), args.result)
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            print("gpu_check: error: --device cuda but no CUDA device is visible (torch.cuda.is_available() is "
                  "False): run it on a GPU machine, or use --device cpu", file=sys.stderr)
            return 2
    return check(args.device, args.quick, work_dir, (args.json or default_json_path()).resolve())


if __name__ == "__main__":
    sys.exit(main())

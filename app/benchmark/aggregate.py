"""Gathers a selection-benchmark sweep: one row per job (sampler, budget, seed, images selected, the
key metric on the held-out images), then per sampler and budget the mean and spread over seeds and
the gain over random, written as benchmark.csv, benchmark.md and learning_curve.png in the sweep
directory.

Everything is read from what each job left in its run directory (<sweep dir>/<job num>): its
redacted .hydra/config.yaml (which sampler, budget and seed) and summary.json (the selection's size,
the train stage's key metric, or the error). So a sweep run in containers (hydra/launcher=docker),
a sweep still running, or one whose jobs partly failed reads the same: a failed job becomes a
listed row, never an exception. No torch here; numpy and yaml only.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

from app import atomic
from app.artifacts import CONTAINER_LOG, HYDRA_CONFIGS, HYDRA_LOG, MARKER, SUMMARY
from app.benchmark.budgets import BASELINE, budget_label
from app.errors import UserError


BENCHMARK_CSV = "benchmark.csv"
BENCHMARK_MD = "benchmark.md"
LEARNING_CURVE_PNG = "learning_curve.png"
CSV_HEADER = ("job", "sampler", "budget", "seed", "n_candidates", "n_selected", "n_val", "key_metric", "value",
              "status", "run_directory", "error")


@dataclass
class JobResult:
    """One job of the sweep, as its run directory tells it."""
    job: str
    run_dir: Path
    sampler: Optional[str] = None
    budget: Any = None  # sampler.stopping_condition.n_samples: a fraction (float) or a count (int)
    seed: Optional[int] = None
    n_candidates: Optional[int] = None
    n_selected: Optional[int] = None
    n_val: Optional[int] = None
    key_metric: Optional[str] = None
    value: Optional[float] = None  # the key metric at the last epoch, on the validation images
    status: str = "missing"  # finished, or the run's status (failed, interrupted, running), or missing
    error: Optional[str] = None
    evaluation: Optional[str] = None  # where the validation images came from (describe_evaluation)

    @property
    def measured(self) -> bool:
        return self.value is not None and self.sampler is not None and self.budget is not None


@dataclass
class Cell:
    """One sampler at one budget: the key metric of each seed that finished."""
    sampler: str
    budget: Any
    values: Dict[int, float] = field(default_factory=dict)  # seed -> value
    n_selected: List[int] = field(default_factory=list)

    @property
    def mean(self) -> float:
        return float(sum(self.values.values()) / len(self.values))

    @property
    def std(self) -> float:
        """The sample standard deviation over seeds (n - 1); nan with one seed."""
        n = len(self.values)
        if n < 2:
            return float("nan")
        mean = self.mean
        return math.sqrt(sum((v - mean) ** 2 for v in self.values.values()) / (n - 1))


@dataclass
class Benchmark:
    """What aggregate() found and wrote."""
    sweep_dir: Path
    jobs: List[JobResult]
    cells: Dict[Tuple[str, Any], Cell]
    samplers: List[str]
    budgets: List[Any]
    key_metric: Optional[str]
    files: List[Path]
    markdown: str

    @property
    def failed(self) -> List[JobResult]:
        return [job for job in self.jobs if not job.measured]


# ---------------------------------------------------------------------------------------------
# Reading the jobs
# ---------------------------------------------------------------------------------------------
_read_json = atomic.read_json_object


def _read_yaml(path: Path) -> Dict[str, Any]:
    import yaml

    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError):
        return {}
    return data if isinstance(data, dict) else {}


def _get(node: Any, dotted: str) -> Any:
    for key in dotted.split("."):
        if not isinstance(node, dict):
            return None
        node = node.get(key)
    return node


def is_job_dir(path: Path) -> bool:
    """A folder a job of the sweep ran in: it has a run's marker, summary, configs or log."""
    return path.is_dir() and any((path / name).exists()
                                 for name in (MARKER, SUMMARY, HYDRA_CONFIGS, HYDRA_LOG, CONTAINER_LOG))


def _job_order(path: Path) -> Tuple[int, Any]:
    return (0, int(path.name)) if path.name.isdigit() else (1, path.name)


def job_dirs(sweep_dir: Path) -> List[Path]:
    """The jobs' run directories (hydra.sweep.subdir, the job number by default), in job order."""
    return sorted((child for child in sweep_dir.iterdir() if is_job_dir(child)), key=_job_order)


def describe_evaluation(config: Dict[str, Any]) -> str:
    """Which images the job's key metric was measured on, from its config."""
    holdout = _get(config, "data.holdout_fraction")
    val_input_dir = _get(config, "data.val_input_dir")
    if val_input_dir:
        return f"the labelled folder data.val_input_dir={val_input_dir}"
    if isinstance(holdout, (int, float)) and holdout > 0:
        return f"data.holdout_fraction={holdout:g} of the images, held out by name and never selected from"
    return (f"a trainer.val_fraction={_get(config, 'trainer.val_fraction')} split of each job's own selection: "
            f"not a fixed held-out set, so the jobs are not compared on the same images; set "
            f"data.holdout_fraction or data.val_input_dir")


def _last_error_line(run_dir: Path) -> Optional[str]:
    """The last error a job printed, from its log (the container's output under the docker launcher)."""
    for name in (CONTAINER_LOG, HYDRA_LOG):
        try:
            lines = (run_dir / name).read_text(errors="replace").splitlines()
        except OSError:
            continue
        for line in reversed(lines):
            if "error" in line.lower():
                return line.strip()
    return None


def _budget(value: Any) -> Optional[Any]:
    """n_samples as configured, int (a count) or float (a fraction); None for anything else."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return value


def read_job(run_dir: Path) -> JobResult:
    """One job's sampler, budget, seed, selection size and key metric; what went wrong if it has none."""
    result = JobResult(job=run_dir.name, run_dir=run_dir)
    config = _read_yaml(run_dir / HYDRA_CONFIGS / "config.yaml")
    if config:
        result.sampler = _get(config, "sampler.method")
        result.budget = _budget(_get(config, "sampler.stopping_condition.n_samples"))
        seed = _get(config, "seed")
        result.seed = seed if isinstance(seed, int) and not isinstance(seed, bool) else None
        result.evaluation = describe_evaluation(config)
    summary = _read_json(run_dir / SUMMARY)
    stages = summary.get("stages") if isinstance(summary.get("stages"), dict) else {}
    select = stages.get("select") or {}
    train = stages.get("train") or {}
    result.n_candidates = select.get("n_candidates")
    result.n_selected = select.get("n_selected")
    result.n_val = train.get("n_val")
    result.key_metric = train.get("key_metric")
    result.status = summary.get("status") or "missing"
    value = train.get("key_metric_value")
    if train.get("status") == "finished" and isinstance(value, (int, float)) and math.isfinite(value):
        result.value = float(value)
    if result.measured:
        return result
    if summary.get("error"):
        result.error = str(summary["error"])
    elif not summary:
        result.error = (_last_error_line(run_dir) or
                        "no summary.json: the job stopped before its run started (see its log)")
    elif result.status == "running":
        result.error = "still running"
    elif not config:
        result.error = "no .hydra/config.yaml: its sampler, budget and seed are unknown"
    elif "train" not in stages:
        result.error = "the job did not train (stages without train): no key metric"
    else:
        result.error = f"the train stage reported no key metric (status {train.get('status')})"
    if result.status == "finished":
        result.status = "no_metric"
    return result


def read_jobs(sweep_dir: Path) -> List[JobResult]:
    return [read_job(path) for path in job_dirs(sweep_dir)]


# ---------------------------------------------------------------------------------------------
# Summarising
# ---------------------------------------------------------------------------------------------
def gather_cells(jobs: Sequence[JobResult]) -> Dict[Tuple[str, Any], Cell]:
    """Finished jobs per (sampler, budget); a repeated seed (a job run twice) keeps the later job."""
    cells: Dict[Tuple[str, Any], Cell] = {}
    for job in jobs:
        if not job.measured:
            continue
        cell = cells.setdefault((job.sampler, job.budget), Cell(job.sampler, job.budget))
        cell.values[job.seed if job.seed is not None else len(cell.values)] = job.value
        if job.n_selected is not None:
            cell.n_selected.append(int(job.n_selected))
    return cells


def sampler_order(names: Sequence[str]) -> List[str]:
    """random first (the baseline), then the others by name."""
    unique = sorted(set(names))
    return ([BASELINE] if BASELINE in unique else []) + [name for name in unique if name != BASELINE]


def gain_points(cell: Cell, baseline: Optional[Cell]) -> Optional[float]:
    """The difference of the means, in points (100 x) of a metric in [0, 1] such as val_top1."""
    if baseline is None or not cell.values or not baseline.values:
        return None
    return 100.0 * (cell.mean - baseline.mean)


def noise_points(cells: Dict[Tuple[str, Any], Cell], budget: Any) -> Optional[float]:
    """2 x the standard error of a difference of two samplers' means at `budget`, in points: the
    samplers' variances over seeds pooled, sqrt(2 / n) for n seeds each. None with fewer than 2 seeds."""
    spread = [cell for (_, b), cell in cells.items() if b == budget and len(cell.values) > 1]
    if not spread:
        return None
    pooled = math.sqrt(sum(cell.std ** 2 for cell in spread) / len(spread))
    n = min(len(cell.values) for cell in spread)
    return 100.0 * 2 * pooled * math.sqrt(2 / n)


def paired_gains(cell: Cell, baseline: Optional[Cell]) -> List[Tuple[int, float]]:
    """(seed, difference in points) for the seeds both ran."""
    if baseline is None:
        return []
    return [(seed, 100.0 * (cell.values[seed] - baseline.values[seed]))
            for seed in sorted(cell.values) if seed in baseline.values]


def _number(value: Optional[float], digits: int = 3) -> str:
    return "" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


def write_csv(path: Path, jobs: Sequence[JobResult]) -> None:
    atomic.write_csv(path, CSV_HEADER, ([job.job, job.sampler or "", "" if job.budget is None else f"{job.budget:g}",
                                         "" if job.seed is None else job.seed, _or_blank(job.n_candidates),
                                         _or_blank(job.n_selected), _or_blank(job.n_val), job.key_metric or "",
                                         _number(job.value, 5), job.status, str(job.run_dir), job.error or ""]
                                        for job in jobs))


def _or_blank(value: Any) -> Any:
    return "" if value is None else value


def _cell_text(cell: Optional[Cell], baseline: Optional[Cell], n_seeds: int) -> str:
    if cell is None or not cell.values:
        return "—"
    text = f"{cell.mean:.3f}"
    if len(cell.values) > 1:
        text += f" ± {cell.std:.3f}"
    if len(cell.values) < n_seeds:
        text += f" (n={len(cell.values)})"
    gain = gain_points(cell, baseline) if cell.sampler != BASELINE else None
    if gain is not None:
        text += f" ({gain:+.1f})"
    return text


def _signed(points: float) -> str:
    return f"{points:+.1f}"


def render_markdown(sweep_dir: Path, jobs: Sequence[JobResult], cells: Dict[Tuple[str, Any], Cell],
                    samplers: Sequence[str], budgets: Sequence[Any], key_metric: Optional[str]) -> str:
    measured = [job for job in jobs if job.measured]
    seeds = sorted({job.seed for job in measured if job.seed is not None})
    metric = key_metric or "the key metric"
    lines = [f"# Selection benchmark: {metric} by sampler and budget", ""]
    lines.append(f"Sweep `{sweep_dir}`: {len(jobs)} jobs, {len(measured)} measured"
                 f"{f', {len(jobs) - len(measured)} not (listed below)' if len(measured) < len(jobs) else ''}; "
                 f"seeds {', '.join(map(str, seeds)) or '—'}.")
    evaluations = sorted({job.evaluation for job in jobs if job.evaluation})
    n_val = sorted({job.n_val for job in measured if job.n_val is not None})
    if evaluations:
        size = (f" ({n_val[0]} images)" if len(n_val) == 1 else
                f" ({n_val[0]}–{n_val[-1]} images: not the same set for every job)" if n_val else "")
        lines.append(f"Evaluated on {'; '.join(evaluations)}{size}.")
    lines.append("")
    if not cells:
        lines.append("No job has a key metric yet.")
    else:
        lines.append(f"Each cell: mean ± standard deviation over seeds of {metric} at the last epoch; "
                     f"in brackets the gain over {BASELINE} in points (100 × the difference of the means).")
        lines.append("")
        header = ["sampler"]
        for budget in budgets:
            sizes = [job.n_selected for job in jobs if job.budget == budget and job.n_selected is not None]
            header.append(f"{budget_label(budget)}" + (f" ({round(sum(sizes) / len(sizes))} img)" if sizes else ""))
        lines.append("| " + " | ".join(header) + " |")
        lines.append("|" + "|".join(["---"] + ["---:"] * len(budgets)) + "|")
        for sampler in samplers:
            row = [sampler] + [_cell_text(cells.get((sampler, budget)), cells.get((BASELINE, budget)), len(seeds))
                               for budget in budgets]
            lines.append("| " + " | ".join(row) + " |")
        noise = [noise_points(cells, budget) for budget in budgets]
        if any(value is not None for value in noise):
            lines.append("| *noise (2 SE)* | " + " | ".join("—" if value is None else f"±{value:.1f}"
                                                          for value in noise) + " |")
            lines += ["", "*noise*: a gain smaller than this is within the seeds' spread (twice the standard "
                          "error of a difference of two means, from the samplers' pooled spread at that budget); "
                          "more seeds (seed=1,2,3,4,5,...) shrink it by √n."]
        others = [s for s in samplers if s != BASELINE]
        if others and any((BASELINE, b) in cells for b in budgets):
            lines += ["", f"Gain over {BASELINE} per seed, in points (same seed, same budget):", ""]
            lines.append("| sampler | " + " | ".join(budget_label(b) for b in budgets) + " |")
            lines.append("|" + "|".join(["---"] + ["---:"] * len(budgets)) + "|")
            for sampler in others:
                row = [sampler]
                for budget in budgets:
                    cell = cells.get((sampler, budget))
                    pairs = paired_gains(cell, cells.get((BASELINE, budget))) if cell else []
                    row.append(", ".join(_signed(points) for _, points in pairs) or "—")
                lines.append("| " + " | ".join(row) + " |")
    unmeasured = [job for job in jobs if not job.measured]
    if unmeasured:
        lines += ["", "## Jobs without a result", ""]
        for job in unmeasured:
            what = ", ".join(part for part in (
                f"sampler={job.sampler}" if job.sampler else "",
                f"n_samples={job.budget:g}" if job.budget is not None else "",
                f"seed={job.seed}" if job.seed is not None else "",
                f"{job.n_selected} selected" if job.n_selected is not None else "") if part)
            lines.append(f"- job {job.job}{f' ({what})' if what else ''}: {job.status}: {job.error} "
                         f"(`{job.run_dir}`)")
    lines.append("")
    return "\n".join(lines)


def aggregate(sweep_dir: Path, plot: bool = True) -> Benchmark:
    """Read every job under `sweep_dir` and write benchmark.csv, benchmark.md and (with `plot`)
    learning_curve.png there; raises UserError when `sweep_dir` holds no job."""
    sweep_dir = Path(sweep_dir)
    if not sweep_dir.is_dir():
        raise UserError(f"{str(sweep_dir)!r} is not a folder: name a sweep directory "
                        f"(<work_dir>/multirun/<stamp>_<note>)")
    jobs = read_jobs(sweep_dir)
    if not jobs:
        raise UserError(f"{str(sweep_dir)!r} holds no job of a sweep (no sub-folder with a summary.json, "
                        f".hydra/ or thresher.log): name the sweep directory that `thresher -m` printed")
    cells = gather_cells(jobs)
    # every sampler and budget the sweep ran, measured or not, so that a failed cell shows as one
    samplers = sampler_order([job.sampler for job in jobs if job.sampler])
    budgets = sorted({job.budget for job in jobs if job.budget is not None})
    metrics = [job.key_metric for job in jobs if job.measured and job.key_metric]
    key_metric = max(set(metrics), key=metrics.count) if metrics else None
    markdown = render_markdown(sweep_dir, jobs, cells, samplers, budgets, key_metric)
    files = [sweep_dir / BENCHMARK_CSV, sweep_dir / BENCHMARK_MD]
    write_csv(files[0], jobs)
    atomic.write_text(files[1], markdown)
    if plot and cells:
        from app.benchmark.plot import plot_learning_curve

        seeds = {job.seed for job in jobs if job.measured}
        plot_learning_curve(cells, samplers, budgets, key_metric or "key metric", len(seeds),
                            sweep_dir / LEARNING_CURVE_PNG)
        files.append(sweep_dir / LEARNING_CURVE_PNG)
    return Benchmark(sweep_dir, jobs, cells, samplers, budgets, key_metric, files, markdown)

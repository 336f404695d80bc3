"""The default pipeline without training (scan → embed → select with its report, coreset to 1%) at
N = 1e4, 1e5 and 1e6 small images: per-stage wall time and peak RSS, and how each grows with N.

Each stage runs as its own `thresher "stages=[<stage>]"` process on the same run directory, so its
peak RSS is its own (os.wait4's ru_maxrss of that process); the report's share of the select stage
is the select stage's `report_s`. The images are made here, in parallel, once per N
(24 px PNGs, three class folders, about 1% exact copies and 0.1% truncated files, so the scan has
real work to do): about 4 GB of disk and a few minutes at 1e6.

    .venv/bin/python bench/bench_scale.py --sizes 10000 100000 1000000     # ~1 h on 2 cores
    .venv/bin/python bench/bench_scale.py --sizes 10000                    # ~2 min
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Dict, List

ROOT = Path(__file__).resolve().parents[1]
CLASSES = ("circle", "square", "triangle")
STAGES = ("scan", "embed", "select")
COMPLETE = ".complete"


def _write_chunk(args) -> int:
    """Images start..stop-1 of a folder of n: noise, a filled shape, PNG; some copies, some cut off."""
    import numpy as np
    from PIL import Image, ImageDraw

    root, start, stop, size = args
    written = 0
    for index in range(start, stop):
        rng = np.random.default_rng(index)
        kind = CLASSES[index % 3]
        folder = Path(root) / kind / f"{index // 10000:04d}"
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{kind}_{index:07d}.png"
        if index % 100 == 99:  # an exact copy of the image before it in the same class
            source_index = index - 3
            source = Path(root) / kind / f"{source_index // 10000:04d}" / f"{kind}_{source_index:07d}.png"
            if source.is_file():
                shutil.copyfile(source, path)
                written += 1
                continue
        pixels = np.clip(rng.integers(0, 256, 3) + rng.normal(0, 18, (size, size, 3)), 0, 255).astype(np.uint8)
        image = Image.fromarray(pixels, "RGB")
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        half = rng.uniform(0.2, 0.45) * size
        cx, cy = rng.uniform(half, size - half, 2)
        box = (cx - half, cy - half, cx + half, cy + half)
        draw = ImageDraw.Draw(image)
        if kind == "circle":
            draw.ellipse(box, fill=colour)
        elif kind == "square":
            draw.rectangle(box, fill=colour)
        else:
            draw.polygon([(cx, cy - half), (cx - half, cy + half), (cx + half, cy + half)], fill=colour)
        if index % 1000 == 500:  # a truncated upload
            import io

            buffer = io.BytesIO()
            image.save(buffer, format="PNG")
            path.write_bytes(buffer.getvalue()[:40])
        else:
            image.save(path, format="PNG", compress_level=1)
        written += 1
    return written


def ensure_images(folder: Path, n: int, size: int, workers: int) -> Path:
    """The n images, made once (a marker says the folder is complete)."""
    if (folder / COMPLETE).is_file():
        return folder
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    began = time.perf_counter()
    step = 5000
    # Copies refer to an earlier image of the same chunk's neighbourhood: chunks are whole thousands.
    chunks = [(str(folder), start, min(start + step, n), size) for start in range(0, n, step)]
    done = 0
    with ProcessPoolExecutor(workers) as pool:
        for written in pool.map(_write_chunk, chunks):
            done += written
            print(f"  images: {done}/{n}", flush=True)
    (folder / COMPLETE).write_text(str(n))
    print(f"  made {n} images in {time.perf_counter() - began:.0f} s", flush=True)
    return folder


def run_stage(stage: str, overrides: List[str], env: dict, log_path: Path) -> Dict:
    """One stage as its own process: wall time, peak RSS, and its log."""
    command = [sys.executable, "-m", "app", f"stages=[{stage}]", *overrides]
    began = time.perf_counter()
    with open(log_path, "w") as log:
        process = subprocess.Popen(command, env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(process.pid, 0)
    wall = time.perf_counter() - began
    code = os.waitstatus_to_exitcode(status)
    if code != 0:
        sys.exit(f"stage {stage} failed ({code}); see {log_path}:\n" + log_path.read_text()[-3000:])
    return {"wall_s": round(wall, 2), "peak_rss_MB": round(usage.ru_maxrss / 1024, 1)}


def stage_seconds(run_dir: Path) -> Dict[str, float]:
    summary = json.loads((run_dir / "summary.json").read_text())
    return {stage: record.get("duration_s") for stage, record in summary.get("stages", {}).items()}


def measure(n: int, data_root: Path, work: Path, args) -> Dict:
    print(f"N = {n}", flush=True)
    images = ensure_images(data_root / f"scale-n{n}-s{args.image_size}", n, args.image_size, args.workers)
    run_dir = work / f"run-n{n}"
    shutil.rmtree(run_dir, ignore_errors=True)
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "THRESHER_WORK_DIR": str(work),
           "THRESHER_CACHE_DIR": str(work / "cache")}
    overrides = ["data=folder", f"data.input_dir={images}", f"run_directory={run_dir}",
                 f"data.image_size={args.image_size}", "sampler.stopping_condition.n_samples=0.01",
                 f"note=scale-{n}", *args.overrides]
    row: Dict = {"n": n, "stages": {}}
    for stage in STAGES:
        # the later stages go on in the same run directory, reusing what the earlier ones wrote
        again = [] if stage == STAGES[0] else ["resume=true"]
        row["stages"][stage] = run_stage(stage, [*overrides, *again], env, work / f"n{n}-{stage}.log")
        print(f"  {stage}: {row['stages'][stage]}", flush=True)
    inner = stage_seconds(run_dir)
    for stage in STAGES:
        row["stages"][stage]["stage_s"] = inner.get(stage)
    summary = json.loads((run_dir / "summary.json").read_text())
    row["details"] = {stage: {key: value for key, value in summary["stages"][stage].items()
                              if key not in ("fingerprint", "depends_on", "artifacts")} for stage in STAGES}
    row["report_s"] = row["details"]["select"].get("report_s")
    row["n_selected"] = len((run_dir / "filenames/sampled_filenames.txt").read_text().splitlines())
    return row


def table(rows: List[Dict]) -> str:
    lines = ["| N | stage | wall s | in-stage s | peak RSS MB |", "|---|---|---|---|---|"]
    for row in rows:
        for stage in STAGES:
            figures = row["stages"][stage]
            lines.append(f"| {row['n']:,} | {stage} | {figures['wall_s']} | {figures['stage_s']} | "
                         f"{figures['peak_rss_MB']} |")
        if row.get("report_s") is not None:
            lines.append(f"| {row['n']:,} | (report, within select) | | {row['report_s']} | |")
    by_n = {row["n"]: row for row in rows}
    for small, large in ((10_000, 100_000), (100_000, 1_000_000)):
        if small in by_n and large in by_n:
            ratios = ", ".join(f"{stage} {by_n[large]['stages'][stage]['stage_s'] / max(by_n[small]['stages'][stage]['stage_s'], 1e-9):.1f}"
                               for stage in STAGES)
            lines.append(f"\nin-stage time ratio N={large:,} / N={small:,}: {ratios}")
    return "\n".join(lines)


def main(argv=None) -> Dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    parser.add_argument("--image-size", type=int, default=24)
    parser.add_argument("--data-root", type=Path, default=ROOT / "runs" / "bench_scale_data")
    parser.add_argument("--work", type=Path, default=ROOT / "runs" / "bench_scale")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="processes making the images")
    parser.add_argument("--json", type=Path, default=ROOT / "runs" / "bench_scale.json")
    parser.add_argument("overrides", nargs="*", help="more thresher overrides for every stage")
    args = parser.parse_args(argv)
    args.work.mkdir(parents=True, exist_ok=True)
    load_before = os.getloadavg()
    rows = [measure(n, args.data_root, args.work, args) for n in args.sizes]
    result = {"machine": f"{platform.node()} {os.cpu_count()} cores {platform.machine()}",
              "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "load_before": load_before,
              "load_after": os.getloadavg(), "image_size": args.image_size, "rows": rows}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2))
    print(table(rows))
    print(f"load average before {load_before}, after {result['load_after']}; figures in {args.json}")
    return result


if __name__ == "__main__":
    main()

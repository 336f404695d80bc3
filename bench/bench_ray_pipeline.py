"""executor=ray against executor=local: scan + embed on the same folder of small images, on this
machine (a Ray started for the run, with all its cores), in the same script, alternating.

Each executor runs `thresher "stages=[scan,embed]"` as its own process; the figures are the stages'
own seconds from summary.json (what Ray adds inside a stage: task scheduling, the object store,
the actors' start) and the process's wall time (also Ray's own start and stop). The artifacts of
the two runs are compared: same rows, embeddings equal within 1e-5.

    .venv/bin/python bench/bench_ray_pipeline.py --n 100000      # the issue's figure (~15 min on 2 cores)
    .venv/bin/python bench/bench_ray_pipeline.py --n 10000       # ~3 min
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
from datetime import datetime, timezone
from pathlib import Path
from typing import Dict, List

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
from bench_scale import ensure_images  # noqa: E402  (the same generated folders, shared on disk)


def run_pipeline(executor: str, images: Path, work: Path, image_size: int, extra: List[str]) -> Dict:
    run_dir = work / f"run-{executor}"
    shutil.rmtree(run_dir, ignore_errors=True)
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "THRESHER_CACHE_DIR": str(work / "cache")}
    command = [sys.executable, "-m", "app", "stages=[scan,embed]", "data=folder", f"data.input_dir={images}",
               f"data.image_size={image_size}", f"run_directory={run_dir}", f"work_dir={work}",
               f"executor={executor}", *extra]
    began = time.perf_counter()
    with open(work / f"{executor}.log", "w") as log:
        done = subprocess.run(command, env=env, stdout=log, stderr=subprocess.STDOUT)
    wall = time.perf_counter() - began
    if done.returncode:
        raise SystemExit(f"{executor} failed ({done.returncode}); see {work / f'{executor}.log'}")
    stages = json.loads((run_dir / "summary.json").read_text())["stages"]
    return {"run_dir": str(run_dir), "wall_s": round(wall, 1),
            "scan_s": stages["scan"]["duration_s"], "embed_s": stages["embed"]["duration_s"],
            "images_per_s": stages["embed"].get("images_per_s")}


def same_artifacts(local: Path, ray: Path) -> float:
    """The largest embedding difference; raises when the rows or the lists differ."""
    for name in ("data/input_files.csv", "data/embedding_rows.csv", "filenames/corrupt_filenames.txt",
                 "filenames/duplicate_filenames.txt"):
        if (local / name).read_bytes() != (ray / name).read_bytes():
            raise SystemExit(f"{name} differs between the executors")
    return float(np.abs(np.load(local / "data/embeddings.npy") - np.load(ray / "data/embeddings.npy")).max())


def main(argv=None) -> Dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=100_000)
    parser.add_argument("--image-size", type=int, default=24)
    parser.add_argument("--rounds", type=int, default=1, help="alternating local/ray rounds")
    parser.add_argument("--data-root", type=Path, default=ROOT / "runs" / "bench_scale_data")
    parser.add_argument("--work", type=Path, default=ROOT / "runs" / "bench_ray_pipeline")
    parser.add_argument("overrides", nargs="*", help="more thresher overrides for both executors")
    args = parser.parse_args(argv)
    images = ensure_images(args.data_root / f"scale-n{args.n}-s{args.image_size}", args.n, args.image_size,
                           os.cpu_count() or 1)
    args.work.mkdir(parents=True, exist_ok=True)
    rows: Dict[str, List[Dict]] = {"local": [], "ray": []}
    for _ in range(args.rounds):
        for executor in ("local", "ray"):
            rows[executor].append(run_pipeline(executor, images, args.work, args.image_size, args.overrides))
            print(executor, rows[executor][-1], flush=True)
    difference = same_artifacts(Path(rows["local"][-1]["run_dir"]), Path(rows["ray"][-1]["run_dir"]))
    median = {executor: {key: float(np.median([row[key] for row in found])) for key in ("wall_s", "scan_s", "embed_s")}
              for executor, found in rows.items()}
    stage_ratio = (median["ray"]["scan_s"] + median["ray"]["embed_s"]) / (median["local"]["scan_s"] + median["local"]["embed_s"])
    result = {"n": args.n, "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
              "date": datetime.now(timezone.utc).strftime("%Y-%m-%d"), "median": median,
              "ray_over_local_stages": round(stage_ratio, 3),
              "ray_over_local_wall": round(median["ray"]["wall_s"] / median["local"]["wall_s"], 3),
              "max_embedding_difference": difference, "runs": rows,
              "command": "python bench/bench_ray_pipeline.py " + " ".join(argv or sys.argv[1:])}
    print("| N | executor | scan s | embed s | wall s |\n|---|---|---|---|---|")
    for executor in ("local", "ray"):
        m = median[executor]
        print(f"| {args.n:,} | {executor} | {m['scan_s']:.1f} | {m['embed_s']:.1f} | {m['wall_s']:.1f} |")
    print(f"ray / local: stages {result['ray_over_local_stages']}, wall {result['ray_over_local_wall']}; "
          f"largest embedding difference {difference:.2e}")
    (args.work / "bench_ray_pipeline.json").write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()

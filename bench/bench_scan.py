"""The scan stage against the plainest check there is: one process that, for each file, opens it,
reads its bytes, decodes them with PIL (`Image.open(...).load()`) and hashes them with SHA-256.

The folder is `--images` distinct noise PNGs of 24 to 64 px in 10 class folders, made once into
the cache. Each measurement is a fresh subprocess (imports left out of the times): the reference
times its listing (os.walk) and its loop; the scan times the whole `scan_stage` (listing,
checking on its process pool, duplicates, writing the artifacts) with `hardware.num_workers`
(default null: one process per available core). Rounds alternate the two, so that a change in
the machine's load hits both; the figure is the reference's time over the scan's (above 1: the
scan is faster), with the 1-minute load average, files per second and the peak RSS of the
measuring process and of its largest check process. On a loaded machine the wall-clock ratio says
little (the kernel's autogroup gives a process tree one share, however many processes it has), so
each round also gives `cpu_bound_ratio`: the reference's CPU seconds over the scan's own plus its
check processes' divided among them, the ratio the same work gives on idle cores.

    .venv/bin/python bench/bench_scan.py --images 20000 --rounds 3
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from app.data.locations import shapes_cache_dir  # noqa: E402

# Runs in a fresh process: prints {seconds, cpu_s (its own), check_processes_cpu_s, files, rss_mb, child_rss_mb}.
MEASURE = """
import hashlib, io, json, resource, sys, time
from pathlib import Path

mode, folder, work, workers = sys.argv[1], sys.argv[2], Path(sys.argv[3]), sys.argv[4]
if mode == "reference":
    import os
    from PIL import Image
    began, began_cpu = time.perf_counter(), time.process_time()
    names = sorted(os.path.join(parent, name) for parent, _, names in os.walk(folder) for name in names
                   if name.endswith(".png"))
    for name in names:
        with open(name, "rb") as handle:
            data = handle.read()
        with Image.open(io.BytesIO(data)) as image:
            image.load()
        hashlib.sha256(data).hexdigest()
    files = len(names)
else:
    from app.cli import compose_quietly
    from app.config import register_configs, register_resolvers
    from app.data.scan import scan_stage
    register_configs()
    register_resolvers()
    cfg = compose_quietly(["data=folder", "hardware=cpu", f"hardware.num_workers={workers}",
                           f"data.input_dir={folder}", f"work_dir={work}"])
    began, began_cpu = time.perf_counter(), time.process_time()
    files = scan_stage(cfg, work / "run").n_images
seconds, cpu = time.perf_counter() - began, time.process_time() - began_cpu
children = resource.getrusage(resource.RUSAGE_CHILDREN)
print(json.dumps({"seconds": seconds, "cpu_s": cpu, "check_processes_cpu_s": children.ru_utime + children.ru_stime,
                  "files": files,
                  "rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "child_rss_mb": children.ru_maxrss / 1024}))
"""


def make_folder(folder: Path, n_images: int) -> Path:
    """`n_images` distinct noise PNGs of 24 to 64 px in 10 class folders; made once."""
    done = folder / ".complete"
    if done.is_file():
        return folder
    rng = np.random.default_rng(0)
    for index in range(n_images):
        size = int(rng.integers(24, 65))
        path = folder / f"class_{index % 10}" / f"{index:07d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, size=(size, size, 3), dtype=np.uint8)).save(path)
    done.touch()
    return folder


def measure(mode: str, folder: Path, work: Path, workers: str) -> dict:
    runs = Path(tempfile.mkdtemp(prefix=f"{mode}-", dir=work))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "THRESHER_CACHE_DIR": str(work)}
    done = subprocess.run([sys.executable, "-c", MEASURE, mode, str(folder), str(runs), workers], env=env,
                          cwd=work, capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=20000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--workers", default="null", help="hardware.num_workers for the scan")
    args = parser.parse_args()
    folder = make_folder(shapes_cache_dir() / f"bench_scan_{args.images}_24-64", args.images)
    cores = len(os.sched_getaffinity(0))
    processes = cores if args.workers in ("null", "-1") else max(1, int(args.workers))
    rounds = []
    with tempfile.TemporaryDirectory(prefix="thresher-bench-scan-") as work:
        measure("reference", folder, Path(work), args.workers)  # the page cache holds the folder for both
        for index in range(args.rounds):
            reference = measure("reference", folder, Path(work), args.workers)
            scan = measure("scan", folder, Path(work), args.workers)
            assert scan["files"] == reference["files"] == args.images, (reference, scan)
            rounds.append({"round": index + 1, "reference_s": round(reference["seconds"], 3),
                           "scan_s": round(scan["seconds"], 3), "ratio": round(reference["seconds"] / scan["seconds"], 3),
                           "reference_files_per_s": round(args.images / reference["seconds"]),
                           "scan_files_per_s": round(args.images / scan["seconds"]),
                           "reference_cpu_s": round(reference["cpu_s"], 3), "scan_cpu_s": round(scan["cpu_s"], 3),
                           "check_processes_cpu_s": round(scan["check_processes_cpu_s"], 3),
                           "scan_rss_mb": round(scan["rss_mb"]), "check_process_rss_mb": round(scan["child_rss_mb"]),
                           "reference_rss_mb": round(reference["rss_mb"]),
                           "cpu_bound_ratio": round(reference["cpu_s"] / (scan["cpu_s"] + scan["check_processes_cpu_s"]
                                                                           / processes), 3),
                           "load_average_1m": round(os.getloadavg()[0], 2)})
            print(json.dumps(rounds[-1]), flush=True)
    print(json.dumps({"images": args.images, "cpus": cores, "workers": args.workers,
                      "rounds": args.rounds, "median_ratio": statistics.median(r["ratio"] for r in rounds),
                      "median_scan_files_per_s": statistics.median(r["scan_files_per_s"] for r in rounds)}))


if __name__ == "__main__":
    main()

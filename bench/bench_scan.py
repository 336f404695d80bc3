"""The scan stage of this tree against the same stage of a reference checkout (the code before a
change), on the same generated folder: 5 000 small PNGs in 10 class folders, made once into the
cache.

Each measurement is a fresh subprocess with PYTHONPATH at one tree; it times, inside the process
(imports left out), the listing alone (Source.list_files) and the whole scan_stage (listing,
reading, decoding and hashing every image on the scan's thread pool, writing the artifacts), in
wall and in process CPU seconds, the best of --repeats. Rounds alternate reference and this tree,
so that a change in the machine's load hits both; the figures are this tree's time over the
reference's, and their medians.

    git -C /work/main worktree add /tmp/thresher-base HEAD     # the reference: the last commit
    .venv/bin/python bench/bench_scan.py --base /tmp/thresher-base --rounds 9
    git -C /work/main worktree remove /tmp/thresher-base
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

# Runs in the measured tree: the best of `repeats` listings and scans (wall and process CPU seconds).
MEASURE = """
import json, sys, time
from pathlib import Path
from app.cli import compose_quietly
from app.config import register_configs, register_resolvers
from app.data.scan import IMAGE_EXTENSIONS, scan_stage
from app.data.sources import Source
from app.data.video import VIDEO_EXTENSIONS

folder, work, repeats = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3])
register_configs()
register_resolvers()
cfg = compose_quietly(["data=folder", "hardware=cpu", f"data.input_dir={folder}", f"work_dir={work}"])
best = {"list_s": float("inf"), "scan_s": float("inf"), "scan_cpu_s": float("inf")}
for repeat in range(repeats):
    began = time.perf_counter()
    n_listed = sum(1 for _ in Source(folder).list_files(IMAGE_EXTENSIONS | VIDEO_EXTENSIONS))
    best["list_s"] = min(best["list_s"], time.perf_counter() - began)
    began, began_cpu = time.perf_counter(), time.process_time()
    result = scan_stage(cfg, work / f"run{repeat}")
    best["scan_s"] = min(best["scan_s"], time.perf_counter() - began)
    best["scan_cpu_s"] = min(best["scan_cpu_s"], time.process_time() - began_cpu)
print(json.dumps({**best, "n_listed": n_listed, "n_images": result.n_images}))
"""


FIGURES = ("list_s", "scan_s", "scan_cpu_s")


def make_folder(folder: Path, n_images: int, size: int) -> Path:
    """`n_images` distinct noise PNGs of size×size in 10 class folders; made once."""
    done = folder / ".complete"
    if done.is_file():
        return folder
    rng = np.random.default_rng(0)
    for index in range(n_images):
        path = folder / f"class_{index % 10}" / f"{index:05d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, size=(size, size, 3), dtype=np.uint8)).save(path)
    done.touch()
    return folder


def measure(tree: Path, folder: Path, work: Path, label: str, repeats: int) -> dict:
    runs = Path(tempfile.mkdtemp(prefix=f"{label}-", dir=work))
    env = {**os.environ, "PYTHONPATH": str(tree), "THRESHER_CACHE_DIR": str(work)}
    done = subprocess.run([sys.executable, "-c", MEASURE, str(folder), str(runs), str(repeats)], env=env, cwd=work,
                          capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", type=Path, required=True, help="a checkout of the reference code")
    parser.add_argument("--images", type=int, default=5000)
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=3, help="scans per round and tree; the best counts")
    args = parser.parse_args()
    folder = make_folder(shapes_cache_dir() / f"bench_scan_{args.images}_{args.size}", args.images, args.size)
    rounds = []
    with tempfile.TemporaryDirectory(prefix="thresher-bench-scan-") as work:
        measure(ROOT, folder, Path(work), "warm", 1)  # the page cache holds the folder for both
        for index in range(args.rounds):
            base = measure(args.base, folder, Path(work), "base", args.repeats)
            ours = measure(ROOT, folder, Path(work), "ours", args.repeats)
            assert ours["n_images"] == base["n_images"] == args.images, (base, ours)
            rounds.append({"round": index + 1, **{f"base_{key}": round(base[key], 4) for key in FIGURES},
                           **{key: round(ours[key], 4) for key in FIGURES},
                           **{f"{key[:-2]}_ratio": round(ours[key] / base[key], 3) for key in FIGURES},
                           "load_average_1m": round(os.getloadavg()[0], 2)})
            print(json.dumps(rounds[-1]), flush=True)
    print(json.dumps({"images": args.images, "size": args.size, "cpus": os.cpu_count(), "rounds": args.rounds,
                      "repeats": args.repeats, **{f"median_{key[:-2]}_ratio": statistics.median(
                          r[f"{key[:-2]}_ratio"] for r in rounds) for key in FIGURES}}))

if __name__ == "__main__":
    main()

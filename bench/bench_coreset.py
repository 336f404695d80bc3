"""Greedy k-center, three ways, on the same data: the plain reference (reads every point once per
pick), a port of google/active-learning's kCenterGreedy, and thresher's select_coreset.

    .venv/bin/python bench/bench_coreset.py                                # 1e6 × 512, k = 1e4
    .venv/bin/python bench/bench_coreset.py --n 100000 --k 1000 --ref-picks 1000   # small, all full runs

On clustered and on isotropic data (both L2-normalised float32, as thresher's embeddings are).
thresher always runs in full. The reference and the port cost the same for every pick (each reads
all N points once), so when --ref-picks < k they run that many picks and their time for k picks is
extrapolated linearly: setup + k × per-pick, both measured from two runs (ref-picks / 5 and
ref-picks). Whatever the size, the picks are compared: thresher's first picks against the
reference's, and, when those are not full runs, full runs at the check size (--check-n, --check-k)
as well. Prints a table and writes the figures as JSON (--json).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from app.sampling.coreset import reference_select_coreset, select_coreset  # noqa: E402
from kcenter_greedy_port import KCenterGreedy  # noqa: E402


def make_points(kind: str, n: int, d: int, clusters: int, seed: int) -> np.ndarray:
    """isotropic: Gaussian directions. clustered: `clusters` random unit vectors with Gaussian noise
    of norm about 0.35 around each (equal odds per cluster). Rows normalised to length 1."""
    rng = np.random.default_rng(seed)
    points = np.empty((n, d), dtype=np.float32)
    centers = rng.standard_normal((clusters, d), dtype=np.float32)
    centers /= np.linalg.norm(centers, axis=1, keepdims=True)
    for start in range(0, n, 65536):
        block = points[start:start + 65536]
        block[:] = rng.standard_normal(block.shape, dtype=np.float32)
        if kind == "clustered":
            block *= np.float32(0.35 / np.sqrt(d))
            block += centers[rng.integers(clusters, size=len(block))]
        block /= np.linalg.norm(block, axis=1, keepdims=True)
    return points


def run_thresher(points, k, seed):
    start = time.perf_counter()
    chosen = select_coreset(points, k, seed=seed)
    return time.perf_counter() - start, chosen.indices, chosen.distances


def run_reference(points, k, seed):
    start = time.perf_counter()
    chosen = reference_select_coreset(points, k, seed=seed)
    return time.perf_counter() - start, chosen.indices, chosen.distances


def run_google(points, k, first):
    start = time.perf_counter()
    picks = KCenterGreedy(points).select_batch_([], k, first=first)
    return time.perf_counter() - start, picks, None


def timed(run, points, k, picks_timed, *args):
    """Seconds for k picks (measured, or extrapolated from two shorter runs) and the picks made."""
    if picks_timed >= k:
        seconds, picks, distances = run(points, k, *args)
        return {"seconds": seconds, "measured_picks": k, "extrapolated": False}, picks, distances
    short = max(2, picks_timed // 5)
    t_short, _, _ = run(points, short, *args)
    t_long, picks, distances = run(points, picks_timed, *args)
    per_pick = max(t_long - t_short, 0.0) / (picks_timed - short)
    setup = max(t_long - per_pick * picks_timed, 0.0)
    return {"seconds": setup + per_pick * k, "measured_picks": picks_timed, "extrapolated": True,
            "seconds_per_pick": per_pick, "setup_seconds": setup,
            "measured_seconds": t_long}, picks, distances


def agreement(picks, reference):
    """'identical' or where the first difference is."""
    for i, (a, b) in enumerate(zip(picks, reference)):
        if a != b:
            return f"differ from pick {i}"
    return "identical" if len(picks) >= len(reference) else f"stops after {len(picks)}"


def compare(kind, points, k, picks_timed, seed, with_google=True):
    load = {}  # 1-minute load average before and after each contender: the machine may be shared
    print(f"  {kind}: thresher ...", flush=True)
    before = os.getloadavg()[0]
    t_thresher, thresher_picks, thresher_distances = run_thresher(points, k, seed)
    load["thresher"] = [before, os.getloadavg()[0]]
    print(f"  {kind}: reference ({'all' if picks_timed >= k else picks_timed} picks) ...", flush=True)
    before = os.getloadavg()[0]
    reference, ref_picks, ref_distances = timed(run_reference, points, k, picks_timed, seed)
    load["reference"] = [before, os.getloadavg()[0]]
    n_ref = len(ref_picks)
    row = {
        "thresher_seconds": t_thresher,
        "reference": reference,
        "compared_picks": n_ref,
        "thresher_vs_reference": ("identical" if thresher_picks[:n_ref] == ref_picks
                                  and thresher_distances[:n_ref] == ref_distances
                                  else agreement(thresher_picks, ref_picks)),
    }
    row["reference_over_thresher"] = reference["seconds"] / t_thresher
    if with_google:
        print(f"  {kind}: google port ...", flush=True)
        before = os.getloadavg()[0]
        google, google_picks, _ = timed(run_google, points, k, picks_timed, ref_picks[0])
        load["google_port"] = [before, os.getloadavg()[0]]
        row["google_port"] = google
        row["google_vs_reference"] = agreement(google_picks, ref_picks)
        row["google_over_thresher"] = google["seconds"] / t_thresher
    row["load_1min"] = load
    return row


def machine():
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        model = next(line.split(":", 1)[1].strip() for line in lscpu.splitlines() if line.startswith("Model name"))
    except (OSError, StopIteration):
        model = platform.processor() or "unknown"
    return {"cpu": model, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__, "numpy": np.__version__, "python": platform.python_version()}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=1_000_000, help="points")
    parser.add_argument("--d", type=int, default=512, help="dimensions")
    parser.add_argument("--k", type=int, default=10_000, help="picks")
    parser.add_argument("--ref-picks", type=int, default=60,
                        help="picks the reference and the port run before extrapolating to k (>= k: full runs)")
    parser.add_argument("--check-n", type=int, default=100_000, help="points of the full-run identity check")
    parser.add_argument("--check-k", type=int, default=1_000, help="picks of the full-run identity check")
    parser.add_argument("--clusters", type=int, default=1000)
    parser.add_argument("--data", default="clustered,isotropic", help="comma-separated: clustered, isotropic")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=str(ROOT / "runs" / "bench_coreset.json"), help="where the figures go")
    args = parser.parse_args(argv)

    started = datetime.datetime.now(datetime.timezone.utc)
    result = {"date_utc": started.strftime("%Y-%m-%d %H:%M UTC"), "machine": machine(),
              "command": " ".join([Path(sys.executable).name, *sys.argv]), "load_before": os.getloadavg(),
              "config": vars(args), "runs": {}, "checks": {}}
    print(f"{result['machine']['cpu']}, {result['machine']['cores']} cores, load {result['load_before']}")
    full = args.ref_picks >= args.k
    for kind in args.data.split(","):
        print(f"{kind}: n={args.n} d={args.d} k={args.k}", flush=True)
        points = make_points(kind, args.n, args.d, args.clusters, args.seed)
        result["runs"][kind] = compare(kind, points, args.k, args.ref_picks, args.seed)
        del points
        if not full:
            print(f"{kind}: full-run check, n={args.check_n} d={args.d} k={args.check_k}", flush=True)
            points = make_points(kind, args.check_n, args.d, args.clusters, args.seed)
            result["checks"][kind] = compare(kind, points, args.check_k, args.check_k, args.seed)
            del points
    result["load_after"] = os.getloadavg()
    result["wall_seconds"] = (datetime.datetime.now(datetime.timezone.utc) - started).total_seconds()

    print(f"\nn={args.n} d={args.d} k={args.k}; seconds (e = extrapolated from {args.ref_picks} picks)")
    print(f"{'data':<10} {'reference':>11} {'google port':>12} {'thresher':>9} {'ref/thr':>8} {'google/thr':>10}  picks")
    for title, runs in (("", result["runs"]), (f"full runs, n={args.check_n} k={args.check_k}:", result["checks"])):
        if title and runs:
            print(title)
        for kind, row in runs.items():
            ref, google = row["reference"], row["google_port"]
            print(f"{kind:<10} {ref['seconds']:>10.1f}{'e' if ref['extrapolated'] else ' '}"
                  f" {google['seconds']:>11.1f}{'e' if google['extrapolated'] else ' '}"
                  f" {row['thresher_seconds']:>9.1f} {row['reference_over_thresher']:>8.1f}"
                  f" {row['google_over_thresher']:>10.1f}  thresher {row['thresher_vs_reference']} "
                  f"(first {row['compared_picks']}), google port {row['google_vs_reference']}")
    print(f"load before {result['load_before']}, after {result['load_after']}; 1-minute load around each run:")
    for runs in (result["runs"], result["checks"]):
        for kind, row in runs.items():
            print(f"  {kind:<10} " + ", ".join(f"{name} {a:.1f}->{b:.1f}" for name, (a, b) in row["load_1min"].items()))
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(result, indent=2))
    print(f"figures: {args.json}")
    failed = [kind for runs in (result["runs"], result["checks"]) for kind, row in runs.items()
              if row["thresher_vs_reference"] != "identical"]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

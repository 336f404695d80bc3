"""The coreset on Ray (app/executors/ray_coreset.py, points sharded across actors) against the local
select_coreset on the same data: time, time per pick, round trips and bytes moved per pick.

    .venv/bin/python bench/bench_coreset_ray.py                       # 1e6 × 512, 2 000 picks, 2 actors
    .venv/bin/python bench/bench_coreset_ray.py --n 100000 --picks 500

The data: random unit vectors (Gaussian directions), float32, written to a temporary .npy that the
actors map and copy their shards from. The local run gets the whole matrix in memory and
`--threads` torch threads; each actor gets `--cpus-per-actor` CPUs and as many torch threads, the
driver `--threads`. Both runs must return the same picks and distances; the script says so and
prints a markdown row (machine, date, command).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from app.executors.ray_coreset import select_coreset_on_ray  # noqa: E402
from app.sampling.coreset import select_coreset  # noqa: E402


def write_unit_vectors(path: str, n: int, d: int, seed: int) -> None:
    points = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(n, d))
    rng = np.random.default_rng(seed)
    for start in range(0, n, 65536):
        block = rng.standard_normal((min(65536, n - start), d), dtype=np.float32)
        block /= np.linalg.norm(block, axis=1, keepdims=True)
        points[start:start + len(block)] = block
    points.flush()
    del points


def machine() -> str:
    model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() else ""
    return f"{model}, {os.cpu_count()} cores"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=1_000_000)
    parser.add_argument("--d", type=int, default=512)
    parser.add_argument("--picks", type=int, default=2000)
    parser.add_argument("--actors", type=int, default=2)
    parser.add_argument("--cpus-per-actor", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2, help="torch threads of the local run and the driver")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", help="also write the figures here")
    args = parser.parse_args()
    import ray

    torch.set_num_threads(args.threads)
    folder = tempfile.mkdtemp(prefix="bench-coreset-ray-")
    try:
        path = os.path.join(folder, "points.npy")
        write_unit_vectors(path, args.n, args.d, args.seed)

        points = np.load(path)
        started = time.perf_counter()
        local = select_coreset(points, args.picks, seed=args.seed)
        local_s = time.perf_counter() - started
        del points

        ray.init(num_cpus=args.actors * args.cpus_per_actor, include_dashboard=False, configure_logging=False,
                 log_to_driver=False)
        started = time.perf_counter()
        on_ray = select_coreset_on_ray(path, args.picks, seed=args.seed, actors=args.actors,
                                       num_cpus_per_actor=args.cpus_per_actor)
        ray_s = time.perf_counter() - started
        ray.shutdown()
    finally:
        shutil.rmtree(folder, ignore_errors=True)

    stats = on_ray.stats
    same = on_ray.indices == local.indices and on_ray.distances == local.distances
    picks = len(on_ray.indices)
    figures = {
        "n": args.n, "d": args.d, "picks": picks, "actors": args.actors, "same_picks_and_distances": same,
        "local_s": round(local_s, 2), "ray_s": round(ray_s, 2), "ray_setup_s": round(stats.setup_s, 2),
        "ray_picks_s": round(stats.picks_s, 2), "ray_over_local": round(ray_s / local_s, 2),
        "ray_picks_over_local": round(stats.picks_s / local_s, 2),
        "local_ms_per_pick": round(1000 * local_s / picks, 3),
        "ray_ms_per_pick": round(1000 * stats.picks_s / picks, 3),
        "rounds": stats.rounds, "round_trips": stats.round_trips,
        "picks_per_round": round(picks / max(1, stats.rounds), 1),
        "bytes_sent_per_pick": round(stats.bytes_sent / picks),
        "bytes_received_per_pick": round(stats.bytes_received / picks),
    }
    print(json.dumps(figures, indent=1))
    command = "bench/bench_coreset_ray.py " + " ".join(sys.argv[1:])
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    print("| machine | date | command | local s | ray s (setup + picks) | ray / local (picks only) "
          "| ms/pick local, ray | rounds (trips) | KB/pick sent, received | same picks |")
    print("|---|---|---|---:|---:|---:|---:|---:|---:|---|")
    print(f"| {machine()} | {date} | `{command}` | {local_s:.1f} "
          f"| {ray_s:.1f} ({stats.setup_s:.1f} + {stats.picks_s:.1f}) "
          f"| {ray_s / local_s:.2f} ({stats.picks_s / local_s:.2f}) "
          f"| {figures['local_ms_per_pick']:.2f}, {figures['ray_ms_per_pick']:.2f} "
          f"| {stats.rounds} ({stats.round_trips}) "
          f"| {stats.bytes_sent / picks / 1024:.1f}, {stats.bytes_received / picks / 1024:.1f} | {same} |")
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=1))
    if not same:
        sys.exit(1)


if __name__ == "__main__":
    main()

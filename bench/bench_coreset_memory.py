"""Peak memory and time of select_coreset, each run in a fresh process, optionally against another
version of app/sampling/coreset.py (say git HEAD's) on the same data, the runs interleaved.

    git show HEAD:app/sampling/coreset.py > /tmp/coreset_before.py
    .venv/bin/python bench/bench_coreset_memory.py --n 1000000 --k 10000 --before /tmp/coreset_before.py

Peak RSS is the process's ru_maxrss; "added" is the peak less the RSS with the points made (the
caller's float32 matrix, torch loaded), so it is what the selection itself costs. Time is wall
and CPU (user + system, all threads) seconds of the selection; on a busy machine CPU time is the
steadier of the two. The picks and distances of both versions are compared. The machine may be
shared: the 1-minute load average is printed around every run.
"""
from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def measure(module_path: str, kind: str, n: int, d: int, k: int, clusters: int, seed: int) -> dict:
    """One selection in this process: seconds, peak RSS, RSS before it, and a digest of the picks."""
    sys.path[:0] = [str(ROOT), str(ROOT / "bench")]
    from bench_coreset import make_points

    spec = importlib.util.spec_from_file_location("coreset_under_test", module_path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look themselves up there
    spec.loader.exec_module(module)
    points = make_points(kind, n, d, clusters, seed)
    usage = resource.getrusage(resource.RUSAGE_SELF)
    start = time.perf_counter()
    chosen = module.select_coreset(points, k, seed=seed)
    seconds = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_SELF)
    cpu_seconds = after.ru_utime + after.ru_stime - usage.ru_utime - usage.ru_stime
    before, peak = usage.ru_maxrss, after.ru_maxrss
    digest = hashlib.sha256(json.dumps([chosen.indices, chosen.distances]).encode()).hexdigest()[:16]
    return {"seconds": seconds, "cpu_seconds": cpu_seconds, "peak_mib": peak / 1024,
            "added_mib": (peak - before) / 1024, "points_mib": points.nbytes / 2 ** 20,
            "picks": len(chosen.indices), "digest": digest}


def run_fresh(module_path: str, args) -> dict:
    command = [sys.executable, __file__, "--child", module_path, "--kind", args.kind, "--n", str(args.n),
               "--d", str(args.d), "--k", str(args.k), "--clusters", str(args.clusters),
               "--seed", str(args.seed)]
    load = os.getloadavg()[0]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"{module_path} failed:\n{done.stderr[-2000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    result["load_1min"] = [load, os.getloadavg()[0]]
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=1_000_000)
    parser.add_argument("--d", type=int, default=512)
    parser.add_argument("--k", type=int, default=10_000)
    parser.add_argument("--kind", default="clustered", choices=["clustered", "isotropic"])
    parser.add_argument("--clusters", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=1, help="runs of each version, interleaved")
    parser.add_argument("--before", help="another coreset.py to measure beside this checkout's")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(measure(args.child, args.kind, args.n, args.d, args.k, args.clusters, args.seed)))
        return 0

    versions = {"after": str(ROOT / "app" / "sampling" / "coreset.py")}
    if args.before:
        versions = {"before": args.before, **versions}
    print(f"{args.kind} n={args.n} d={args.d} k={args.k}; load {os.getloadavg()}", flush=True)
    results = {name: [] for name in versions}
    for _ in range(args.repeats):
        for name, path in versions.items():
            row = run_fresh(path, args)
            results[name].append(row)
            print(f"  {name:<6} {row['seconds']:8.1f} s  cpu {row['cpu_seconds']:8.1f} s  "
                  f"peak {row['peak_mib']:7.0f} MiB  added {row['added_mib']:6.0f} MiB "
                  f"(points {row['points_mib']:.0f} MiB)  picks {row['picks']} {row['digest']}  "
                  f"load {row['load_1min'][0]:.2f}->{row['load_1min'][1]:.2f}", flush=True)
    if args.before:
        before, after = results["before"], results["after"]
        ratio = min(r["seconds"] for r in after) / min(r["seconds"] for r in before)
        cpu_ratio = min(r["cpu_seconds"] for r in after) / min(r["cpu_seconds"] for r in before)
        same = {r["digest"] for r in before + after}
        print(f"after/before, best of {args.repeats}: wall {ratio:.3f}, cpu {cpu_ratio:.3f}; picks and "
              f"distances {'identical' if len(same) == 1 else 'DIFFER'}; load {os.getloadavg()}")
        return 0 if len(same) == 1 else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

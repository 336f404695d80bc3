"""The lightly embeddings CSV: thresher's streaming reader and writer (app.sampling.embeddings_io)
against the reader they replace (`reference_read_embeddings_csv`, the csv module into Python lists).

A random float32 N×d matrix is made in chunks into a `.npy` memmap, written as CSV by
`write_embeddings_csv` (from the memmap), then read with strict=True by the reference and by the
new reader. Each step runs in a fresh subprocess that reports its wall time, its CPU time (imports
included; the fairer figure on a loaded machine) and its own peak RSS (VmHWM), so the figures
do not mix; both readers' results are hashed and must agree. Then the new reader alone reads a
--big-n CSV (the reference would need ~45 GB at 1e6 × 512: skipped).

    .venv/bin/python bench/bench_embeddings_csv.py                      # 1e5 × 512, then 1e6 × 512
    .venv/bin/python bench/bench_embeddings_csv.py --n 20000 --big-n 0  # seconds

The CSVs (0.5 and 5 GB) go to --work (a temporary folder by default) and are deleted afterwards.
The figures go to --json (default runs/bench_embeddings_csv.json).
"""
from __future__ import annotations

import argparse
import csv
import hashlib
import json
import math
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import List, Tuple

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from app.errors import UserError  # noqa: E402
from app.sampling.embeddings_io import (  # noqa: E402
    is_embeddings_header, read_embeddings_csv, write_embeddings_csv)

MiB = 1 << 20


def reference_read_embeddings_csv(path: Path, strict: bool = False) -> Tuple[List[str], np.ndarray, List[int]]:
    """app/sampling/embeddings_io.py's reader before it streamed, copied unchanged."""

    def refuse(line: int, reason: str) -> UserError:
        return UserError(f"embeddings={str(path)!r} is malformed at line {line}: {reason}")

    # A name that is not UTF-8 reads (surrogate-escaped) as no file the scan uses, instead of failing.
    with open(path, newline="", encoding="utf-8", errors="surrogateescape") as handle:
        reader = csv.reader(handle)
        header = next(reader, None)
        if header is None:
            raise refuse(1, "the file is empty; expected the header filenames,embedding_0,...,labels")
        dim = len(header) - 2
        if strict and not is_embeddings_header(header):
            raise refuse(1, f"the header must be filenames,embedding_0,...,embedding_{{D-1}},labels, "
                            f"not {','.join(header[:3])}{',...' if len(header) > 3 else ''}")
        files, rows, labels, seen = [], [], [], set()
        for line, row in enumerate(reader, start=2):
            if strict:
                if len(row) != dim + 2:
                    raise refuse(line, f"{len(row)} fields, the header has {dim + 2}")
                if not row[0]:
                    raise refuse(line, "the file name is empty")
                if row[0] in seen:
                    raise refuse(line, f"{row[0]!r} appears twice")
                seen.add(row[0])
                try:
                    values = [float(v) for v in row[1:1 + dim]]
                except ValueError as error:
                    raise refuse(line, f"not a number: {error}") from None
                if not all(math.isfinite(v) for v in values):
                    raise refuse(line, "an embedding value is NaN or infinite")
                try:
                    int(row[-1])
                except ValueError:
                    raise refuse(line, f"the label {row[-1]!r} is not an integer") from None
            files.append(row[0])
            rows.append(row[1:1 + dim])
            labels.append(int(row[-1]))
    if strict and not files:
        raise refuse(2, "the file has a header but no rows")
    vectors = np.array(rows, dtype=np.float32).reshape(len(rows), dim)
    return files, vectors, labels


def make_matrix(path: Path, n: int, d: int, chunk: int = 65536) -> None:
    """A random N×d float32 `.npy`, made chunk by chunk (the parent never holds it)."""
    rng = np.random.default_rng(0)
    matrix = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(n, d))
    for start in range(0, n, chunk):
        stop = min(start + chunk, n)
        matrix[start:stop] = rng.standard_normal((stop - start, d), dtype=np.float32)
    matrix.flush()


def digest(files, vectors, labels, chunk: int = 65536) -> str:
    """A hash of what a reader returned, read in chunks (no copy of the matrix)."""
    sha = hashlib.sha256()
    for start in range(0, len(files), chunk):
        sha.update(np.ascontiguousarray(vectors[start:start + chunk]).data)
    sha.update(np.asarray(labels, dtype=np.int64).data)
    sha.update("\n".join(files).encode("utf-8", "surrogateescape"))
    return sha.hexdigest()[:16]


def child(step: str, csv_path: Path, matrix_path: Path) -> dict:
    """One measured step, in this (fresh) process: its wall time and its own peak RSS."""
    if step == "write":
        vectors = np.load(matrix_path, mmap_mode="r")
        n = len(vectors)
        files = [f"images/class_{i % 10}/img_{i:07d}.png" for i in range(n)]
        began = time.perf_counter()
        write_embeddings_csv(csv_path, files, vectors, np.arange(n, dtype=np.int64) % 10)
        result = {"seconds": time.perf_counter() - began, "csv_bytes": csv_path.stat().st_size}
    else:
        reader = reference_read_embeddings_csv if step == "read-old" else read_embeddings_csv
        began = time.perf_counter()
        files, vectors, labels = reader(csv_path, strict=True)
        result = {"seconds": time.perf_counter() - began, "rows": len(files), "matrix_bytes": vectors.nbytes}
        result["digest"] = digest(files, vectors, labels)
    usage = resource.getrusage(resource.RUSAGE_SELF)
    result["cpu_seconds"] = usage.ru_utime + usage.ru_stime
    result["peak_rss_bytes"] = peak_rss_bytes(usage)
    return result


def peak_rss_bytes(usage) -> int:
    """This process's peak RSS: VmHWM, which counts from exec (Linux's ru_maxrss also carries the
    parent's RSS at fork through exec), else ru_maxrss."""
    status = Path("/proc/self/status")
    if status.is_file():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return usage.ru_maxrss * 1024


def measure(step: str, csv_path: Path, matrix_path: Path) -> dict:
    output = subprocess.run([sys.executable, __file__, "--child", step, str(csv_path), str(matrix_path)],
                            check=True, capture_output=True, text=True, cwd=ROOT).stdout
    result = json.loads(output.strip().splitlines()[-1])
    result["loadavg"] = Path("/proc/loadavg").read_text().split()[:3]
    print(f"  {step:9s} n={result.get('rows', '')!s:8s} {result['seconds']:7.1f} s ({result['cpu_seconds']:6.1f} s CPU)  "
          f"peak RSS {result['peak_rss_bytes'] / MiB:7.0f} MiB  load {' '.join(result['loadavg'])}", flush=True)
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=100_000)
    parser.add_argument("--d", type=int, default=512)
    parser.add_argument("--big-n", type=int, default=1_000_000, help="rows for the new reader alone; 0 skips")
    parser.add_argument("--work", type=Path, default=None)
    parser.add_argument("--json", type=Path, default=ROOT / "runs" / "bench_embeddings_csv.json")
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child[0], Path(args.child[1]), Path(args.child[2]))))
        return 0

    report = {"d": args.d, "loadavg_before": Path("/proc/loadavg").read_text().split()[:3], "runs": []}
    with tempfile.TemporaryDirectory(dir=args.work) as work:
        work = Path(work)
        for n, with_reference in [(args.n, True), (args.big_n, False)]:
            if not n:
                continue
            print(f"{n} × {args.d}:", flush=True)
            matrix_path, csv_path = work / f"matrix_{n}.npy", work / f"embeddings_{n}.csv"
            make_matrix(matrix_path, n, args.d)
            run = {"n": n, "matrix_bytes": n * args.d * 4, "write": measure("write", csv_path, matrix_path)}
            if with_reference:
                run["read_old"] = measure("read-old", csv_path, matrix_path)
            run["read_new"] = measure("read-new", csv_path, matrix_path)
            if with_reference:
                old, new = run["read_old"], run["read_new"]
                run["same_result"] = old["digest"] == new["digest"]
                run["time_ratio_old_over_new"] = old["seconds"] / new["seconds"]
                run["rss_ratio_old_over_new"] = old["peak_rss_bytes"] / new["peak_rss_bytes"]
            else:
                run["read_old"] = "skipped: the csv-module reader holds ~45 GB of Python objects at 1e6 × 512"
            new = run["read_new"]
            run["rss_budget_bytes"] = int(1.5 * run["matrix_bytes"] + 300 * MiB)
            run["within_rss_budget"] = new["peak_rss_bytes"] <= run["rss_budget_bytes"]
            report["runs"].append(run)
            matrix_path.unlink()
            csv_path.unlink()
    report["loadavg_after"] = Path("/proc/loadavg").read_text().split()[:3]

    print(f"\n{'n × d':>14s} {'CSV MB':>7s} {'write s':>8s} {'old read s':>10s} {'new read s':>10s} "
          f"{'old RSS MB':>10s} {'new RSS MB':>10s} {'budget MB':>9s} {'old/new t':>9s} {'old/new RSS':>11s}")
    for run in report["runs"]:
        old = run["read_old"] if isinstance(run["read_old"], dict) else None
        new = run["read_new"]
        print(f"{run['n']:>8d} × {args.d:<3d} {run['write']['csv_bytes'] / 1e6:7.0f} {run['write']['seconds']:8.1f} "
              f"{old['seconds'] if old else float('nan'):10.1f} {new['seconds']:10.1f} "
              f"{old['peak_rss_bytes'] / MiB if old else float('nan'):10.0f} {new['peak_rss_bytes'] / MiB:10.0f} "
              f"{run['rss_budget_bytes'] / MiB:9.0f} {run.get('time_ratio_old_over_new', float('nan')):9.1f} "
              f"{run.get('rss_ratio_old_over_new', float('nan')):11.1f}")
        if old:
            print(f"{'':14s} old and new read the same values: {run['same_result']}")
    print(f"load average before {' '.join(report['loadavg_before'])}, after {' '.join(report['loadavg_after'])}")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.json}")
    same = all(run.get("same_result", True) for run in report["runs"])
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())

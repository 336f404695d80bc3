"""From a sweep's measurements to the setting worth using, written as a ready override line.

Pure Python (no torch), so the choice can be tested on made-up measurements.
"""
from __future__ import annotations

from typing import Dict, List, Optional

OK, OOM, FAILED = "ok", "oom", "failed"


def override_line(mode: str, batch_size: int, num_workers: int, batch_size_key: Optional[str]) -> str:
    """The command-line overrides that set what was measured: the batch size under the key the
    measured mode feeds (none in latency mode, which is batch size 1 by definition)."""
    parts = [f"{batch_size_key}={batch_size}"] if batch_size_key and mode != "latency" else []
    return " ".join(parts + [f"hardware.num_workers={num_workers}"])


def recommend(rows: List[Dict], mode: str, tolerance: float, batch_size_key: Optional[str]) -> Optional[Dict]:
    """The setting to use, or None when no setting ran.

    train/infer: among the settings within `tolerance` of the best throughput, the smallest batch
    size, then the fewest workers: a larger batch or more workers that buy no speed only cost
    memory, CPU and (for training) a different optimisation. latency: the lowest p95 latency.
    """
    ran = [row for row in rows if row["status"] == OK]
    if not ran:
        return None
    if mode == "latency":
        best = min(ran, key=lambda row: (row["latency_ms"]["p95"], row["num_workers"]))
        reason = (f"lowest p95 latency, {best['latency_ms']['p95']:.4g} ms an image "
                  f"(p50 {best['latency_ms']['p50']:.4g} ms)")
    else:
        top = max(row["samples_per_s"] for row in ran)
        near = [row for row in ran if row["samples_per_s"] >= (1 - tolerance) * top]
        best = min(near, key=lambda row: (row["batch_size"], row["num_workers"]))
        fastest = max(ran, key=lambda row: row["samples_per_s"])
        reason = f"{best['samples_per_s']:.4g} samples/s"
        if best is not fastest:
            reason += (f", within {tolerance:.0%} of the fastest (batch {fastest['batch_size']}, "
                       f"{fastest['num_workers']} workers: {fastest['samples_per_s']:.4g} samples/s) with "
                       f"a smaller batch or fewer workers")
        else:
            reason += ", the fastest setting"
        skipped = sorted({row["batch_size"] for row in rows if row["status"] == OOM})
        if skipped:
            reason += f"; out of memory at batch size {', '.join(map(str, skipped))}"
    return {"batch_size": best["batch_size"], "num_workers": best["num_workers"],
            "overrides": override_line(mode, best["batch_size"], best["num_workers"], batch_size_key),
            "samples_per_s": best.get("samples_per_s"), "reason": reason}

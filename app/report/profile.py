"""The profile's part of the report: its section in report.json and report.html, and the plots
of throughput and CPU time per sample against batch size (the batch-size guidance's two
diagrams), or of latency percentiles in latency mode."""
from __future__ import annotations

from pathlib import Path
from typing import Dict, List

from app.artifacts import BATCH_LATENCY_PNG, CPU_TIME_PNG, LATENCY_PNG, REPORT_HTML, REPORT_JSON, THROUGHPUT_PNG
from app.report import plots
from app.report.page import read_report, write_report_files


def write_profile_report(run_dir: Path, section: Dict) -> List[str]:
    """Plot `section` (the profile stage's results), put it into report.json beside any selection
    report of the run, and render report.html; returns the files written."""
    rows, mode = section["settings"], section["mode"]
    what = {"train": "training", "infer": "inference", "latency": "inference"}[mode]
    subject = f"{section['model']} {what}, {section['device']}"
    captions: Dict[str, str] = {}
    if any(row["status"] == "ok" for row in rows):
        if mode == "latency":
            plots.plot_latency(rows, f"Latency per image: {subject}", run_dir / LATENCY_PNG)
            captions[LATENCY_PNG] = ("Per-image latency percentiles at batch size 1, from the image in hand to "
                                     "its result on the host, for each number of loader workers.")
        else:
            plots.plot_against_batch_size(rows, "samples_per_s", "samples / s", f"Throughput: {subject}",
                                          run_dir / THROUGHPUT_PNG, section.get("recommended"))
            captions[THROUGHPUT_PNG] = ("Samples per second against batch size, a line per number of loader "
                                        "workers; x: out of memory; ringed: the recommended setting.")
        if mode == "infer":
            plots.plot_against_batch_size(rows, "latency_ms.p95", "p95 latency of a batch (ms)",
                                          f"Latency: {subject}", run_dir / BATCH_LATENCY_PNG)
            captions[BATCH_LATENCY_PNG] = ("p95 time from a batch in hand to its results on the host, against "
                                           "batch size: a larger batch raises the throughput, but every image "
                                           "waits for its whole batch (live use wants batch size 1: "
                                           "profile.mode=latency).")
        plots.plot_against_batch_size(rows, "cpu_ms_per_sample", "CPU ms / sample",
                                      f"CPU time per sample: {subject}", run_dir / CPU_TIME_PNG)
        captions[CPU_TIME_PNG] = ("CPU time (user + system, the process and its loader workers) per sample "
                                  "against batch size: the host's overhead, which keeps falling with larger "
                                  "batches even where the throughput does not rise.")
    section = {**section, "plots": list(captions), "plot_captions": captions}
    report = read_report(run_dir)
    report["profile"] = section
    write_report_files(run_dir, report)
    return [REPORT_JSON, REPORT_HTML, *captions]

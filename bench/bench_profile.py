"""Does the profile measure what a plain loop measures? thresher's profile stage against a
hand-written timing loop, on the same model, files, preprocessing and batch sizes.

The reference is the loop a user would write to time training: a DataLoader, `warmup` steps, then
`steps` steps between two clock reads (the device synchronised), CPU time from
`time.process_time()` (no loader workers, so the process is everything). thresher's figures come
from its profile stage (per-step clocks, a sampling thread, psutil over the process tree, a
progress bar). Rounds alternate A B A B so that the machine's load hits both; per batch size two
ratios, thresher's over the reference's, with their medians:
- throughput_ratio: samples/s (1.0: the instrumentation costs nothing and measures the same);
- cpu_ratio: CPU ms per sample.

    .venv/bin/python bench/bench_profile.py --batch-sizes 8 32 --rounds 5 [--device cuda]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import time
from pathlib import Path

import torch
import torchvision
from torch.utils.data import DataLoader

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench_train_loop import HandFiles, scanned_shapes  # noqa: E402  (the same plain preprocessing)

from app.profile.measure import synchronize  # noqa: E402


def hand_profile(args, input_dir: Path, files, labels, batch_size: int, device) -> dict:
    torch.manual_seed(0)
    model = torchvision.models.get_model(args.model, num_classes=3).to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=1e-4)
    n_batches = args.warmup + args.steps
    repeated = (files * (n_batches * batch_size // len(files) + 1))[:n_batches * batch_size]
    labels = (labels * (n_batches * batch_size // len(labels) + 1))[:n_batches * batch_size]
    loader = DataLoader(HandFiles(input_dir, repeated, labels, args.image_size), batch_size=batch_size,
                        shuffle=False, num_workers=0, pin_memory=device.type == "cuda")
    batches = iter(loader)

    def step():
        images, targets = next(batches)
        images, targets = images.to(device, non_blocking=True), targets.to(device, non_blocking=True)
        loss = torch.nn.functional.cross_entropy(model(images), targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        float(loss.detach())

    for _ in range(args.warmup):
        step()
    synchronize(device)
    wall, cpu = time.perf_counter(), time.process_time()
    for _ in range(args.steps):
        step()
    synchronize(device)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    samples = args.steps * batch_size
    return {"samples_per_s": samples / wall, "cpu_ms_per_sample": 1000 * cpu / samples}


def thresher_profile(args, run_dir: Path, batch_size: int, device) -> dict:
    from app.cli import compose
    from app.config import register_configs, register_resolvers
    from app.profile.stage import profile_stage

    register_configs()
    register_resolvers()
    shutil.rmtree(run_dir / "profile", ignore_errors=True)
    cfg = compose([f"model={args.model}", f"data.image_size={args.image_size}", "stages=[profile]",
                   f"profile.batch_sizes=[{batch_size}]", "profile.num_workers=[0]",
                   f"profile.warmup_steps={args.warmup}", f"profile.steps={args.steps}",
                   "data.augment.hflip=0", "data.augment.resize.keep_ratio=false", f"work_dir={run_dir.parent}"])
    torch.manual_seed(0)
    profile_stage(cfg, run_dir, device)
    row = json.loads((run_dir / "report.json").read_text())["profile"]["settings"][0]
    return {"samples_per_s": row["samples_per_s"], "cpu_ms_per_sample": row["cpu_ms_per_sample"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=480)
    parser.add_argument("--shapes-size", type=int, default=96)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[8, 32])
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    device = torch.device(args.device)

    work, run_dir, input_dir, files, labels = scanned_shapes(args.images, args.shapes_size)

    results = {}
    for batch_size in args.batch_sizes:
        pairs = []
        for round_index in range(args.rounds):
            hand = hand_profile(args, input_dir, files, labels, batch_size, device)
            ours = thresher_profile(args, run_dir, batch_size, device)
            pairs.append({"batch_size": batch_size, "round": round_index + 1,
                          "hand_samples_per_s": round(hand["samples_per_s"], 2),
                          "thresher_samples_per_s": round(ours["samples_per_s"], 2),
                          "throughput_ratio": round(ours["samples_per_s"] / hand["samples_per_s"], 3),
                          "hand_cpu_ms_per_sample": round(hand["cpu_ms_per_sample"], 3),
                          "thresher_cpu_ms_per_sample": round(ours["cpu_ms_per_sample"], 3),
                          "cpu_ratio": round(ours["cpu_ms_per_sample"] / hand["cpu_ms_per_sample"], 3),
                          "load_average_1m": round(os.getloadavg()[0], 2)})
            print(json.dumps(pairs[-1]), flush=True)
        results[batch_size] = {"median_throughput_ratio": statistics.median(p["throughput_ratio"] for p in pairs),
                               "median_cpu_ratio": statistics.median(p["cpu_ratio"] for p in pairs)}
    print(json.dumps({"model": args.model, "image_size": args.image_size, "device": str(device),
                      "torch_threads": torch.get_num_threads(), "warmup": args.warmup, "steps": args.steps,
                      "results": results}))
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()

"""Loop overhead: thresher's training loop against a minimal hand-written PyTorch loop.

Both train the same torchvision model on the same files with the same batch size, the same
preprocessing (a plain resize to data.image_size and ImageNet normalisation: thresher's
augmentations set to do exactly that) and the same DataLoader workers, for one epoch each,
alternating A B A B so that a change in the machine's load hits both. Two figures per pair,
thresher's over the hand loop's, and their medians:
- step_ratio: training steps per second over the epoch (first batch to last step), the loop's own
  rate: thresher's per-sample seeding, progress, stop checks, loss bookkeeping against none;
- whole_ratio: images per second of process CPU time for the whole call, model construction and
  thresher's end-of-epoch work (metrics files, last.pt and best.pt) included. `--threads 1` makes
  it robust to a busy machine, where a second torch thread only spins.

    .venv/bin/python bench/bench_train_loop.py --images 960 --model resnet18 --image-size 64 \
        --batch-size 32 --rounds 3 [--device cuda]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torchvision
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import v2

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from app.train.data import selected_files  # noqa: E402


class HandFiles(Dataset):
    def __init__(self, root: Path, files, labels, size: int):
        self.root, self.files, self.labels = root, files, labels
        self.transform = v2.Compose([v2.ToImage(), v2.Resize((size, size), antialias=True),
                                     v2.ToDtype(torch.float32, scale=True),
                                     v2.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))])

    def __len__(self):
        return len(self.files)

    def __getitem__(self, index):
        with Image.open(self.root / self.files[index]) as image:
            return self.transform(image.convert("RGB")), self.labels[index]


def scanned_shapes(n_images: int, shapes_size: int):
    """A temporary work folder with the shapes dataset scanned into run `bench`; the environment
    points thresher at it. Returns (work, run_dir, input_dir, files, labels)."""
    work = Path(tempfile.mkdtemp(prefix="thresher-bench-"))
    env = {**os.environ, "THRESHER_CACHE_DIR": str(work / "cache"), "THRESHER_WORK_DIR": str(work / "runs")}
    subprocess.run([sys.executable, "-m", "app", "stages=[scan]", "run_directory=bench", f"data.n_images={n_images}",
                    f"data.shapes_image_size={shapes_size}"], env=env, cwd=ROOT, check=True, capture_output=True)
    os.environ.update(env)
    run_dir = work / "runs/bench"
    input_dir, files, labels, _ = selected_files(run_dir)
    return work, run_dir, Path(input_dir), files, labels  # a local folder: the shapes cache


def timed(function, *args):
    wall, cpu = time.perf_counter(), time.process_time()
    seen = function(*args)
    return seen / (time.perf_counter() - wall), seen / (time.process_time() - cpu)


def hand_loop(args, input_dir: Path, files, labels, device) -> int:
    """The loop a user would write in ten lines; returns the number of images trained on."""
    torch.manual_seed(0)
    model = torchvision.models.get_model(args.model, num_classes=3).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=1e-4)
    loader = DataLoader(HandFiles(input_dir, files, labels, args.image_size), batch_size=args.batch_size,
                        shuffle=True, num_workers=args.workers, drop_last=False,
                        pin_memory=device.type == "cuda")
    model.train()
    seen = 0
    started = time.perf_counter()
    for images, targets in loader:
        images, targets = images.to(device, non_blocking=True), targets.to(device, non_blocking=True)
        loss = torch.nn.functional.cross_entropy(model(images), targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        float(loss.detach())  # thresher reads the loss every step too (progress, divergence check)
        seen += len(targets)
    if device.type == "cuda":
        torch.cuda.synchronize()
    hand_loop.images_per_s = seen / (time.perf_counter() - started)
    return seen


def thresher_loop(args, run_dir: Path, device) -> int:
    """thresher's own fit() for one epoch, without validation; returns the images trained on."""
    from app.cli import compose
    from app.config import register_configs, register_resolvers
    from app.train.loop import fit

    register_configs()
    register_resolvers()
    shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)
    cfg = compose([f"model={args.model}", f"data.image_size={args.image_size}", "trainer.epochs=1",
                   f"trainer.batch_size={args.batch_size}", "trainer.val_fraction=0",
                   "data.augment.hflip=0", "data.augment.resize.keep_ratio=false",
                   f"hardware.num_workers={args.workers}", f"work_dir={run_dir.parent}"])
    torch.manual_seed(0)
    result = fit(cfg, run_dir, device)
    thresher_loop.images_per_s = result.images_per_s  # the epoch's own rate, as hand_loop's
    return result.n_train


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=960)
    parser.add_argument("--shapes-size", type=int, default=96)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--workers", type=int, default=0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = parser.parse_args()
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)

    work, run_dir, input_dir, files, labels = scanned_shapes(args.images, args.shapes_size)

    pairs = []
    for round_index in range(args.rounds):
        _, hand_cpu = timed(hand_loop, args, input_dir, files, labels, device)
        _, ours_cpu = timed(thresher_loop, args, run_dir, device)
        hand_rate, ours_rate = hand_loop.images_per_s, thresher_loop.images_per_s
        pairs.append({"round": round_index + 1, "hand_steps_per_s": round(hand_rate / args.batch_size, 3),
                      "thresher_steps_per_s": round(ours_rate / args.batch_size, 3),
                      "step_ratio": round(ours_rate / hand_rate, 3), "whole_ratio": round(ours_cpu / hand_cpu, 3),
                      "load_average_1m": round(os.getloadavg()[0], 2)})
        print(json.dumps(pairs[-1]), flush=True)
    summary = {"model": args.model, "images": len(files), "image_size": args.image_size,
               "batch_size": args.batch_size, "workers": args.workers, "device": str(device),
               "torch_threads": torch.get_num_threads(),
               "median_step_ratio": statistics.median(p["step_ratio"] for p in pairs),
               "median_whole_ratio": statistics.median(p["whole_ratio"] for p in pairs)}
    print(json.dumps(summary))
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()

"""Embedding throughput: thresher's embed stage against lightly's embedding loop, in one run.

Both embed the same folder of `shapes` images with the same model (torchvision resnet18, seeded
random weights), the same resolution (a square resize), batch size and loader workers, on the same
device, and both write a lightly-format embeddings.csv. Loader workers: thresher's are
`--num-workers` (default: its auto choice, app.device.loader_workers); lightly's loop gets the same
number unless `--lightly-workers` says otherwise (lightly-embed's own default is one per core); the
summary says how many each used. lightly's side is what `lightly-embed` runs
inside (LightlyDataset, SelfSupervisedEmbedding.embed, save_embeddings), given the same backbone,
since the CLI's own resnet-18 is a different (CIFAR-style) network.

Compute efficiency is the time spent in the backbone over the whole loop's time, measured the same
way for both by timing the backbone's forward.

    .venv/bin/python bench/bench_embed.py --n-images 2000 --image-size 64 --batch-size 64
    .venv/bin/python bench/bench_embed.py --n-images 5000 --image-size 24 --lightly-workers 0
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


class TimedForward(nn.Module):
    """Wraps a module and adds up the seconds its forward takes (synchronised on CUDA)."""

    def __init__(self, module: nn.Module, device: torch.device):
        super().__init__()
        self.module, self.device, self.seconds = module, device, 0.0

    def forward(self, x):
        began = time.perf_counter()
        out = self.module(x)
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        self.seconds += time.perf_counter() - began
        return out


def backbone(seed: int) -> nn.Module:
    from app.models import build_backbone

    torch.manual_seed(seed)
    model, _ = build_backbone("resnet18", None)
    return model.eval()


def run_thresher(input_dir: Path, work: Path, args, device) -> dict:
    from omegaconf import OmegaConf

    from app import cli
    from app.config import register_configs, register_resolvers
    from app.data.scan import scan_stage
    from app.sampling import embed

    register_configs()
    register_resolvers()
    cfg = cli.compose(["data=folder", f"data.input_dir={input_dir}", f"data.image_size={args.image_size}",
                       f"sampler.batch_size={args.batch_size}", f"hardware.num_workers={args.num_workers}",
                       "remove_exact_duplicates=false", "enable_corruptness_check=false"])
    OmegaConf.set_struct(cfg, False)
    scan_stage(cfg, work, device)
    timed = TimedForward(backbone(args.seed), device)
    original = embed.build_backbone
    embed.build_backbone = lambda name, weights, key="model.weights": (timed, 512)
    try:
        began = time.perf_counter()
        result = embed.embed_stage(cfg, work, device)
        seconds = time.perf_counter() - began
    finally:
        embed.build_backbone = original
    return {"seconds": seconds, "images_per_s": result.n_embedded / seconds,
            "compute_efficiency": timed.seconds / seconds, "n": result.n_embedded}


def run_lightly(input_dir: Path, work: Path, args, device) -> dict:
    import torchvision.transforms as T
    from lightly.data import LightlyDataset
    from lightly.embedding import SelfSupervisedEmbedding
    from lightly.utils.io import save_embeddings

    from app.data.images import IMAGENET_MEAN, IMAGENET_STD

    transform = T.Compose([T.Resize((args.image_size, args.image_size)), T.ToTensor(),
                           T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
    began = time.perf_counter()
    dataset = LightlyDataset(str(input_dir), transform=transform)
    loader = torch.utils.data.DataLoader(dataset, batch_size=args.batch_size, shuffle=False,
                                         num_workers=args.lightly_workers)
    holder = nn.Module()
    holder.backbone = TimedForward(backbone(args.seed), device).to(device)
    encoder = SelfSupervisedEmbedding(holder, nn.Identity(), torch.optim.SGD(holder.parameters(), lr=0.1), loader)
    embeddings, labels, filenames = encoder.embed(loader, device=device)
    save_embeddings(str(work / "embeddings.csv"), embeddings, labels, filenames)
    seconds = time.perf_counter() - began
    return {"seconds": seconds, "images_per_s": len(filenames) / seconds,
            "compute_efficiency": holder.backbone.seconds / seconds, "n": len(filenames)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n-images", type=int, default=2000)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--num-workers", type=int, default=None, help="thresher's; default: its auto choice")
    parser.add_argument("--lightly-workers", type=int, default=None, help="lightly's; default: as thresher's")
    parser.add_argument("--repeats", type=int, default=2, help="alternating runs of each; the best counts")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    device = torch.device(args.device)
    from app.device import loader_workers

    thresher_workers = loader_workers(args.num_workers, device)
    if args.lightly_workers is None:
        args.lightly_workers = thresher_workers
    args.num_workers = "null" if args.num_workers is None else args.num_workers
    load_before = Path("/proc/loadavg").read_text().split()[:3] if Path("/proc/loadavg").exists() else None

    from app.data.shapes import ensure_shapes

    with tempfile.TemporaryDirectory() as tmp:
        input_dir = ensure_shapes(Path(tmp) / "cache", args.n_images, 96)
        (input_dir / "annotations.json").unlink()  # lightly's dataset would not mind, but keep it images only
        results = {"thresher": [], "lightly": []}
        for repeat in range(args.repeats):
            for name, run in (("lightly", run_lightly), ("thresher", run_thresher)):
                work = Path(tmp) / f"{name}-{repeat}"
                work.mkdir()
                results[name].append(run(input_dir, work, args, device))
                print(f"{name:9s} run {repeat + 1}: {results[name][-1]}", flush=True)
    best = {name: min(runs, key=lambda r: r["seconds"]) for name, runs in results.items()}
    summary = {
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}",
        "device": str(device), "args": {k: str(v) for k, v in vars(args).items()},
        "thresher": best["thresher"], "lightly": best["lightly"],
        "speedup_images_per_s": best["thresher"]["images_per_s"] / best["lightly"]["images_per_s"],
        "loader_workers": {"thresher": thresher_workers, "lightly": args.lightly_workers},
        "torch_threads": torch.get_num_threads(),
        "load_average_before_after": [load_before, Path("/proc/loadavg").read_text().split()[:3]
                                      if load_before else None],
    }
    print(json.dumps(summary, indent=2))
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2) + "\n")


if __name__ == "__main__":
    main()

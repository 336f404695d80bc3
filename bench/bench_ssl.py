"""Does `enable_training=true` (SimCLR) give embeddings that describe the data better than the
randomly initialised backbone it starts from? One script, one process, the same images both ways.

On a `shapes` set (class = the shape; colour, position, size and background are noise) it embeds
every image with the seeded random-init backbone, trains it with thresher's own SimCLR loop
(app.sampling.ssl, the ssl.* defaults unless overridden), embeds again, and reports for both a
leave-one-out kNN accuracy (k=5, cosine) against the known labels, the loss per epoch, how far it
fell below the no-learning level log(2*batch-1), and the seconds SSL took.

    nice -n 10 .venv/bin/python bench/bench_ssl.py --n-images 2000 --image-size 32
    nice -n 10 .venv/bin/python bench/bench_ssl.py --n-images 2000 ssl.optimizer=sgd ssl.lr=0.06 ssl.temperature=0.5
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

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def knn_accuracy(vectors: np.ndarray, labels: np.ndarray, k: int = 5) -> float:
    """Leave-one-out: each image's majority label among its k nearest others (cosine)."""
    unit = vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
    similarity = unit @ unit.T
    np.fill_diagonal(similarity, -np.inf)
    neighbours = np.argpartition(-similarity, k, axis=1)[:, :k]
    votes = labels[neighbours]
    predicted = np.array([np.bincount(row, minlength=labels.max() + 1).argmax() for row in votes])
    return float((predicted == labels).mean())


def embed(model: torch.nn.Module, root: Path, files, image_size: int) -> np.ndarray:
    from app.data.images import ImagesToEmbed, collate_pixels, make_loader
    from app.sampling.embed import embedded_batches

    loader = make_loader(ImagesToEmbed(root, files, image_size), 128, 0, collate=collate_pixels)
    model.eval()
    out = np.zeros((len(files), 0), dtype=np.float32)
    for indices, vectors, _, _ in embedded_batches(model, loader, torch.device("cpu")):
        if out.shape[1] == 0:
            out = np.zeros((len(files), vectors.shape[1]), dtype=np.float32)
        out[indices] = vectors
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n-images", type=int, default=2000)
    parser.add_argument("--shapes-size", type=int, default=64, help="the generated images' size")
    parser.add_argument("--image-size", type=int, default=32, help="data.image_size: embedding and SSL resolution")
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--blur", action="store_true", help="keep lightly's Gaussian blur at any size "
                        "(the setting before thresher turned it off below 96 px)")
    parser.add_argument("overrides", nargs="*", help="ssl.* overrides, e.g. ssl.epochs=10")
    args = parser.parse_args()
    import logging

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")

    from app.cli import compose_quietly
    from app.config import register_configs, register_resolvers
    from app.data.shapes import CLASSES, ensure_shapes
    from app.lifecycle import seed_everything
    from app.models import build_backbone
    from app.sampling import ssl
    from app.sampling.ssl import train_backbone_simclr

    if args.blur:
        ssl.BLUR_MIN_IMAGE_SIZE = 0

    register_configs()
    register_resolvers()
    cfg = compose_quietly([f"data.image_size={args.image_size}", f"seed={args.seed}", "hardware.num_workers=1",
                           *args.overrides])
    cache = Path(os.environ.get("THRESHER_CACHE_DIR", Path(tempfile.gettempdir()) / "thresher-bench-cache"))
    root = ensure_shapes(cache, args.n_images, args.shapes_size)
    files = sorted(str(p.relative_to(root)) for p in root.glob("*/*.png"))
    labels = np.array([CLASSES.index(name.split("/")[0]) for name in files])

    seed_everything(args.seed)
    model, dim = build_backbone(args.model, None)
    random_acc = knn_accuracy(embed(model, root, files, args.image_size), labels)
    with tempfile.TemporaryDirectory() as run_dir:
        (Path(run_dir) / "checkpoints").mkdir()
        began = time.perf_counter()
        details = train_backbone_simclr(model, dim, cfg, root, files, torch.device("cpu"), Path(run_dir))
        ssl_seconds = time.perf_counter() - began
    ssl_acc = knn_accuracy(embed(model, root, files, args.image_size), labels)
    print(json.dumps({
        "n_images": len(files), "image_size": args.image_size, "model": args.model,
        "ssl": {k: cfg.ssl[k] for k in cfg.ssl}, "blur": args.blur, "loss_per_epoch": details["ssl_loss"],
        "no_learning_loss": details["ssl_no_learning_loss"], "ssl_seconds": round(ssl_seconds, 1),
        "knn5_accuracy_random_init": round(random_acc, 4), "knn5_accuracy_ssl": round(ssl_acc, 4),
        "machine": f"{platform.machine()}, {len(os.sched_getaffinity(0))} cores, torch {torch.__version__}, "
                   f"{torch.get_num_threads()} threads, load {os.getloadavg()[0]:.1f}",
    }, indent=1))


if __name__ == "__main__":
    main()

"""`enable_training=true`: train the embedding backbone self-supervised on the input pool first
(SimCLR from lightly's model head, loss and transform), so the embeddings describe this data and
not random weights or another dataset's classes.

The defaults are chosen for what thresher usually embeds: small images (data.image_size 32-64 px)
and a few thousand of them on a CPU. lightly's SimCLR transform is tuned for 224 px ImageNet crops;
its Gaussian blur (sigma up to 2 px) and tiny crops (8% of the area) leave little of a 32 px image,
so the blur is off below 96 px and the smallest crop is ssl.min_scale. With AdamW, a short warmup and
a cosine decay the loss fell 2.5 times as far in the same 70 steps as with the earlier SGD defaults,
and after ~200 steps the embeddings' kNN accuracy beat the random backbone's (bench/bench_ssl.py).
"""
from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Dict, List, Union

import torch
from omegaconf import DictConfig
from torch import nn

from app import atomic
from app.artifacts import SSL_CHECKPOINT
from app.data.images import ImageFiles
from app.device import loader_workers
from app.errors import UserError
from app.progress import Progress

log = logging.getLogger("thresher")

# Below this image size lightly's Gaussian blur wipes out the shapes the backbone should learn.
BLUR_MIN_IMAGE_SIZE = 96
# A final loss within this share of the no-learning level means the backbone learned little.
LITTLE_LEARNING_SHARE = 0.05


def no_learning_loss(batch_size: int) -> float:
    """SimCLR's NT-Xent loss when every pair of views looks alike to the model: each view's
    positive is one of its 2B-1 equally similar candidates, so the loss is log(2B-1)."""
    return math.log(2 * batch_size - 1)


def collate_views(batch):
    """Stack the two augmented views of each image that decoded; skip the ones that did not."""
    good = [item for item in batch if item[0] is not None]
    if len(good) < 2:
        return None
    first = torch.stack([item[0][0] for item in good])
    second = torch.stack([item[0][1] for item in good])
    return first, second


def ssl_transform(ssl: DictConfig, image_size: int):
    """lightly's SimCLR views at the embedding's resolution, without blur for small images."""
    from lightly.transforms import SimCLRTransform

    return SimCLRTransform(input_size=image_size, min_scale=ssl.min_scale,
                           gaussian_blur=0.5 if image_size >= BLUR_MIN_IMAGE_SIZE else 0.0)


def ssl_optimizer(ssl: DictConfig, parameters) -> torch.optim.Optimizer:
    if ssl.optimizer == "sgd":
        return torch.optim.SGD(parameters, lr=ssl.lr, momentum=0.9, weight_decay=5e-4)
    return torch.optim.AdamW(parameters, lr=ssl.lr, weight_decay=ssl.weight_decay)


def warmup_cosine(step: int, warmup_steps: int, total_steps: int) -> float:
    """The learning rate's factor at `step`: linear warmup, then a cosine decay to zero."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def describe_loss(losses: List[float], epochs: int, batch_size: int) -> str:
    """The log line that says how far the loss fell, against the no-learning level."""
    return (f"ssl: loss {losses[0]:.2f} -> {losses[-1]:.2f} over {epochs} epochs "
            f"(no-learning level {no_learning_loss(batch_size):.2f})")


def learned_little(final_loss: float, batch_size: int) -> bool:
    return final_loss >= (1.0 - LITTLE_LEARNING_SHARE) * no_learning_loss(batch_size)


def train_backbone_simclr(backbone: nn.Module, dim: int, cfg: DictConfig, input_dir: Union[Path, str], files: List[str],
                          device: torch.device, run_dir: Path) -> Dict:
    """Train `backbone` in place; returns the loss per epoch. The result is saved as a state dict."""
    from lightly.loss import NTXentLoss
    from lightly.models.modules import SimCLRProjectionHead
    from torch.utils.data import DataLoader

    ssl = cfg.ssl
    if len(files) < 2:
        raise UserError(f"enable_training needs at least 2 images, the input has {len(files)}")
    batch_size = min(ssl.batch_size, len(files))
    dataset = ImageFiles(input_dir, files, [0] * len(files), ssl_transform(ssl, cfg.data.image_size))
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=True, drop_last=True,
                        num_workers=loader_workers(cfg.hardware.num_workers, device), collate_fn=collate_views,
                        generator=torch.Generator().manual_seed(cfg.seed))
    torch.manual_seed(cfg.seed)  # the projection head's initial weights
    head = SimCLRProjectionHead(dim, dim, ssl.projection_dim).to(device)
    backbone.to(device).train()
    criterion = NTXentLoss(temperature=ssl.temperature)
    optimizer = ssl_optimizer(ssl, list(backbone.parameters()) + list(head.parameters()))
    total_steps = ssl.epochs * len(loader)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: warmup_cosine(step, min(ssl.warmup_epochs, ssl.epochs) * len(loader), total_steps))
    log.info("ssl: SimCLR on %d images at %d px, %d epochs of %d batches of %d, %s lr %g, temperature %g",
             len(files), cfg.data.image_size, ssl.epochs, len(loader), batch_size, ssl.optimizer, ssl.lr,
             ssl.temperature)
    losses: List[float] = []
    for epoch in range(1, ssl.epochs + 1):
        total, batches = 0.0, 0
        with Progress(len(loader) * batch_size, f"ssl {epoch}/{ssl.epochs}") as bar:
            for views in loader:
                if views is None:
                    continue
                first, second = (v.to(device, non_blocking=True) for v in views)
                loss = criterion(head(backbone(first)), head(backbone(second)))
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                schedule.step()
                total += float(loss.detach())
                batches += 1
                bar.update(len(first), loss=total / batches)
        losses.append(total / max(batches, 1))
        log.info("ssl epoch %d/%d: SimCLR loss %.4f", epoch, ssl.epochs, losses[-1])
    backbone.eval()
    log.info(describe_loss(losses, ssl.epochs, batch_size))
    if learned_little(losses[-1], batch_size):
        log.warning("the backbone learned little: the SimCLR loss ended at %.2f, within %d%% of the "
                    "no-learning level %.2f; try more ssl.epochs, more images, or a larger ssl.lr",
                    losses[-1], round(100 * LITTLE_LEARNING_SHARE), no_learning_loss(batch_size))
    with atomic.atomic_path(run_dir / SSL_CHECKPOINT) as tmp:
        torch.save(backbone.state_dict(), tmp)
    return {"ssl_epochs": ssl.epochs, "ssl_loss": [round(x, 5) for x in losses],
            "ssl_no_learning_loss": round(no_learning_loss(batch_size), 5)}

"""`enable_training=true`: train the embedding backbone self-supervised on the input pool first
(SimCLR from lightly's model head, loss and transform), so the embeddings describe this data and
not random weights or another dataset's classes."""
from __future__ import annotations

import logging
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


def collate_views(batch):
    """Stack the two augmented views of each image that decoded; skip the ones that did not."""
    good = [item for item in batch if item[0] is not None]
    if len(good) < 2:
        return None
    first = torch.stack([item[0][0] for item in good])
    second = torch.stack([item[0][1] for item in good])
    return first, second


def train_backbone_simclr(backbone: nn.Module, dim: int, cfg: DictConfig, input_dir: Union[Path, str], files: List[str],
                          device: torch.device, run_dir: Path) -> Dict:
    """Train `backbone` in place; returns the loss per epoch. The result is saved as a state dict."""
    from lightly.loss import NTXentLoss
    from lightly.models.modules import SimCLRProjectionHead
    from lightly.transforms import SimCLRTransform
    from torch.utils.data import DataLoader

    ssl = cfg.ssl
    if len(files) < 2:
        raise UserError(f"enable_training needs at least 2 images, the input has {len(files)}")
    batch_size = min(ssl.batch_size, len(files))
    transform = SimCLRTransform(input_size=cfg.data.image_size)
    dataset = ImageFiles(input_dir, files, [0] * len(files), transform)
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=True, drop_last=True,
                        num_workers=loader_workers(cfg.hardware.num_workers, device), collate_fn=collate_views,
                        generator=torch.Generator().manual_seed(cfg.seed))
    head = SimCLRProjectionHead(dim, dim, ssl.projection_dim).to(device)
    backbone.to(device).train()
    criterion = NTXentLoss(temperature=ssl.temperature)
    parameters = list(backbone.parameters()) + list(head.parameters())
    optimizer = torch.optim.SGD(parameters, lr=ssl.lr, momentum=0.9, weight_decay=5e-4)
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
                total += float(loss.detach())
                batches += 1
                bar.update(len(first), loss=total / batches)
        losses.append(total / max(batches, 1))
        log.info("ssl epoch %d/%d: SimCLR loss %.4f", epoch, ssl.epochs, losses[-1])
    backbone.eval()
    with atomic.atomic_path(run_dir / SSL_CHECKPOINT) as tmp:
        torch.save(backbone.state_dict(), tmp)
    return {"ssl_epochs": ssl.epochs, "ssl_loss": [round(x, 5) for x in losses]}

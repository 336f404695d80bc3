"""The embed stage's images and model on a Ray cluster (`executor=ray`), as NeMo Curator runs its
image models on Ray Data: a streaming pipeline of CPU tasks that read and decode the images, and a
pool of actors, one model each (`ray.num_gpus_per_actor` GPUs when the cluster has them), that
turn them into vectors. On a cluster without GPUs each actor decodes its own batches (`embed_plan`).

The actors load the driver's weights from the run directory (whatever the embed stage built:
torchvision weights, a checkpoint, the SSL-trained backbone, or one random initialisation shared by
all; a restarted actor finds them there too), decode and
resize exactly as the local loader does (app.data.images.square_pixels) and normalise as it does
(normalize_pixels), so the vectors equal the local run's within float rounding. Batches come back
in row order; Ray retries the tasks and restarts the actors of a lost worker, and every row is
written once (EmbeddingsWriter.put by row index).
"""
from __future__ import annotations

import logging
import time
from typing import Any, Dict, Iterator, List, Optional, Sequence

import numpy as np

from app.executors import Executor
from app.executors.ray_session import ClusterResources, connect, shared_file
from app.errors import UserError

log = logging.getLogger("thresher")


def embed_plan(executor: Executor, resources: ClusterResources) -> Dict[str, Any]:
    """Actors, each one's GPUs and CPUs, and whether images are decoded by separate CPU tasks, from
    cfg.ray and what the cluster has. With GPUs, CPU tasks decode and the actors only embed (a GPU
    would wait on one actor's decoding); on CPUs alone each actor decodes its own batches, and
    there are as many actors as the CPUs hold."""
    ray_cfg = executor.ray
    gpus = ray_cfg.num_gpus_per_actor
    if gpus is None:
        gpus = 1.0 if resources.gpus >= 1 else 0.0
    cpus = float(ray_cfg.num_cpus_per_actor)
    decode_tasks = gpus > 0
    spare = ray_cfg.num_cpus_per_task if decode_tasks else 0.0
    actors = ray_cfg.embed_actors
    if actors is None:
        by_cpu = max(1, int((resources.cpus - spare) // cpus))
        actors = max(1, min(int(resources.gpus // gpus), by_cpu)) if gpus else by_cpu
    needed = actors * cpus + spare
    if needed > resources.cpus:
        raise UserError(f"ray.embed_actors={actors} with ray.num_cpus_per_actor={cpus:g}"
                        f"{f' and a decode task of ray.num_cpus_per_task={spare:g}' if spare else ''} need "
                        f"{needed:g} CPUs, and the cluster has {resources.cpus:g}: use fewer actors or fewer CPUs each")
    if gpus and actors * gpus > resources.gpus:
        raise UserError(f"ray.embed_actors={actors} with ray.num_gpus_per_actor={gpus:g} need {actors * gpus:g} "
                        f"GPUs, and the cluster has {resources.gpus:g}")
    return dict(actors=actors, gpus=gpus, cpus=cpus, decode_tasks=decode_tasks)


def embedded_batches_on_ray(executor: Executor, model_name: str, state_dict: Dict[str, Any], location: str,
                            files: Sequence[str], image_size: int, batch_size: int,
                            storage_options: Optional[Dict[str, Any]] = None) -> Iterator[tuple]:
    """(rows, float32 vectors, [(row, error)], model seconds) for batches of `files`, in row order,
    embedded by actors on the cluster."""
    import torch

    resources = connect(executor.ray)
    plan = embed_plan(executor, resources)
    log.info("embed on ray: %d actor(s) of %s, %g GPU(s) and %g CPU(s) each; images decoded by %s",
             plan["actors"], model_name, plan["gpus"], plan["cpus"],
             "CPU tasks" if plan["decode_tasks"] else "the actors")
    with shared_file(executor, "embedding_weights.pt", lambda path: torch.save(state_dict, path)) as weights:
        yield from _embedded_batches(executor, plan, model_name, str(weights), location, files, image_size,
                                     batch_size, storage_options)


def _embedded_batches(executor: Executor, plan: Dict[str, Any], model_name: str, weights: str, location: str,
                      files: Sequence[str], image_size: int, batch_size: int, storage_options) -> Iterator[tuple]:
    import pyarrow as pa
    import ray

    # Ray Data's cost is per block (scheduling, the object store): blocks of ray.block_images images
    # (256), which the actors feed to the model sampler.batch_size at a time.
    block = max(batch_size, int(executor.ray.block_images))
    blocks = []
    for start in range(0, len(files), block):
        stop = min(len(files), start + block)
        blocks.append(pa.table({"row": pa.array(np.arange(start, stop, dtype=np.int64)),
                                "name": pa.array([name.encode("utf-8", "surrogateescape") for name in files[start:stop]],
                                                 pa.binary())}))
    decode = dict(location=location, image_size=image_size, storage_options=storage_options)
    dataset = ray.data.from_arrow(blocks)
    if plan["decode_tasks"]:
        dataset = dataset.map_batches(_decode_batch, batch_size=block, batch_format="numpy",
                                      num_cpus=executor.ray.num_cpus_per_task, fn_kwargs=decode)
    dataset = dataset.map_batches(
        _EmbedActor, batch_size=block, batch_format="numpy", compute=ray.data.ActorPoolStrategy(size=plan["actors"]),
        num_cpus=plan["cpus"], num_gpus=plan["gpus"],
        fn_constructor_kwargs=dict(model_name=model_name, weights=weights, threads=max(1, int(plan["cpus"])),
                                   model_batch=batch_size,
                                   decode=None if plan["decode_tasks"] else decode))
    for batch in dataset.iter_batches(batch_size=None, batch_format="numpy"):
        errors = batch["error"]
        good = errors == ""
        failures = [(int(row), str(error)) for row, error in zip(batch["row"][~good], errors[~good])]
        yield (batch["row"][good].astype(np.int64), np.asarray(batch["vector"][good], dtype=np.float32), failures,
               float(batch["compute_s"].sum()))


def _decode_batch(batch: Dict[str, np.ndarray], location: str, image_size: int, storage_options) -> Dict[str, np.ndarray]:
    """A CPU task: the images of a batch as uint8 N×3×S×S, as the local loader's workers make them."""
    from app.data.images import open_image, square_pixels
    from app.data.sources import configure_storage

    if storage_options:
        configure_storage(storage_options)
    names = batch["name"]
    pixels = np.zeros((len(names), 3, image_size, image_size), dtype=np.uint8)
    errors: List[str] = [""] * len(names)
    for i, name in enumerate(names):
        try:
            pixels[i] = square_pixels(open_image(location, bytes(name).decode("utf-8", "surrogateescape")),
                                      image_size).numpy()
        except Exception as error:  # decoded fine at scan time, or the check was off: reported, skipped
            errors[i] = f"{type(error).__name__}: {error}" or type(error).__name__
    return {"row": batch["row"], "pixels": pixels, "error": np.array(errors, dtype=object)}


class _EmbedActor:
    """One model on one actor: the driver's weights, on the GPU Ray gave it, else the CPU."""

    def __init__(self, model_name: str, weights: str, threads: int, model_batch: int,
                 decode: Optional[Dict[str, Any]] = None):
        import ray
        import torch

        from app.models import build_backbone

        torch.set_num_threads(threads)
        logging.getLogger("thresher").setLevel(logging.ERROR)  # the driver said how the weights were made
        model, self.dim = build_backbone(model_name, None, from_scratch=None)  # the driver's weights follow
        model.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
        self.device = torch.device("cuda" if ray.get_gpu_ids() and torch.cuda.is_available() else "cpu")
        self.model = model.eval().to(self.device, memory_format=torch.channels_last)
        self.decode = decode  # the images' location and size when this actor decodes them itself
        self.model_batch = model_batch

    def __call__(self, batch: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
        import torch

        from app.data.images import normalize_pixels

        if self.decode is not None:
            batch = _decode_batch(batch, **self.decode)
        errors = batch["error"]
        good = np.flatnonzero(errors == "")
        vectors = np.zeros((len(errors), self.dim), dtype=np.float32)
        began = time.perf_counter()
        with torch.inference_mode():
            for start in range(0, len(good), self.model_batch):
                rows = good[start:start + self.model_batch]
                pixels = torch.from_numpy(np.ascontiguousarray(batch["pixels"][rows])).to(self.device)
                images = normalize_pixels(pixels).contiguous(memory_format=torch.channels_last)
                vectors[rows] = self.model(images).float().cpu().numpy()
        spent = time.perf_counter() - began
        return {"row": batch["row"], "vector": vectors, "error": errors,
                "compute_s": np.full(len(errors), spent / max(1, len(errors)))}

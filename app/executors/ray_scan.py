"""The scan's listing and checks on a Ray cluster (`executor=ray`).

The input (a folder every node mounts at the same path, or a bucket) is listed by one Ray task and
read by the workers: each chunk of names is a row of a Ray Dataset, handled by a CPU task with the
function the local scan's processes run (app.data.scan.check_chunk: read, decode, hash); the
results stream back in name order (DataContext.preserve_order), so the scan writes the same
artifacts as with executor=local. Only names go out and only small results come back (failures
and digests); the images themselves never reach the driver.
"""
from __future__ import annotations

import pickle
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple

from app.data.sources import Listed, configure_storage, source_for
from app.executors import Executor
from app.executors.ray_session import connect


def list_files_on_ray(executor: Executor, location: str, extensions: Iterable[str],
                      storage_options: Optional[Dict[str, Any]] = None) -> List[Listed]:
    """What `source_for(location).list_files(extensions)` finds, listed by a task on the cluster."""
    import ray

    connect(executor.ray)
    task = ray.remote(num_cpus=executor.ray.num_cpus_per_task, max_retries=3)(_list_files)
    return ray.get(task.remote(location, sorted(extensions), storage_options))


def _list_files(location: str, extensions: List[str], storage_options) -> List[Listed]:
    if storage_options:
        configure_storage(storage_options)
    return list(source_for(location).list_files(extensions))


def chunks_on_ray(executor: Executor, function: Callable[..., Any], names: Sequence[str],
                  storage_options: Optional[Dict[str, Any]] = None, **kwargs) -> Iterator[Tuple[int, Any]]:
    """(first index, function(chunk of names, **kwargs)) for consecutive chunks of
    `names`, in order, computed by CPU tasks on the cluster (as many chunks as keep every CPU busy;
    at most 256 names each, so that results stream and progress moves)."""
    import pyarrow as pa
    import ray

    resources = connect(executor.ray)
    slots = max(1, int(resources.cpus // executor.ray.num_cpus_per_task))
    chunk = max(16, min(256, -(-len(names) // (8 * slots))))
    starts = list(range(0, len(names), chunk))
    # One block per few chunks, so that the tasks spread over the cluster's CPUs.
    per_block = max(1, len(starts) // (4 * slots))
    blocks = []
    for first in range(0, len(starts), per_block):
        mine = starts[first:first + per_block]
        blocks.append(pa.table({
            "start": pa.array(mine, pa.int64()),
            "names": pa.array([[name.encode("utf-8", "surrogateescape") for name in names[s:s + chunk]] for s in mine],
                              pa.list_(pa.binary()))}))
    dataset = ray.data.from_arrow(blocks).map_batches(
        _run_on_block, batch_size=None, batch_format="pyarrow", num_cpus=executor.ray.num_cpus_per_task,
        fn_kwargs=dict(function=function, storage_options=storage_options, kwargs=kwargs))
    for batch in dataset.iter_batches(batch_size=None, batch_format="pyarrow"):
        for start, result in zip(batch.column("start").to_pylist(), batch.column("result").to_pylist()):
            yield start, pickle.loads(result)


def _run_on_block(block, function, storage_options, kwargs):
    """`function` on every chunk of names in a block; its results pickled, one row per chunk."""
    import pyarrow as pa

    if storage_options:
        configure_storage(storage_options)
    results = [pickle.dumps(function([name.decode("utf-8", "surrogateescape") for name in names], **kwargs))
               for names in block.column("names").to_pylist()]
    return pa.table({"start": block.column("start"), "result": pa.array(results, pa.binary())})

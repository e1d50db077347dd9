"""The Ray engine: Ray Data's ``map_batches`` with an actor class that loads the model once per actor.

The inputs become a dataset of one block per chunk; a fixed pool of ``workers`` actors
(``ActorPoolStrategy(size=workers)``, what older Ray spelled ``concurrency=N``), each holding a
``vledge.runtime`` model with ``num_cpus`` threads (and ``num_gpus`` where asked), turn each block
into rows with the same function the local engine runs. Rows stream back to this process, which
commits them as parts exactly as the local engine does, so ``--resume`` and the output do not depend
on the engine. Without ``--ray-address`` Ray starts on this machine; with it, the job joins that
cluster, whose workers need vledge installed and the images readable at the same paths.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Sequence
from typing import Any

from vledge import errors
from vledge.bulk.inputs import InputItem
from vledge.bulk.rows import RowCaptioner, WorkerSettings
from vledge.errors import BatchError, ConfigError, VledgeError

log = logging.getLogger(__name__)

INSTALL_HINT = "pip install 'vledge[ray]'"
_RAISED = re.compile(r"^vledge\.errors\.(\w+): (.+)$", re.MULTILINE)  # the last line of a remote traceback


def import_ray():
    """Ray and Ray Data, or a ConfigError that says how to install them."""
    try:
        import ray
        import ray.data
    except ImportError as exc:
        raise ConfigError(f"--engine ray needs Ray Data, which is not installed ({exc}): {INSTALL_HINT}") from None
    return ray


class RayCaptioner:
    """The actor class: one loaded model per actor, one block of inputs -> one Arrow table of rows per call."""

    def __init__(self, settings: WorkerSettings) -> None:
        self.captioner = RowCaptioner(settings)

    def __call__(self, batch):
        from vledge.bulk.schema import rows_to_arrow

        columns = batch.to_pydict()
        items = [InputItem(index=int(index), path=path, prompt=prompt, data=data)
                 for index, path, prompt, data in zip(columns["index"], columns["path"], columns["prompt"],
                                                      columns["data"])]
        return rows_to_arrow(self.captioner.caption(items))


def caption_on_ray(settings: WorkerSettings, chunks: Sequence[Sequence[InputItem]], workers: int,
                   gpus_per_worker: float, address: str | None,
                   on_rows: Callable[[list[dict[str, Any]]], None]) -> None:
    """Caption every chunk with ``workers`` Ray actors; ``on_rows`` gets rows here as blocks finish."""
    ray = import_ray()
    if not chunks:
        return
    started_here = not ray.is_initialized()
    if started_here:
        try:
            ray.init(address=address, include_dashboard=False, logging_level=logging.WARNING)
        except Exception as exc:  # noqa: BLE001 - Ray raises ConnectionError, RuntimeError, ... per cause
            where = f"the Ray cluster at {address}" if address else "a local Ray instance"
            raise BatchError(f"cannot start or join {where}: {exc}") from None
    elif address is not None:
        log.warning("Ray is already initialised in this process; --ray-address %s is not used", address)
    context = ray.data.DataContext.get_current()
    saved = context.enable_progress_bars, context.print_on_execution_start
    context.enable_progress_bars, context.print_on_execution_start = False, False
    ray_data_log = logging.getLogger("ray.data")
    saved_level = ray_data_log.level
    if not log.isEnabledFor(logging.INFO):  # vledge reports failures itself; -v shows Ray Data's own log
        ray_data_log.setLevel(logging.CRITICAL)
    try:
        _check_resources(ray, workers, settings.threads, gpus_per_worker)
        dataset = ray.data.from_arrow([_block(chunk) for chunk in chunks])
        gpu_request = {"num_gpus": gpus_per_worker} if gpus_per_worker else {}
        captioned = dataset.map_batches(RayCaptioner, fn_constructor_kwargs={"settings": settings},
                                        batch_size=None, batch_format="pyarrow",
                                        compute=ray.data.ActorPoolStrategy(size=workers),
                                        num_cpus=settings.threads, **gpu_request)
        blocks = iter(captioned.iter_batches(batch_size=None, batch_format="pyarrow"))
        while True:
            try:
                block = next(blocks)
            except StopIteration:
                break
            except Exception as exc:  # noqa: BLE001 - Ray wraps what failed in an actor; unwrap or name it
                raise _unwrap(exc) from None
            if block.num_rows:
                on_rows(block.to_pylist())
    finally:
        context.enable_progress_bars, context.print_on_execution_start = saved
        ray_data_log.setLevel(saved_level)
        if started_here:
            ray.shutdown()


def _unwrap(exc: BaseException) -> VledgeError:
    """The vledge error an actor raised (Ray wraps it, e.g. a ModelDirError while loading), or a BatchError."""
    seen = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, VledgeError) and type(current).__module__.startswith("vledge."):
            return current
        current = getattr(current, "cause", None) or current.__cause__ or current.__context__
    # An actor that died in its constructor reaches here as text only (ActorDiedError keeps no cause).
    named = _RAISED.findall(str(exc))
    if named:
        kind = getattr(errors, named[-1][0], None)
        if isinstance(kind, type) and issubclass(kind, VledgeError):
            return kind(named[-1][1].strip())
    first_line = next((line for line in str(exc).splitlines() if line.strip()), type(exc).__name__)
    return BatchError(f"the Ray job failed ({type(exc).__name__}): {first_line.strip()}; "
                      "the parts written so far are kept: rerun with --resume to finish")


def _block(chunk: Sequence[InputItem]):
    import pyarrow as pa

    return pa.table({"index": pa.array([item.index for item in chunk], pa.int64()),
                     "path": pa.array([item.path for item in chunk], pa.string()),
                     "prompt": pa.array([item.prompt for item in chunk], pa.string()),
                     "data": pa.array([item.data for item in chunk], pa.binary())})


def _check_resources(ray, workers: int, threads: int, gpus_per_worker: float) -> None:
    """Actors that can never be placed would make Ray wait forever; say so instead."""
    resources = ray.cluster_resources()
    cpus, gpus = resources.get("CPU", 0), resources.get("GPU", 0)
    if workers * threads > cpus:
        raise BatchError(f"{workers} actors x {threads} CPUs need {workers * threads} CPUs; the Ray cluster has "
                         f"{cpus:g}: lower --workers or --threads-per-worker")
    if gpus_per_worker and workers * gpus_per_worker > gpus:
        raise BatchError(f"{workers} actors x {gpus_per_worker:g} GPUs need {workers * gpus_per_worker:g} GPUs; "
                         f"the Ray cluster has {gpus:g}")

"""The local engine: worker processes on this machine, each loading the model once.

Processes are started with ``spawn`` (no state inherited from the parent, safe with ONNX Runtime's
threads). Chunks of inputs go out on one queue and rows come back on another; only the parent writes
the output, so a worker never leaves half a part behind. A worker whose parent has gone (killed)
stops at its next chunk instead of captioning for nobody.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import queue
import signal
from collections.abc import Callable, Sequence
from typing import Any

from vledge import errors
from vledge.bulk.inputs import InputItem
from vledge.bulk.rows import RowCaptioner, WorkerSettings
from vledge.errors import BatchError

log = logging.getLogger(__name__)

POLL_SECONDS = 0.5


def caption_locally(settings: WorkerSettings, chunks: Sequence[Sequence[InputItem]], workers: int,
                    on_rows: Callable[[list[dict[str, Any]]], None]) -> None:
    """Caption every chunk on ``workers`` processes; ``on_rows`` gets each chunk's rows as it finishes."""
    if not chunks:
        return
    context = multiprocessing.get_context("spawn")
    tasks = context.Queue()
    results = context.Queue()
    for number, chunk in enumerate(chunks):
        tasks.put((number, list(chunk)))
    count = min(workers, len(chunks))
    for _ in range(count):
        tasks.put(None)
    processes = [context.Process(target=_worker_main, args=(settings, tasks, results, os.getpid()),
                                 name=f"vledge-batch-{i}", daemon=True) for i in range(count)]
    for process in processes:
        process.start()
    try:
        pending = set(range(len(chunks)))
        while pending:
            try:
                message = results.get(timeout=POLL_SECONDS)
            except queue.Empty:
                _check_alive(processes)
                continue
            if message[0] == "failed":
                raise _rebuild_error(message[1], message[2])
            _, number, rows = message
            pending.discard(number)
            on_rows(rows)
        for process in processes:
            process.join()
    finally:
        for process in processes:
            if process.is_alive():
                process.terminate()
            process.join(timeout=5)
        tasks.close()
        results.close()


def _check_alive(processes) -> None:
    for process in processes:
        if process.exitcode not in (None, 0):
            raise BatchError(f"worker process {process.name} stopped (exit code {process.exitcode}); "
                             "the parts written so far are kept: rerun with --resume to finish")
    if all(process.exitcode == 0 for process in processes):
        raise BatchError("every worker process ended with inputs left to caption")


def _worker_main(settings: WorkerSettings, tasks, results, parent_pid: int) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle; it stops the workers
    try:
        captioner = RowCaptioner(settings)
    except BaseException as exc:  # noqa: BLE001 - reported to the parent, which raises it
        results.put(("failed", type(exc).__name__, " ".join(str(exc).split())))
        return
    while os.getppid() == parent_pid:
        try:
            task = tasks.get(timeout=POLL_SECONDS)
        except queue.Empty:
            continue
        if task is None:
            return
        number, items = task
        results.put(("rows", number, captioner.caption(items)))


def _rebuild_error(name: str, message: str) -> errors.VledgeError:
    """The worker's typed error as the same type here (a model directory problem stays a ModelDirError)."""
    kind = getattr(errors, name, None)
    if isinstance(kind, type) and issubclass(kind, errors.VledgeError):
        return kind(message)
    return BatchError(f"a worker could not start: {name}: {message}")

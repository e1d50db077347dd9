"""Bulk captioning (``vledge batch``): a folder, a glob, a list of paths or a table, into Parquet or JSONL.

    from vledge.bulk import BatchOptions, run_batch
    summary = run_batch(BatchOptions(model_dir="model/", input="photos/", output="captions.parquet"))

The work runs in worker processes on this machine (``engine="local"``) or on Ray Data
(``engine="ray"``, the ``[ray]`` extra), with the same rows either way; output is written in parts
committed atomically, so ``resume=True`` continues an interrupted run without redoing or repeating
an input. Torch-free: only the runtime is used.
"""

from vledge.bulk.inputs import InputItem, list_inputs
from vledge.bulk.options import BatchOptions
from vledge.bulk.parts import RUN_MANIFEST, OutputFolder
from vledge.bulk.rows import RowCaptioner, WorkerSettings
from vledge.bulk.run import BatchSummary, model_manifest_sha256, run_batch
from vledge.bulk.schema import COLUMNS, SCHEMA_VERSION

__all__ = ["COLUMNS", "RUN_MANIFEST", "SCHEMA_VERSION", "BatchOptions", "BatchSummary", "InputItem", "OutputFolder",
           "RowCaptioner", "WorkerSettings", "list_inputs", "model_manifest_sha256", "run_batch"]

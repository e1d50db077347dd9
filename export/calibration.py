"""Calibration data for the static int8 vision encoder: checked against the graph, fed in batches, bounded in memory.

ONNX Runtime's calibrator records every float tensor the graph computes for each image it is fed. A real vision
tower (SigLIP-B/16 at 512 px: about 0.9 GB of activations per image) would exhaust the memory on a few dozen
images, so the batches (and, for the histogram methods, the images) are sized to a share of the memory
available.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from vledge.errors import QuantizationError

log = logging.getLogger(__name__)


def input_shape(model, name: str) -> list[int | None]:
    for value in model.graph.input:
        if value.name == name:
            return [dim.dim_value if dim.HasField("dim_value") else None for dim in value.type.tensor_type.shape.dim]
    raise QuantizationError(f"the graph has no input named {name!r}")


def check_calibration(calibration, expected: list[int | None] | None = None) -> np.ndarray:
    """Calibration pixels as float32 [N, 3, H, W] with N > 0, or a typed error saying what is wrong."""
    if not isinstance(calibration, np.ndarray):
        raise QuantizationError(f"calibration must be a numpy array [N, 3, H, W], got {type(calibration).__name__}")
    if calibration.ndim != 4 or calibration.shape[1] != 3:
        raise QuantizationError(f"calibration must have shape [N, 3, H, W], got {list(calibration.shape)}")
    if calibration.shape[0] == 0:
        raise QuantizationError("the calibration set is empty; static int8 needs representative images")
    if not np.issubdtype(calibration.dtype, np.floating):
        raise QuantizationError(f"calibration must hold preprocessed float pixels, got dtype {calibration.dtype}")
    if expected is not None:
        for axis in (2, 3):
            if expected[axis] is not None and calibration.shape[axis] != expected[axis]:
                raise QuantizationError(
                    f"calibration images are {calibration.shape[2]}x{calibration.shape[3]}, "
                    f"the vision encoder expects {expected[2]}x{expected[3]}"
                )
    pixels = np.ascontiguousarray(calibration, dtype=np.float32)
    if not np.isfinite(pixels).all():
        raise QuantizationError("calibration pixels contain NaN or infinity")
    return pixels


# Share of the memory available that the calibration's recorded activations may take.
CALIBRATION_MEMORY_SHARE = 0.25


def activation_bytes_per_image(model_path: Path) -> int:
    """Bytes of every float tensor the graph computes for one image (ONNX Runtime's calibrator records them all),
    from the shapes its shape inference wrote; unknown axes count as 1."""
    import onnx

    graph = onnx.load(str(model_path), load_external_data=False).graph
    total = 0
    for value in graph.value_info:
        kind = value.type.tensor_type
        if kind.elem_type not in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16):
            continue
        count = 1
        for dim in kind.shape.dim:
            count *= dim.dim_value if dim.HasField("dim_value") and dim.dim_value > 0 else 1
        total += count * (4 if kind.elem_type == onnx.TensorProto.FLOAT else 2)
    return total


def calibration_within_memory(model_path: Path, pixels: np.ndarray, batch_size: int,
                              method: str) -> tuple[np.ndarray, int]:
    """(pixels, batch size) whose recorded activations fit ``CALIBRATION_MEMORY_SHARE`` of the memory available.

    ONNX Runtime's calibrators keep every image's activations until the end (its ``CalibMaxIntermediateOutputs``
    option, which would fold min/max ranges in batch by batch, drops the batches it clears in 1.31), so a model
    whose activations do not fit is calibrated on fewer images, with a warning.
    """
    from vledge.families.size import available_memory

    per_image = activation_bytes_per_image(model_path)
    available = available_memory()
    if not per_image or available is None:
        return pixels, batch_size
    fits = max(1, int(available * CALIBRATION_MEMORY_SHARE // per_image))
    if fits < len(pixels):
        log.warning("%s calibration keeps every image's activations (%.0f MB each): calibrating on %d of %d images "
                    "to stay within %.0f%% of the memory available", method, per_image / 1e6, fits, len(pixels),
                    100 * CALIBRATION_MEMORY_SHARE)
        pixels = pixels[:fits]
    return pixels, min(batch_size, fits)


def calibration_reader(pixels: np.ndarray, batch_size: int):
    from onnxruntime.quantization import CalibrationDataReader

    class PixelBatches(CalibrationDataReader):
        """Feeds the calibration pixels to the encoder in batches."""

        def __init__(self) -> None:
            self.index = 0

        def get_next(self):
            if self.index >= len(pixels):
                return None
            batch = pixels[self.index:self.index + batch_size]
            self.index += batch_size
            return {"pixel_values": batch}

        def rewind(self) -> None:
            self.index = 0

    return PixelBatches()

"""Export a vledge checkpoint to an ONNX model directory with quantized variants and a parity gate."""

from vledge.export.export import ExportOptions, ExportResult, export
from vledge.export.folder import export_folder, export_llava

__all__ = ["ExportOptions", "ExportResult", "export", "export_folder", "export_llava"]

"""Export a vledge checkpoint to an ONNX model directory with quantized variants and a parity gate."""

from vledge.export.export import ExportOptions, ExportResult, export

__all__ = ["ExportOptions", "ExportResult", "export"]

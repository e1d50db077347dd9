"""Torch-free ONNX Runtime engine for exported vledge models.

    model = vledge.runtime.load("model/")
    print(model.caption("photo.jpg").text)
"""

from vledge.decoding import GenerationOptions
from vledge.runtime.model import GenerationResult, Timings, VisionLanguageRuntime, load

__all__ = ["GenerationOptions", "GenerationResult", "Timings", "VisionLanguageRuntime", "load"]

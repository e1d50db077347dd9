"""Torch-free ONNX Runtime engine for exported vledge models.

    model = vledge.runtime.load("model/")
    print(model.caption("photo.jpg").text)
    print(model.ask("photo.jpg", "How many shapes are there?").text)
    for piece in model.stream("photo.jpg"):
        print(piece, end="", flush=True)

``load`` verifies the model directory, picks graph variants (precision) and execution providers
(an explicit GPU request that cannot be met raises ``vledge.errors.ProviderError``); one loaded
model may be used from several threads at once.
"""

from vledge.decoding import GenerationOptions
from vledge.generation import GenerationResult, Timings
from vledge.runtime.loader import load
from vledge.runtime.model import VisionLanguageRuntime
from vledge.runtime.providers import GpuStatus, gpu_status

__all__ = ["GenerationOptions", "GenerationResult", "GpuStatus", "Timings", "VisionLanguageRuntime", "gpu_status",
           "load"]

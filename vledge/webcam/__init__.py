"""Live captioning demo (``vledge webcam``): a camera, video file, stream, image folder or synthetic scenes,
captioned as they play. Torch-free (numpy + OpenCV + the ONNX Runtime engine).

Three threads share the work so the display stays smooth while captions update at the model's pace:
the capture thread keeps only the newest frame (:mod:`~vledge.webcam.capture`), the captioner thread
runs the model when the scene has changed (:mod:`~vledge.webcam.captioner`), and the calling thread
draws, shows and writes each frame (:mod:`~vledge.webcam.demo`). With ``pace="lockstep"`` nothing is
dropped and the output is repeatable.

    from vledge.webcam import DemoOptions, run_demo
    summary = run_demo("model/", "synthetic", DemoOptions(headless=True, output="demo.mp4", max_frames=300))
"""

from vledge.errors import SourceError
from vledge.webcam.captioner import CaptionEvent, Captioner
from vledge.webcam.capture import CaptureThread, Frame, LatestFrame
from vledge.webcam.demo import PACES, DemoOptions, DemoSummary, run_demo
from vledge.webcam.display import NO_GUI, Window, display_problem, has_gui_support, open_window, require_gui
from vledge.webcam.outputs import VIDEO_FOURCC, CaptionLog, OutputError, VideoOutput
from vledge.webcam.overlay import FONT, OverlayState, RateMeter, draw_overlay, wrap_text
from vledge.webcam.reasons import (END_OF_STREAM, INTERRUPTED, MAX_FRAMES, NORMAL_ENDS, READ_ERROR, STALE_SOURCE,
                                   TIME_LIMIT, USER_QUIT)
from vledge.webcam.scene import DEFAULT_SCENE_THRESHOLD, THUMBNAIL_SIZE, SceneChangeDetector
from vledge.webcam.sources import (
    IMAGE_SUFFIXES,
    FrameSource,
    ImageFolderSource,
    SyntheticSource,
    VideoSource,
    open_source,
)

__all__ = [
    "DEFAULT_SCENE_THRESHOLD", "END_OF_STREAM", "FONT", "IMAGE_SUFFIXES", "INTERRUPTED", "MAX_FRAMES", "NO_GUI",
    "NORMAL_ENDS", "PACES", "READ_ERROR", "STALE_SOURCE", "THUMBNAIL_SIZE", "TIME_LIMIT", "USER_QUIT", "VIDEO_FOURCC",
    "CaptionEvent", "CaptionLog", "Captioner", "CaptureThread", "DemoOptions", "DemoSummary", "Frame",
    "FrameSource", "ImageFolderSource", "LatestFrame", "OutputError", "OverlayState", "RateMeter",
    "SceneChangeDetector", "SourceError", "SyntheticSource", "VideoOutput", "VideoSource", "Window",
    "display_problem", "draw_overlay", "has_gui_support", "open_source", "open_window", "require_gui", "run_demo",
    "wrap_text",
]

"""The optional window: fall back to headless where OpenCV or the machine cannot show one."""

from __future__ import annotations

import os
import sys

import cv2
import numpy as np

NO_GUI = "this OpenCV build has no GUI support (opencv-python-headless); install opencv-python for a window"


def display_problem() -> str | None:
    """Why no window can be shown on this machine (no display on Linux), or None when one may be."""
    if sys.platform.startswith("linux") and not (os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY")):
        return "no display (neither DISPLAY nor WAYLAND_DISPLAY is set)"
    return None


def open_window(title: str) -> tuple[Window | None, str]:
    """A window, or None and the reason. OpenCV's headless builds raise cv2.error from every GUI call."""
    problem = display_problem()
    if problem is not None:
        return None, problem
    try:
        return Window(title), ""
    except cv2.error as exc:
        message = str(exc)
        return None, NO_GUI if "not implemented" in message.lower() else f"OpenCV cannot open a window: {message}"


class Window:
    def __init__(self, title: str) -> None:
        self.title = title
        cv2.namedWindow(title, cv2.WINDOW_NORMAL)  # raises cv2.error without GUI support

    def show(self, image: np.ndarray) -> bool:
        """Show a frame; False when the user pressed q or Esc or closed the window."""
        cv2.imshow(self.title, image)
        key = cv2.waitKey(1) & 0xFF
        if key in (ord("q"), ord("Q"), 27):
            return False
        try:
            return cv2.getWindowProperty(self.title, cv2.WND_PROP_VISIBLE) >= 1
        except cv2.error:
            return False

    def poll(self) -> bool:
        """Keep the window responsive while no frame comes; False when the user asked to stop."""
        key = cv2.waitKey(1) & 0xFF
        return key not in (ord("q"), ord("Q"), 27)

    def close(self) -> None:
        try:
            cv2.destroyWindow(self.title)
            cv2.waitKey(1)
        except cv2.error:
            pass

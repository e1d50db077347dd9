"""The optional window: headless where the machine has no display, a clear error where OpenCV has no GUI.

``pip install vledge`` brings ``opencv-python-headless`` (servers, boards without a display); the
``vledge[gui]`` extra brings ``opencv-python``, the build that can open windows (see docs/webcam.md).
"""

from __future__ import annotations

import os
import re
import sys

import cv2
import numpy as np

from vledge.errors import DisplayError

NO_GUI = ("this OpenCV build has no GUI support (opencv-python-headless), so it cannot open a window; "
          'install the GUI build with: pip install "vledge[gui]" && pip uninstall -y opencv-python-headless '
          "&& pip install --force-reinstall --no-deps opencv-python (see docs/webcam.md), or run headless (--headless)")


def has_gui_support() -> bool:
    """Whether this OpenCV build can open windows, read from its build information.

    Headless builds report ``GUI: NONE``; older ones list each backend under ``GUI:`` with NO.
    """
    info = cv2.getBuildInformation()
    match = re.search(r"^[ \t]*GUI:[ \t]*(\S*)[ \t]*$", info, re.M)
    if match is None:
        return True  # a layout we do not know: let namedWindow decide
    if match.group(1):
        return match.group(1).upper() != "NONE"
    section = info[match.end():].split("\n\n", 1)[0]
    return "YES" in section


def require_gui() -> None:
    """Raise ``DisplayError`` when a display exists but this OpenCV build cannot open windows on it."""
    if display_problem() is None and not has_gui_support():
        raise DisplayError(NO_GUI)


def display_problem() -> str | None:
    """Why no window can be shown on this machine (no display on Linux), or None when one may be."""
    if sys.platform.startswith("linux") and not (os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY")):
        return "no display (neither DISPLAY nor WAYLAND_DISPLAY is set)"
    return None


def open_window(title: str) -> tuple[Window | None, str]:
    """A window, or None and the reason (no display, or OpenCV failed to open one).

    Raises ``DisplayError`` where a display exists but OpenCV has no GUI support: headless builds
    raise cv2.error from every GUI call, so a window would never appear.
    """
    problem = display_problem()
    if problem is not None:
        return None, problem
    require_gui()
    try:
        return Window(title), ""
    except cv2.error as exc:
        message = str(exc)
        if "not implemented" in message.lower():
            raise DisplayError(NO_GUI) from None
        return None, f"OpenCV cannot open a window: {message}"


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

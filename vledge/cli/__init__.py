"""The ``vledge`` command line: the ``main`` click group and one module per command group.

``vledge.cli:main`` is the console entry point; ``python -m vledge`` runs it too. Modules:

- ``base``: the ``main`` group, ``fail_cleanly`` (a typed ``VledgeError`` becomes one line
  ``Error: <Type>: <message>`` and exit status 1) and options several commands share;
- ``data`` (data synth, data inspect), ``train`` (train, pretrain-vision, eval), ``infer``
  (caption, ask), ``batch`` (bulk captioning), ``export``, ``convert``, ``bench``, ``webcam``, ``quickstart``, ``serve``.

Adding a command: write ``vledge/cli/<name>.py`` that imports ``main`` and ``fail_cleanly`` from
``vledge.cli.base`` and decorates its function with ``@main.command("<name>")`` then
``@fail_cleanly`` (or builds a ``click.Group`` and calls ``main.add_command`` on it), and import
the module below. Import only click and ``pathlib`` at module level: heavy modules (torch,
onnxruntime, cv2, ...) are imported inside the command function, so ``vledge --help`` and the
torch-free commands work on an install without them.
"""

from __future__ import annotations

from vledge.cli.base import fail_cleanly, main

# Importing a command module registers its commands on ``main``.
from vledge.cli import batch  # noqa: E402,F401
from vledge.cli import bench  # noqa: E402,F401
from vledge.cli import convert  # noqa: E402,F401
from vledge.cli import data  # noqa: E402,F401
from vledge.cli import export  # noqa: E402,F401
from vledge.cli import infer  # noqa: E402,F401
from vledge.cli import quickstart  # noqa: E402,F401
from vledge.cli import serve  # noqa: E402,F401
from vledge.cli import train  # noqa: E402,F401
from vledge.cli import webcam  # noqa: E402,F401

__all__ = ["fail_cleanly", "main"]

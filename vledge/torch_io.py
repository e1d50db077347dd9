"""torch files: written atomically through vledge.files, read only under a torch whose loader is safe.

Below torch 2.6, ``torch.load(weights_only=True)`` can run code (CVE-2025-32434): every reader of a torch file
(checkpoints, vision weights, the torchvision cache) asks :func:`require_safe_torch` first. torch is imported
inside the functions, so the torch-free runtime can import vledge.files without reaching it.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

from vledge.errors import CheckpointError
from vledge.files import atomic_path

SAFE_TORCH = (2, 6)


def require_safe_torch() -> None:
    """Refuse to unpickle anything under a torch whose ``weights_only`` loader can be bypassed."""
    import torch

    version = str(torch.__version__)
    match = re.match(r"(\d+)\.(\d+)", version)
    if match is None or (int(match[1]), int(match[2])) < SAFE_TORCH:
        raise CheckpointError(
            f"torch {version} cannot load checkpoints safely (weights_only=True can run code before "
            f"torch {SAFE_TORCH[0]}.{SAFE_TORCH[1]}, CVE-2025-32434); install torch>={SAFE_TORCH[0]}.{SAFE_TORCH[1]}"
        )


def save_torch(value: Any, path: str | os.PathLike) -> Path:
    """``torch.save`` to ``path`` atomically, with the mode every user file gets (vledge.files)."""
    import torch

    with atomic_path(path) as temp:
        torch.save(value, temp)
    return Path(path)

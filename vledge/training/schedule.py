"""Learning rate as a function of progress: linear warmup, then cosine decay to a floor."""

from __future__ import annotations

import math


def learning_rate(base: float, local_step: int, warmup_steps: int, progress: float, min_ratio: float) -> float:
    """``progress`` runs 0..1 through the stage (by steps or by time budget, whichever is further)."""
    warm = min(1.0, (local_step + 1) / warmup_steps) if warmup_steps > 0 else 1.0
    progress = min(max(progress, 0.0), 1.0)
    cosine = min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    return base * warm * cosine

"""Upper bounds on the counts a user or a file controls, checked before any work starts.

Each bound is far above any sensible value and low enough that reaching it costs seconds, not the
machine: a thread pool of a million threads, ten thousand beams or a billion accumulation steps
never start.
"""

from __future__ import annotations

from vledge.errors import ConfigError

MAX_THREADS = 256  # intra-op / torch threads (a fixed number, not a multiple of the cores)
MAX_BEAMS = 64  # beam search width
MAX_GRAD_ACCUM = 4096  # gradient accumulation steps per optimizer step
MAX_SEED = 2**63 - 1  # seeds are 0..MAX_SEED (numpy refuses negative seeds)


def check_count(name: str, value, low: int, high: int) -> int:
    """``value`` as an int in ``low..high``, or a ConfigError naming ``name`` and the bound."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{name} must be an integer, got {value!r}")
    if not low <= value <= high:
        raise ConfigError(f"{name} must be in {low}..{high}, got {value}")
    return value


def check_train_counts(grad_accum: int, threads: int | None) -> None:
    """TrainConfig's bounded counts: accumulation steps and torch threads."""
    check_count("TrainConfig.grad_accum", grad_accum, 1, MAX_GRAD_ACCUM)
    if threads is not None:
        check_count("TrainConfig.threads", threads, 1, MAX_THREADS)

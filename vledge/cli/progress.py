"""Progress bars of the long commands: tqdm on stderr, silent with ``--quiet`` or when stderr is not a terminal."""

from __future__ import annotations

import sys


def progress_bar(quiet: bool = False, **options):
    """A tqdm bar on stderr; ``disable=None`` is tqdm's "only on a terminal", so logs and pipes stay clean."""
    from tqdm import tqdm

    return tqdm(file=sys.stderr, dynamic_ncols=True, disable=True if quiet else None, **options)


def training_bar(event, **options):
    """The bar of a training run, made at its ``start`` event: it counts from the step the run starts
    at, so on a resume its speed and time left are this run's, not the steps trained before."""
    from tqdm import tqdm

    return tqdm(total=event.total_steps, initial=event.step, unit="step", dynamic_ncols=True, **options)

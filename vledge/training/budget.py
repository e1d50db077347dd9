"""What a wall-time budget does to a run: refusing a resume that has no time left, and saying loudly
when the budget stopped a run before its planned steps, with the commands that finish it.

Shared by ``vledge train`` and ``vledge quickstart`` so both say it the same way. Torch-free.
"""

from __future__ import annotations

import math
from pathlib import Path

from vledge.errors import TrainingError

# The pace measured so far, times this margin, sizes the budget that finishes a run.
FINISH_MARGIN = 1.25


def finish_minutes(seconds: float, steps: int, planned: int) -> int:
    """A whole-run budget (minutes, the minutes already trained included) that reaches ``planned``
    steps at the pace measured so far, with a 25% margin."""
    seconds_per_step = seconds / max(steps, 1)
    return max(1, math.ceil((seconds + FINISH_MARGIN * max(planned - steps, 0) * seconds_per_step) / 60))


def resume_command(data: Path, run_dir: Path, minutes: int) -> str:
    return f"vledge train --data {data} --out {run_dir} --resume --minutes {minutes}"


def check_resumable(step: int, planned: int, elapsed: float, budget_minutes: float | None, last: Path) -> None:
    """TrainingError, before any work, when a resumed run could not take a single step: its planned
    steps are done, or the minutes it has already trained fill its budget."""
    if step >= planned:
        raise TrainingError(f"{last} has already trained all {planned:,} planned steps; there is nothing to "
                            "resume (evaluate or export the run's ckpt.pt)")
    if budget_minutes is not None and elapsed >= budget_minutes * 60:
        minutes = finish_minutes(elapsed, step, planned)
        raise TrainingError(
            f"{last} has already trained {elapsed / 60:.3g} min of its {budget_minutes:g}-minute budget (step "
            f"{step:,} of {planned:,}), so no step fits; --minutes counts the whole run: pass more than "
            f"{elapsed / 60:.3g} (at its pace, --minutes {minutes} reaches the planned steps)")


def cut_short_lines(steps: int, planned: int, budget_minutes: float | None, consequence: str,
                    commands: list[str]) -> list[str]:
    """The loud lines that say a budget stopped a run before its planned steps, what that means
    (``consequence``) and the ``commands`` that finish the job; none when it was not cut short."""
    if not 0 < steps < planned:
        return []
    share = 100 * steps / planned
    budget = f"the {budget_minutes:g}-minute budget" if budget_minutes else "the time budget"
    return ([f"!! TRAINING WAS CUT SHORT: {budget} stopped it at step {steps:,} of {planned:,} ({share:.0f}%).",
             f"!! {consequence}", "!! Finish the job:"]
            + [f"!!   {command}" for command in commands])

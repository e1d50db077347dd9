"""Per-question progress of the export's slow parts (the PyTorch reference, each variant's measurement).

The export only counts; whoever called it shows the count (``vledge export`` draws a bar with an
ETA on stderr when it is a terminal). A callback ``on_questions(label, done, total)``.
"""

from __future__ import annotations

from collections.abc import Callable

QuestionCallback = Callable[[str, int, int], None]


def question_counter(on_questions: QuestionCallback | None, label: str, total: int) -> Callable[[int], None] | None:
    """A ``progress(count)`` for ``vledge.export.parity`` that reports ``label``'s running total, or None."""
    if on_questions is None:
        return None
    done = 0
    on_questions(label, 0, total)

    def advance(count: int) -> None:
        nonlocal done
        done += count
        on_questions(label, done, total)

    return advance

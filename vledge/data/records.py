"""The one in-memory shape every dataset format is read into."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

TASKS = ("caption", "describe", "list", "count", "color", "shape", "position", "relation", "read", "classify", "chat")


@dataclass(frozen=True)
class Turn:
    question: str  # the user's words, without any image placeholder
    answer: str
    task: str = "chat"


@dataclass(frozen=True)
class Record:
    id: str
    image: Path
    turns: tuple[Turn, ...]


@dataclass
class LoadReport:
    """What a loader kept and what it skipped, by reason, so a summary can say so."""

    source: str
    kept: int = 0
    skipped: Counter = field(default_factory=Counter)

    def skip(self, reason: str) -> None:
        self.skipped[reason] += 1

    @property
    def total_skipped(self) -> int:
        return sum(self.skipped.values())

    def summary(self) -> str:
        text = f"{self.source}: kept {self.kept} records"
        if self.skipped:
            reasons = ", ".join(f"{count} {reason}" for reason, count in sorted(self.skipped.items()))
            text += f", skipped {self.total_skipped} ({reasons})"
        return text

"""``SynthOptions``: everything that decides a synthetic dataset, validated in one place."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from vledge.data.synth.scenes import MIN_CELL_PX
from vledge.errors import ConfigError

IMAGE_FORMATS = ("jpg", "png")
SPLITS = ("train", "val", "test")


@dataclass
class SynthOptions:
    """Everything that decides the generated data; stored in ``dataset.json``."""

    size: int = 20000
    seed: int = 0
    image_size: int = 64
    grid: int = 3
    min_objects: int = 1
    max_objects: int = 6
    word_probability: float = 0.25
    splits: tuple[float, float, float] = (0.9, 0.05, 0.05)  # train / val / test
    image_format: str = "jpg"  # jpg (quality 95) | png

    def __post_init__(self) -> None:
        for name in ("size", "seed", "image_size", "grid", "min_objects", "max_objects"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
                raise ConfigError(f"SynthOptions.{name} must be an integer, got {value!r}")
            setattr(self, name, int(value))
        if self.size < 1:
            raise ConfigError(f"SynthOptions.size must be at least 1, got {self.size}")
        if self.seed < 0:
            raise ConfigError(f"SynthOptions.seed must be non-negative, got {self.seed}")
        if not 2 <= self.grid <= 6:
            raise ConfigError(f"SynthOptions.grid must be between 2 and 6, got {self.grid}")
        if self.image_size < MIN_CELL_PX * self.grid or self.image_size > 4096:
            raise ConfigError(
                f"SynthOptions.image_size must be between {MIN_CELL_PX * self.grid} "
                f"({MIN_CELL_PX} px per cell on a {self.grid}x{self.grid} grid) and 4096, got {self.image_size}"
            )
        if self.min_objects < 1:
            raise ConfigError(f"SynthOptions.min_objects must be at least 1, got {self.min_objects}")
        cells = self.grid * self.grid
        if not self.min_objects <= self.max_objects <= cells:
            raise ConfigError(
                f"SynthOptions.max_objects must be between min_objects ({self.min_objects}) "
                f"and the {cells} grid cells, got {self.max_objects}"
            )
        try:
            self.word_probability = float(self.word_probability)
        except (TypeError, ValueError):
            raise ConfigError(f"SynthOptions.word_probability must be a number, got {self.word_probability!r}") from None
        if not 0.0 <= self.word_probability <= 1.0:
            raise ConfigError(f"SynthOptions.word_probability must be in [0, 1], got {self.word_probability}")
        try:
            splits = tuple(float(x) for x in self.splits)
        except (TypeError, ValueError):
            raise ConfigError(f"SynthOptions.splits must be three numbers, got {self.splits!r}") from None
        if len(splits) != 3 or min(splits) < 0 or splits[0] <= 0 or abs(sum(splits) - 1.0) > 1e-6:
            raise ConfigError(
                f"SynthOptions.splits must be three non-negative fractions (train > 0) summing to 1, got {self.splits!r}"
            )
        self.splits = splits  # type: ignore[assignment]
        fmt = str(self.image_format).lower()
        if fmt not in IMAGE_FORMATS:
            raise ConfigError(f"SynthOptions.image_format must be one of {IMAGE_FORMATS}, got {self.image_format!r}")
        self.image_format = fmt

    def split_counts(self) -> dict[str, int]:
        """Exact number of samples per split (val and test rounded, train takes the rest)."""
        val = int(math.floor(self.size * self.splits[1] + 0.5))
        test = min(int(math.floor(self.size * self.splits[2] + 0.5)), self.size - val)
        return {"train": self.size - val - test, "val": val, "test": test}

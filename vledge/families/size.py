"""How big a configured model is, checked before anything is allocated or read.

A config.json or checkpoint can ask for any number of layers and any width. The family counts the parameters
from the numbers alone, and a model whose float32 weights would not fit the memory this machine has free is
refused at once, naming the file, rather than after minutes of allocation (or the kernel's OOM killer).
"""

from __future__ import annotations

import logging
from pathlib import Path

from vledge.errors import ConfigError

log = logging.getLogger(__name__)

BYTES_PER_PARAMETER = 4  # float32, as vledge builds every model on the CPU
MEMINFO = Path("/proc/meminfo")


def available_memory(meminfo: Path = MEMINFO) -> int | None:
    """Bytes the kernel says a new allocation can have (MemAvailable), or None where it does not say."""
    try:
        for line in meminfo.read_text(encoding="ascii").splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def model_parameters(model_config) -> int:
    """Parameters of a whole fusion model (vision backbone, language model, token embeddings), about."""
    language = model_config.language
    count = language.family.parameter_count(language) + language.vocab_size * language.hidden
    vision = model_config.vision
    from vledge.families import vision_family

    count += vision_family(vision.backbone).parameter_count(vision) or 0
    return count


def check_fits_memory(parameters: int, where: str, available: int | None = None) -> None:
    """ConfigError when ``parameters`` float32 weights exceed the memory available now."""
    available = available_memory() if available is None else available
    needed = parameters * BYTES_PER_PARAMETER
    if available is not None and needed > available:
        raise ConfigError(f"{where}: the model has about {parameters / 1e9:.2f} billion parameters "
                          f"({needed / 2**30:.1f} GiB in float32), more than the {available / 2**30:.1f} GiB of "
                          "memory available")
    log.debug("%s: about %d parameters (%.2f GiB float32)", where, parameters, needed / 2**30)


def check_parts_fit(language, vision, where: str) -> None:
    """:func:`check_fits_memory` for a language model and a vision backbone about to be read from a folder."""
    from vledge.families import vision_family

    check_fits_memory(language.family.parameter_count(language)
                      + (vision_family(vision.backbone).parameter_count(vision) or 0), where)


def check_model_fits(model_config, where: str) -> None:
    check_fits_memory(model_parameters(model_config), where)

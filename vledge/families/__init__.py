"""Model families: every language model and vision tower vledge knows, one module each, one registry line each.

A family module holds all the facts of its family: its config fields, how a Hugging Face config and its tensor
names map to vledge's, which torch module builds it (imported only when a model is built), what the export must
do with it (fusion passes, quantization exceptions, cache layout) and what the manifest records. Nothing outside a
family module branches on a family's name: code asks the family.

The registry maps a name (``LanguageConfig.kind``, ``VisionConfig.backbone``) to the module that defines the
family, and imports that module on first use, so ``import vledge.families`` is cheap and torch-free. A new family
is one module plus one line below; a family defined elsewhere (a plugin, a test) is added with
:func:`register_language_family` / :func:`register_vision_family` before its first use.
"""

from __future__ import annotations

import importlib
import threading
from collections.abc import Mapping
from typing import TYPE_CHECKING

from vledge.errors import ConfigError

if TYPE_CHECKING:  # pragma: no cover
    from vledge.families.base import LanguageFamily, VisionFamily

# name -> module that defines it as ``FAMILY`` (or ``FAMILIES[name]`` where one module holds several)
_BUILTIN_LANGUAGE = {
    "transformer": "vledge.families.gpt",
    "lstm": "vledge.families.lstm",
    "llama": "vledge.families.llama",
    "qwen2": "vledge.families.qwen2",
    "mistral": "vledge.families.mistral",
}
_BUILTIN_VISION = {
    "convnet": "vledge.families.convnet",
    "resnet18": "vledge.families.torchvision_cnn",
    "mobilenet_v3_small": "vledge.families.torchvision_cnn",
    "efficientnet_b0": "vledge.families.torchvision_cnn",
    "clip": "vledge.families.clip",
    "siglip": "vledge.families.siglip",
    "idefics3": "vledge.families.idefics3",
}


class _Registry:
    """Names -> families, loaded on first use; added families live beside the built-in ones."""

    def __init__(self, what: str, builtin: Mapping[str, str]) -> None:
        self._what = what
        self._modules = dict(builtin)
        self._loaded: dict[str, object] = {}
        self._lock = threading.Lock()

    def names(self) -> tuple[str, ...]:
        return tuple(self._modules) + tuple(n for n in self._loaded if n not in self._modules)

    def get(self, name: str):
        family = self._loaded.get(name)
        if family is not None:
            return family
        module_name = self._modules.get(name)
        if module_name is None:
            raise ConfigError(f"unknown {self._what} {name!r}; choose from {', '.join(self.names())}")
        module = importlib.import_module(module_name)
        families = getattr(module, "FAMILIES", None) or {module.FAMILY.name: module.FAMILY}
        family = families[name]
        with self._lock:
            self._loaded.setdefault(name, family)
        return self._loaded[name]

    def add(self, family, replace: bool = False) -> None:
        name = family.name
        with self._lock:
            if not replace and (name in self._modules or name in self._loaded):
                raise ConfigError(f"a {self._what} named {name!r} is already registered")
            self._loaded[name] = family

    def remove(self, name: str) -> None:
        with self._lock:
            if name in self._modules:
                raise ConfigError(f"the built-in {self._what} {name!r} cannot be removed")
            self._loaded.pop(name, None)

    def all(self) -> list:
        return [self.get(name) for name in self.names()]


_LANGUAGE = _Registry("language model family", _BUILTIN_LANGUAGE)
_VISION = _Registry("vision backbone", _BUILTIN_VISION)


def language_family(kind: str) -> LanguageFamily:
    """The family of ``LanguageConfig.kind`` (ConfigError naming the known ones for anything else)."""
    return _LANGUAGE.get(kind)


def vision_family(backbone: str) -> VisionFamily:
    """The family of ``VisionConfig.backbone``."""
    return _VISION.get(backbone)


def language_families() -> list[LanguageFamily]:
    return _LANGUAGE.all()


def vision_families() -> list[VisionFamily]:
    return _VISION.all()


def register_language_family(family: LanguageFamily, replace: bool = False) -> None:
    """Add a language model family defined outside vledge (a name already taken is an error unless ``replace``)."""
    _LANGUAGE.add(family, replace)


def register_vision_family(family: VisionFamily, replace: bool = False) -> None:
    _VISION.add(family, replace)


def unregister_language_family(name: str) -> None:
    _LANGUAGE.remove(name)


def unregister_vision_family(name: str) -> None:
    _VISION.remove(name)


def language_family_for_hf(config_json: Mapping, where: str) -> LanguageFamily:
    """The family whose Hugging Face architectures (or, without any, model_type) a causal LM config.json names."""
    names = [n for n in (config_json.get("architectures") or []) if isinstance(n, str)]
    model_type = config_json.get("model_type")
    families = [f for f in language_families() if f.hf_architectures]
    for name in names:
        for family in families:
            if name in family.hf_architectures:
                return family
    if not names:
        for family in families:
            if model_type in family.hf_model_types:
                return family
    shown = ", ".join(names) or f"model_type {model_type!r}"
    known = ", ".join(a for f in families for a in f.hf_architectures)
    raise ConfigError(f"{where}: architecture {shown} is not supported; vledge loads {known} "
                      "(SmolLM2 and TinyLlama are LlamaForCausalLM)")


def language_family_for_hf_model_type(model_type: object, where: str) -> LanguageFamily:
    """The family of a ``text_config.model_type`` inside a multimodal config.json."""
    for family in language_families():
        if model_type in family.hf_model_types:
            return family
    known = sorted(t for f in language_families() for t in f.hf_model_types)
    raise ConfigError(f"{where}: text_config.model_type {model_type!r} is not supported; supported: {known}")


def vision_family_for_hf(model_type: object, where: str) -> VisionFamily:
    """The vision family of a tower's ``model_type`` (``clip_vision_model``) or its parent's (``clip``)."""
    for family in vision_families():
        if model_type in family.hf_model_types or model_type in family.hf_parent_model_types:
            return family
    known = sorted(t for f in vision_families() for t in f.hf_model_types)
    raise ConfigError(f"{where}.model_type {model_type!r} is not a supported vision tower; supported: {known}")


def vision_family_for_processor(processor_type: object, where: str) -> VisionFamily:
    """The vision family whose Hugging Face image processor class ``image_processor_type`` names."""
    for family in vision_families():
        if processor_type in family.hf_image_processors:
            return family
    known = sorted(t for f in vision_families() for t in f.hf_image_processors)
    raise ConfigError(f"{where}: image_processor_type {processor_type!r} is not supported; supported: {known}")

"""CLIP's vision transformer (LLaVA-1.5's tower): a class token, LayerNorm before the first block, no patch bias.

The architecture numbers live in ``vledge.config.ViTConfig`` (shared with SigLIP, which derives from this family);
what makes the tower CLIP's is here: the class token, ``pre_layrnorm``, Hugging Face's names and defaults, and its
image processor (shortest edge resize then a centre crop). The torch module is ``vledge.models.vit``.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar

from vledge.config import ViTConfig
from vledge.errors import ConfigError, WeightsError
from vledge.families.base import VisionFamily
from vledge.families.hf_config import MAX_HEADS, MAX_IMAGE_SIZE, MAX_LAYERS, MAX_PATCH, HFConfig


class CLIPFamily(VisionFamily):
    name = "clip"
    output = "tokens"
    config_field = "vit"
    class_token: ClassVar[bool] = True  # a learned first token; "default" selection drops it
    pre_layernorm: ClassVar[bool] = True  # LayerNorm on the embeddings before the first block
    patch_bias: ClassVar[bool] = False
    # Positions looked up by bucketed fractional patch coordinates (Idefics3's towers), not in reading order.
    bucketed_positions: ClassVar[bool] = False
    default_select: ClassVar[str] = "default"
    hf_model_types = ("clip_vision_model",)
    hf_parent_model_types = ("clip",)
    # transformers' CLIPVisionConfig defaults, for the keys a saved config.json leaves out
    hf_defaults: ClassVar[dict[str, Any]] = {
        "hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12, "num_attention_heads": 12,
        "image_size": 224, "patch_size": 32, "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5, "num_channels": 3}
    # Where a tower folder's tensors sit (CLIPVisionModel, a whole CLIPModel, a bare tower).
    hf_tensor_prefixes: ClassVar[tuple[str, ...]] = ("vision_model.", "model.vision_model.", "")
    # The image processor: classes, transformers' defaults, and whether a bare int size means a square.
    hf_image_processors = ("CLIPImageProcessor", "CLIPImageProcessorFast", "CLIPImageProcessorPil")
    processor_defaults: ClassVar[dict[str, Any]] = {
        "do_resize": True, "size": {"shortest_edge": 224}, "resample": 3, "do_center_crop": True,
        "crop_size": {"height": 224, "width": 224}, "do_rescale": True, "rescale_factor": 1 / 255,
        "do_normalize": True, "image_mean": [0.48145466, 0.4578275, 0.40821073],
        "image_std": [0.26862954, 0.26130258, 0.27577711], "do_convert_rgb": True}
    processor_int_size_is_square: ClassVar[bool] = False
    transformers_js = True

    def backbone(self, config):
        from vledge.models.vit import VisionTransformer

        module = VisionTransformer(config.vit)
        return module, module.out_features

    def num_tokens(self, config, image_size: int) -> int:
        if image_size != config.vit.image_size:
            raise ConfigError(f"the preprocessing image_size {image_size} differs from the vision transformer's "
                              f"{config.vit.image_size}")
        return config.vit.num_tokens

    def load_pretrained(self, backbone, config, path) -> None:
        if path is None or not Path(path).is_dir():
            raise WeightsError(f"a {self.name} tower loads its weights from a Hugging Face folder "
                               f"(vledge train --vision-model DIR), not {path}")
        from vledge.hf.vision import load_tower_weights

        load_tower_weights(backbone, path)

    def to_hf_config(self, vit: ViTConfig) -> dict[str, Any]:
        return {"hidden_size": vit.hidden, "intermediate_size": vit.intermediate, "num_hidden_layers": vit.layers,
                "num_attention_heads": vit.heads, "image_size": vit.image_size, "patch_size": vit.patch_size,
                "hidden_act": vit.hidden_act, "layer_norm_eps": vit.layer_norm_eps}

    def parameter_count(self, config) -> int:
        vit = config.vit
        h = vit.hidden
        layer = 4 * h * h + 4 * h + 2 * h * vit.intermediate + vit.intermediate + h + 4 * h
        return 3 * vit.patch_size ** 2 * h + (vit.grid ** 2 + 1) * h + vit.layers * layer + 4 * h

    def from_hf_config(self, vision_config: Mapping[str, Any], feature_layers, select: str, where: str,
                       **options) -> ViTConfig:
        """A Hugging Face vision config (this family's, as a dict) -> ViTConfig."""
        values = HFConfig(vision_config, where, self.hf_defaults)
        if values.int("num_channels", high=16) != 3:
            raise ConfigError(f"{where}.num_channels is {values.raw('num_channels')}; only RGB (3) towers are "
                              "supported")
        if isinstance(feature_layers, bool) or not isinstance(feature_layers, (int, list, tuple)):
            raise ConfigError(f"vision_feature_layer must be an integer or a list of integers, got {feature_layers!r}")
        layers = (feature_layers,) if isinstance(feature_layers, int) else tuple(feature_layers)
        if not layers or not all(isinstance(layer, int) and not isinstance(layer, bool) for layer in layers):
            raise ConfigError(f"vision_feature_layer must be an integer or a list of integers, got {feature_layers!r}")
        try:
            return ViTConfig(
                family=self.name, hidden=values.int("hidden_size"),
                layers=values.int("num_hidden_layers", high=MAX_LAYERS),
                heads=values.int("num_attention_heads", high=MAX_HEADS),
                intermediate=values.int("intermediate_size"), patch_size=values.int("patch_size", high=MAX_PATCH),
                image_size=values.int("image_size", high=MAX_IMAGE_SIZE),
                layer_norm_eps=values.float("layer_norm_eps", positive=True), hidden_act=values.str("hidden_act"),
                feature_layers=layers, select=select, **options,
            )
        except ConfigError as exc:
            raise ConfigError(f"{where}: {exc}") from None


FAMILY = CLIPFamily()

"""SigLIP's vision transformer: no class token, no LayerNorm before the blocks, a biased patch embedding.

Every token is an image token (selection "full" by default), and its image processor squashes to a square.
"""

from __future__ import annotations

from vledge.families.clip import CLIPFamily


class SiglipFamily(CLIPFamily):
    name = "siglip"
    class_token = False
    pre_layernorm = False
    patch_bias = True
    default_select = "full"
    hf_model_types = ("siglip_vision_model",)
    hf_parent_model_types = ("siglip",)
    hf_defaults = {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12, "num_attention_heads": 12,
                   "image_size": 224, "patch_size": 16, "hidden_act": "gelu_pytorch_tanh", "layer_norm_eps": 1e-6,
                   "num_channels": 3}
    hf_image_processors = ("SiglipImageProcessor", "SiglipImageProcessorFast", "SiglipImageProcessorPil")
    processor_defaults = {
        "do_resize": True, "size": {"height": 224, "width": 224}, "resample": 3, "do_center_crop": False,
        "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True, "image_mean": [0.5, 0.5, 0.5],
        "image_std": [0.5, 0.5, 0.5], "do_convert_rgb": True}
    processor_int_size_is_square = True

    def parameter_count(self, config) -> int:
        return super().parameter_count(config) - config.vit.hidden  # no class token


FAMILY = SiglipFamily()

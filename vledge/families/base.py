"""What a model family tells the rest of vledge: the base classes every family module fills in.

Facts are class attributes (declarative, as optimum's export configs); behaviour that differs is a method a
family overrides (as onnxruntime-genai's builders). Everything here is torch-free: a family's torch module is
imported inside :meth:`LanguageFamily.module` / :meth:`VisionFamily.backbone`, so the registry, the manifest and
the runtime read the facts without torch.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

from vledge.errors import ConfigError

# The two layouts of a decoder's recurrent state (docs/model-directory.md).
CACHE_LAYOUTS = ("kv", "recurrent")


class LanguageFamily:
    """A causal language model family: one subclass per family, overriding only what differs."""

    name: ClassVar[str]
    config_class: ClassVar[type]  # a dataclass deriving from vledge.config.LanguageConfig
    # "kv": past_key_values.{i}.key/value [batch, key_value_heads, past, head_dim] in, present.* out;
    # "recurrent": past_hidden / past_cell [layers, batch, hidden] (the LSTM).
    cache: ClassVar[str] = "kv"
    # vledge.export.layer_fusion passes written for this family's decoder graph: "attention", "layers".
    decoder_fusions: ClassVar[tuple[str, ...]] = ()
    # The fused attention operator its decoder is exported with ("GroupQueryAttention": ONNX Runtime's contrib op,
    # vledge.export.gqa; None: standard ops).
    attention_op: ClassVar[str | None] = None
    # Why a 4-bit decoder makes no sense for this family (None: q4 is made like for any MatMul decoder).
    q4_refusal: ClassVar[str | None] = None
    # q4 stores the LM head with this many bits instead of float (None: float).
    q4_head_bits: ClassVar[int | None] = None
    # How q4 packs 4-bit weights: "onnxruntime" (its MatMulNBitsQuantizer, asymmetric, block 16) or "minmax"
    # (vledge.export.nbits: min/max blocks of 32 with their exact offset; vledge.export.quantize.Q4_SCHEMES).
    q4_scheme: ClassVar[str] = "onnxruntime"
    # How the int8 decoder stores its weights: "dynamic" (MatMulInteger, activations quantized per call) or
    # "matmulnbits" (8-bit weight-only MatMulNBits, float activations; chosen by measurement, docs/results.md).
    int8_weights: ClassVar[str] = "dynamic"
    # LoRA adapters fit its projections (vledge.models.lora).
    lora: ClassVar[bool] = False
    # The benchmark's torch.compile and OpenVINO engines are measured for this family.
    bench_peers: ClassVar[bool] = False
    # Hugging Face: the causal-LM class names in config.json's "architectures", and the model_type values
    # (a standalone folder's, or text_config's inside a multimodal folder); the first is the one written.
    hf_architectures: ClassVar[tuple[str, ...]] = ()
    hf_model_types: ClassVar[tuple[str, ...]] = ()
    # transformers.js's llava takes it as its text model (export/transformers_js.py).
    transformers_js: ClassVar[bool] = False

    @property
    def has_kv_cache(self) -> bool:
        return self.cache == "kv"

    def module(self, config):
        """The torch module of the language model (token embeddings excluded, LM head included)."""
        raise NotImplementedError(f"the {self.name} family has no torch module")

    def architecture_facts(self, config) -> dict[str, Any]:
        """What the manifest's ``architecture`` section records beyond the numbers every family has."""
        if self.cache == "kv":
            return {"heads": config.heads, "kv_heads": config.key_value_heads, "head_dim": config.head_dim,
                    "max_positions": config.max_positions}
        return {}

    def parameter_count(self, config) -> int:
        """Parameters of the language module for ``config`` (token embeddings excluded), from the numbers alone."""
        raise NotImplementedError

    # ---------------------------------------------------------------- Hugging Face folders

    def from_hf_config(self, config_json: Mapping[str, Any], where: str, context: int):
        """vledge's config for a causal LM's config.json (the family's class defaults filled in)."""
        raise ConfigError(f"{where}: the {self.name} family has no Hugging Face form")

    def to_hf_config(self, config) -> dict[str, Any]:
        """The numbers of ``config`` as its Hugging Face config would hold them (the inverse of from_hf_config)."""
        raise ConfigError(f"the {self.name} family has no Hugging Face form")

    def hf_tensor_name(self, name: str) -> str:
        """The Hugging Face tensor name of the fusion model's ``name`` (``embed_tokens.weight`` or ``language.*``)."""
        raise ConfigError(f"the {self.name} family has no Hugging Face form")

    def hf_ignored(self, hf_name: str) -> bool:
        """Tensors a folder may hold that the model does not need (recomputed buffers)."""
        return False


class VisionFamily:
    """A vision backbone family: how it is built, how many tokens it makes, how Hugging Face describes it."""

    name: ClassVar[str]
    # "grid": the backbone returns a feature map [B, C, h, w] that becomes h*w tokens (optionally pooled to
    # VisionConfig.token_grid); "tokens": it returns tokens [B, N, C] itself.
    output: ClassVar[str] = "grid"
    # Where VisionConfig keeps this family's architecture: "vit" (a ViTConfig) or None (the CNN fields).
    config_field: ClassVar[str | None] = None
    # Hugging Face: the tower's model_type, the whole model's (whose config holds the tower under vision_config),
    # the image processor classes that belong to it and their defaults.
    hf_model_types: ClassVar[tuple[str, ...]] = ()
    hf_parent_model_types: ClassVar[tuple[str, ...]] = ()
    hf_image_processors: ClassVar[tuple[str, ...]] = ()
    # transformers.js's llava takes it as its vision tower (export/transformers_js.py).
    transformers_js: ClassVar[bool] = False

    def backbone(self, config):
        """(torch module, feature width) for a VisionConfig of this family."""
        raise NotImplementedError

    def num_tokens(self, config, image_size: int) -> int | None:
        """Visual tokens per image where the numbers alone tell (None: measured by running the module)."""
        return None

    def to_hf_config(self, config) -> dict[str, Any]:
        """The tower's numbers as its Hugging Face ``vision_config`` would hold them."""
        raise ConfigError(f"the {self.name} backbone has no Hugging Face form")

    def check(self, config) -> None:
        """ConfigError for a VisionConfig this family cannot build (called from VisionConfig's validation)."""

    def load_pretrained(self, backbone, config, path) -> None:
        """Load pretrained backbone weights from ``path`` (a file or a folder) or the family's named weights."""
        raise ConfigError(f"the {self.name} backbone has no pretrained weights to load")

    def parameter_count(self, config) -> int | None:
        """Parameters of the backbone for ``config`` from the numbers alone (None: not known without building it)."""
        return None

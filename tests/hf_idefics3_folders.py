"""Tiny random Idefics3 / SmolVLM folders with their processor, written by transformers here, and references.

``make_idefics3_folder`` saves what ``Idefics3ForConditionalGeneration`` / ``SmolVLMForConditionalGeneration``
and their processors write with ``save_pretrained``; ``reference_generate`` and ``reference_image_features``
say what transformers itself computes for such a folder, so importers, exporters and the runtime can be checked
against it.

Shapes. Vision tower: SigLIP-like, hidden 32, 2 layers, 4 heads, intermediate 64, patch 8, ``image_size`` 32
(the tile size), so 16 patches per tile. Connector: pixel shuffle by ``scale_factor`` 2 (16 patches -> 4 tokens
of width 32 * 2**2 = 128) then ``modality_projection.proj`` (Linear 128 -> 64, no bias), so
``image_seq_len = (32 / 8) ** 2 / 2 ** 2 = 4`` tokens per tile. Text: Llama, hidden 64, 2 layers, 4 heads,
2 kv heads, intermediate 112, ``initializer_range`` 0.1, vocab = the tokenizer's size (``VOCAB`` = 400).
``tie_word_embeddings`` is False by default, the Idefics3Config/SmolVLMConfig default and what Idefics3-8B
ships; ``tied=True`` writes a folder without ``lm_head.weight`` (transformers ties it to
``model.text_model.embed_tokens.weight``), as a checkpoint whose LM is a tied SmolLM2 would (greedy output of
a tied folder at seed 0 repeats one token; untied folders at seed 0 vary, checked by the tests).

Tensors in model.safetensors (``tensor_names(folder)`` lists them; the same names for both kinds)::

    model.vision_model.embeddings.patch_embedding.{weight,bias}      # Conv2d 3 -> 32, kernel = stride = 8
    model.vision_model.embeddings.position_embedding.weight          # [16, 32]: (image_size / patch) ** 2 rows
    model.vision_model.encoder.layers.{i}.layer_norm1.{weight,bias}
    model.vision_model.encoder.layers.{i}.self_attn.{q,k,v,out}_proj.{weight,bias}
    model.vision_model.encoder.layers.{i}.layer_norm2.{weight,bias}
    model.vision_model.encoder.layers.{i}.mlp.fc1.{weight,bias}      # gelu_pytorch_tanh
    model.vision_model.encoder.layers.{i}.mlp.fc2.{weight,bias}
    model.vision_model.post_layernorm.{weight,bias}
    model.connector.modality_projection.proj.weight                  # [64, 128], no bias
    model.text_model.embed_tokens.weight                             # [VOCAB, 64]
    model.text_model.layers.{i}.input_layernorm.weight
    model.text_model.layers.{i}.self_attn.{q,k,v,o}_proj.weight      # no biases
    model.text_model.layers.{i}.post_attention_layernorm.weight
    model.text_model.layers.{i}.mlp.{gate,up,down}_proj.weight
    model.text_model.norm.weight
    lm_head.weight                                                   # absent when tied

config.json keys. Top level: ``architectures`` ([``Idefics3ForConditionalGeneration``] or
[``SmolVLMForConditionalGeneration``]), ``model_type`` (``idefics3`` / ``smolvlm``), ``image_token_id`` (the
``<image>`` id), ``scale_factor``, ``tie_word_embeddings``, ``use_cache``, ``_pad_token_id`` (sic: transformers
5 writes the deprecated top-level pad id under this name; published folders say ``pad_token_id``), ``dtype``,
``transformers_version``, ``vision_config``, ``text_config``. ``vision_config``: ``model_type``
(``idefics3_vision`` / ``smolvlm_vision``), ``hidden_size``, ``intermediate_size``, ``num_hidden_layers``,
``num_attention_heads``, ``num_channels``, ``image_size``, ``patch_size``, ``hidden_act``, ``layer_norm_eps``
(1e-6), ``attention_dropout``, ``initializer_range``. ``text_config``: a Llama config (``model_type`` llama,
``vocab_size``, ``hidden_size``, ``intermediate_size``, ``num_hidden_layers``, ``num_attention_heads``,
``num_key_value_heads``, ``head_dim``, ``hidden_act`` silu, ``max_position_embeddings``, ``rms_norm_eps``,
``rope_parameters`` {rope_type, rope_theta}, ``bos/eos/pad_token_id``, ``tie_word_embeddings``,
``attention_bias``, ``attention_dropout``, ``initializer_range``, ``mlp_bias``, ``pretraining_tp``,
``use_cache``). ``config_keys(folder)`` returns the three key sets as written.

Processor files (``layout="hub"``, the default, as published folders hold them; ``layout="nested"`` is what
transformers 5's ``processor.save_pretrained`` alone writes: no preprocessor_config.json, the image and video
processor settings nested in processor_config.json under ``image_processor`` / ``video_processor``):
``preprocessor_config.json`` (``image_processor_type`` ``Idefics3ImageProcessor`` /
``SmolVLMImageProcessor``, the name without a backend suffix, ``size`` {"longest_edge": ``longest_edge``},
``max_image_size`` {"longest_edge": 32}, ``do_image_splitting``, ``resample`` 1 = Lanczos, ``do_pad``, rescale /
normalize with mean = std = 0.5), ``processor_config.json`` (``processor_class``, ``image_seq_len`` 4),
``chat_template.jinja``, ``tokenizer.json``, ``tokenizer_config.json``, ``generation_config.json``; smolvlm
folders also hold ``video_preprocessor_config.json`` (SmolVLMProcessor requires a video processor).

How transformers 5 preprocesses and expands ``<image>`` (the PIL image processor, then
Idefics3Processor.replace_image_token / SmolVLMProcessor's get_image_prompt_string; ``expanded_image_prompt``
reproduces the text): every image is first resized (Lanczos, up or down) so its longest edge is
``size.longest_edge``, the other edge ``int(long / aspect)`` rounded up to even. Without splitting it is then
resized again to a 32 x 32 square (aspect ratio not kept): one tile, rows = cols = 0, and ``<image>`` becomes
``<fake_token_around_image><global-img>`` + ``<image>`` * 4 + ``<fake_token_around_image>``. With splitting it is
resized again so both edges are multiples of 32 (the longer edge rounded up first, the other from the aspect
ratio, then rounded up), cut into rows x cols tiles of 32 x 32 (row-major), followed by the resized image shrunk to
32 x 32 (the global tile, last); ``<image>`` becomes, for each row r and column c,
``<fake_token_around_image><row_{r}_col_{c}>`` + ``<image>`` * 4, a ``\\n`` after each row, then
``\\n<fake_token_around_image><global-img>`` + ``<image>`` * 4 + ``<fake_token_around_image>``. With
``longest_edge`` 64 every image, however small, is scaled up and gives 1 x 2, 2 x 1 or 2 x 2 tiles; only an image
that is at most 32 x 32 after the second resize (``longest_edge`` 32) falls back to the unsplit prompt, as one
untouched tile. Each ``<image>`` id takes the next row of the image features, tiles in ``pixel_values`` order,
images in prompt order. For one prompt transformers pads nothing: all tiles are 32 x 32, ``pixel_attention_mask``
is all ones, and padding tiles (all-zero pixels, mask zero) appear only when a batch holds prompts with different
tile counts; ``get_image_features`` drops every tile whose pixels are all exactly 0.0.

idefics3 vs smolvlm folders: ``model_type`` idefics3 / smolvlm (vision idefics3_vision / smolvlm_vision),
architectures Idefics3ForConditionalGeneration / SmolVLMForConditionalGeneration, processor Idefics3Processor
(image processor only; its token strings are hard-coded) / SmolVLMProcessor (image and video processors; reads
``image_token``, ``fake_image_token``, ``global_image_token``, ``end_of_utterance_token`` from the tokenizer,
which smolvlm folders name as top-level keys of tokenizer_config.json, as SmolVLM2's does), image processor
Idefics3ImageProcessor / SmolVLMImageProcessor. The weights (same seed, same tensors), tokens, token ids and
chat template are the same. Both tokenizers follow SmolVLM's: bos ``<|im_start|>``, eos ``<end_of_utterance>``,
pad ``<|im_end|>``, unk ``<|endoftext|>``, no bos added by the tokenizer (the chat template writes
``<|im_start|>``); generation stops at ``<end_of_utterance>`` (generation_config.json's ``eos_token_id``).

SmolVLMProcessor refuses to start without the ``num2words`` package, which it only uses to spell frame counts in
video prompts; where it is missing, ``_smolvlm_processor_class`` lends it a stand-in that refuses to be called,
so image prompts go through transformers' own code unchanged.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from hf_folders import _tokenizer

# SmolVLM-Instruct's chat template: "<|im_start|>User:<image>What is this?<end_of_utterance>\nAssistant:".
# transformers' smolvlm DEFAULT_CHAT_TEMPLATE (its video-aware variant) renders the same text for image prompts.
SMOLVLM_CHAT_TEMPLATE = (
    "<|im_start|>{% for message in messages %}{{message['role'] | capitalize}}"
    "{% if message['content'][0]['type'] == 'image' %}{{':'}}{% else %}{{': '}}{% endif %}"
    "{% for line in message['content'] %}{% if line['type'] == 'text' %}{{line['text']}}"
    "{% elif line['type'] == 'image' %}{{ '<image>' }}{% endif %}{% endfor %}<end_of_utterance>\n"
    "{% endfor %}{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)

KINDS = ("idefics3", "smolvlm")
TILE = 32  # vision image_size = max_image_size.longest_edge
PATCH = 8
SCALE_FACTOR = 2
IMAGE_SEQ_LEN = (TILE // PATCH) ** 2 // SCALE_FACTOR ** 2  # 4
TEXT_HIDDEN = 64
VOCAB = 400
ROW_COL_TOKENS = [f"<row_{i}_col_{j}>" for i in range(1, 7) for j in range(1, 7)]
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<end_of_utterance>", "<fake_token_around_image>",
            "<image>", "<global-img>", *ROW_COL_TOKENS]
TOKEN_NAMES = {"bos_token": "<|im_start|>", "eos_token": "<end_of_utterance>", "pad_token": "<|im_end|>",
               "unk_token": "<|endoftext|>"}
SMOLVLM_NAMED_TOKENS = {"image_token": "<image>", "fake_image_token": "<fake_token_around_image>",
                        "global_image_token": "<global-img>", "end_of_utterance_token": "<end_of_utterance>"}


def _classes(kind: str):
    """(model class, config class, vision config class, PIL image processor class) for a kind."""
    import transformers

    if kind == "idefics3":
        from transformers.models.idefics3.image_processing_pil_idefics3 import Idefics3ImageProcessorPil

        return (transformers.Idefics3ForConditionalGeneration, transformers.Idefics3Config,
                transformers.Idefics3VisionConfig, Idefics3ImageProcessorPil)
    if kind == "smolvlm":
        from transformers.models.smolvlm.image_processing_pil_smolvlm import SmolVLMImageProcessorPil

        return (transformers.SmolVLMForConditionalGeneration, transformers.SmolVLMConfig,
                transformers.SmolVLMVisionConfig, SmolVLMImageProcessorPil)
    raise ValueError(f"kind must be one of {KINDS}, not {kind!r}")


def _smolvlm_processor_class():
    """SmolVLMProcessor, with a refusing stand-in for num2words (video prompts only) where it is not installed."""
    from transformers.models.smolvlm import processing_smolvlm

    if processing_smolvlm.num2words is None:
        def num2words(*args, **kwargs):
            raise RuntimeError("num2words is not installed; these test folders handle images only")

        processing_smolvlm.num2words = num2words
    return processing_smolvlm.SmolVLMProcessor


def _processor_class(kind: str):
    import transformers

    return transformers.Idefics3Processor if kind == "idefics3" else _smolvlm_processor_class()


def make_idefics3_folder(folder: Path, *, kind: str = "idefics3", split: bool, seed: int = 0,
                         longest_edge: int = 64, tied: bool = False, max_positions: int = 512,
                         layout: str = "hub") -> Path:
    """An Idefics3 or SmolVLM folder: 2-layer vision tower, pixel-shuffle connector, 2-layer Llama, processor.

    ``longest_edge`` is the image processor's ``size`` (a multiple of 32: 64 gives at most 2 x 2 tiles, 96 at
    most 3 x 3); ``split`` its ``do_image_splitting``. ``layout`` "nested" keeps transformers 5's single
    ``processor_config.json`` holding the image (and video) processor settings; "hub" (the default) writes them
    apart as the published SmolVLM / Idefics3 folders do (``preprocessor_config.json``, smolvlm's
    ``video_preprocessor_config.json``, and a ``processor_config.json`` of ``image_seq_len`` and
    ``processor_class`` only). transformers reloads both.
    """
    import torch
    import transformers

    model_class, config_class, vision_config_class, image_processor_class = _classes(kind)
    if layout not in ("hub", "nested"):
        raise ValueError(f"layout must be 'hub' or 'nested', not {layout!r}")
    if longest_edge % TILE:
        raise ValueError(f"longest_edge must be a multiple of {TILE}, not {longest_edge}")
    folder = Path(folder)
    backend = _tokenizer(SPECIALS, vocab_size=VOCAB)
    ids = {token: backend.token_to_id(token) for token in SPECIALS}
    extra = {"extra_special_tokens": SMOLVLM_NAMED_TOKENS} if kind == "smolvlm" else {}
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=backend, **TOKEN_NAMES, **extra)
    vision_config = vision_config_class(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, image_size=TILE, patch_size=PATCH)
    text_config = transformers.LlamaConfig(
        vocab_size=backend.get_vocab_size(), hidden_size=TEXT_HIDDEN, intermediate_size=112, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=max_positions, rms_norm_eps=1e-5,
        initializer_range=0.1, rope_theta=100000.0, tie_word_embeddings=tied,
        bos_token_id=ids["<|im_start|>"], eos_token_id=ids["<end_of_utterance>"], pad_token_id=ids["<|im_end|>"])
    config = config_class(vision_config=vision_config, text_config=text_config, scale_factor=SCALE_FACTOR,
                          image_token_id=ids["<image>"], tie_word_embeddings=tied, pad_token_id=ids["<|im_end|>"])
    torch.manual_seed(seed)
    model = model_class(config).eval()
    with torch.no_grad():  # random norms and biases, so a mix-up of them cannot pass unnoticed
        for name, parameter in model.named_parameters():
            if "norm" in name or name.endswith(".bias"):
                parameter.add_(torch.randn_like(parameter) * 0.2)
    model.generation_config = transformers.GenerationConfig(
        bos_token_id=ids["<|im_start|>"], eos_token_id=ids["<end_of_utterance>"], pad_token_id=ids["<|im_end|>"])
    model.save_pretrained(folder)
    image_processor = image_processor_class(size={"longest_edge": longest_edge},
                                            max_image_size={"longest_edge": TILE}, do_image_splitting=split,
                                            resample=1)
    parts = {"image_processor": image_processor, "tokenizer": tokenizer}
    if kind == "smolvlm":
        parts["video_processor"] = transformers.SmolVLMVideoProcessor(
            size={"longest_edge": longest_edge}, max_image_size={"longest_edge": TILE})
    processor = _processor_class(kind)(**parts, image_seq_len=IMAGE_SEQ_LEN, chat_template=SMOLVLM_CHAT_TEMPLATE)
    processor.save_pretrained(folder)
    if layout == "hub":
        image_processor.save_pretrained(folder)  # preprocessor_config.json
        if kind == "smolvlm":
            parts["video_processor"].save_pretrained(folder)  # video_preprocessor_config.json
        (folder / "processor_config.json").write_text(json.dumps(
            {"image_seq_len": IMAGE_SEQ_LEN, "processor_class": processor.__class__.__name__}, indent=2) + "\n")
    return folder


def kind_of(folder: Path) -> str:
    return json.loads((Path(folder) / "config.json").read_text())["model_type"]


def load_processor(folder: Path):
    """The folder's processor with transformers' PIL image processor (the numpy/Pillow reference backend).

    ``AutoProcessor`` in transformers 5 picks the torchvision backend when torchvision is installed; the PIL
    classes (``Idefics3ImageProcessorPil`` / ``SmolVLMImageProcessorPil``) are the reference vledge matches.
    """
    folder = Path(folder)
    kind = kind_of(folder)
    image_processor = _classes(kind)[3].from_pretrained(folder)
    return _processor_class(kind).from_pretrained(folder, image_processor=image_processor)


def load_model(folder: Path):
    return _classes(kind_of(folder))[0].from_pretrained(folder).eval()


def messages_for(n_images: int, question: str) -> list[dict]:
    """One user turn: ``n_images`` image entries, then the question."""
    return [{"role": "user", "content": [{"type": "image"}] * n_images + [{"type": "text", "text": question}]}]


def render_prompt(folder: Path, n_images: int, question: str) -> str:
    """The chat template's text, before ``<image>`` is expanded."""
    return load_processor(folder).apply_chat_template(messages_for(n_images, question), add_generation_prompt=True,
                                                      tokenize=False)


def expanded_image_prompt(rows: int, cols: int, image_seq_len: int = IMAGE_SEQ_LEN) -> str:
    """What one ``<image>`` becomes for an image cut into rows x cols tiles (0, 0: unsplit), per transformers."""
    from transformers.models.smolvlm.processing_smolvlm import get_image_prompt_string

    return get_image_prompt_string(rows, cols, image_seq_len, "<fake_token_around_image>", "<image>", "<global-img>")


def reference_inputs(folder: Path, images: list[np.ndarray], question: str) -> dict:
    """The processor's output for a chat prompt: text, input_ids [1, T], pixel_values [1, tiles, 3, 32, 32], ...

    Also rows / cols (one entry per image) from ``return_row_col_info``.
    """
    processor = load_processor(folder)
    text = processor.apply_chat_template(messages_for(len(images), question), add_generation_prompt=True,
                                         tokenize=False)
    grid = processor.image_processor([list(images)], return_row_col_info=True)
    out = processor(text=text, images=[list(images)], return_tensors="pt")
    inputs = {key: value for key, value in out.items()}
    inputs.update(text=text, rows=list(grid["rows"][0]), cols=list(grid["cols"][0]))
    return inputs


def reference_generate(folder: Path, images: list[np.ndarray], question: str, max_new_tokens: int = 16) -> dict:
    """Greedy generation by transformers for ``images`` (RGB uint8 HWC arrays) and ``question``.

    Returns numpy arrays: ``input_ids`` [T] (the expanded prompt), ``attention_mask`` [T], ``pixel_values``
    [tiles, 3, 32, 32] float32, ``pixel_attention_mask`` [tiles, 32, 32] int64 (the batch axis dropped), and
    ``generated`` [<= max_new_tokens] (new tokens only, ending at ``<end_of_utterance>`` if it came), plus the
    rendered ``text`` before expansion and ``rows`` / ``cols`` per image.
    """
    import torch

    inputs = reference_inputs(folder, images, question)
    model = load_model(folder)
    feed = {key: inputs[key] for key in ("input_ids", "attention_mask", "pixel_values", "pixel_attention_mask")}
    with torch.no_grad():
        out = model.generate(**feed, do_sample=False, max_new_tokens=max_new_tokens)
    prompt_length = inputs["input_ids"].shape[1]
    return {"text": inputs["text"], "rows": inputs["rows"], "cols": inputs["cols"],
            "input_ids": inputs["input_ids"][0].numpy(), "attention_mask": inputs["attention_mask"][0].numpy(),
            "pixel_values": inputs["pixel_values"][0].numpy(),
            "pixel_attention_mask": inputs["pixel_attention_mask"][0].numpy(),
            "generated": out[0, prompt_length:].numpy()}


def reference_image_features(folder: Path, pixel_values: np.ndarray,
                             pixel_attention_mask: np.ndarray | None = None) -> np.ndarray:
    """``model.get_image_features`` for tiles [tiles, 3, 32, 32] (or [1, tiles, 3, 32, 32]): [tiles, 4, 64].

    transformers drops tiles that are all exactly 0.0 (its batch padding) before the vision tower, so such a
    tile has no row in the result; the reshape below then fails loudly rather than misaligning.
    """
    import torch

    pixel_values = np.asarray(pixel_values, dtype=np.float32)
    if pixel_values.ndim == 4:
        pixel_values = pixel_values[None]
    mask = None
    if pixel_attention_mask is not None:
        mask = torch.from_numpy(np.asarray(pixel_attention_mask).reshape(pixel_values.shape[:2] + (TILE, TILE)))
    model = load_model(folder)
    with torch.no_grad():
        out = model.get_image_features(pixel_values=torch.from_numpy(pixel_values), pixel_attention_mask=mask)
    features = out.pooler_output[0].numpy()  # [kept tiles * image_seq_len, hidden] for the one batch entry
    return features.reshape(pixel_values.shape[1], IMAGE_SEQ_LEN, features.shape[-1])


def tensor_names(folder: Path) -> list[str]:
    from safetensors import safe_open

    with safe_open(str(Path(folder) / "model.safetensors"), "np") as handle:
        return sorted(handle.keys())


def config_keys(folder: Path) -> dict[str, list[str]]:
    config = json.loads((Path(folder) / "config.json").read_text())
    return {"top": sorted(config), "vision_config": sorted(config["vision_config"]),
            "text_config": sorted(config["text_config"])}

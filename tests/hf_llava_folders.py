"""Tiny random LlavaForConditionalGeneration folders with their processor, written by transformers here."""

from __future__ import annotations

from pathlib import Path

from hf_folders import _tokenizer

# LLaVA-1.5's processor chat template (llava-hf), without transformers' {% generation %} extension.
LLAVA_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] != 'system' %}{{ message['role'].upper() + ': '}}{% endif %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\n' }}{% endfor %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] + ' '}}"
    "{% endfor %}{% endfor %}{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)
# Qwen2-style ChatML with images, as LLaVA-OneVision-like Qwen2 fine-tunes write it.
CHATML_IMAGE_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\n' }}{% endfor %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] }}{% endfor %}"
    "{{ '<|im_end|>\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def make_llava_folder(folder: Path, tower: str = "clip", lm: str = "llama", seed: int = 0, image_size: int = 32,
                      patch_size: int = 8, feature_layer: int = -2, select: str = "default",
                      max_positions: int = 512) -> Path:
    """A LLaVA folder: 2-layer CLIP or SigLIP tower, 2-layer Llama or Qwen2 LM, processor and chat template."""
    import torch
    import transformers

    if lm == "llama":
        specials = ["<unk>", "<s>", "</s>", "<image>"]
        token_names = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<unk>"}
    else:
        specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<image>"]
        token_names = {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"}
    backend = _tokenizer(specials, vocab_size=360)
    if lm == "llama":
        from tokenizers import processors

        backend.post_processor = processors.TemplateProcessing(
            single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", backend.token_to_id("<s>"))])
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=backend, **token_names,
                                                    extra_special_tokens={"image_token": "<image>"})
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  image_size=image_size, patch_size=patch_size)
    if tower == "clip":
        vision_config = transformers.CLIPVisionConfig(**vision)
        image_processor = transformers.CLIPImageProcessor(
            size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size})
    else:
        vision_config = transformers.SiglipVisionConfig(**vision)
        image_processor = transformers.SiglipImageProcessor(size={"height": image_size, "width": image_size})
    text = dict(vocab_size=backend.get_vocab_size(), hidden_size=64, initializer_range=0.1, intermediate_size=112, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=max_positions, rms_norm_eps=1e-5)
    if lm == "llama":
        text_config = transformers.LlamaConfig(**text, bos_token_id=backend.token_to_id("<s>"),
                                               eos_token_id=backend.token_to_id("</s>"))
    else:
        text_config = transformers.Qwen2Config(**text, rope_theta=1000000.0, use_sliding_window=False,
                                               eos_token_id=backend.token_to_id("<|im_end|>"))
    config = transformers.LlavaConfig(vision_config=vision_config, text_config=text_config,
                                      image_token_index=backend.token_to_id("<image>"),
                                      vision_feature_layer=feature_layer, vision_feature_select_strategy=select)
    torch.manual_seed(seed)
    model = transformers.LlavaForConditionalGeneration(config).eval()
    with torch.no_grad():  # random norms and biases, so a mix-up of them cannot pass unnoticed
        for name, parameter in model.named_parameters():
            if "norm" in name or name.endswith(".bias"):
                parameter.add_(torch.randn_like(parameter) * 0.2)
    model.save_pretrained(folder)
    template = LLAVA_CHAT_TEMPLATE if lm == "llama" else CHATML_IMAGE_TEMPLATE
    processor = transformers.LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer,
                                            patch_size=patch_size, vision_feature_select_strategy=select,
                                            num_additional_image_tokens=1 if tower == "clip" else 0,
                                            chat_template=template)
    processor.save_pretrained(folder)
    return folder

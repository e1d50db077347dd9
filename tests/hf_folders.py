"""Tiny random Hugging Face causal-LM folders, written by transformers itself in the test session."""

from __future__ import annotations

from pathlib import Path

# ChatML, as SmolLM2-Instruct and Qwen2 write it (a default system turn when none is given).
CHATML = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

CORPUS = [
    "a red circle on a blue square", "the green triangle is left of the yellow star",
    "what colour is the shape", "how many shapes are there", "describe the image in detail",
    "there is one small white circle and two large black squares", "yes", "no", "top left", "bottom right",
]


def _tokenizer(specials: list[str], vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    backend.train_from_iterator(CORPUS * 4, trainer=trainer)
    return backend


def make_lm_folder(folder: Path, arch: str = "llama", tied: bool = False, rope_scaling: dict | None = None,
                   chat: bool = False, seed: int = 0, extra_rows: int = 0) -> Path:
    """A 2-layer, 64-wide, 4-head / 2-kv-head random LM with a tokenizer, saved by transformers.

    ``extra_rows`` embedding rows beyond the tokenizer (as Qwen2 pads its vocabulary).
    """
    import torch
    import transformers

    if arch in ("llama", "mistral"):
        specials = ["<unk>", "<s>", "</s>"] + (["<|im_start|>", "<|im_end|>"] if chat else [])
        token_names = {"bos_token": "<s>", "eos_token": "<|im_end|>" if chat else "</s>", "unk_token": "<unk>"}
    else:  # Qwen2: no bos, no unk
        specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
        token_names = {"eos_token": "<|im_end|>" if chat else "<|endoftext|>", "pad_token": "<|endoftext|>"}
    backend = _tokenizer(specials, vocab_size=360)
    if arch in ("llama", "mistral"):
        from tokenizers import processors

        backend.post_processor = processors.TemplateProcessing(
            single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", backend.token_to_id("<s>"))])
    vocab = backend.get_vocab_size() + extra_rows
    common = dict(vocab_size=vocab, hidden_size=64, intermediate_size=112, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=tied, rms_norm_eps=1e-5)
    if arch == "llama":
        config = transformers.LlamaConfig(**common, rope_scaling=rope_scaling, rope_theta=10000.0,
                                          bos_token_id=backend.token_to_id("<s>"),
                                          eos_token_id=backend.token_to_id("</s>"))
        model_class = transformers.LlamaForCausalLM
    elif arch == "mistral":
        config = transformers.MistralConfig(**common, rope_theta=10000.0, sliding_window=None,
                                            bos_token_id=backend.token_to_id("<s>"),
                                            eos_token_id=backend.token_to_id("</s>"))
        model_class = transformers.MistralForCausalLM
    else:
        config = transformers.Qwen2Config(**common, rope_scaling=rope_scaling, rope_theta=1000000.0,
                                          use_sliding_window=False)
        model_class = transformers.Qwen2ForCausalLM
    torch.manual_seed(seed)
    model = model_class(config).eval()
    with torch.no_grad():  # random norms and biases, so a mix-up of them cannot pass unnoticed
        for name, parameter in model.named_parameters():
            if "norm" in name or name.endswith(".bias"):
                parameter.add_(torch.randn_like(parameter) * 0.2)
    model.save_pretrained(folder)
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=backend, **token_names)
    if chat:
        fast.chat_template = CHATML
    fast.save_pretrained(folder)
    return folder

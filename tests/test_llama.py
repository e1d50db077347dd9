"""vledge's Llama-family LM against transformers' own, on tiny random folders saved in the session."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from hf_folders import make_lm_folder
from vledge.errors import ConfigError, TokenizerError, WeightsError
from vledge.hf.language_model import load_pretrained_lm
from vledge.models.llama import LlamaLM
from vledge.models.vlm import position_ids_from_mask

LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 16}
LINEAR = {"rope_type": "linear", "factor": 2.0}
CASES = {
    "llama-untied": ("llama", False, None),
    "llama-tied-llama3": ("llama", True, LLAMA3),
    "llama-linear": ("llama", False, LINEAR),
    "qwen2-untied-llama3": ("qwen2", False, LLAMA3),
    "qwen2-tied": ("qwen2", True, None),
}


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    return {name: make_lm_folder(root / name, arch, tied, rope, chat=name.startswith("qwen2"), seed=index)
            for index, (name, (arch, tied, rope)) in enumerate(CASES.items())}


def vledge_lm(folder):
    pretrained = load_pretrained_lm(folder)
    module = LlamaLM(pretrained.config).eval()
    language = {k[len("language."):]: v for k, v in pretrained.state_dict.items() if k.startswith("language.")}
    module.load_state_dict(language)
    return pretrained, module


def left_padded_batch(pad_id: int):
    ids = torch.tensor([[5, 17, 42, 99, 7, 250, 31, 64, 8], [pad_id, pad_id, pad_id, 12, 77, 3, 140, 9, 300]])
    mask = torch.tensor([[1] * 9, [0, 0, 0] + [1] * 6])
    return ids, mask


@pytest.mark.parametrize("case", sorted(CASES))
def test_logits_match_transformers_with_and_without_cache(folders, case):
    import transformers

    pretrained, module = vledge_lm(folders[case])
    reference = transformers.AutoModelForCausalLM.from_pretrained(folders[case]).eval()
    embed = pretrained.state_dict["embed_tokens.weight"]
    vocab = pretrained.original_vocab_size
    ids, mask = left_padded_batch(pad_id=0)  # any id of the original vocabulary: padded places are masked
    positions = position_ids_from_mask(mask)
    with torch.no_grad():
        expected = reference(input_ids=ids, attention_mask=mask, position_ids=positions).logits
        full, _ = module(embed[ids], mask, positions)
        split = 5
        first, past = module(embed[ids[:, :split]], mask[:, :split], positions[:, :split])
        rest, presents = module(embed[ids[:, split:]], mask, positions[:, split:], past)
    real = mask.bool()
    assert (full[..., :vocab] - expected).abs()[real].max() < 1e-4
    cached = torch.cat([first, rest], dim=1)[..., :vocab]
    assert (cached - expected).abs()[real].max() < 1e-4
    # the cache holds the key/value heads, not the repeated query heads: [batch, kv_heads, past, head_dim]
    assert tuple(presents[0][0].shape) == (2, 2, 9, 16)


def test_sharded_folder_loads_like_a_single_file(folders, tmp_path):
    import transformers

    sharded = tmp_path / "sharded"
    shutil.copytree(folders["llama-untied"], sharded)
    (sharded / "model.safetensors").unlink()
    transformers.AutoModelForCausalLM.from_pretrained(folders["llama-untied"]).save_pretrained(
        sharded, max_shard_size="60KB")
    assert (sharded / "model.safetensors.index.json").is_file()
    single, sharded_lm = load_pretrained_lm(folders["llama-untied"]), load_pretrained_lm(sharded)
    assert len(sharded_lm.config.source["files"]) > 1
    assert single.state_dict.keys() == sharded_lm.state_dict.keys()
    assert all(torch.equal(single.state_dict[k], sharded_lm.state_dict[k]) for k in single.state_dict)


def test_image_and_pad_tokens_are_added_as_mean_rows(folders):
    pretrained = load_pretrained_lm(folders["llama-untied"])
    tokenizer, original = pretrained.tokenizer, pretrained.original_vocab_size
    assert tokenizer.image_id == original and tokenizer.pad_id == original + 1  # Llama has no pad token
    assert pretrained.config.vocab_size == original + 2
    for key in ("embed_tokens.weight", "language.lm_head.weight"):
        matrix = pretrained.state_dict[key]
        assert matrix.shape[0] == original + 2
        assert torch.allclose(matrix[tokenizer.image_id], matrix[:original].mean(dim=0))
    assert tokenizer.bos_id == tokenizer.backend.token_to_id("<s>")  # its post-processor puts <s> first

    qwen = load_pretrained_lm(folders["qwen2-tied"])
    assert qwen.tokenizer.pad_id == qwen.tokenizer.backend.token_to_id("<|endoftext|>")  # its own pad kept
    assert qwen.tokenizer.bos_id is None and "bos" not in qwen.tokenizer.special_tokens()
    assert qwen.config.vocab_size == qwen.original_vocab_size + 1
    assert qwen.state_dict["language.lm_head.weight"] is qwen.state_dict["embed_tokens.weight"]


def test_chat_template_pieces_give_the_templates_own_ids(folders):
    import transformers

    from vledge.data.records import Turn
    from vledge.prompt import encode_conversation

    folder = folders["qwen2-untied-llama3"]
    pretrained = load_pretrained_lm(folder)
    reference = transformers.AutoTokenizer.from_pretrained(folder)
    turns = [Turn("what colour is the shape", "a red circle"), Turn("how many shapes are there", "two")]
    messages = [{"role": role, "content": text} for t in turns for role, text in (("user", t.question),
                                                                                 ("assistant", t.answer))]
    expected = reference.apply_chat_template(messages, tokenize=True, add_generation_prompt=False)
    expected = expected["input_ids"] if isinstance(expected, dict) or hasattr(expected, "keys") else expected
    encoded = encode_conversation(pretrained.tokenizer, pretrained.prompt, turns, with_image=False)
    newline = pretrained.tokenizer.encode("\n")
    assert encoded.ids + newline == list(expected)  # the template ends the last turn with a newline too
    assert pretrained.tokenizer.eos_id == pretrained.tokenizer.backend.token_to_id("<|im_end|>")
    answer = [i for i, t in zip(encoded.ids, encoded.target) if t]
    assert pretrained.tokenizer.decode(answer) == "a red circletwo"


def _edit_config(folder, **changes):
    config = json.loads((folder / "config.json").read_text())
    config.update(changes)
    (folder / "config.json").write_text(json.dumps(config))


@pytest.fixture
def broken(folders, tmp_path):
    target = tmp_path / "lm"
    shutil.copytree(folders["llama-untied"], target)
    return target


def test_missing_and_unexpected_tensors_are_listed(broken):
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(broken / "model.safetensors"))
    tensors.pop("model.layers.1.mlp.up_proj.weight")
    tensors["model.layers.0.extra.weight"] = torch.zeros(2)
    save_file(tensors, str(broken / "model.safetensors"))
    with pytest.raises(WeightsError, match=r"missing tensors \['model.layers.1.mlp.up_proj.weight'\].*"
                                           r"unexpected tensors \['model.layers.0.extra.weight'\]"):
        load_pretrained_lm(broken)


def test_unknown_architecture_names_it_and_the_supported_ones(broken):
    _edit_config(broken, architectures=["GPT2LMHeadModel"], model_type="gpt2")
    with pytest.raises(ConfigError, match="GPT2LMHeadModel is not supported.*LlamaForCausalLM.*Qwen2ForCausalLM"):
        load_pretrained_lm(broken)


def test_pickled_weights_only_say_how_to_convert(broken):
    (broken / "model.safetensors").rename(broken / "pytorch_model.bin")
    with pytest.raises(WeightsError, match="only pickled weights.*safe_serialization=True"):
        load_pretrained_lm(broken)


def test_a_name_that_is_not_a_folder_is_refused(tmp_path):
    with pytest.raises(WeightsError, match="not a local folder.*nothing is downloaded"):
        load_pretrained_lm("HuggingFaceTB/SmolLM2-135M")


def test_short_mistral_sliding_window_and_unknown_rope_are_config_errors(broken):
    _edit_config(broken, architectures=["MistralForCausalLM"], model_type="mistral", sliding_window=64)
    with pytest.raises(ConfigError, match="sliding_window 64 is shorter than the context"):
        load_pretrained_lm(broken, context=128)
    assert load_pretrained_lm(broken, context=64).config.kind == "mistral"  # a window as long as the context is fine
    _edit_config(broken, architectures=["LlamaForCausalLM"], model_type="llama", sliding_window=None,
                 rope_parameters={"rope_type": "yarn", "factor": 4.0, "rope_theta": 10000.0})
    with pytest.raises(ConfigError, match=r"rope type 'yarn' is not supported \(vledge implements default, linear, "
                                          r"llama3\)"):
        load_pretrained_lm(broken)


def test_missing_tokenizer_is_a_tokenizer_error(broken):
    (broken / "tokenizer.json").unlink()
    with pytest.raises(TokenizerError, match="no tokenizer.json"):
        load_pretrained_lm(broken)


def test_new_tokens_take_unused_padding_rows_unchanged(tmp_path):
    from safetensors.torch import load_file

    folder = make_lm_folder(tmp_path / "padded", "qwen2", tied=True, extra_rows=5)
    pretrained = load_pretrained_lm(folder)
    original = load_file(str(folder / "model.safetensors"))["model.embed_tokens.weight"]
    assert pretrained.tokenizer.image_id < original.shape[0]  # Qwen2-style padding rows hold the new token
    assert pretrained.config.vocab_size == original.shape[0]
    assert torch.equal(pretrained.state_dict["embed_tokens.weight"], original)


def test_lora_starts_at_the_base_model_and_merges_to_what_it_computes():
    from vledge.families.llama import LlamaConfig
    from vledge.models.lora import LoRAOptions, add_lora, lora_parameters, merge_lora, merged_state_dict

    config = LlamaConfig(hidden=32, layers=1, heads=4, kv_heads=2, intermediate=48, vocab_size=50)
    torch.manual_seed(0)
    base = LlamaLM(config).eval()
    x, mask, positions = torch.randn(2, 5, 32), torch.ones(2, 5, dtype=torch.long), torch.arange(5).expand(2, 5)
    before, _ = base(x, mask, positions)
    add_lora(base, LoRAOptions(rank=4, alpha=8.0, dropout=0.0))
    assert torch.allclose(base(x, mask, positions)[0], before, atol=1e-6)  # B starts at zero
    assert len(lora_parameters(base)) == 2 * 7 and not [n for n, _ in base.named_parameters() if "proj.weight" in n]
    with torch.no_grad():
        for parameter in lora_parameters(base):
            parameter.normal_(std=0.1)
    adapted, _ = base(x, mask, positions)
    assert not torch.allclose(adapted, before, atol=1e-3)
    state = merged_state_dict(base)
    plain = LlamaLM(config).eval()
    plain.load_state_dict(state)  # plain names only: loads into a model without adapters
    assert torch.allclose(plain(x, mask, positions)[0], adapted, atol=1e-5)
    merge_lora(base)
    assert torch.allclose(base(x, mask, positions)[0], adapted, atol=1e-5)


def test_cli_names_a_bad_language_model_in_one_line(broken, synth_data, tmp_path):
    from click.testing import CliRunner

    from vledge.cli import main

    (broken / "model.safetensors").rename(broken / "pytorch_model.bin")
    result = CliRunner().invoke(main, ["train", "--data", str(synth_data), "--preset", "tiny", "--language-model",
                                       str(broken), "--out", str(tmp_path / "r")])
    assert result.exit_code == 1
    assert result.output.count("Error: WeightsError: ") == 1 and "safe_serialization=True" in result.output
    assert "Traceback" not in result.output
    result = CliRunner().invoke(main, ["train", "--data", str(synth_data), "--preset", "tiny", "--lora", "4",
                                       "--out", str(tmp_path / "r2")])
    assert result.exit_code == 1 and "Error: ConfigError: LoRA adapters need a pretrained language model" in result.output


def test_training_and_inference_attention_paths_agree(folders):
    pretrained, module = vledge_lm(folders["qwen2-untied-llama3"])
    embed = pretrained.state_dict["embed_tokens.weight"]
    ids, mask = left_padded_batch(pad_id=0)
    positions = position_ids_from_mask(mask)
    with torch.no_grad():
        grouped, _ = module(embed[ids], mask, positions)  # the grouped path (what export traces)
    repeated, _ = module(embed[ids], mask, positions)  # grad enabled: the repeated SDPA path
    assert (grouped - repeated.detach()).abs()[mask.bool()].max() < 1e-5

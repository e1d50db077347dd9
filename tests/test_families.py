"""A model family is one module plus one registration: families defined in this file go through training,
export, the parity gate and the torch-free runtime with no other file edited, and match references written here.

Nothing in this module imports torch at import time, so a subprocess with torch blocked can import it to
register the same families before loading an exported model directory.
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from vledge.families import (language_family, register_language_family, register_vision_family,
                             unregister_language_family, unregister_vision_family, vision_family)
from vledge.families.base import VisionFamily
from vledge.families.llama import LlamaConfig, LlamaFamily

HERE = Path(__file__).resolve().parent

# --------------------------------------------------------------------------- a language model family

# The folder's own names for a Llama-shaped model (every substring replaced in order).
RENAMES = (("model.embed_tokens", "decoder.token_embedding"), ("model.", "decoder."), ("layers.", "blocks."),
           ("self_attn.", "attention."), ("mlp.", "ffn."), ("lm_head", "output"))


@dataclasses.dataclass
class GeluLlamaConfig(LlamaConfig):
    kind: str = "test_gelu_llama"


class GeluLlamaFamily(LlamaFamily):
    """A Llama variant whose gated MLP uses GELU and whose checkpoints name every tensor differently."""

    name = "test_gelu_llama"
    config_class = GeluLlamaConfig
    hf_architectures = ("GeluLlamaForCausalLM",)
    hf_model_types = ("gelu_llama",)
    mlp_activation = "gelu"

    def hf_tensor_name(self, name: str) -> str:
        hf = super().hf_tensor_name(name)
        for old, new in RENAMES:
            hf = hf.replace(old, new)
        return hf


# --------------------------------------------------------------------------- a vision tower family

PATCH = 8


class PatchNetFamily(VisionFamily):
    """One strided convolution into patches, then GELU: a backbone torchvision and vledge do not have."""

    name = "test_patchnet"
    output = "grid"

    def backbone(self, config):
        import torch

        width = config.widths[0]
        module = torch.nn.Sequential(torch.nn.Conv2d(3, width, PATCH, PATCH), torch.nn.GELU())
        return module, width

    def parameter_count(self, config) -> int:
        return 3 * PATCH * PATCH * config.widths[0] + config.widths[0]


def register_test_families() -> None:
    register_language_family(GeluLlamaFamily(), replace=True)
    register_vision_family(PatchNetFamily(), replace=True)


@pytest.fixture
def test_families():
    register_test_families()
    yield
    unregister_language_family("test_gelu_llama")
    unregister_vision_family("test_patchnet")


def test_a_registered_family_is_found_and_a_built_in_name_is_not_taken(test_families):
    from vledge.errors import ConfigError

    assert language_family("test_gelu_llama").mlp_activation == "gelu"
    assert vision_family("test_patchnet").output == "grid"
    with pytest.raises(ConfigError, match="already registered"):
        register_language_family(GeluLlamaFamily())
    with pytest.raises(ConfigError, match="built-in"):
        unregister_language_family("llama")
    with pytest.raises(ConfigError, match="unknown language model family 'nope'.*llama"):
        language_family("nope")


def make_renamed_folder(folder: Path) -> Path:
    """A tiny random Llama-shaped LM with GELU, saved by transformers, then renamed into the test family's form."""
    import torch
    import transformers
    from safetensors.torch import load_file, save_file

    from hf_folders import _tokenizer

    backend = _tokenizer(["<unk>", "<s>", "</s>"], vocab_size=360)
    config = transformers.LlamaConfig(vocab_size=backend.get_vocab_size(), hidden_size=64, intermediate_size=112,
                                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                      max_position_embeddings=512, rms_norm_eps=1e-5, hidden_act="gelu",
                                      tie_word_embeddings=False)
    torch.manual_seed(11)
    model = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "norm" in name:
                parameter.add_(torch.randn_like(parameter) * 0.2)
    model.save_pretrained(folder)
    transformers.PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>",
                                         unk_token="<unk>").save_pretrained(folder)
    tensors = load_file(str(folder / "model.safetensors"))
    renamed = {}
    for name, tensor in tensors.items():
        for old, new in RENAMES:
            name = name.replace(old, new)
        renamed[name] = tensor.contiguous()
    save_file(renamed, str(folder / "model.safetensors"))
    data = json.loads((folder / "config.json").read_text())
    data.update(architectures=["GeluLlamaForCausalLM"], model_type="gelu_llama")
    (folder / "config.json").write_text(json.dumps(data))
    return folder


def reference_logits(folder: Path, ids: list[int]) -> np.ndarray:
    """The family's forward pass written out here from the folder's renamed tensors: [len(ids), vocab]."""
    import torch
    import torch.nn.functional as F
    from safetensors.torch import load_file

    w = load_file(str(folder / "model.safetensors"))
    config = json.loads((folder / "config.json").read_text())
    heads, kv, hidden = config["num_attention_heads"], config["num_key_value_heads"], config["hidden_size"]
    dim, eps = hidden // heads, config["rms_norm_eps"]

    def norm(x, weight):
        return weight * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)

    def rotate(x):  # rotary positions, theta 10000, halves rotated
        half = x.shape[-1] // 2
        freq = 1.0 / 10000 ** (torch.arange(0, half).float() * 2 / x.shape[-1])
        angle = torch.arange(x.shape[-2]).float()[:, None] * freq[None]
        cos, sin = torch.cat([angle.cos()] * 2, -1), torch.cat([angle.sin()] * 2, -1)
        return x * cos + torch.cat([-x[..., half:], x[..., :half]], -1) * sin

    x = w["decoder.token_embedding.weight"][torch.tensor(ids)]
    seq = len(ids)
    causal = torch.full((seq, seq), float("-inf")).triu(1)
    for i in range(config["num_hidden_layers"]):
        p = f"decoder.blocks.{i}."
        h = norm(x, w[p + "input_layernorm.weight"])
        q = rotate((h @ w[p + "attention.q_proj.weight"].T).view(seq, heads, dim).transpose(0, 1))
        k = rotate((h @ w[p + "attention.k_proj.weight"].T).view(seq, kv, dim).transpose(0, 1))
        v = (h @ w[p + "attention.v_proj.weight"].T).view(seq, kv, dim).transpose(0, 1)
        k, v = k.repeat_interleave(heads // kv, 0), v.repeat_interleave(heads // kv, 0)
        attended = ((q @ k.transpose(1, 2)) / dim ** 0.5 + causal).softmax(-1) @ v
        x = x + attended.transpose(0, 1).reshape(seq, hidden) @ w[p + "attention.o_proj.weight"].T
        h = norm(x, w[p + "post_attention_layernorm.weight"])
        gated = F.gelu(h @ w[p + "ffn.gate_proj.weight"].T) * (h @ w[p + "ffn.up_proj.weight"].T)
        x = x + gated @ w[p + "ffn.down_proj.weight"].T
    return (norm(x, w["decoder.norm.weight"]) @ w["output.weight"].T).numpy()


def exported_last_logits(model_dir: Path, ids: list[int]) -> np.ndarray:
    """The exported embed and decoder graphs run as docs/model-directory.md describes: the last position's logits."""
    import onnxruntime as ort

    arch = json.loads((model_dir / "vledge.json").read_text())["architecture"]
    run = {name: ort.InferenceSession(str(model_dir / "onnx" / f"{name}.onnx"), providers=["CPUExecutionProvider"])
           for name in ("embed_tokens", "decoder_model_merged")}
    input_ids = np.array([ids], dtype=np.int64)
    (embeds,) = run["embed_tokens"].run(None, {"input_ids": input_ids})
    feeds = {"inputs_embeds": embeds, "attention_mask": np.ones_like(input_ids),
             "position_ids": np.arange(len(ids), dtype=np.int64)[None]}
    for layer in range(arch["layers"]):
        for part in ("key", "value"):
            feeds[f"past_key_values.{layer}.{part}"] = np.zeros((1, arch["kv_heads"], 0, arch["head_dim"]),
                                                               np.float32)
    return run["decoder_model_merged"].run(None, feeds)[0][0, -1]


RUNTIME_IN_A_TORCH_FREE_PROCESS = """
import sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("torch", "torchvision", "transformers", "safetensors"):
            raise ImportError("blocked: " + name)
sys.meta_path.insert(0, Block())
sys.path.insert(0, {tests!r})
import test_families
test_families.register_test_families()
import vledge.runtime
from vledge.runtime import GenerationOptions
model = vledge.runtime.load({model_dir!r}, providers="cpu", threads=1)
result = model.caption({image!r}, GenerationOptions(max_new_tokens=4))
print(model.manifest.model_config.language.kind, model.manifest.model_config.vision.backbone, len(result.token_ids))
"""


def _caption_without_torch(model_dir: Path, image: Path) -> list[str]:
    code = RUNTIME_IN_A_TORCH_FREE_PROCESS.format(tests=str(HERE), model_dir=str(model_dir), image=str(image))
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return done.stdout.split()


@pytest.mark.slow
def test_a_language_family_defined_in_a_test_trains_exports_and_runs(test_families, synth_data, tmp_path):
    from click.testing import CliRunner

    from vledge.checkpoint import load_checkpoint
    from vledge.cli import main

    folder = make_renamed_folder(tmp_path / "gelu-llama")
    run, model_dir = tmp_path / "run", tmp_path / "model"
    result = CliRunner().invoke(main, ["train", "--data", str(synth_data), "--preset", "tiny", "--language-model",
                                       str(folder), "--freeze", "language", "--max-steps", "4", "--threads", "1",
                                       "--out", str(run)])
    assert result.exit_code == 0, result.output
    checkpoint = load_checkpoint(run / "ckpt.pt")
    assert type(checkpoint.model_config.language) is GeluLlamaConfig
    result = CliRunner().invoke(main, ["export", str(run / "ckpt.pt"), "-o", str(model_dir), "--quantize", "int8",
                                       "--calibration-data", str(synth_data), "--parity-samples", "8"])
    assert result.exit_code == 0, result.output
    manifest = json.loads((model_dir / "vledge.json").read_text())
    assert manifest["architecture"]["language_model"] == "test_gelu_llama"
    assert manifest["parity"]["variants"]["fp32"]["generation"]["token_agreement"] == 1.0  # the gate passed

    tokenizer = checkpoint.tokenizer()
    ids = tokenizer.encode("the green triangle is left of the yellow star")
    expected = reference_logits(folder, ids)
    for length in (3, 7, len(ids)):  # every position's logits, as the last of a prompt
        exported = exported_last_logits(model_dir, ids[:length])[: expected.shape[1]]
        assert np.abs(exported - expected[length - 1]).max() < 1e-3

    image = synth_data / json.loads((synth_data / "test.json").read_text())[0]["image"]
    kind, backbone, tokens = _caption_without_torch(model_dir, image)
    assert (kind, backbone) == ("test_gelu_llama", "convnet") and 1 <= int(tokens) <= 4


@pytest.mark.slow
def test_a_vision_family_defined_in_a_test_trains_exports_and_runs(test_families, synth_data, tmp_path):
    import torch
    import torch.nn.functional as F

    from conftest import export_tiny, tiny_configs
    from vledge.checkpoint import load_checkpoint
    from vledge.config import VisionConfig
    from vledge.training.trainer import train

    model_config, train_config = tiny_configs(max_steps=4, eval_every=4, eval_samples=4)
    model_config = dataclasses.replace(model_config, vision=VisionConfig(backbone="test_patchnet", widths=(16,)))
    result = train(synth_data, tmp_path / "run", model_config, train_config)
    exported = export_tiny(result, synth_data, tmp_path / "model", quantize=("int8",), parity_samples=8)
    model_dir = exported.model_dir
    assert exported.manifest.architecture()["vision_backbone"] == "test_patchnet"
    assert exported.parity["fp32"].generation.token_agreement == 1.0

    state = load_checkpoint(result.best_checkpoint).state_dict
    pixels = np.random.default_rng(0).standard_normal((2, 3, 32, 32)).astype(np.float32)
    with torch.no_grad():  # the family's backbone written out here, then the tiny preset's pooling and projector
        grid = F.gelu(F.conv2d(torch.from_numpy(pixels), state["vision.backbone.0.weight"],
                               state["vision.backbone.0.bias"], stride=PATCH))
        tokens = F.adaptive_avg_pool2d(grid, (4, 4)).flatten(2).transpose(1, 2)
        hidden = F.gelu(tokens @ state["projector.0.weight"].T + state["projector.0.bias"])
        expected = (hidden @ state["projector.2.weight"].T + state["projector.2.bias"]).numpy()
    import onnxruntime as ort

    session = ort.InferenceSession(str(model_dir / "onnx" / "vision_encoder.onnx"), providers=["CPUExecutionProvider"])
    (features,) = session.run(None, {"pixel_values": pixels})
    assert np.abs(features - expected).max() < 1e-4

    image = synth_data / json.loads((synth_data / "test.json").read_text())[0]["image"]
    kind, backbone, tokens = _caption_without_torch(model_dir, image)
    assert (kind, backbone) == ("transformer", "test_patchnet") and 1 <= int(tokens) <= 4


# The language config as releases before the families wrote it: every family's fields side by side.
FLAT_TRANSFORMER = {"kind": "transformer", "hidden": 32, "layers": 2, "heads": 2, "max_positions": 128,
                    "dropout": 0.0, "vocab_size": 320, "kv_heads": 0, "intermediate": 0, "attention_head_dim": 0,
                    "rope_theta": 10000.0, "rope_scaling": None, "rms_norm_eps": 1e-6, "tie_embeddings": False,
                    "qkv_bias": False, "source": None}


def test_an_earlier_flat_language_config_reads_into_its_family_class():
    from vledge.config import ModelConfig, from_dict, preset, to_dict
    from vledge.errors import ConfigError
    from vledge.families.gpt import TransformerConfig

    config, _ = preset("tiny")
    data = to_dict(config)
    data["language"] = dict(FLAT_TRANSFORMER)
    read = from_dict(ModelConfig, data)
    assert type(read.language) is TransformerConfig and read.language.hidden == 32
    assert "kv_heads" not in to_dict(read)["language"]  # written back in the family's own form

    old_qwen2 = {**FLAT_TRANSFORMER, "kind": "llama", "kv_heads": 1, "intermediate": 48, "qkv_bias": True,
                 "tie_embeddings": True, "rms_norm_eps": 1e-5}
    read = from_dict(ModelConfig, {**data, "language": old_qwen2})
    assert type(read.language) is LlamaConfig and read.language.qkv_bias and read.language.key_value_heads == 1

    with pytest.raises(ConfigError, match="field 'kv_heads' does not apply to a 'transformer' language model"):
        from_dict(ModelConfig, {**data, "language": {**FLAT_TRANSFORMER, "kv_heads": 2}})
    with pytest.raises(ConfigError, match="unknown language model family 'gpt9'"):
        from_dict(ModelConfig, {**data, "language": {**FLAT_TRANSFORMER, "kind": "gpt9"}})


def test_a_config_of_one_family_cannot_claim_another_kind():
    from vledge.errors import ConfigError
    from vledge.families.gpt import TransformerConfig

    with pytest.raises(ConfigError, match="configured by LlamaConfig, not TransformerConfig"):
        TransformerConfig(kind="llama")

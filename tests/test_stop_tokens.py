"""Stop token ids: read from a Hugging Face folder as transformers reads them, recorded, honoured by every engine."""

from __future__ import annotations

import json
import shutil

import pytest

from vledge.decoding import GenerationOptions
from vledge.errors import ModelDirError, WeightsError
from vledge.hf.generation_config import folder_stop_ids


def _write(path, data) -> None:
    path.write_text(json.dumps(data))


def test_generation_config_then_config_then_template(tmp_path):
    config = {"eos_token_id": 7}
    assert folder_stop_ids(tmp_path, config, 3) == [7]
    assert folder_stop_ids(tmp_path, {"eos_token_id": [7, 9, 7]}, 3) == [7, 9]
    assert folder_stop_ids(tmp_path, {}, 3) == [3]
    assert folder_stop_ids(tmp_path, {"text_config": {"eos_token_id": 11}}, 3) == [11]  # a LLaVA folder
    _write(tmp_path / "generation_config.json", {"bos_token_id": 1})  # no eos there: config.json's
    assert folder_stop_ids(tmp_path, config, 3) == [7]
    _write(tmp_path / "generation_config.json", {"eos_token_id": [12, 13]})
    assert folder_stop_ids(tmp_path, config, 3) == [12, 13]
    _write(tmp_path / "generation_config.json", {"eos_token_id": 14})
    assert folder_stop_ids(tmp_path, config, 3) == [14]


@pytest.mark.parametrize("bad", ["two", -1, [], [1, "x"], True])
def test_a_garbled_eos_token_id_names_the_file(tmp_path, bad):
    _write(tmp_path / "generation_config.json", {"eos_token_id": bad})
    with pytest.raises(WeightsError, match="generation_config.json: eos_token_id"):
        folder_stop_ids(tmp_path, {}, 3)


def _greedy(hf_model, embeds, steps: int) -> list[int]:
    """transformers' model run greedily, with no stop token at all (the whole sequence each step)."""
    import torch

    tokens: list[int] = []
    with torch.no_grad():
        for _ in range(steps):
            token = int(hf_model(inputs_embeds=embeds).logits[0, -1].argmax())
            tokens.append(token)
            embeds = torch.cat([embeds, hf_model.get_input_embeddings()(torch.tensor([[token]]))], dim=1)
    return tokens


def test_a_llama3_style_folder_stops_where_transformers_stops(tmp_path):
    """generation_config.json lists two stop ids (as Llama 3.x folders do); the answer ends where
    ``transformers.generate`` ends it, one of them being a token the model really produces."""
    import torch
    import transformers

    from hf_folders import make_lm_folder
    from vledge import generation
    from vledge.config import preset
    from vledge.models.generate import TorchEngine
    from vledge.hf.language_model import load_pretrained_lm
    from vledge.models.vlm import VisionLanguageModel
    from vledge.prompt import question_ids
    from vledge.training.pretrained_lm import load_language_weights, with_language_model

    folder = make_lm_folder(tmp_path / "lm", "llama", chat=True, seed=5)
    lm = load_pretrained_lm(folder)
    tokenizer = lm.tokenizer
    ids = question_ids(tokenizer, lm.prompt, "what colour is the shape")
    torch.manual_seed(0)
    model_config = with_language_model(preset("tiny")[0], lm)
    model = VisionLanguageModel(model_config, image_token_id=tokenizer.image_id).eval()
    image_embeds = torch.randn(1, model.num_image_tokens, model_config.language.hidden) * 0.5

    hf = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
    at = ids.index(tokenizer.image_id)
    with torch.no_grad():
        text = hf.get_input_embeddings()(torch.tensor([ids[:at] + ids[at + 1:]]))
    embeds = torch.cat([text[:, :at], image_embeds, text[:, at:]], dim=1)
    free = _greedy(hf, embeds, 16)
    k = next(i for i in range(2, len(free)) if free[i] not in free[:i] and tokenizer.eos_id not in free[:i + 1])
    stop = free[k]
    other = next(i for i in range(tokenizer.vocab_size) if i not in free and i != tokenizer.eos_id)
    _write(folder / "generation_config.json", {"bos_token_id": tokenizer.bos_id, "eos_token_id": [other, stop]})

    hf = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
    with torch.no_grad():
        expected = hf.generate(inputs_embeds=embeds, attention_mask=torch.ones(embeds.shape[:2], dtype=torch.long),
                               max_new_tokens=16, do_sample=False)[0].tolist()
    assert expected == free[:k + 1]  # transformers itself stops at the listed id

    lm = load_pretrained_lm(folder)
    assert lm.config.source["stop_token_ids"] == [other, stop]
    model = VisionLanguageModel(with_language_model(preset("tiny")[0], lm), image_token_id=tokenizer.image_id).eval()
    load_language_weights(model, lm)
    results = generation.generate(TorchEngine(model, lm.tokenizer), image_embeds.numpy(), [ids],
                                  GenerationOptions(max_new_tokens=16))
    assert results[0].token_ids == expected[:-1]  # vledge's answers end before their stop token
    assert results[0].finish_reason == "stop"


# --------------------------------------------------------------------------- the model directory


def _copy_with(model_dir, tmp_path, edit):
    target = tmp_path / "model"
    shutil.copytree(model_dir, target)
    manifest = json.loads((target / "vledge.json").read_text())
    edit(manifest)
    (target / "vledge.json").write_text(json.dumps(manifest))  # the manifest is not among the hashed files
    return target


def _load(model_dir):
    from vledge.runtime import load

    return load(model_dir, precision="fp32", providers="cpu", threads=1)


def test_the_export_records_the_stop_ids_and_the_runtime_stops_at_each(tiny_model_dir, synth_data, tmp_path):
    manifest = json.loads((tiny_model_dir / "vledge.json").read_text())
    eos = manifest["special_tokens"]["eos"]
    assert manifest["generation"]["stop_token_ids"] == [eos]  # a vledge-trained LM: its template's end token

    image = synth_data / json.loads((synth_data / "test.json").read_text())[0]["image"]
    options = GenerationOptions(max_new_tokens=12)
    free = _load(tiny_model_dir).ask(image, "describe the image", options).token_ids
    k = next((i for i in range(1, len(free)) if free[i] not in free[:i]), None)
    if k is None:
        pytest.skip("the tiny model repeats one token")
    edited = _copy_with(tiny_model_dir, tmp_path,
                        lambda m: m["generation"].update(stop_token_ids=[eos, free[k]]))
    result = _load(edited).ask(image, "describe the image", options)
    assert result.token_ids == free[:k]
    assert result.finish_reason == "stop"


def test_a_directory_without_stop_ids_still_loads(tiny_model_dir, tmp_path):
    edited = _copy_with(tiny_model_dir, tmp_path, lambda m: m["generation"].pop("stop_token_ids"))
    runtime = _load(edited)
    assert list(runtime.stop_token_ids) == [runtime.tokenizer.eos_id]


@pytest.mark.parametrize("bad, message", [("x", "generation.stop_token_ids must be a non-empty list"),
                                          ([1, -2], r"generation.stop_token_ids\[1\] must be an integer"),
                                          ([10 ** 6], r"generation.stop_token_ids\[0\] is 1000000, beyond")])
def test_bad_stop_ids_in_the_manifest_are_refused(tiny_model_dir, tmp_path, bad, message):
    edited = _copy_with(tiny_model_dir, tmp_path, lambda m: m["generation"].update(stop_token_ids=bad))
    with pytest.raises(ModelDirError, match=message):
        _load(edited)


def test_a_llava_folder_records_its_stop_ids(tmp_path):
    from hf_llava_folders import make_llava_folder
    from vledge.hf.llava import load_llava_folder

    folder = make_llava_folder(tmp_path / "hf")
    _write(folder / "generation_config.json", {"eos_token_id": [5, 6]})
    assert load_llava_folder(folder).source["stop_token_ids"] == [5, 6]
    (folder / "generation_config.json").unlink()
    text_eos = json.loads((folder / "config.json").read_text())["text_config"]["eos_token_id"]
    assert load_llava_folder(folder).source["stop_token_ids"] == [text_eos]

"""vledge's export of a LLaVA folder loaded by transformers.js in Node, against transformers and vledge.runtime.

The Node side needs ``node`` and ``tests/js/node_modules`` (``cd tests/js && ONNXRUNTIME_NODE_INSTALL=skip npm ci``);
where either is missing those tests are skipped with that reason. Nothing is installed or downloaded here.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

from hf_llava_folders import make_llava_folder  # noqa: E402
from PIL import Image  # noqa: E402
from test_llava import CASES, NEW_TOKENS, QUESTION, until_eos  # noqa: E402

from vledge.decoding import GenerationOptions  # noqa: E402

pytestmark = pytest.mark.slow

JS = Path(__file__).parent / "js"
SCRIPT = JS / "llava_generate.mjs"
JSON_FILES = ("config.json", "preprocessor_config.json", "processor_config.json", "tokenizer_config.json",
              "generation_config.json")
MESSAGES = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]}]


def node_or_skip() -> str:
    node = shutil.which("node")
    if node is None:
        pytest.skip("node is not installed: the transformers.js checks need Node.js >= 20.9 and "
                    "`cd tests/js && ONNXRUNTIME_NODE_INSTALL=skip npm ci`")
    version = subprocess.run([node, "--version"], capture_output=True, text=True, timeout=60).stdout.strip()
    if tuple(int(part) for part in version.lstrip("v").split(".")[:2]) < (20, 9):
        pytest.skip(f"node {version} is too old: @huggingface/transformers 4 (sharp) needs Node.js >= 20.9")
    if not (JS / "node_modules" / "@huggingface" / "transformers" / "package.json").is_file():
        pytest.skip("tests/js/node_modules has no @huggingface/transformers: run "
                    "`cd tests/js && ONNXRUNTIME_NODE_INSTALL=skip npm ci`")
    return node


def run_node(model_dir: Path, image: Path, dtype: dict[str, str] | None = None) -> dict:
    """transformers.js's greedy answer (ids after the prompt) with the folder's chat template and processor."""
    command = [node_or_skip(), str(SCRIPT), str(model_dir), str(image), json.dumps({"messages": MESSAGES}),
               str(NEW_TOKENS)]
    if dtype is not None:
        command.append(json.dumps(dtype))
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=JS)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def agreement(a: list[int], b: list[int]) -> float:
    """Equal tokens at equal positions over the longer answer (as the export's parity measures it)."""
    longest = max(len(a), len(b), 1)
    return sum(x == y for x, y in zip(a, b)) / longest


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """A real photograph at full size (512 x 512) and the same photo at the tiny models' 32 x 32 input size."""
    from skimage import data

    folder = tmp_path_factory.mktemp("photos")
    image = Image.fromarray(data.astronaut())
    image.save(folder / "astronaut.png")
    image.resize((32, 32), Image.BICUBIC).save(folder / "astronaut-32.png")
    return folder / "astronaut.png", folder / "astronaut-32.png"


@pytest.fixture(scope="module", params=sorted(CASES))
def exported(request, tmp_path_factory, photos):
    """(model dir, LLaVA folder, transformers' greedy ids per photo): `vledge export HF_DIR` with every variant."""
    from click.testing import CliRunner

    from vledge.cli import main

    tower, lm, select, seed = CASES[request.param]
    root = tmp_path_factory.mktemp(request.param)
    folder = make_llava_folder(root / "hf", tower=tower, lm=lm, select=select, seed=seed)
    out = root / "model"
    result = CliRunner().invoke(main, ["export", str(folder), "-o", str(out), "--quantize", "auto",
                                       "--parity-samples", "8"])
    assert result.exit_code == 0, result.output
    reference = transformers.LlavaForConditionalGeneration.from_pretrained(folder).eval()
    processor = transformers.AutoProcessor.from_pretrained(folder)
    text = processor.apply_chat_template(MESSAGES, add_generation_prompt=True)
    expected = {}
    for photo in photos:
        with Image.open(photo) as image:
            inputs = processor(images=image.convert("RGB"), text=text, return_tensors="pt")
        with torch.no_grad():
            ids = reference.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False)
        expected[photo.name] = {"prompt_ids": inputs["input_ids"][0].tolist(),
                                "ids": ids[0, inputs["input_ids"].shape[1]:].tolist()}
    return out, folder, expected


def test_export_writes_the_transformers_js_files_listed_and_hashed(exported):
    out, folder, _ = exported
    manifest = json.loads((out / "vledge.json").read_text())
    for name in JSON_FILES:
        entry = manifest["files"][name]
        assert hashlib.sha256((out / name).read_bytes()).hexdigest() == entry["sha256"]
    config = json.loads((out / "config.json").read_text())
    source = json.loads((folder / "config.json").read_text())
    assert config["model_type"] == "llava"
    assert config["text_config"]["model_type"] == source["text_config"]["model_type"]
    assert config["vision_config"]["model_type"] == source["vision_config"]["model_type"]
    assert config["image_token_index"] == source["image_token_index"] == manifest["special_tokens"]["image"]
    assert config["transformers.js_config"]["dtype"] == manifest["selected"]["cpu"]  # the gate's choice per graph
    processor = json.loads((out / "processor_config.json").read_text())
    grid = (manifest["architecture"]["image_size"] // processor["patch_size"]) ** 2
    assert grid + processor["num_additional_image_tokens"] == manifest["architecture"]["image_tokens"]
    if source["vision_config"]["model_type"] == "clip_vision_model":  # default selection drops the class token
        assert processor["num_additional_image_tokens"] == 0
    generation = json.loads((out / "generation_config.json").read_text())
    assert generation["eos_token_id"] == manifest["special_tokens"]["eos"]


def test_graph_names_follow_transformers_js_without_second_copies(exported):
    import onnx

    out, _, _ = exported
    manifest = json.loads((out / "vledge.json").read_text())
    suffix = {"fp32": "", "fp16": "_fp16", "int8": "_int8", "q4": "_q4"}  # transformers.js 4.x's suffixes
    listed = []
    for component, variants in manifest["variants"].items():
        for precision, path in variants.items():
            assert path == f"onnx/{component}{suffix[precision]}.onnx"
            listed.append(path)
    on_disk = sorted(p.relative_to(out).as_posix() for p in (out / "onnx").iterdir())
    assert on_disk == sorted(listed)
    digests = [manifest["files"][path]["sha256"] for path in listed]
    assert len(set(digests)) == len(digests), "a graph is stored twice"
    vision = onnx.load(str(out / "onnx" / "vision_encoder.onnx"), load_external_data=False)
    assert [o.name for o in vision.graph.output] == ["image_features"]
    for path in listed:
        graph = onnx.load(str(out / path), load_external_data=False).graph
        for value in [*graph.input, *graph.output]:
            dims = value.type.tensor_type.shape.dim
            batch_axis = 1 if value.name.endswith(("_hidden", "_cell")) else 0
            assert dims[batch_axis].dim_param == "batch_size", (path, value.name)


def test_transformers_js_fp32_equals_transformers_and_vledge_runtime(exported, photos):
    """On the photo at the input size no resampler runs, so all three see the same pixels: equal ids."""
    from vledge.runtime import load

    out, _, expected = exported
    photo = photos[1]
    got = run_node(out, photo, {"vision_encoder": "fp32", "embed_tokens": "fp32", "decoder_model_merged": "fp32"})
    reference = expected[photo.name]
    eos = json.loads((out / "generation_config.json").read_text())["eos_token_id"]
    assert got["prompt_ids"] == reference["prompt_ids"]  # chat template + tokenizer + image token count
    runtime = load(out, precision="fp32", providers="cpu", threads=1)
    ours = runtime.ask(str(photo), QUESTION, GenerationOptions(max_new_tokens=NEW_TOKENS)).token_ids
    assert until_eos(got["ids"], eos) == until_eos(reference["ids"], eos) == ours
    assert len(ours) == NEW_TOKENS and len(set(ours)) > 3


def _with_selection(model_dir: Path, copy: Path, chosen: dict[str, str]) -> Path:
    """A copy whose transformers.js files are written for another selection of variants."""
    from vledge.export.transformers_js import write_transformers_js_files
    from vledge.manifest import read_manifest
    from vledge.tokenizer import Tokenizer

    shutil.copytree(model_dir, copy)
    manifest = read_manifest(copy)
    manifest.selected = {**manifest.selected, "cpu": chosen}
    tokenizer = Tokenizer.from_file(copy / "tokenizer.json", manifest.model_config.special_tokens)
    write_transformers_js_files(copy, manifest, tokenizer)
    assert json.loads((copy / "config.json").read_text())["transformers.js_config"]["dtype"] == chosen
    return copy


def test_transformers_js_quantized_agreement_is_reported(exported, photos, tmp_path, record_property, capsys):
    """Each variant through transformers.js: its agreement with transformers (fp32) and with vledge.runtime."""
    from vledge.runtime import load

    out, _, expected = exported
    photo = photos[1]
    manifest = json.loads((out / "vledge.json").read_text())
    eos = manifest["special_tokens"]["eos"]
    reference = until_eos(expected[photo.name]["ids"], eos)
    runs: dict[str, dict[str, str] | None] = {}
    for precision in ("fp16", "int8", "q4"):
        runs[precision] = {c: precision if precision in v else "fp32" for c, v in manifest["variants"].items()}
    report = {}
    for label, dtype in runs.items():
        got = until_eos(run_node(out, photo, dtype)["ids"], eos)
        runtime = load(out, precision=dtype or "auto", providers="cpu", threads=1)
        ours = runtime.ask(str(photo), QUESTION, GenerationOptions(max_new_tokens=NEW_TOKENS)).token_ids
        report[label] = {"dtype": dtype or manifest["selected"]["cpu"], "tokens": len(got),
                         "agreement_with_transformers_fp32": agreement(got, reference),
                         "agreement_with_vledge_runtime": agreement(got, ours)}
        assert got, f"{label}: transformers.js produced no token"
    # A selection naming quantized graphs (the tiny models' fp32 is fastest, so the gate keeps it): transformers.js
    # follows config.json's dtype to the _int8 and _q4 files.
    chosen = {"vision_encoder": "int8", "embed_tokens": "fp16", "decoder_model_merged": "q4"}
    got = until_eos(run_node(_with_selection(out, tmp_path / "selected", chosen), photo)["ids"], eos)
    runtime = load(out, precision=chosen, providers="cpu", threads=1)
    ours = runtime.ask(str(photo), QUESTION, GenerationOptions(max_new_tokens=NEW_TOKENS)).token_ids
    report["config.json dtype " + json.dumps(chosen)] = {
        "agreement_with_transformers_fp32": agreement(got, reference),
        "agreement_with_vledge_runtime": agreement(got, ours)}
    full = photos[0]  # transformers.js in Node resizes without antialiasing: its pixels differ from Pillow's
    got = until_eos(run_node(out, full, {c: "fp32" for c in manifest["variants"]})["ids"], eos)
    report["fp32, 512 x 512 photo (resized by each library)"] = {
        "agreement_with_transformers_fp32": agreement(got, until_eos(expected[full.name]["ids"], eos))}
    record_property("transformers_js_agreement", json.dumps(report))
    with capsys.disabled():
        print(f"\ntransformers.js agreement, {out.parent.name}: {json.dumps(report)}")


def _to_old_layout(model_dir: Path, old: Path) -> None:
    """What an export before the transformers.js files wrote: ``image_embeds``, axis ``batch``, no JSON files."""
    import onnx

    shutil.copytree(model_dir, old)
    for name in JSON_FILES:
        (old / name).unlink()
    manifest = json.loads((old / "vledge.json").read_text())
    for path in {p for variants in manifest["variants"].values() for p in variants.values()}:
        graph_model = onnx.load(str(old / path))
        graph = graph_model.graph
        for value in [*graph.input, *graph.output]:
            for dim in value.type.tensor_type.shape.dim:
                if dim.dim_param == "batch_size":
                    dim.dim_param = "batch"
        for node in graph.node:
            node.output[:] = ["image_embeds" if o == "image_features" else o for o in node.output]
        for value in graph.output:
            if value.name == "image_features":
                value.name = "image_embeds"
        onnx.save(graph_model, str(old / path))
    manifest["tensors"]["vision_encoder"]["outputs"] = ["image_embeds"]
    manifest["files"] = {name: {"sha256": hashlib.sha256((old / name).read_bytes()).hexdigest(),
                                "size": (old / name).stat().st_size}
                         for name in manifest["files"] if name not in JSON_FILES}
    (old / "vledge.json").write_text(json.dumps(manifest, indent=2))


def test_directories_written_before_still_load(exported, photos, tmp_path):
    from vledge.runtime import load

    out, _, _ = exported
    old = tmp_path / "old"
    _to_old_layout(out, old)
    import onnx

    assert [o.name for o in onnx.load(str(old / "onnx" / "vision_encoder.onnx")).graph.output] == ["image_embeds"]
    answers = []
    for model_dir in (out, old):
        runtime = load(model_dir, precision="fp32", providers="cpu", threads=1)
        answers.append(runtime.ask(str(photos[1]), QUESTION, GenerationOptions(max_new_tokens=NEW_TOKENS)).token_ids)
    assert answers[0] == answers[1] and len(answers[0]) == NEW_TOKENS


def test_models_transformers_js_cannot_express_get_one_line_and_no_files(tiny_model_dir, tmp_path, caplog):
    from vledge.config import preset
    from vledge.export.transformers_js import unsupported_reason, write_transformers_js_files
    from vledge.manifest import read_manifest
    from vledge.tokenizer import Tokenizer

    for name, words in (("tiny", "vision tower is 'convnet'"), ("seed-lstm", "vision tower is 'resnet18'")):
        assert words in unsupported_reason(preset(name)[0])
    assert not any((tiny_model_dir / name).exists() for name in JSON_FILES)
    manifest = read_manifest(tiny_model_dir)
    tokenizer = Tokenizer.from_file(tiny_model_dir / "tokenizer.json", manifest.model_config.special_tokens)
    with caplog.at_level(logging.INFO, logger="vledge.export.transformers_js"):
        assert write_transformers_js_files(tmp_path, manifest, tokenizer) == []
    lines = [r.getMessage() for r in caplog.records if r.name == "vledge.export.transformers_js"]
    assert len(lines) == 1 and "transformers.js" in lines[0] and "convnet" in lines[0]
    assert list(tmp_path.iterdir()) == []


def test_language_models_transformers_js_cannot_express_are_named():
    import dataclasses

    from vledge.config import ViTConfig, VisionConfig, language_config, preset
    from vledge.export.transformers_js import model_types, unsupported_reason

    config = preset("tiny")[0]
    clip = VisionConfig(backbone="clip", vit=ViTConfig(family="clip", hidden=32, layers=2, heads=4, intermediate=64,
                                                      patch_size=8, image_size=32))
    gpt = dataclasses.replace(config, vision=clip)
    assert "language model is 'transformer'" in unsupported_reason(gpt)
    numbers = dict(hidden=64, layers=2, heads=4, kv_heads=2, intermediate=112)
    for kind in ("llama", "qwen2", "mistral"):
        assert model_types(dataclasses.replace(gpt, language=language_config(kind, **numbers))) == (
            "clip_vision_model", kind)
    # a checkpoint from before the families read every Llama-family LM as kind "llama": its source tells
    old_qwen2 = language_config("llama", qkv_bias=True, source={"architecture": "Qwen2ForCausalLM"}, **numbers)
    assert model_types(dataclasses.replace(gpt, language=old_qwen2)) == ("clip_vision_model", "qwen2")


def test_chat_template_renders_vledge_prompt(exported):
    """tokenizer_config.json's template renders the manifest's prompt; a first question tokenizes to vledge's ids."""
    import jinja2

    from vledge.manifest import read_manifest
    from vledge.prompt import question_ids
    from vledge.tokenizer import Tokenizer

    out, _, _ = exported
    manifest = read_manifest(out)
    tokenizer = Tokenizer.from_file(out / "tokenizer.json", manifest.model_config.special_tokens)
    settings = json.loads((out / "tokenizer_config.json").read_text())
    template = jinja2.Environment().from_string(settings["chat_template"])
    tokens = {"bos_token": settings.get("bos_token"), "eos_token": settings["eos_token"]}
    text = template.render(messages=MESSAGES, add_generation_prompt=True, **tokens)
    expected = question_ids(tokenizer, manifest.prompt, QUESTION)
    assert tokenizer.backend.encode(text, add_special_tokens=True).ids == expected
    messages = [*MESSAGES, {"role": "assistant", "content": "a red square"},
                {"role": "user", "content": [{"type": "text", "text": "and the circle"}]}]
    p = manifest.prompt
    assert template.render(messages=messages, add_generation_prompt=True, **tokens) == (
        text + p.answer_prefix + "a red square" + settings["eos_token"] + p.turn_separator + p.user + "and the circle"
        + p.assistant)

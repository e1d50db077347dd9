"""Export: graphs that match PyTorch step by step, the parity gate, the manifest and safe writing."""

from __future__ import annotations

import json
import os
import pickle
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from conftest import export_tiny
from vledge.checkpoint import load_checkpoint
from vledge.decoding import GenerationOptions, left_pad
from vledge.errors import CheckpointError, ExportError, ModelDirError
from vledge.manifest import COMPONENTS, MANIFEST_NAME, read_manifest
from vledge.prompt import question_ids

QUESTIONS = ["What is in this image?", "How many shapes are there?", "What color is the circle at the top left?"]


def _torch_and_runtime(run, model_dir):
    from vledge.runtime import load

    checkpoint = load_checkpoint(run.best_checkpoint)
    return checkpoint.build_model(), checkpoint.tokenizer(), load(model_dir, precision="fp32", providers="cpu",
                                                                  threads=1)


def _images(synth_data: Path, count: int) -> list[Path]:
    return sorted((synth_data / "images").rglob("*.jpg"))[:count]


@pytest.mark.parametrize("kind", ["transformer", "lstm"])
def test_prefill_and_decode_steps_match_pytorch(kind, tiny_run, tiny_lstm_run, tiny_model_dir, tiny_lstm_model_dir,
                                                synth_data):
    """Batch of 3 prompts of different lengths (left-padded), prefill + 10 teacher-forced decode steps."""
    from vledge.data.images import preprocess
    from vledge.models.generate import TorchLSTMSteps, TorchTransformerSteps

    run, model_dir = (tiny_run, tiny_model_dir) if kind == "transformer" else (tiny_lstm_run, tiny_lstm_model_dir)
    model, tokenizer, runtime = _torch_and_runtime(run, model_dir)
    config = model.config
    pixels = torch.stack([preprocess(p, config.preprocess) for p in _images(synth_data, 3)])
    prompts = [question_ids(tokenizer, config.prompt, q) for q in QUESTIONS]
    assert len({len(p) for p in prompts}) > 1, "prompts must differ in length to exercise padding"
    with torch.inference_mode():
        image_embeds = model.encode_images(pixels)
        if kind == "transformer":
            ids, mask = left_pad(prompts, tokenizer.pad_id)
            merged = model.merge(torch.as_tensor(ids), image_embeds, torch.as_tensor(mask))
            reference = TorchTransformerSteps(model, merged.inputs_embeds, merged.attention_mask)
        else:
            rows = [model.merge(torch.as_tensor([p]), image_embeds[i:i + 1]).inputs_embeds[0]
                    for i, p in enumerate(prompts)]
            reference = TorchLSTMSteps(model, rows)
        ours_embeds = runtime.graphs.encode_images(pixels.numpy())
        np.testing.assert_allclose(ours_embeds, image_embeds.numpy(), atol=1e-5, rtol=1e-4)
        steps, _ = runtime.prefill(image_embeds.numpy(), prompts, GenerationOptions(max_new_tokens=16))
        ref_logits = reference.first_logits
        np.testing.assert_allclose(steps.first_logits, ref_logits, atol=1e-4, rtol=1e-4)
        rng = np.random.default_rng(0)
        for step in range(10):
            # Greedy tokens on even steps, random ones on odd steps, so paths leave the model's comfort zone.
            tokens = ref_logits.argmax(-1) if step % 2 == 0 else rng.integers(5, tokenizer.vocab_size, size=3)
            assert np.array_equal(np.argmax(steps.first_logits if step == 0 else ours, -1), ref_logits.argmax(-1))
            ref_logits = reference.step(tokens)
            ours = steps.step(tokens)
            np.testing.assert_allclose(ours, ref_logits, atol=1e-4, rtol=1e-4, err_msg=f"decode step {step}")


@pytest.mark.parametrize("kind", ["transformer", "lstm"])
def test_greedy_generation_equals_pytorch_batched_and_single(kind, tiny_run, tiny_lstm_run, tiny_model_dir,
                                                             tiny_lstm_model_dir, synth_data):
    from vledge.data.images import preprocess
    from vledge.models.generate import generate

    run, model_dir = (tiny_run, tiny_model_dir) if kind == "transformer" else (tiny_lstm_run, tiny_lstm_model_dir)
    model, tokenizer, runtime = _torch_and_runtime(run, model_dir)
    paths = _images(synth_data, 3)
    pixels = torch.stack([preprocess(p, model.config.preprocess) for p in paths])
    prompts = [question_ids(tokenizer, model.config.prompt, q) for q in QUESTIONS]
    options = GenerationOptions(max_new_tokens=12)
    expected = generate(model, pixels, prompts, options, tokenizer.eos_id, tokenizer.pad_id)
    batched = runtime.generate_from_pixels(pixels.numpy(), QUESTIONS, options)
    assert [r.token_ids for r in batched] == expected
    for row in range(3):
        single = runtime.generate_from_pixels(pixels[row:row + 1].numpy(), [QUESTIONS[row]], options)
        assert single[0].token_ids == expected[row]


def test_graphs_pass_onnx_checks_with_dynamic_axes(tiny_model_dir):
    manifest = read_manifest(tiny_model_dir)
    for component in COMPONENTS:
        path = tiny_model_dir / manifest.variants[component]["fp32"]
        graph = onnx.load(str(path))
        onnx.checker.check_model(graph, full_check=True)
        assert max(o.version for o in graph.opset_import if o.domain in ("", "ai.onnx")) >= 17
        first = graph.graph.input[0].type.tensor_type.shape.dim[0]
        assert first.dim_param, f"{component}: batch axis must be dynamic"
    decoder = onnx.load(str(tiny_model_dir / manifest.variants["decoder_model_merged"]["fp32"]))
    names = [i.name for i in decoder.graph.input]
    assert names == manifest.tensors["decoder_model_merged"]["inputs"]
    past = next(i for i in decoder.graph.input if i.name == "past_key_values.0.key")
    assert past.type.tensor_type.shape.dim[2].dim_param, "past axis must be dynamic"
    assert not any(node.op_type == "If" for node in decoder.graph.node), "the merged decoder must not branch"


def test_manifest_records_everything_a_runtime_needs(tiny_model_dir, tiny_run):
    data = json.loads((tiny_model_dir / MANIFEST_NAME).read_text())
    for key in ("format", "format_version", "architecture", "special_tokens", "prompt", "preprocess", "tensors",
                "generation", "variants", "selected", "files", "parity", "provenance"):
        assert key in data, key
    assert data["provenance"]["checkpoint_sha256"] == __import__("vledge.checkpoint").checkpoint.file_sha256(
        tiny_run.best_checkpoint)
    for name, entry in data["files"].items():
        assert (tiny_model_dir / name).stat().st_size == entry["size"]
    fp32 = data["parity"]["variants"]["fp32"]
    assert fp32["image_embeds"]["within_fp32_tolerance"] and fp32["prefill_logits"]["within_fp32_tolerance"]
    assert fp32["generation"]["token_agreement"] == 1.0
    assert (tiny_model_dir / "parity.md").read_text().count("| fp32 |") == 1
    assert not list(tiny_model_dir.parent.glob(".*export*")), "no staging folder may remain"
    from vledge.export.parity import FP32_ATOL, FP32_MIN_TOKEN_AGREEMENT, FP32_RTOL

    assert data["parity"]["tolerance"] == {"atol": FP32_ATOL, "rtol": FP32_RTOL,
                                           "min_token_agreement": FP32_MIN_TOKEN_AGREEMENT}


def test_every_quantized_variant_is_measured(tiny_model_dir):
    manifest = read_manifest(tiny_model_dir)
    measured = manifest.parity["variants"]
    not_measured = manifest.parity["not_measured"]
    for component in COMPONENTS:
        for precision in manifest.precisions(component):
            if precision == "fp32":
                continue
            label = f"{component}:{precision}"
            assert label in measured or label in not_measured, label
    assert "decoder_model_merged:int8" in measured and "decoder_model_merged:q4" in measured
    assert "vision_encoder:int8" in measured
    for component, precision in manifest.selected["cpu"].items():
        assert precision in manifest.precisions(component)


def test_failed_parity_gate_writes_nothing(tiny_run, synth_data, tmp_path, monkeypatch):
    import vledge.export.parity as parity

    monkeypatch.setattr(parity, "FP32_ATOL", 0.0)  # no real export is bit-exact: the gate must now fail
    monkeypatch.setattr(parity, "FP32_RTOL", 0.0)
    with pytest.raises(ExportError, match="does not match the PyTorch model"):
        export_tiny(tiny_run, synth_data, tmp_path / "model", parity_samples=4)
    assert list(tmp_path.iterdir()) == []


def test_interrupted_export_leaves_no_directory(tiny_run, synth_data, tmp_path, monkeypatch):
    import importlib

    exporter = importlib.import_module("vledge.export.export")  # the package re-exports a function of that name

    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(exporter, "write_parity_markdown", interrupt)
    with pytest.raises(KeyboardInterrupt):
        export_tiny(tiny_run, synth_data, tmp_path / "model", parity_samples=4)
    assert list(tmp_path.iterdir()) == []


def test_existing_directory_needs_force(tiny_run, synth_data, tmp_path):
    out = tmp_path / "model"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(ExportError, match="already exists"):
        export_tiny(tiny_run, synth_data, out, parity_samples=4)
    assert (out / "keep.txt").read_text() == "mine"
    from vledge.export import ExportOptions, export

    export(tiny_run.best_checkpoint, out, ExportOptions(quantize=("none",), data=synth_data, parity_samples=4,
                                                        force=True))
    assert not (out / "keep.txt").exists() and (out / MANIFEST_NAME).is_file()
    assert [p.name for p in tmp_path.iterdir()] == ["model"]


def test_bad_checkpoints_get_clear_errors(tmp_path, tiny_run):
    from vledge.export import export

    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    cases = {}
    cases["pickle"] = tmp_path / "evil.pt"
    with open(cases["pickle"], "wb") as handle:
        pickle.dump(Payload(), handle)
    cases["truncated"] = tmp_path / "truncated.pt"
    data = tiny_run.best_checkpoint.read_bytes()
    cases["truncated"].write_bytes(data[: len(data) // 2])
    cases["foreign"] = tmp_path / "foreign.pt"
    torch.save({"weights": torch.zeros(2)}, cases["foreign"])
    cases["text"] = tmp_path / "notes.pt"
    cases["text"].write_text("hello")
    for name, path in cases.items():
        with pytest.raises(CheckpointError) as error:
            export(path, tmp_path / f"out-{name}")
        assert str(path) in str(error.value)
        assert not (tmp_path / f"out-{name}").exists()
    assert not marker.exists()


def test_tampered_or_unsafe_model_directory_is_refused(tiny_model_dir, tmp_path):
    from vledge.runtime import load

    copy = tmp_path / "model"
    shutil.copytree(tiny_model_dir, copy)
    decoder = copy / "onnx" / "decoder_model_merged.onnx"
    data = bytearray(decoder.read_bytes())
    data[len(data) // 2] ^= 0xFF
    decoder.write_bytes(bytes(data))
    with pytest.raises(ModelDirError, match="decoder_model_merged.onnx.*sha256"):
        load(copy)

    shutil.rmtree(copy)
    shutil.copytree(tiny_model_dir, copy)
    (copy / "tokenizer.json").unlink()
    with pytest.raises(ModelDirError, match="missing tokenizer.json"):
        load(copy)

    for bad in ("../outside.onnx", "/etc/passwd"):
        shutil.rmtree(copy)
        shutil.copytree(tiny_model_dir, copy)
        manifest = json.loads((copy / MANIFEST_NAME).read_text())
        entry = manifest["files"].pop("onnx/embed_tokens.onnx")
        manifest["files"][bad] = entry
        manifest["variants"]["embed_tokens"]["fp32"] = bad
        (copy / MANIFEST_NAME).write_text(json.dumps(manifest))
        with pytest.raises(ModelDirError, match="unsafe path|outside"):
            load(copy)

    shutil.rmtree(copy)
    shutil.copytree(tiny_model_dir, copy)
    outside = tmp_path / "elsewhere.onnx"
    shutil.copy(copy / "onnx" / "embed_tokens.onnx", outside)
    (copy / "onnx" / "embed_tokens.onnx").unlink()
    (copy / "onnx" / "embed_tokens.onnx").symlink_to(outside)
    with pytest.raises(ModelDirError, match="outside"):
        load(copy)


def test_external_data_references_must_stay_inside(tiny_model_dir, tmp_path):
    """A graph whose weights live in an external file outside the directory is refused before loading."""
    from onnx.external_data_helper import convert_model_to_external_data

    from vledge.manifest import FileEntry, sha256_of, verify_file

    copy = tmp_path / "model"
    shutil.copytree(tiny_model_dir, copy)
    graph = onnx.load(str(copy / "onnx" / "embed_tokens.onnx"))
    convert_model_to_external_data(graph, all_tensors_to_one_file=True, location="embed.data", size_threshold=0)
    onnx.save(graph, str(copy / "onnx" / "embed_tokens.onnx"))
    entry = FileEntry(sha256_of(copy / "onnx" / "embed_tokens.onnx"),
                      (copy / "onnx" / "embed_tokens.onnx").stat().st_size)
    listed = {"onnx/embed_tokens.onnx", "onnx/embed.data"}
    verify_file(copy, "onnx/embed_tokens.onnx", entry, listed)  # inside and listed: fine
    with pytest.raises(ModelDirError, match="does not hash"):
        verify_file(copy, "onnx/embed_tokens.onnx", entry, {"onnx/embed_tokens.onnx"})
    for tensor in graph.graph.initializer:
        for item in tensor.external_data:
            if item.key == "location":
                item.value = "../../stolen.data"
    escaped = copy / "onnx" / "escaped.onnx"
    onnx.save(graph, str(escaped))
    entry = FileEntry(sha256_of(escaped), escaped.stat().st_size)
    with pytest.raises(ModelDirError, match="outside the model directory"):
        verify_file(copy, "onnx/escaped.onnx", entry, listed)


@pytest.mark.parametrize("norm", [False, True])
def test_tracing_leaves_the_reference_model_untouched(norm, tmp_path):
    """The parity reference must stay the checkpoint's model: tracing may not update BatchNorm statistics."""
    import onnxruntime as ort

    from vledge.config import preset
    from vledge.export.graphs import export_graphs
    from vledge.models.vlm import VisionLanguageModel

    from vledge.config import ProjectorConfig

    config, _ = preset("small")  # the convnet with its patch shortcut, the case that once drifted
    config.language.vocab_size = 300
    config.projector = ProjectorConfig("mlp2x_gelu", norm=norm, positions=norm)
    torch.manual_seed(0)
    model = VisionLanguageModel(config, image_token_id=4).eval()
    before = {name: value.clone() for name, value in model.state_dict().items()}
    pixels = torch.randn(2, 3, 48, 48)
    with torch.inference_mode():
        expected = model.encode_images(pixels).numpy()
    paths = export_graphs(model, tmp_path)
    changed = [name for name, value in model.state_dict().items() if not torch.equal(before[name], value)]
    assert changed == []
    session = ort.InferenceSession(str(paths["vision_encoder"]), providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(session.run(None, {"pixel_values": pixels.numpy()})[0], expected, atol=1e-5, rtol=1e-4)


def _modes(root: Path) -> tuple[set[int], set[int]]:
    """(file modes, folder modes) of everything under ``root``, ``root`` itself included."""
    files, folders = set(), {root.stat().st_mode & 0o777}
    for path in root.rglob("*"):
        (folders if path.is_dir() else files).add(path.stat().st_mode & 0o777)
    return files, folders


@pytest.mark.parametrize("umask, file_mode, folder_mode", [(0o022, 0o644, 0o755), (0o077, 0o600, 0o700)])
def test_export_writes_ordinary_modes_under_the_umask(tiny_run, synth_data, tmp_path, umask, file_mode,
                                                      folder_mode):
    """A model directory copied to a server must be readable by its service user (umask 022: 0644/0755)."""
    previous = os.umask(umask)
    try:
        out = export_tiny(tiny_run, synth_data, tmp_path / "model",
                          quantize=("int8",) if umask == 0o022 else ("none",), parity_samples=8).model_dir
    finally:
        os.umask(previous)
    files, folders = _modes(out)
    assert any(path.suffix == ".onnx" for path in out.rglob("*"))
    assert files == {file_mode}, sorted(oct(mode) for mode in files)
    assert folders == {folder_mode}, sorted(oct(mode) for mode in folders)


def _obeying_file_modes():
    """preexec_fn for a child that obeys file modes even as root: it drops CAP_DAC_OVERRIDE and
    CAP_DAC_READ_SEARCH from its bounding set, so the program it runs starts without them. None when not root."""
    import ctypes

    if os.geteuid() != 0:
        return None
    libc = ctypes.CDLL(None, use_errno=True)

    def drop() -> None:
        for capability in (1, 2):  # CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH
            if libc.prctl(24, capability, 0, 0, 0) != 0:  # PR_CAPBSET_DROP
                raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP) failed")

    return drop


def test_an_unreadable_graph_is_a_model_dir_error_naming_it(tiny_model_dir, synth_data, tmp_path):
    import subprocess
    import sys

    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    graph = read_manifest(model).variants["decoder_model_merged"]["fp32"]
    os.chmod(model / graph, 0)
    try:
        done = subprocess.run([sys.executable, "-m", "vledge", "caption", "--model", str(model), "--precision",
                               "fp32", str(_images(synth_data, 1)[0])], capture_output=True, text=True, timeout=300,
                              preexec_fn=_obeying_file_modes())
    except subprocess.SubprocessError as exc:
        if os.geteuid() == 0:
            pytest.skip(f"cannot drop root's file-permission override here ({exc})")
        raise
    finally:
        os.chmod(model / graph, 0o644)
    assert done.returncode != 0
    assert "Traceback" not in done.stderr, done.stderr
    assert "Error: ModelDirError:" in done.stderr and graph in done.stderr, done.stderr


def test_export_to_an_unwritable_place_is_one_output_error_line(tiny_run, tmp_path):
    from click.testing import CliRunner

    from vledge.cli import main

    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    result = CliRunner().invoke(main, ["export", str(tiny_run.best_checkpoint), "-o", str(blocker / "model")])
    assert result.exit_code != 0
    assert "Error: OutputError: cannot write" in result.output and "a-file/model" in result.output, result.output
    assert "Traceback" not in result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file"]


def _measured(agreement: float, accuracy_delta: float, decode_ms: float):
    from vledge.export.parity import Agreement, Drift, VariantParity

    drift = Drift(0.0, 0.0, 1.0, True)
    return VariantParity(precisions={}, image_embeds=drift, prefill_logits=drift,
                         generation=Agreement(agreement, agreement, None, None, None), accuracy={"overall": 0.0},
                         accuracy_delta=accuracy_delta, questions=10,
                         latency_ms={"vision_ms": 1.0, "embed_ms": 1.0, "decode_step_ms": decode_ms})


def test_auto_passes_over_a_fast_variant_that_does_not_pick_pytorchs_tokens():
    """Accuracy alone says nothing when the reference scores 0%: token agreement must hold too."""
    from vledge.errors import ConfigError
    from vledge.export import ExportOptions
    from vledge.export.export import _select

    variants = {"vision_encoder": {"fp32": "v.onnx"}, "embed_tokens": {"fp32": "e.onnx"},
                "decoder_model_merged": {"fp32": "d.onnx", "int8": "d8.onnx", "q4": "d4.onnx"}}
    parity = {"fp32": _measured(1.0, 0.0, 1.0),
              "decoder_model_merged:int8": _measured(0.99, 0.0, 0.8),
              "decoder_model_merged:q4": _measured(0.17, 0.0, 0.5)}  # fastest, same (zero) accuracy, wrong tokens
    assert _select(parity, variants, ExportOptions())["cpu"]["decoder_model_merged"] == "int8"
    lenient = ExportOptions(min_token_agreement=0.1)
    assert _select(parity, variants, lenient)["cpu"]["decoder_model_merged"] == "q4"
    with pytest.raises(ConfigError, match="min_token_agreement"):
        ExportOptions(min_token_agreement=1.5)


@pytest.mark.slow
def test_export_keeps_the_onnx_tools_warnings_out_of_the_terminal(tiny_run, synth_data, tmp_path):
    """Shape inference and "consider pre-processing" go to the debug log; the fp16 variants, built for CUDA and
    not measured on a CPU-only machine, are explained in plain words instead of a row of WARNING lines."""
    import subprocess
    import sys

    command = [sys.executable, "-m", "vledge", "export", str(tiny_run.best_checkpoint), "-o", str(tmp_path / "m"),
               "--quantize", "auto", "--calibration-data", str(synth_data)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "WARNING" not in done.stderr and "consider" not in done.stderr, done.stderr
    fp16_lines = [line for line in done.stderr.splitlines() if ":fp16: built for CUDA" in line]
    assert len(fp16_lines) == 3 and all("not measured" in line for line in fp16_lines), done.stderr

    debug = subprocess.run([sys.executable, "-m", "vledge", "-vv", "export", str(tiny_run.best_checkpoint), "-o",
                            str(tmp_path / "m2"), "--quantize", "auto", "--calibration-data", str(synth_data)],
                           capture_output=True, text=True, timeout=600)
    assert debug.returncode == 0, debug.stderr[-2000:]
    assert "vledge.export.tool_warnings" in debug.stderr and "said:" in debug.stderr  # kept, at debug level

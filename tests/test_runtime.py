"""The torch-free runtime: parity with PyTorch through its own preprocessing, generation options,
typed errors for bad inputs, thread safety, providers, and the ``caption`` / ``ask`` commands."""

from __future__ import annotations

import json
import shutil
import struct
import subprocess
import sys
import threading
import zlib
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from vledge.decoding import GenerationOptions, log_softmax
from vledge.errors import ConfigError, ImageError, ModelDirError, ProviderError
from vledge.manifest import MANIFEST_NAME

QUESTIONS = ["What is in this image?", "How many shapes are there?", "What color is the circle at the top left?",
             "Describe the image briefly.", "Is the red square above the blue circle?"]


def _images(synth_data: Path, count: int, start: int = 0) -> list[Path]:
    return sorted((synth_data / "images").rglob("*.jpg"))[start:start + count]


def _load(model_dir, **kwargs):
    from vledge.runtime import load

    kwargs.setdefault("providers", "cpu")
    kwargs.setdefault("threads", 1)
    return load(model_dir, **kwargs)


@pytest.fixture(scope="module")
def fp32(tiny_model_dir):
    return _load(tiny_model_dir, precision="fp32")


@pytest.fixture(scope="module")
def lstm(tiny_lstm_model_dir):
    return _load(tiny_lstm_model_dir, precision="fp32")


# --------------------------------------------------------------------------- no torch


def test_runtime_captions_a_file_with_torch_blocked(tiny_model_dir, synth_data):
    image = _images(synth_data, 1)[0]
    code = (
        "import sys, json; sys.modules['torch'] = None; sys.modules['torchvision'] = None\n"
        "import vledge.runtime as rt\n"
        f"model = rt.load({str(tiny_model_dir)!r}, providers='cpu', threads=1)\n"
        f"result = model.caption({str(image)!r})\n"
        "assert not any(name == 'torch' or name.startswith('torch.') for name, m in sys.modules.items() if m)\n"
        "print(json.dumps({'text': result.text, 'tokens': result.token_ids, 'info': model.info()['provider']}))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    output = json.loads(done.stdout.strip().splitlines()[-1])
    assert output["info"] == "CPUExecutionProvider"
    assert output["tokens"] == _load(tiny_model_dir).caption(image).token_ids


# --------------------------------------------------------------------------- parity with PyTorch


@pytest.mark.parametrize("kind", ["transformer", "lstm"])
def test_greedy_from_image_files_equals_pytorch(kind, tiny_run, tiny_lstm_run, tiny_model_dir, tiny_lstm_model_dir,
                                               synth_data):
    """Runtime preprocessing (OpenCV) + ONNX graphs vs training preprocessing (Pillow) + PyTorch, same files."""
    import torch

    from vledge.checkpoint import load_checkpoint
    from vledge.data.images import preprocess
    from vledge.models.generate import generate
    from vledge.prompt import question_ids

    run, model_dir = (tiny_run, tiny_model_dir) if kind == "transformer" else (tiny_lstm_run, tiny_lstm_model_dir)
    checkpoint = load_checkpoint(run.best_checkpoint)
    model, tokenizer = checkpoint.build_model().eval(), checkpoint.tokenizer()
    runtime = _load(model_dir, precision="fp32")
    paths = _images(synth_data, 5, start=3)
    torch_pixels = torch.stack([preprocess(p, model.config.preprocess) for p in paths])
    ours_pixels = runtime.preprocessor.batch([str(p) for p in paths])
    std = np.asarray(model.config.preprocess.std, dtype=np.float32)[None, :, None, None]
    difference = np.abs(ours_pixels - torch_pixels.numpy()) * std  # in [0, 1] pixel units
    assert difference.max() <= 1 / 255 + 1e-6, "the pipelines differ by more than one grey level"
    assert difference.mean() <= 1 / 255

    prompts = [question_ids(tokenizer, model.config.prompt, q) for q in QUESTIONS]
    assert len({len(p) for p in prompts}) > 1, "prompts must differ in length to exercise padding"
    for options in (GenerationOptions(max_new_tokens=12),
                    GenerationOptions(max_new_tokens=16, temperature=1.0, seed=11)):  # long, varied sequences
        expected = generate(model, torch_pixels, prompts, options, tokenizer.eos_id, tokenizer.pad_id)
        batched = runtime.generate([str(p) for p in paths], QUESTIONS, options)
        assert [r.token_ids for r in batched] == expected, f"batch of {len(paths)} ({options})"
        for row in (0, 3):
            # A batch shares one random stream, so a row alone is compared with PyTorch's row alone.
            alone = generate(model, torch_pixels[row:row + 1], prompts[row:row + 1], options, tokenizer.eos_id,
                             tokenizer.pad_id)[0]
            if options.temperature == 0:
                assert alone == expected[row]
            single = runtime.ask(paths[row], QUESTIONS[row], options)
            assert single.token_ids == alone, f"row {row} alone ({options})"
            assert single.text == tokenizer.decode(alone).strip()


# --------------------------------------------------------------------------- bad inputs


def _png_header_only(width: int, height: int) -> bytes:
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)

    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)) + chunk(
        b"IEND", b"")


def test_bad_images_get_typed_errors_naming_the_problem(fp32, synth_data, tmp_path):
    good = _images(synth_data, 1)[0]
    text_file = tmp_path / "notes.jpg"
    text_file.write_text("this is not an image")
    truncated = tmp_path / "truncated.jpg"
    truncated.write_bytes(good.read_bytes()[: len(good.read_bytes()) // 2])
    huge = tmp_path / "huge.png"
    huge.write_bytes(_png_header_only(9000, 9000))
    cases = [
        (tmp_path / "missing.jpg", "missing.jpg.*no such file"),
        (text_file, "notes.jpg"),
        (truncated, "truncated.jpg.*(truncated|cut short|corrupt)"),
        (np.zeros((0, 0, 3), np.uint8), "empty"),
        (np.zeros((32, 32, 3), np.float64), "dtype float64"),
        (huge, "9000x9000 pixels, over the limit"),
        (tmp_path, "directory"),
    ]
    for source, pattern in cases:
        with pytest.raises(ImageError, match=pattern):
            fp32.caption(source)
        with pytest.raises(ImageError, match=pattern):  # in a batch too, with the image's index
            fp32.generate([good, source])
    assert fp32.caption(good).token_ids  # still alive and answering


def test_bad_model_directories_and_options_get_typed_errors(tiny_model_dir, tiny_lstm_model_dir, tmp_path):
    from vledge.runtime import load

    with pytest.raises(ModelDirError, match="not found"):
        load(tmp_path / "nowhere")
    copy = tmp_path / "model"
    shutil.copytree(tiny_model_dir, copy)
    (copy / "onnx" / "embed_tokens.onnx").unlink()
    with pytest.raises(ModelDirError, match="missing onnx/embed_tokens.onnx"):
        load(copy)
    shutil.rmtree(copy)
    shutil.copytree(tiny_model_dir, copy)
    vision = copy / "onnx" / "vision_encoder.onnx"
    data = bytearray(vision.read_bytes())
    data[len(data) // 3] ^= 0x55
    vision.write_bytes(bytes(data))
    with pytest.raises(ModelDirError, match="vision_encoder.onnx.*sha256"):
        load(copy)
    (copy / MANIFEST_NAME).write_text("{not json")
    with pytest.raises(ModelDirError, match="cannot read"):
        load(copy)

    with pytest.raises(ConfigError, match="unknown precision 'int3'"):
        load(tiny_model_dir, precision="int3")
    with pytest.raises(ConfigError, match="unknown graphs"):
        load(tiny_model_dir, precision={"decoder": "int8"})
    with pytest.raises(ConfigError, match="no int8 variant"):
        load(tiny_lstm_model_dir, precision="int8")  # exported without quantized variants
    with pytest.raises(ConfigError, match="unknown execution provider"):
        load(tiny_model_dir, providers="quantum")
    with pytest.raises(ConfigError, match="threads"):
        load(tiny_model_dir, threads=0)
    with pytest.raises(ConfigError, match="optimisation level"):
        load(tiny_model_dir, optimization="ludicrous")


def test_explicit_cuda_runs_on_cuda_or_is_a_provider_error(tiny_model_dir, synth_data):
    """Where CUDA really works every graph runs on it; where it does not, asking for it is a ProviderError."""
    from vledge.runtime import load
    from vledge.runtime.providers import gpu_status

    status = gpu_status("CUDAExecutionProvider")
    image = _images(synth_data, 1)[0]
    if status.usable:
        for providers in ("cuda", "auto", ["CUDAExecutionProvider", "CPUExecutionProvider"]):
            model = load(tiny_model_dir, providers=providers, precision="fp32")
            info = model.info()
            assert info["provider"] == "CUDAExecutionProvider" and info["device"] == "cuda", info
            assert info["gpu_fallback"] is None
            assert all(names[0] == "CUDAExecutionProvider" for names in info["providers"].values()), info
            result = model.caption(image, GenerationOptions(max_new_tokens=8))
            assert result.finish_reason in ("stop", "length") and 1 <= len(result.token_ids) <= 8
        # On CUDA, "auto" takes the fp16 decoder the export made (integer MatMuls would fall back to the CPU).
        assert load(tiny_model_dir, providers="cuda").info()["precisions"]["decoder_model_merged"] == "fp16"
        return
    assert status.reason
    for providers in ("cuda", ["CUDAExecutionProvider", "CPUExecutionProvider"]):
        with pytest.raises(ProviderError, match="CUDAExecutionProvider") as error:
            load(tiny_model_dir, providers=providers)
        assert status.reason in str(error.value)
    model = load(tiny_model_dir, providers="auto", threads=1)  # auto falls back, and says so
    info = model.info()
    assert info["provider"] == "CPUExecutionProvider" and info["device"] == "cpu"
    if "CUDAExecutionProvider" in __import__("onnxruntime").get_available_providers():
        assert "CUDAExecutionProvider" in info["gpu_fallback"]


def test_generation_arguments_are_checked(fp32, synth_data):
    image = _images(synth_data, 1)[0]
    with pytest.raises(ConfigError, match="2 prompts for 1 images"):
        fp32.generate([image], ["a?", "b?"])
    with pytest.raises(ConfigError, match="at least one image"):
        fp32.generate([])
    with pytest.raises(ConfigError, match="exactly one image token"):
        fp32.ask(image, "What is <image> here?")
    with pytest.raises(ConfigError, match="GenerationOptions"):
        fp32.caption(image, options={"max_new_tokens": 3})
    with pytest.raises(ConfigError, match="pixel_values must have shape"):
        fp32.generate_from_pixels(np.zeros((1, 3, 5, 5), np.float32), ["a?"])


# --------------------------------------------------------------------------- threads


def test_eight_threads_share_one_model(fp32, synth_data):
    images = _images(synth_data, 16, start=10)
    jobs = [(images[(t * 10 + i) % len(images)], QUESTIONS[(t + i) % len(QUESTIONS)]) for t in range(8)
            for i in range(10)]
    options = GenerationOptions(max_new_tokens=12, temperature=0.8, seed=5)  # sampled: longer, varied answers
    expected = [fp32.ask(image, question, options).token_ids for image, question in jobs]
    results: dict[int, list[int]] = {}
    errors: list[BaseException] = []
    start = threading.Barrier(8)

    def worker(thread: int) -> None:
        try:
            start.wait()
            for i in range(10):
                index = thread * 10 + i
                results[index] = fp32.ask(*jobs[index], options).token_ids
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors
    assert [results[i] for i in range(len(jobs))] == expected


# --------------------------------------------------------------------------- generation options


def test_sampling_is_reproducible_and_depends_on_the_seed(fp32, synth_data):
    images = _images(synth_data, 3)

    def run(**options):
        return [r.token_ids for r in fp32.generate(images, options=GenerationOptions(max_new_tokens=16, **options))]

    hot = dict(temperature=1.0, top_k=50, top_p=0.95)
    assert run(seed=1, **hot) == run(seed=1, **hot)
    assert any(run(seed=s, **hot) != run(seed=1, **hot) for s in range(2, 6))
    assert run(temperature=1.0, top_k=1, seed=3) == run()  # top-1 sampling is greedy
    penalised = run(repetition_penalty=1.8)
    assert all(len(tokens) <= 16 for tokens in penalised)


def _sequence_log_prob(runtime, image, tokens: list[int], limit: int) -> float:
    """Beam search's score of ``tokens``: log p(tokens [+ eos unless cut at ``limit``] | image, caption prompt),
    teacher-forced through the runtime's own decoder."""
    from vledge.prompt import question_ids

    embeds = runtime.embed_images([image])
    prompt = question_ids(runtime.tokenizer, runtime.manifest.prompt, runtime.caption_prompt)
    steps, _ = runtime.prefill(embeds, [prompt], GenerationOptions(max_new_tokens=len(tokens) + 1))
    logits, total = steps.first_logits, 0.0
    for token in tokens + ([runtime.tokenizer.eos_id] if len(tokens) < limit else []):
        total += float(log_softmax(logits.astype(np.float64))[0, token])
        logits = steps.step(np.array([token]))
    return total


@pytest.mark.parametrize("kind", ["transformer", "lstm"])
def test_beam_search(kind, fp32, lstm, synth_data):
    runtime = fp32 if kind == "transformer" else lstm
    images = _images(synth_data, 3, start=20)
    options = dict(max_new_tokens=6)
    greedy = [r.token_ids for r in runtime.generate(images, options=GenerationOptions(**options))]
    one_beam = [r.token_ids for r in runtime.generate(images, options=GenerationOptions(num_beams=1, **options))]
    assert one_beam == greedy
    beams = runtime.generate(images, options=GenerationOptions(num_beams=4, length_penalty=0.0, **options))
    limit = options["max_new_tokens"]
    for row, image in enumerate(images):
        assert _sequence_log_prob(runtime, image, beams[row].token_ids, limit) >= _sequence_log_prob(
            runtime, image, greedy[row], limit) - 1e-4


def test_stop_strings_cut_the_text_and_end_generation(fp32, synth_data):
    image = _images(synth_data, 1, start=30)[0]
    for seed in range(20):
        options = GenerationOptions(max_new_tokens=24, temperature=1.0, seed=seed)
        full = fp32.caption(image, options)
        raw = fp32.tokenizer.decode(full.token_ids)
        # Two characters (no space) that the first half of the tokens completes: the stop ends generation early.
        words = [w for w in fp32.tokenizer.decode(full.token_ids[: len(full.token_ids) // 2]).split() if len(w) > 1]
        if len(full.token_ids) >= 4 and len(full.text) >= 8 and "\ufffd" not in raw and words:
            break
    else:
        pytest.skip("no seed gave a long enough caption")
    stop = words[-1][-2:]
    cut = fp32.caption(image, options, stop_strings=[stop, "never-appears"])
    assert cut.text == raw[: raw.find(stop)].strip()
    assert stop not in cut.text
    assert cut.finish_reason == "stop_string"
    assert cut.token_ids == full.token_ids[: len(cut.token_ids)] and len(cut.token_ids) < len(full.token_ids)
    streamed = "".join(fp32.stream(image, options=options, stop_strings=[stop]))
    assert streamed == cut.text


@pytest.mark.parametrize("kind", ["transformer", "lstm"])
def test_stream_pieces_join_to_the_caption(kind, fp32, lstm, synth_data):
    runtime = fp32 if kind == "transformer" else lstm
    images = _images(synth_data, 4, start=40)
    for index, image in enumerate(images):
        options = GenerationOptions(max_new_tokens=20, temperature=1.0, seed=index) if index else None
        pieces = list(runtime.stream(image, options=options))
        assert "".join(pieces) == runtime.caption(image, options).text
        assert all(pieces)
    seen: list[tuple[int, int]] = []
    result = runtime.caption(images[1], GenerationOptions(max_new_tokens=20, temperature=1.0, seed=1),
                             on_token=lambda row, token: seen.append((row, token)))
    assert [token for _, token in seen] == result.token_ids and {row for row, _ in seen} <= {0}
    beams = "".join(runtime.stream(images[2], options=GenerationOptions(num_beams=3, max_new_tokens=8)))
    assert beams == runtime.caption(images[2], GenerationOptions(num_beams=3, max_new_tokens=8)).text
    stream = runtime.stream(images[1], options=GenerationOptions(max_new_tokens=20, temperature=1.0, seed=1))
    next(stream, None)
    stream.close()  # stopping early is fine, and the model keeps working
    assert runtime.caption(images[0]).token_ids == runtime.caption(images[0]).token_ids


@pytest.mark.parametrize("kind", ["transformer", "lstm"])
def test_prefix_cache_gives_the_same_tokens_and_logits(kind, tiny_model_dir, tiny_lstm_model_dir, synth_data):
    from vledge.prompt import question_ids

    model_dir = tiny_model_dir if kind == "transformer" else tiny_lstm_model_dir
    cached = _load(model_dir, precision="fp32")
    plain = _load(model_dir, precision="fp32", prefix_cache=False)
    assert cached.info()["prefix_cache_tokens"] > 0 and plain.info()["prefix_cache_tokens"] == 0
    images = _images(synth_data, 5, start=50)
    embeds = cached.embed_images(images)
    prompts = [question_ids(cached.tokenizer, cached.manifest.prompt, q) for q in QUESTIONS]
    for _ in range(3):  # the cache must stay intact across calls
        np.testing.assert_allclose(cached.prefill_logits(embeds, prompts), plain.prefill_logits(embeds, prompts),
                                   atol=1e-5, rtol=1e-5)
        for row in (0, 4):
            np.testing.assert_allclose(cached.prefill_logits(embeds[row:row + 1], prompts[row:row + 1]),
                                       plain.prefill_logits(embeds[row:row + 1], prompts[row:row + 1]),
                                       atol=1e-5, rtol=1e-5)
    options = GenerationOptions(max_new_tokens=16, temperature=1.0, seed=2)
    assert [r.token_ids for r in cached.generate(images, QUESTIONS, options)] == [
        r.token_ids for r in plain.generate(images, QUESTIONS, options)]


def test_token_table_matches_the_embed_graph(fp32):
    ids = np.array([[0, 5, 17, fp32.tokenizer.eos_id], [3, 3, 2, 1]], dtype=np.int64)
    np.testing.assert_array_equal(fp32.graphs.lookup_ids(ids), fp32.graphs.embed_ids(ids))
    with pytest.raises(ConfigError, match="token ids"):
        fp32.graphs.lookup_ids(np.array([[fp32.graphs.vocab_size]]))


def test_an_8bit_token_table_loads_and_is_checked_like_the_float_one(tiny_model_dir, fp32):
    from vledge.manifest import read_manifest

    assert "int8" in read_manifest(tiny_model_dir).variants["embed_tokens"]
    quantized = _load(tiny_model_dir, precision={"embed_tokens": "int8"})
    assert quantized.precisions["embed_tokens"] == "int8"
    quantized.graphs.use_embed_table = False  # the graph each step, as for a table too big to read into memory
    ids = np.array([[0, 5, 17, fp32.tokenizer.eos_id], [3, 3, 2, 1]], dtype=np.int64)
    want, got = fp32.graphs.embed_ids(ids), quantized.graphs.lookup_ids(ids)
    assert np.abs(got - want).max() <= np.abs(want).max() / 127 + 1e-6 and not np.array_equal(got, 0 * got)
    with pytest.raises(ConfigError, match="token ids"):  # GatherBlockQuantized itself would return zeros
        quantized.graphs.lookup_ids(np.array([[quantized.graphs.vocab_size]]))


# --------------------------------------------------------------------------- precisions and placement


def test_info_and_placement_report_what_runs(fp32):
    info = fp32.info()
    assert info["provider"] == "CPUExecutionProvider"
    assert info["precisions"] == {"vision_encoder": "fp32", "embed_tokens": "fp32", "decoder_model_merged": "fp32"}
    assert all(providers == ["CPUExecutionProvider"] for providers in info["providers"].values())
    assert info["threads"] == 1 and info["device"] == "cpu"
    placement = fp32.placement()
    assert set(placement) == {"vision_encoder", "embed_tokens", "decoder_model_merged"}
    for component, by_provider in placement.items():
        assert set(by_provider) == {"CPUExecutionProvider"}, component
        assert sum(by_provider["CPUExecutionProvider"].values()) > 0
    assert "Conv" in "".join(placement["vision_encoder"]["CPUExecutionProvider"])
    assert any("MatMul" in op for op in placement["decoder_model_merged"]["CPUExecutionProvider"])


@pytest.mark.parametrize("precision", ["int8", "q4", "auto"])
def test_quantized_precisions_load_and_generate(precision, tiny_model_dir, synth_data):
    from vledge.manifest import read_manifest

    manifest = read_manifest(tiny_model_dir)
    runtime = _load(tiny_model_dir, precision=precision)
    if precision == "auto":
        assert runtime.precisions == manifest.selected["cpu"]
    else:
        assert runtime.precisions["decoder_model_merged"] == precision
        assert runtime.info()["precisions"]["decoder_model_merged"] == precision
    results = runtime.generate(_images(synth_data, 3), QUESTIONS[:3], GenerationOptions(max_new_tokens=8))
    assert len(results) == 3 and all(len(r.token_ids) <= 8 for r in results)
    assert all(r.timings.total_ms > 0 for r in results)
    mixed = _load(tiny_model_dir, precision={"decoder_model_merged": "int8", "vision_encoder": "fp32"})
    assert mixed.precisions["decoder_model_merged"] == "int8" and mixed.precisions["vision_encoder"] == "fp32"


def test_results_carry_timings(fp32, synth_data):
    result = fp32.caption(_images(synth_data, 1)[0], GenerationOptions(max_new_tokens=8, temperature=1.0, seed=4))
    timings = result.timings.to_dict()
    for key in ("preprocess_ms", "vision_ms", "prefill_ms", "decode_ms", "total_ms"):
        assert timings[key] >= 0
    assert timings["new_tokens"] == len(result.token_ids)
    assert json.loads(json.dumps(result.to_dict()))["token_ids"] == result.token_ids


# --------------------------------------------------------------------------- command line


def _folder(synth_data: Path, tmp_path: Path, count: int, broken: bool) -> tuple[Path, list[Path]]:
    folder = tmp_path / "photos"
    folder.mkdir()
    good = []
    for image in _images(synth_data, count, start=60):
        good.append(folder / image.name)
        shutil.copy(image, good[-1])
    if broken:
        (folder / "zz-broken.jpg").write_bytes(good[0].read_bytes()[:200])
    (folder / "readme.txt").write_text("not an image, skipped by extension")
    return folder, good


def test_cli_captions_a_folder_as_json_lines(tiny_model_dir, synth_data, tmp_path):
    from vledge.cli import main

    folder, good = _folder(synth_data, tmp_path, 4, broken=False)
    result = CliRunner().invoke(main, ["caption", "--model", str(tiny_model_dir), str(folder), "--jsonl",
                                       "--threads", "1", "--provider", "cpu", "--max-new-tokens", "8"])
    assert result.exit_code == 0, result.output
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert [line["image"] for line in lines] == [str(p) for p in good]
    runtime = _load(tiny_model_dir)
    for line, path in zip(lines, good):
        assert line["token_ids"] == runtime.caption(path, GenerationOptions(max_new_tokens=8)).token_ids
        assert isinstance(line["text"], str) and "timings_ms" in line

    pattern = str(folder / "*.jpg")
    batched = CliRunner().invoke(main, ["caption", "--model", str(tiny_model_dir), pattern, "--batch-size", "3",
                                        "--max-new-tokens", "8", "--precision", "fp32"])
    assert batched.exit_code == 0, batched.output
    assert batched.stdout.splitlines() == [f"{line['image']}: {line['text']}" for line in lines]


def test_cli_reports_bad_images_and_exits_1(tiny_model_dir, synth_data, tmp_path):
    from vledge.cli import main

    folder, good = _folder(synth_data, tmp_path, 3, broken=True)
    missing = tmp_path / "missing.jpg"
    result = CliRunner().invoke(main, ["caption", "--model", str(tiny_model_dir), str(folder), str(missing),
                                       "--jsonl", "--max-new-tokens", "6"])
    assert result.exit_code == 1
    assert "Traceback" not in result.output
    assert "zz-broken.jpg: error: ImageError" in result.stderr
    assert f"{missing}: error: ImageError" in result.stderr
    assert "2 of 5 images could not be read" in result.stderr
    records = [json.loads(line) for line in result.stdout.splitlines()]
    assert [r["image"] for r in records if "text" in r] == [str(p) for p in good]
    assert sorted(Path(r["image"]).name for r in records if "error" in r) == ["missing.jpg", "zz-broken.jpg"]


def test_cli_ask_and_engine_choice(tiny_model_dir, tiny_run, synth_data, tmp_path):
    from vledge.cli import main

    image = _images(synth_data, 1, start=70)[0]
    question = "How many shapes are there?"
    result = CliRunner().invoke(main, ["ask", "--model", str(tiny_model_dir), str(image), question,
                                       "--temperature", "1", "--seed", "3", "--max-new-tokens", "10"])
    assert result.exit_code == 0, result.output
    expected = _load(tiny_model_dir).ask(image, question, GenerationOptions(max_new_tokens=10, temperature=1.0,
                                                                            seed=3))
    assert result.stdout == f"{image}: {expected.text}\n"
    torch_result = CliRunner().invoke(main, ["ask", "--ckpt", str(tiny_run.best_checkpoint), str(image), question,
                                             "--jsonl", "--max-new-tokens", "10", "--num-beams", "2"])
    assert torch_result.exit_code == 0, torch_result.output
    assert json.loads(torch_result.stdout)["finish_reason"] in ("stop", "length")
    both = CliRunner().invoke(main, ["caption", "--model", str(tiny_model_dir), "--ckpt",
                                     str(tiny_run.best_checkpoint), str(image)])
    assert both.exit_code == 2 and "exactly one of --model" in both.output
    neither = CliRunner().invoke(main, ["caption", str(image)])
    assert neither.exit_code == 2
    cuda = CliRunner().invoke(main, ["caption", "--model", str(tiny_model_dir), "--provider", "cuda", str(image)])
    from vledge.runtime.providers import gpu_status

    if gpu_status("CUDAExecutionProvider").usable:
        assert cuda.exit_code == 0, cuda.output
        assert cuda.stdout.startswith(f"{image}: ") and cuda.stdout.count("\n") == 1
    else:
        assert cuda.exit_code == 1 and "ProviderError" in cuda.stderr and "Traceback" not in cuda.output


@pytest.mark.parametrize("kind", ["transformer", "lstm"])
def test_public_binding_path_gives_the_same_results(kind, tiny_model_dir, tiny_lstm_model_dir, synth_data):
    """The decode loop binds through ONNX Runtime's pybind object when it can; the public API path agrees."""
    model_dir = tiny_model_dir if kind == "transformer" else tiny_lstm_model_dir
    fast, public = _load(model_dir, precision="fp32"), _load(model_dir, precision="fp32")
    public.graphs.fast_binding = False
    from vledge.runtime.decoder import _Binder

    assert not _Binder(public.graphs).fast
    images = _images(synth_data, 3, start=80)
    for options in (GenerationOptions(max_new_tokens=12, temperature=1.0, seed=9),
                    GenerationOptions(max_new_tokens=6, num_beams=3)):
        assert [r.token_ids for r in fast.generate(images, QUESTIONS[:3], options)] == [
            r.token_ids for r in public.generate(images, QUESTIONS[:3], options)]


def test_fast_binding_can_be_turned_off(tiny_model_dir, synth_data):
    from vledge.runtime.decoder import _Binder

    public = _load(tiny_model_dir, precision="fp32", fast_binding=False)
    fast = _load(tiny_model_dir, precision="fp32")
    assert public.info()["fast_binding"] is False and not _Binder(public.graphs).fast
    assert fast.info()["fast_binding"] is True and _Binder(fast.graphs).fast
    images = _images(synth_data, 2, start=60)
    options = GenerationOptions(max_new_tokens=10)
    assert [r.token_ids for r in public.generate(images, QUESTIONS[:2], options)] == [
        r.token_ids for r in fast.generate(images, QUESTIONS[:2], options)]


class _ChangedBinding:
    """ONNX Runtime's private IOBinding object as a later release might change it: one call's signature differs."""

    def __init__(self, binding, failing: str) -> None:
        self._binding, self._failing = binding, failing

    def __getattr__(self, name):
        if name == self._failing:
            def changed(*args):
                raise TypeError(f"{name}(): incompatible function arguments")
            return changed
        return getattr(self._binding, name)


@pytest.mark.parametrize("kind", ["transformer", "lstm"])
@pytest.mark.parametrize("failing", ["bind_ortvalue_input", "bind_output", "get_outputs"])
def test_fast_binding_falls_back_when_a_call_fails(kind, failing, tiny_model_dir, tiny_lstm_model_dir, synth_data,
                                                   monkeypatch, caplog):
    """A failing call through the private objects switches the model to the public IOBinding API, same tokens."""
    from vledge.runtime import decoder

    model_dir = tiny_model_dir if kind == "transformer" else tiny_lstm_model_dir
    images = _images(synth_data, 2, start=70)
    options = GenerationOptions(max_new_tokens=10, temperature=1.0, seed=4)  # sampled: long enough to step
    expected = [r.token_ids for r in _load(model_dir, precision="fp32", fast_binding=False).generate(
        images, QUESTIONS[:2], options)]
    runtime = _load(model_dir, precision="fp32")
    original_init = decoder._Binder.__init__

    def changed_init(self, graphs):
        original_init(self, graphs)
        if self.fast:
            self._c = _ChangedBinding(self._c, failing)

    assert max(len(tokens) for tokens in expected) > 1
    monkeypatch.setattr(decoder._Binder, "__init__", changed_init)
    with caplog.at_level("WARNING", logger="vledge.runtime.decoder"):
        assert [r.token_ids for r in runtime.generate(images, QUESTIONS[:2], options)] == expected
    assert runtime.info()["fast_binding"] is False
    assert sum("public IOBinding API" in record.getMessage() for record in caplog.records) == 1
    assert [r.token_ids for r in runtime.generate(images, QUESTIONS[:2], options)] == expected


def test_decode_steps_past_the_planned_capacity(fp32, synth_data):
    """The attention-mask buffer is sized for max_new_tokens; stepping further grows it, same logits."""
    from vledge.prompt import question_ids
    from vledge.runtime.decoder import OrtTransformerSteps

    embeds = fp32.embed_images(_images(synth_data, 2, start=90))
    prompts = [question_ids(fp32.tokenizer, fp32.manifest.prompt, q) for q in QUESTIONS[:2]]
    small, _ = fp32.prefill(embeds, prompts, GenerationOptions(max_new_tokens=2))
    large, _ = fp32.prefill(embeds, prompts, GenerationOptions(max_new_tokens=40))
    assert isinstance(small, OrtTransformerSteps)
    tokens = np.random.default_rng(0).integers(5, fp32.tokenizer.vocab_size, size=(12, 2))
    for step, row_tokens in enumerate(tokens):
        np.testing.assert_array_equal(small.step(row_tokens), large.step(row_tokens), err_msg=f"step {step}")
    assert small.past_length == large.past_length and np.array_equal(small.mask, large.mask)

"""Every app on a tiled (Idefics3 / SmolVLM) model directory: caption/ask (several --image), serve (several
image_url parts in one request), batch, webcam and bench, each checked against the runtime's own answers."""

from __future__ import annotations

import base64
import json
import socket
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import cv2
import httpx
import numpy as np
import pytest
from click.testing import CliRunner

from hf_idefics3_folders import make_idefics3_folder

from vledge.errors import ConfigError, RequestError
from vledge.runtime import GenerationOptions

TOKENS = 12
QUESTION = "What is in these pictures?"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("smolvlm")
    from vledge.export import ExportOptions, export_folder

    folder = make_idefics3_folder(root / "folder", kind="smolvlm", split=True)
    return export_folder(folder, root / "model", ExportOptions(quantize=("none",), parity_samples=2,
                                                               calibration_samples=1)).model_dir


@pytest.fixture(scope="module")
def runtime(model_dir):
    import vledge.runtime

    return vledge.runtime.load(model_dir, precision="fp32", providers="cpu", threads=1)


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> list[Path]:
    """Three PNG photographs of different sizes and aspect ratios (split into different grids)."""
    from skimage import data

    folder = tmp_path_factory.mktemp("photos")
    images = [data.astronaut()[::7, ::5], data.coffee()[::9, ::6], data.chelsea()[::4, ::3]]
    paths = []
    for number, rgb in enumerate(images):
        path = folder / f"photo{number}.png"
        cv2.imwrite(str(path), np.ascontiguousarray(rgb[:, :, ::-1]))
        paths.append(path)
    return paths


def options(tokens: int = TOKENS) -> GenerationOptions:
    return GenerationOptions(max_new_tokens=tokens)


def test_the_model_directory_is_tiled_and_splits_the_photos(runtime, photos):
    assert runtime.preprocessor.tiled
    counts = [len(runtime.preprocessor.tiles(path).pixel_values) for path in photos]
    assert max(counts) > 1  # at least one photo is split into tiles (plus its global view)


# --------------------------------------------------------------------------- caption and ask


def _cli(*arguments):
    from vledge.cli import main

    return CliRunner().invoke(main, [*map(str, arguments), "--precision", "fp32", "--provider", "cpu",
                                     "--threads", "1", "--max-new-tokens", str(TOKENS)])


def test_ask_with_two_images_answers_about_both_at_once(runtime, model_dir, photos):
    first, second = photos[:2]
    result = _cli("ask", QUESTION, "--image", first, "--image", second, "--model", model_dir, "--jsonl")
    assert result.exit_code == 0, result.output
    record = json.loads(result.stdout.strip().splitlines()[-1])
    expected = runtime.generate([[first, second]], [QUESTION], options())[0]
    assert record["token_ids"] == expected.token_ids and record["text"] == expected.text
    assert record["image"] == f"{first} + {second}"
    # IMAGE then --image: the same prompt
    again = _cli("ask", first, QUESTION, "--image", second, "--model", model_dir, "--jsonl")
    assert again.exit_code == 0, again.output
    assert json.loads(again.stdout.strip().splitlines()[-1])["token_ids"] == expected.token_ids
    # each image alone answers otherwise than both together (the prompt holds both images' tiles)
    alone = runtime.generate([first], [QUESTION], options())[0]
    assert len(runtime.tiled_inputs([[runtime.preprocessor.tiles(first)]], [QUESTION])[0][0]) < len(
        runtime.tiled_inputs([[runtime.preprocessor.tiles(p) for p in (first, second)]], [QUESTION])[0][0])
    assert alone.token_ids  # answered


def test_caption_and_ask_one_image_per_file(runtime, model_dir, photos):
    result = _cli("caption", *photos, "--model", model_dir, "--jsonl", "--batch-size", "2")
    assert result.exit_code == 0, result.output
    records = [json.loads(line) for line in result.stdout.strip().splitlines()]
    assert [r["image"] for r in records] == [str(p) for p in photos]
    for record, path in zip(records, photos):
        expected = runtime.caption(path, options())
        assert record["token_ids"] == expected.token_ids, path
    asked = _cli("ask", photos[2], QUESTION, "--model", model_dir, "--jsonl")
    assert asked.exit_code == 0, asked.output
    assert json.loads(asked.stdout)["token_ids"] == runtime.ask(photos[2], QUESTION, options()).token_ids


def test_several_images_need_a_model_that_takes_them():
    from vledge import captioning

    one_image_model = SimpleNamespace(runtime=SimpleNamespace(preprocessor=SimpleNamespace(tiled=False)))
    with pytest.raises(ConfigError, match="one image per prompt, got 2"):
        captioning.ask_images(one_image_model, ["a.png", "b.png"], "q", options())
    with pytest.raises(ConfigError, match="--model"):
        captioning.ask_images(SimpleNamespace(), ["a.png", "b.png"], "q", options())
    from vledge.cli import main

    usage = CliRunner().invoke(main, ["ask", "only-a-question"])
    assert usage.exit_code == 2 and "--image" in usage.output


# --------------------------------------------------------------------------- serve


def _data_url(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()


def _body(urls: list[str], question: str | None = QUESTION, **fields) -> dict:
    parts = [{"type": "image_url", "image_url": {"url": url}} for url in urls]
    if question:
        parts.append({"type": "text", "text": question})
    return {"model": "m", "messages": [{"role": "user", "content": parts}], "max_tokens": TOKENS, **fields}


def _running(model, **settings):
    from vledge.serve import ServeOptions, build_server

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    server = build_server(model, ServeOptions(port=sock.getsockname()[1], **settings))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{sock.getsockname()[1]}"
    for _ in range(600):
        try:
            if httpx.get(f"{base}/health", timeout=2).status_code == 200:
                break
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    return base, server, thread, sock


def test_serve_answers_two_images_in_one_request_as_generate_does(runtime, photos):
    base, server, thread, sock = _running(runtime, max_images=3, max_batch=4, batch_window_ms=50)
    try:
        first, second, third = photos
        card = httpx.get(f"{base}/v1/models").json()["data"][0]
        assert card["capabilities"]["max_images"] == 3
        reply = httpx.post(f"{base}/v1/chat/completions", json=_body([_data_url(first), _data_url(second)]),
                           timeout=120)
        assert reply.status_code == 200, reply.text
        expected = runtime.generate([[first, second]], [QUESTION], options())[0]
        body = reply.json()
        assert body["choices"][0]["message"]["content"] == expected.text
        assert body["usage"]["completion_tokens"] == len(expected.token_ids)
        ids, _, _ = runtime.tiled_inputs([[runtime.preprocessor.tiles(p) for p in (first, second)]], [QUESTION])
        assert body["usage"]["prompt_tokens"] == len(ids[0])

        # streamed: the same text in pieces
        streamed = httpx.post(f"{base}/v1/chat/completions", timeout=120,
                              json=_body([_data_url(first), _data_url(second)], stream=True))
        assert streamed.status_code == 200, streamed.text
        events = [line[6:] for line in streamed.text.splitlines() if line.startswith("data: ")]
        assert events[-1] == "[DONE]"
        pieces = [json.loads(e)["choices"][0]["delta"].get("content", "") for e in events[:-1]]
        assert "".join(pieces) == expected.text

        # requests with different numbers of images, batched together, each get their own answer
        bodies = [_body([_data_url(third)], None), _body([_data_url(second), _data_url(third), _data_url(first)])]
        with httpx.Client(timeout=120) as client:
            results: list = [None, None]

            def post(index: int) -> None:
                results[index] = client.post(f"{base}/v1/chat/completions", json=bodies[index])

            workers = [threading.Thread(target=post, args=(i,)) for i in range(2)]
            for worker in workers:
                worker.start()
            for worker in workers:
                worker.join()
        assert [r.status_code for r in results] == [200, 200], [r.text for r in results]
        assert results[0].json()["choices"][0]["message"]["content"] == runtime.caption(third, options()).text
        assert results[1].json()["choices"][0]["message"]["content"] == runtime.generate(
            [[second, third, first]], [QUESTION], options())[0].text

        # more images than the limit: refused before any image is decoded (these are not even base64)
        over = httpx.post(f"{base}/v1/chat/completions", json=_body(["data:image/png;base64,@@"] * 4), timeout=30)
        assert over.status_code == 400, over.text
        error = over.json()["error"]
        assert error["code"] == "too_many_images" and "at most 3" in error["message"]
    finally:
        server.should_exit = True
        thread.join(15)
        sock.close()


def test_a_model_taking_one_image_refuses_two_naming_the_limit():
    from vledge.serve.options import ServeOptions
    from vledge.serve.schemas import ChatCompletionRequest, RequestLimits, chat_request

    body = ChatCompletionRequest.model_validate(_body(["data:image/png;base64,AAAA"] * 2))
    with pytest.raises(RequestError, match="one image per request, got 2") as caught:
        chat_request(body, RequestLimits(max_tokens=64))
    assert caught.value.status == 400 and caught.value.code == "too_many_images"
    assert chat_request(body, RequestLimits(max_tokens=64, max_images=2)).image_urls == (
        "data:image/png;base64,AAAA",) * 2
    for bad in (0, 17):
        with pytest.raises(ConfigError, match="max_images"):
            ServeOptions(max_images=bad)


# --------------------------------------------------------------------------- batch and webcam


def test_batch_captions_each_image_as_caption_does(runtime, model_dir, photos, tmp_path):
    from vledge.bulk import BatchOptions, run_batch

    folder = tmp_path / "in"
    folder.mkdir()
    for path in photos:
        (folder / path.name).write_bytes(path.read_bytes())
    (folder / "broken.png").write_bytes(b"not a png")
    output = tmp_path / "rows.jsonl"
    run_batch(BatchOptions(model_dir=model_dir, input=str(folder), output=output, workers=1, threads_per_worker=1,
                           batch_size=2, precision="fp32", providers="cpu", max_new_tokens=TOKENS))
    rows = {Path(row["path"]).name: row for part in sorted(output.glob("part-*.jsonl"))
            for row in map(json.loads, part.read_text().splitlines())}
    assert set(rows) == {p.name for p in photos} | {"broken.png"}
    assert rows["broken.png"]["error"].startswith("ImageError")
    for path in photos:
        row = rows[path.name]
        assert row["error"] is None and row["tokens"] == runtime.caption(path, options()).token_ids, path.name
        assert row["vision_ms"] > 0


def test_webcam_captions_frames_and_reuses_by_embedding(runtime, photos):
    from vledge.webcam.captioner import Captioner
    from vledge.webcam.capture import Frame
    from vledge.webcam.scene import SceneChangeDetector

    frames = [cv2.imread(str(path)) for path in (photos[0], photos[0], photos[2])]
    captioner = Captioner(runtime, None, options(), SceneChangeDetector(threshold=0, embedding_threshold=1e-4))
    events = []
    for index, frame in enumerate(frames):  # what the captioner thread does per frame
        events.append(captioner._process(Frame(index, frame, index / 10, time.monotonic())))
        captioner._last = events[-1]
    assert [e.reused for e in events] == [False, True, False]
    assert events[1].embedding_distance is not None and events[1].embedding_distance <= 1e-4
    for event, frame in zip(events, frames):
        assert event.caption == runtime.caption(frame, options()).text
    # the same without the embedding check (the runtime's own caption of the frame)
    plain = Captioner(runtime, QUESTION, options(), SceneChangeDetector(threshold=0))
    assert plain._process(Frame(0, frames[2], 0.0, time.monotonic())).caption == runtime.ask(
        frames[2], QUESTION, options()).text


def test_webcam_demo_runs_headless_on_the_synthetic_source(runtime, tmp_path):
    from vledge.webcam import DemoOptions, run_demo

    log_path = tmp_path / "captions.jsonl"
    summary = run_demo(runtime, "synthetic", DemoOptions(headless=True, log=log_path, max_frames=3, every_ms=0,
                                                         max_new_tokens=4))
    assert summary.ok, summary.message
    assert summary.captions_made >= 1


# --------------------------------------------------------------------------- bench


def test_bench_times_the_vision_encoder_per_tile_and_says_what_it_skipped(model_dir, tmp_path):
    from vledge.cli import main

    out = tmp_path / "bench"
    result = CliRunner().invoke(main, ["bench", "--model", str(model_dir), "--out", str(out), "--threads", "1",
                                       "--batch", "1,2", "--repeats", "3", "--no-cold-start", "--quiet",
                                       "--engines", "pytorch,ort-cpu-fp32"])
    assert result.exit_code == 0, result.output
    data = json.loads((out / "bench.json").read_text())
    assert data["engines"] == ["ort-cpu-fp32"] and "pytorch" in data["skipped"]
    assert "tiled model" in data["pytorch_skipped"] or "--ckpt" in data["pytorch_skipped"]
    assert data["reference"] is None and data["parity"] == {}
    (row,) = data["latency"]
    assert row["tiles_per_image"] > 1  # the synthetic scenes are as large as the model's longest edge: split
    vision, per_tile = row["stages"]["vision_ms"]["median"], row["stages"]["vision_tile_ms"]["median"]
    assert 0 < per_tile < vision
    assert set(row["throughput"]) == {"1", "2"} and all(v > 0 for v in row["throughput"].values())
    table = (out / "bench.md").read_text()
    assert "vision/tile" in table and "tiles/img" in table and "PyTorch side skipped" in table
    assert data["tiled"] is True
    assert "tiles" in result.output

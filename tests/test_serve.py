"""vledge serve: a real uvicorn server on 127.0.0.1, real clients (openai, httpx), the tiny exported model."""

from __future__ import annotations

import base64
import contextlib
import json
import os
import socket
import struct
import subprocess
import sys
import threading
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

openai = pytest.importorskip("openai")

from vledge.errors import ConfigError  # noqa: E402
from vledge.runtime import GenerationOptions  # noqa: E402
from vledge.serve import ServeOptions, build_server  # noqa: E402
from vledge.serve.text import StreamText  # noqa: E402

pytestmark = pytest.mark.slow


# --------------------------------------------------------------------------- helpers


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    import vledge.runtime

    return vledge.runtime.load(tiny_model_dir, precision="fp32", threads=1)


@pytest.fixture(scope="module")
def images(synth_data) -> list[Path]:
    return sorted((synth_data / "images").iterdir())[:12]


def alone(model, image, question=None, max_tokens=64, stops=()):
    """What the runtime answers for this one request by itself (64 tokens: the server's default limit)."""
    return model.generate([image], [question or model.caption_prompt], GenerationOptions(max_tokens), stops)[0]


def data_url(data: bytes, media: str = "image/png") -> str:
    return f"data:{media};base64,{base64.b64encode(data).decode()}"


def chat_body(url: str, question: str | None = None, **fields) -> dict:
    parts = [{"type": "image_url", "image_url": {"url": url}}]
    if question:
        parts.append({"type": "text", "text": question})
    return {"model": "tiny", "messages": [{"role": "user", "content": parts}], **fields}


def wait_ready(base: str, process: subprocess.Popen | None = None) -> None:
    for _ in range(600):
        if process is not None and process.poll() is not None:
            raise AssertionError(f"server exited with {process.returncode}: {process.stderr.read()}")
        try:
            if httpx.get(f"{base}/health", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    raise AssertionError(f"{base} did not become ready")


@contextlib.contextmanager
def running(model, **settings):
    """A real uvicorn server in a thread, on a free loopback port bound before it starts."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = build_server(model, ServeOptions(port=port, **settings))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{port}"
    try:
        wait_ready(base)
        yield base
    finally:
        server.should_exit = True
        thread.join(15)
        sock.close()


def metric(base: str, name: str, **labels) -> float:
    """A sample's value from /metrics (0 when absent)."""
    text = httpx.get(f"{base}/metrics").text
    wanted = name + ("{" + ",".join(f'{k}="{v}"' for k, v in labels.items()) + "}" if labels else "")
    for line in text.splitlines():
        if line.startswith(wanted + " "):
            return float(line.split()[-1])
    return 0.0


def assert_openai_error(response: httpx.Response, status: int, code: str) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["code"] == code and error["message"]
    return error


def png_bomb() -> bytes:
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)

    side = 60000
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b""))


@pytest.fixture(scope="module")
def batching_server(model):
    with running(model, max_batch=8, batch_window_ms=50) as base:
        yield base


# --------------------------------------------------------------------------- the command line


def test_cli_serve_answers_like_vledge_caption(tiny_model_dir, images, tmp_path):
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    env = {**os.environ, "VLEDGE_API_KEY": "s3cret", "OMP_NUM_THREADS": "1"}
    vledge = [sys.executable, "-m", "vledge"]
    process = subprocess.Popen([*vledge, "serve", "--model", str(tiny_model_dir), "--port", str(port)], env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        base = f"http://127.0.0.1:{port}"
        wait_ready(base, process)
        client = openai.OpenAI(base_url=f"{base}/v1", api_key="s3cret", max_retries=0)
        image = images[0]
        caption = subprocess.run([*vledge, "caption", "--model", str(tiny_model_dir), str(image)], env=env,
                                 capture_output=True, text=True, check=True).stdout
        expected = caption.strip().split(": ", 1)[1]
        messages = [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": data_url(image.read_bytes(), "image/jpeg")}}]}]
        answer = client.chat.completions.create(model="tiny", messages=messages)
        assert answer.choices[0].message.content == expected
        assert answer.usage.completion_tokens > 0
        chunks = list(client.chat.completions.create(model="tiny", messages=messages, stream=True))
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == expected
        assert chunks[-1].choices[0].finish_reason == answer.choices[0].finish_reason
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=f"{base}/v1", api_key="wrong", max_retries=0).models.list()
    finally:
        process.terminate()
        process.wait(20)


def test_serve_imports_no_torch():
    code = ("import sys, vledge.serve, vledge.serve.app, vledge.serve.server; "
            "assert 'torch' not in sys.modules, 'torch imported'")
    subprocess.run([sys.executable, "-c", code], check=True)


# --------------------------------------------------------------------------- answers


def test_openai_client_non_streaming_and_streaming_equal_the_runtime(model, images, batching_server):
    client = openai.OpenAI(base_url=f"{batching_server}/v1", api_key="unused", max_retries=0)
    for image, question in [(images[1], None), (images[2], "How many objects are there?")]:
        expected = alone(model, image, question)
        body = chat_body(data_url(image.read_bytes(), "image/jpeg"), question)
        answer = client.chat.completions.create(model="tiny", messages=body["messages"], max_tokens=5)
        assert answer.choices[0].message.content == alone(model, image, question, 5).text
        full = client.chat.completions.create(model="tiny", messages=body["messages"])
        assert full.choices[0].message.content == expected.text
        assert full.usage.completion_tokens == len(expected.token_ids)
        assert full.choices[0].finish_reason == ("length" if expected.finish_reason == "length" else "stop")
        stream = client.chat.completions.create(model="tiny", messages=body["messages"], stream=True,
                                                stream_options={"include_usage": True})
        chunks = list(stream)
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == expected.text
        assert chunks[-1].usage.completion_tokens == len(expected.token_ids)


def test_stop_strings_system_message_and_string_content(model, images, batching_server):
    image = images[3]
    expected = alone(model, image, stops=[" "])
    body = chat_body(data_url(image.read_bytes()), stop=" ")
    body["messages"].insert(0, {"role": "system", "content": "You are a captioner."})
    answer = httpx.post(f"{batching_server}/v1/chat/completions", json=body, timeout=60).json()
    assert answer["choices"][0]["message"]["content"] == expected.text
    assert answer["object"] == "chat.completion" and answer["choices"][0]["finish_reason"] == "stop"
    only_text = {"messages": [{"role": "user", "content": "hello"}]}
    assert_openai_error(httpx.post(f"{batching_server}/v1/chat/completions", json=only_text), 400, "missing_image")


def test_seeded_sampling_gives_what_it_gives_alone(model, images, batching_server):
    options = GenerationOptions(max_new_tokens=16, temperature=1.0, top_p=0.9, seed=3)
    expected = model.generate([images[4]], [model.caption_prompt], options)[0].text
    body = chat_body(data_url(images[4].read_bytes()), max_tokens=16, temperature=1.0, top_p=0.9, seed=3)
    with ThreadPoolExecutor(4) as pool:  # batched neighbours must not change a seeded row's draws
        answers = list(pool.map(lambda _: httpx.post(f"{batching_server}/v1/chat/completions", json=body,
                                                     timeout=60).json(), range(4)))
    assert [a["choices"][0]["message"]["content"] for a in answers] == [expected] * 4


def test_32_concurrent_requests_get_the_answers_they_get_alone(model, images, batching_server):
    questions = [None, "How many objects are there?", "What color is the circle?", None]
    cases = [(images[i % len(images)], questions[i % 4], [64, 3, 10, 24][i % 4]) for i in range(32)]
    expected = []
    for image, question, max_tokens in cases:
        result = alone(model, image, question, max_tokens)
        expected.append((result.text, len(result.token_ids)))
    batches_before = metric(batching_server, "vledge_serve_batch_size_count")

    def ask(numbered):
        number, (image, question, max_tokens) = numbered
        body = chat_body(data_url(image.read_bytes(), "image/jpeg"), question, max_tokens=max_tokens)
        url = f"{batching_server}/v1/chat/completions"
        if number % 2 == 0:
            response = httpx.post(url, json=body, timeout=120)
            assert response.status_code == 200, response.text
            answer = response.json()
            return answer["choices"][0]["message"]["content"], answer["usage"]["completion_tokens"]
        pieces, usage = [], None  # every other request streams: each row streams its own tokens
        body.update(stream=True, stream_options={"include_usage": True})
        with httpx.stream("POST", url, json=body, timeout=120) as response:
            assert response.status_code == 200
            for line in response.iter_lines():
                if line.startswith("data: ") and line != "data: [DONE]":
                    chunk = json.loads(line[6:])
                    pieces += [c["delta"].get("content", "") for c in chunk["choices"]]
                    usage = chunk.get("usage") or usage
        return "".join(pieces), usage["completion_tokens"]

    with ThreadPoolExecutor(32) as pool:
        got = list(pool.map(ask, enumerate(cases)))
    assert got == expected
    assert metric(batching_server, "vledge_serve_batch_size_count") - batches_before < 32  # rows shared batches


def test_health_models_and_metrics(batching_server):
    health = httpx.get(f"{batching_server}/health").json()
    assert health["status"] == "ok" and health["max_batch"] == 8
    models = httpx.get(f"{batching_server}/v1/models").json()
    assert models["object"] == "list" and models["data"][0]["capabilities"]["vision"] is True
    name = models["data"][0]["id"]
    assert httpx.get(f"{batching_server}/v1/models/{name}").json()["id"] == name
    assert_openai_error(httpx.get(f"{batching_server}/v1/models/nope"), 404, "model_not_found")
    text = httpx.get(f"{batching_server}/metrics").text
    for stage in ("queue", "preprocess", "vision", "prefill", "decode"):
        assert f'vledge_serve_stage_seconds_bucket{{le="0.001",stage="{stage}"}}' in text
    for name in ("vledge_serve_requests_total", "vledge_serve_queue_depth", "vledge_serve_batch_size_bucket",
                 "vledge_serve_request_seconds_bucket", "vledge_serve_ready 1.0"):
        assert name in text


# --------------------------------------------------------------------------- bad requests


def test_bad_requests_get_their_status_and_the_server_keeps_serving(model, images, tmp_path):
    good = chat_body(data_url(images[5].read_bytes(), "image/jpeg"))
    with running(model, api_key="k3y", max_body_bytes=64 << 10, max_image_bytes=32 << 10) as base:
        url = f"{base}/v1/chat/completions"
        auth = {"Authorization": "Bearer k3y"}

        def post(body, **kwargs):
            return httpx.post(url, json=body, headers=auth, timeout=60, **kwargs) if body is not None else \
                httpx.post(url, headers=auth, timeout=60, **kwargs)

        assert_openai_error(httpx.post(url, json=good), 401, "missing_api_key")
        wrong = httpx.post(url, json=good, headers={"Authorization": "Bearer k3z"})
        assert assert_openai_error(wrong, 401, "invalid_api_key")["type"] == "authentication_error"
        assert_openai_error(post(chat_body("data:image/png;base64,@@not*base64@@")), 400, "invalid_base64")
        text_file = data_url(b"just some text, not an image\n" * 10)
        assert_openai_error(post(chat_body(text_file)), 400, "invalid_image")
        bomb = assert_openai_error(post(chat_body(data_url(png_bomb()))), 400, "invalid_image")
        assert "60000x60000" in bomb["message"]
        assert_openai_error(post(chat_body("https://example.com/cat.png")), 400, "remote_image_url")
        assert_openai_error(post(chat_body("data:text/plain;base64,aGk=")), 400, "invalid_image")
        assert_openai_error(post(chat_body(data_url(os.urandom(40 << 10)))), 413, "image_too_large")
        big = json.dumps(chat_body(data_url(os.urandom(80 << 10)))).encode()
        assert_openai_error(post(None, content=big), 413, "body_too_large")  # Content-Length over the limit
        chunked = httpx.post(url, content=iter([big[:40000], big[40000:]]), headers=auth, timeout=60)
        assert_openai_error(chunked, 413, "body_too_large")  # no Content-Length: counted as it arrives
        two = chat_body(data_url(images[5].read_bytes()))
        two["messages"][0]["content"].append(two["messages"][0]["content"][0])
        assert_openai_error(post(two), 400, "too_many_images")
        audio = chat_body(data_url(images[5].read_bytes()))
        audio["messages"][0]["content"].append({"type": "input_audio", "input_audio": {"data": "", "format": "wav"}})
        assert_openai_error(post(audio), 400, "unsupported_content_part")
        long_question = chat_body(data_url(images[5].read_bytes()), "is it red? " * 400)
        assert_openai_error(post(long_question), 400, "prompt_too_long")
        assert_openai_error(post({**good, "n": 2}), 400, "unsupported_parameter")
        assert_openai_error(post({**good, "max_tokens": 10_000}), 400, "max_tokens_too_large")
        assert_openai_error(post({**good, "temperature": -1}), 400, "invalid_request")
        assert_openai_error(httpx.post(url, content=b"{not json", headers={**auth, "Content-Type":
                                                                            "application/json"}), 400, "invalid_json")
        assert_openai_error(post({"messages": []}), 400, "invalid_request")
        assert httpx.get(f"{base}/health").status_code == 200  # no key needed
        answer = post(good)
        assert answer.status_code == 200
        assert answer.json()["choices"][0]["message"]["content"] == alone(model, images[5]).text
        assert metric(base, "vledge_serve_errors_total", code="invalid_image") == 3
        assert metric(base, "vledge_serve_requests_total", status="200") == 1


def test_full_queue_gets_429_deadline_504_and_disconnect_cancels(model, images):
    body = json.dumps(chat_body(data_url(images[6].read_bytes()))).encode()
    # The batch window is waited out while another request is still arriving: a client that sends half its
    # body holds a long window open, so the queue's depth is known when the next request comes.
    with running(model, max_batch=8, batch_window_ms=3000, max_queue=2, request_timeout_s=1.5,
                 retry_after_s=2) as base:
        url = f"{base}/v1/chat/completions"
        port = int(base.rsplit(":", 1)[1])
        slow = socket.create_connection(("127.0.0.1", port))
        slow.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     + f"Content-Length: {len(body)}\r\n\r\n".encode() + body[: len(body) // 2])

        def depth() -> int:
            return httpx.get(f"{base}/health").json()["queue_depth"]

        with ThreadPoolExecutor(2) as pool:
            waiting = [pool.submit(httpx.post, url, content=body, timeout=30) for _ in range(2)]
            for _ in range(300):
                if depth() == 2:
                    break
                time.sleep(0.02)
            full = httpx.post(url, content=body, timeout=30)
            error = assert_openai_error(full, 429, "queue_full")
            assert error["type"] == "rate_limit_error" and full.headers["Retry-After"] == "2"
            for future in waiting:  # the window outlasts the deadline
                assert_openai_error(future.result(), 504, "deadline_exceeded")
        assert metric(base, "vledge_serve_cancelled_total", reason="deadline") == 2

        raw = socket.create_connection(("127.0.0.1", port))
        raw.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                    + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
        for _ in range(300):
            if depth() == 1:
                break
            time.sleep(0.02)
        raw.close()
        for _ in range(300):
            if metric(base, "vledge_serve_cancelled_total", reason="disconnected") == 1:
                break
            time.sleep(0.02)
        assert metric(base, "vledge_serve_cancelled_total", reason="disconnected") == 1
        slow.close()
        for _ in range(300):
            if depth() == 0:
                break
            time.sleep(0.05)
        assert metric(base, "vledge_serve_batch_size_count") == 0  # cancelled rows never ran


# --------------------------------------------------------------------------- pieces


def test_serve_options_are_checked_once():
    with pytest.raises(ConfigError, match="max_batch"):
        ServeOptions(max_batch=0)
    with pytest.raises(ConfigError, match="api_key"):
        ServeOptions(api_key="")
    assert ServeOptions().host == "127.0.0.1" and ServeOptions().loopback
    assert not ServeOptions(host="0.0.0.0").loopback


def test_stream_text_joins_to_the_final_text(model, images):
    result = model.caption(images[7], stop_strings=["e"])
    text = StreamText(model.tokenizer, ["e"])
    pieces = [text.add(token) for token in result.token_ids]
    pieces.append(text.finish(result.text))
    assert "".join(pieces) == result.text


def test_lstm_model_is_served_like_the_runtime(tiny_lstm_model_dir, images):
    import vledge.runtime

    lstm = vledge.runtime.load(tiny_lstm_model_dir, precision="fp32", threads=1)
    with running(lstm, max_batch=4, batch_window_ms=20) as base:
        bodies = [chat_body(data_url(image.read_bytes()), max_tokens=12) for image in images[:4]]
        with ThreadPoolExecutor(4) as pool:
            answers = list(pool.map(lambda body: httpx.post(f"{base}/v1/chat/completions", json=body,
                                                            timeout=60).json(), bodies))
    assert [a["choices"][0]["message"]["content"] for a in answers] == [
        alone(lstm, image, max_tokens=12).text for image in images[:4]]


# --------------------------------------------------------------------------- limits under hostile clients


def blank_png(width: int, height: int) -> bytes:
    """A valid grey PNG of ``width`` x ``height`` black pixels: a few KB that decode to width*height pixels."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)

    raw = zlib.compress(bytes(height * (width + 1)), 9)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
            + chunk(b"IDAT", raw) + chunk(b"IEND", b""))


def huge_headers(port: int, total: int) -> bytes:
    """Send a request whose headers grow to ``total`` bytes; what the server answers before closing."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
        try:
            raw.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n")
            line = b"X-Filler: " + b"a" * 8000 + b"\r\n"
            for _ in range(total // len(line)):
                raw.sendall(line)
            raw.sendall(b"\r\n")
        except (BrokenPipeError, ConnectionResetError):
            pass
        try:
            return raw.recv(4096)
        except (ConnectionResetError, TimeoutError):
            return b""


def test_health_answers_within_a_second_while_hostile_clients_send_the_limits(model, images):
    """Every hostile request gets its 4xx, and /health keeps answering within 1 s throughout (client timeout)."""
    photo = chat_body(data_url(images[5].read_bytes()))
    with running(model, max_image_pixels=9_000_000, max_pixels_in_flight=18_000_000,
                 max_header_bytes=16 << 10) as base:
        url = f"{base}/v1/chat/completions"
        port = int(base.rsplit(":", 1)[1])
        done = threading.Event()
        polls: list[float] = []
        failures: list[str] = []

        def poll_health() -> None:
            with httpx.Client(timeout=1.0) as client:
                for _ in range(3000):  # bounded: about five minutes at most
                    if done.is_set():
                        return
                    started = time.perf_counter()
                    try:
                        assert client.get(f"{base}/health").status_code == 200
                        polls.append(time.perf_counter() - started)
                    except (httpx.HTTPError, AssertionError) as exc:
                        failures.append(repr(exc))
                    time.sleep(0.05)

        watcher = threading.Thread(target=poll_health, daemon=True)
        watcher.start()
        try:
            long_text = chat_body(data_url(images[5].read_bytes()), "a" * 12_000_000)
            assert_openai_error(httpx.post(url, json=long_text, timeout=60), 400, "text_too_long")
            many = {"messages": [{"role": "system", "content": "x"}] * 250_000 + photo["messages"]}
            assert_openai_error(httpx.post(url, json=many, timeout=60), 400, "invalid_request")
            some = {"messages": [{"role": "system", "content": "x"}] * 40 + photo["messages"]}
            assert_openai_error(httpx.post(url, json=some, timeout=60), 400, "too_many_messages")
            deep = b'{"messages": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
            assert_openai_error(httpx.post(url, content=deep, timeout=60), 400, "invalid_json")
            assert_openai_error(httpx.post(url, json={**photo, "seed": -1}, timeout=60), 400, "invalid_request")
            over = assert_openai_error(httpx.post(url, json=chat_body(data_url(blank_png(4000, 4000))),
                                                  timeout=60), 400, "invalid_image")
            assert "4000x4000" in over["message"]
            big = json.dumps(chat_body(data_url(blank_png(3000, 3000)))).encode()
            with ThreadPoolExecutor(8) as pool:
                answers = list(pool.map(lambda _: httpx.post(url, content=big, timeout=120), range(8)))
            for answer in answers:  # each either answered or refused for the budget, never a 500
                if answer.status_code != 200:
                    assert_openai_error(answer, 429, "pixel_budget_exceeded")
            assert huge_headers(port, 1 << 20)[:12] in (b"", b"HTTP/1.1 400", b"HTTP/1.1 431")
            for path in ("/docs", "/redoc", "/openapi.json"):
                assert httpx.get(f"{base}{path}").status_code == 404
            assert httpx.post(url, json=photo, timeout=60).status_code == 200
        finally:
            done.set()
            watcher.join(10)
    assert not failures, failures
    assert polls


def test_pixel_budget_refuses_what_would_go_over_it():
    from vledge.errors import RequestError
    from vledge.serve.budget import PixelBudget

    budget = PixelBudget(100, retry_after_s=3)
    with budget.reserve(60):
        with pytest.raises(RequestError) as refused:
            with budget.reserve(41):
                pass
        assert refused.value.status == 429 and refused.value.retry_after_s == 3
        with budget.reserve(40):
            assert budget.held == 100
    assert budget.held == 0


def test_api_pages_are_off_by_default_and_behind_the_key_when_on(model):
    with running(model, docs=True, api_key="k3y") as base:
        for path in ("/docs", "/redoc", "/openapi.json"):
            assert_openai_error(httpx.get(f"{base}{path}"), 401, "missing_api_key")
            assert httpx.get(f"{base}{path}", headers={"Authorization": "Bearer k3y"}).status_code == 200
        assert httpx.get(f"{base}/health").status_code == 200


def test_cli_busy_port_and_too_many_threads_are_one_error_line(tiny_model_dir):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        done = subprocess.run([sys.executable, "-m", "vledge", "serve", "--model", str(tiny_model_dir), "--port",
                               str(port)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 1, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: ConfigError: cannot listen on 127.0.0.1:"), done.stderr
    many = subprocess.run([sys.executable, "-m", "vledge", "serve", "--model", str(tiny_model_dir), "--threads",
                           "1000000"], capture_output=True, text=True, timeout=120)
    assert many.returncode == 2 and "--threads" in many.stderr and "Traceback" not in many.stderr


def test_serve_limits_are_checked_once():
    for field in ("max_messages", "max_text_chars", "max_image_pixels", "max_header_bytes"):
        with pytest.raises(ConfigError, match=field):
            ServeOptions(**{field: 0})
    with pytest.raises(ConfigError, match="max_pixels_in_flight"):
        ServeOptions(max_image_pixels=10, max_pixels_in_flight=5)

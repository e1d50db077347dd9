"""One benchmark engine in a process of its own, driven over a pipe.

    python -m vledge.benchmark.worker      (spoken to by :class:`EngineWorker`, not by people)

Engines sharing a process disturb each other: ONNX Runtime's and PyTorch's thread pools spin
on the same cores, and OpenCV, OpenVINO and torch each bring their own. So every engine lives
in its own worker; the parent sends one JSON request per line on the worker's stdin and reads
one JSON reply per line. Replies go to a private copy of the original stdout, and the worker's
stdout is pointed at stderr, so nothing a library prints can break the protocol.

Requests (``op``): ``load`` (engine, ckpt, model_dir, threads), ``warmup`` (images, prompt,
caption_tokens), ``repetition`` (image, prompt, decode_tokens, caption_tokens, batches: a list of
image lists), ``parity`` (samples: a pickle path), ``exit``. A failed request answers
``{"error": "Type: message"}`` and the worker keeps serving.
"""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from vledge.errors import VledgeError


class WorkerError(VledgeError):
    """A benchmark worker failed a request or died."""


def _clock(call) -> tuple[float, Any]:
    tick = time.perf_counter()
    value = call()
    return (time.perf_counter() - tick) * 1e3, value


class _Server:
    """The worker side: one engine, its requests."""

    def __init__(self) -> None:
        self.engine = None

    def load(self, engine: str, ckpt: str, model_dir: str, threads: int) -> dict:
        from vledge.benchmark.engines import EngineSpec, make_engine

        self.engine = make_engine(EngineSpec.parse(engine), Path(ckpt), Path(model_dir), int(threads))
        ms, _ = _clock(self.engine.load)
        return {"load_ms": ms, "pid": os.getpid()}

    def warmup(self, images: list[str], prompt: list[int], caption_tokens: int) -> dict:
        """First calls allocate, JIT and fill caches (and, for ``pytorch-compile``, compile): timed apart."""
        engine, paths = self.engine, [Path(p) for p in images]
        tick = time.perf_counter()
        prepared = engine.preprocess(paths[:1])
        embeds = engine.encode_images(engine.pixels(prepared))
        engine.caption(paths[:1], [prompt], caption_tokens)
        engine.start(*engine.rows(prepared, embeds, [prompt]))
        return {"warmup_ms": (time.perf_counter() - tick) * 1e3}

    def repetition(self, image: str, prompt: list[int], decode_tokens: int, caption_tokens: int,
                   batches: list[list[str]]) -> dict:
        """Every stage once (decode: ``decode_tokens`` steps), then a caption per batch in ``batches``.

        The vision encoder runs on every tile of the image (one for untiled models): ``vision_tile_ms`` is its
        time per tile, ``tiles`` the count."""
        engine = self.engine
        times: dict[str, Any] = {}
        times["preprocess_ms"], prepared = _clock(lambda: engine.preprocess([Path(image)]))
        pixels = engine.pixels(prepared)
        times["vision_ms"], embeds = _clock(lambda: engine.encode_images(pixels))
        tiles = len(pixels)
        times["vision_tile_ms"] = times["vision_ms"] / tiles
        embeds, prompts = engine.rows(prepared, embeds, [prompt])
        times["prefill_ms"], steps = _clock(lambda: engine.start(embeds, prompts))
        token = np.argmax(steps.first_logits, axis=-1)
        decode = []
        for _ in range(decode_tokens):  # the cost of a step does not depend on the token: never stop
            ms, logits = _clock(lambda: steps.step(token))
            decode.append(ms)
            token = np.argmax(logits, axis=-1)
        times["decode_token_ms"] = decode
        times["caption_ms"], out = _clock(lambda: engine.caption([Path(image)], [prompt], caption_tokens))
        throughput = []
        for chosen in batches:
            ms, _ = _clock(lambda: engine.caption([Path(p) for p in chosen], [prompt] * len(chosen), caption_tokens))
            throughput.append(len(chosen) / (ms / 1e3))
        return {"times": times, "tokens": len(out[0]), "throughput": throughput, "tiles": tiles}

    def parity(self, samples: str) -> dict:
        from vledge.export.parity import measure_engine

        with open(samples, "rb") as handle:
            parity_samples, reference = pickle.load(handle)
        engine = self.engine
        measured = measure_engine(engine, parity_samples, reference,
                                  precisions=getattr(engine, "precisions", {"all": engine.spec.precision}))
        result = measured.to_dict()
        result["size_bytes"] = engine.size_bytes()
        return result


def serve(requests, replies) -> None:
    server = _Server()
    for line in requests:
        request = json.loads(line)
        op = request.pop("op")
        if op == "exit":
            break
        try:
            reply = getattr(server, op)(**request)
        except Exception as exc:  # one failed request is reported, the worker keeps serving
            reply = {"error": f"{type(exc).__name__}: {exc}"}
        replies.write(json.dumps(reply) + "\n")
        replies.flush()


class EngineWorker:
    """The parent side: a worker process for one engine, and a call per request."""

    def __init__(self, name: str, threads: int) -> None:
        self.name, self.threads = name, threads
        self._stderr = tempfile.TemporaryFile(mode="w+", prefix="vledge-worker-")
        env = dict(os.environ, OMP_NUM_THREADS=str(threads))
        self.process = subprocess.Popen([sys.executable, "-m", "vledge.benchmark.worker"], stdin=subprocess.PIPE,
                                        stdout=subprocess.PIPE, stderr=self._stderr, text=True, env=env)

    def call(self, op: str, **arguments) -> dict:
        self.process.stdin.write(json.dumps({"op": op, **arguments}) + "\n")
        self.process.stdin.flush()
        line = self.process.stdout.readline()
        if not line:
            self._stderr.seek(0)
            raise WorkerError(f"the {self.name} worker died during {op}: {self._stderr.read()[-800:].strip()}")
        reply = json.loads(line)
        if "error" in reply:
            raise WorkerError(f"{self.name} failed {op}: {reply['error']}")
        return reply

    def close(self) -> None:
        if self.process.poll() is None:
            try:
                self.process.stdin.write(json.dumps({"op": "exit"}) + "\n")
                self.process.stdin.flush()
                self.process.wait(timeout=60)
            except (OSError, subprocess.TimeoutExpired):
                self.process.kill()
                self.process.wait()
        self._stderr.close()

    def __enter__(self) -> "EngineWorker":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def main() -> None:
    replies = os.fdopen(os.dup(sys.stdout.fileno()), "w")
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())  # stray prints go to stderr, never into the replies
    serve(sys.stdin, replies)


if __name__ == "__main__":
    main()

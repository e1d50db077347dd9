"""Load test for ``vledge serve``: N concurrent clients for a fixed time, batching on and off, in one run.

    python benchmarks/serve_load.py --model MODEL_DIR --images IMAGE_DIR [--clients 1,4,16,64] [--seconds 10]
        [--max-batch 8] [--batch-window-ms 5] [--max-tokens 32] [--threads N] [--out serve_load.json]

For each mode (``batched``: ``--max-batch`` and ``--batch-window-ms``; ``unbatched``: ``--max-batch 1``) a
real ``vledge serve`` process is started on a free 127.0.0.1 port and warmed up; then for each client count
N, the modes one after the other (interleaved, as the machine's load drifts), N clients (asyncio streams, one keep-alive HTTP/1.1 connection each) send chat completions back to back for ``--seconds``
(each client sends its next request when its answer arrives; greedy, ``max_tokens`` fixed) after a short
untimed warm-up round. Requests cycle through the images (base64 data URLs, encoded once). Reported per
(mode, N): captions/s (answers that arrived inside the window / window), latency p50/p90/p99 in ms, errors
(any non-200 or transport failure), and from the server's ``/metrics``: mean rows per batch, mean ms a
request waited in the queue and mean ms of its batch's generation (vision + prefill + decode). The queue
wait bounds what continuous batching (rows joining between decode steps) could save. Mean tokens per
answer are in the JSON. The clients share the machine with the server: ``uptime`` before and after is recorded.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import json
import os
import platform
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _uptime() -> str:
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _bodies(image_dir: Path, count: int, max_tokens: int) -> list[bytes]:
    files = sorted(p for p in image_dir.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)[:count]
    if not files:
        raise SystemExit(f"no images in {image_dir}")
    bodies = []
    for path in files:
        media = "image/png" if path.suffix.lower() == ".png" else "image/jpeg"
        url = f"data:{media};base64,{base64.b64encode(path.read_bytes()).decode()}"
        bodies.append(json.dumps({"model": "bench", "max_tokens": max_tokens, "temperature": 0,
                                  "messages": [{"role": "user", "content": [
                                      {"type": "image_url", "image_url": {"url": url}}]}]}).encode())
    return bodies


def _server_stats(base: str) -> dict[str, float]:
    """Sums and counts of the server's batch-size and per-stage histograms (from /metrics)."""
    values = {}
    for line in httpx.get(f"{base}/metrics", timeout=10).text.splitlines():
        if line.startswith(("vledge_serve_batch_size_sum", "vledge_serve_batch_size_count",
                            "vledge_serve_stage_seconds_sum", "vledge_serve_stage_seconds_count")):
            name, value = line.rsplit(" ", 1)
            values[name] = float(value)
    return values


def _means(before: dict[str, float], after: dict[str, float]) -> dict[str, float | None]:
    """Mean rows per batch, and mean ms per request in each stage, between two snapshots."""
    def mean(name: str, labels: str = "", scale: float = 1.0) -> float | None:
        count = after.get(f"{name}_count{labels}", 0) - before.get(f"{name}_count{labels}", 0)
        total = after.get(f"{name}_sum{labels}", 0) - before.get(f"{name}_sum{labels}", 0)
        return total / count * scale if count else None

    out = {"mean_batch_rows": mean("vledge_serve_batch_size")}
    for stage in ("queue", "preprocess", "vision", "prefill", "decode"):
        out[f"{stage}_ms"] = mean("vledge_serve_stage_seconds", f'{{stage="{stage}"}}', 1e3)
    return out


class Server:
    """One ``vledge serve`` process on a free loopback port."""

    def __init__(self, args, max_batch: int) -> None:
        self.port = _free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        command = [sys.executable, "-m", "vledge", "serve", "--model", str(args.model), "--port", str(self.port),
                   "--max-batch", str(max_batch), "--batch-window-ms", str(args.batch_window_ms),
                   "--max-queue", str(max(64, 2 * max(args.clients))), "--precision", args.precision]
        if args.threads:
            command += ["--threads", str(args.threads)]
        self.process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)

    def __enter__(self) -> Server:
        for _ in range(1200):
            if self.process.poll() is not None:
                raise SystemExit(f"server exited: {self.process.stderr.read()}")
            try:
                if httpx.get(f"{self.base}/health", timeout=2).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        raise SystemExit("server did not become ready in 120 s")

    def __exit__(self, *exc) -> None:
        self.process.terminate()
        try:
            self.process.wait(20)
        except subprocess.TimeoutExpired:
            self.process.kill()


class _Connection:
    """One keep-alive HTTP/1.1 connection on asyncio streams: a client cheap enough not to steal the server's CPU."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def post(self, path: str, body: bytes) -> tuple[int, bytes]:
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection("127.0.0.1", self.port)
        self.writer.write(f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                          f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
        await self.writer.drain()
        head = await self.reader.readuntil(b"\r\n\r\n")
        status = int(head.split(b" ", 2)[1])
        length = 0
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value)
        payload = await self.reader.readexactly(length)
        if b"connection: close" in head.lower():
            await self.close()
        return status, payload

    async def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            with contextlib.suppress(OSError):
                await self.writer.wait_closed()
        self.reader = self.writer = None


async def _load(port: int, bodies: list[bytes], clients: int, seconds: float, warmup_requests: int) -> dict:
    path = "/v1/chat/completions"
    latencies: list[float] = []
    tokens: list[int] = []
    errors: dict[str, int] = {}
    connections = [_Connection(port) for _ in range(clients)]

    async def one(connection: _Connection, index: int) -> tuple[float, int | None, str | None]:
        started = time.perf_counter()
        try:
            status, payload = await connection.post(path, bodies[index % len(bodies)])
        except (OSError, asyncio.IncompleteReadError, ValueError) as exc:
            await connection.close()
            return time.perf_counter() - started, None, type(exc).__name__
        elapsed = time.perf_counter() - started
        if status != 200:
            return elapsed, None, str(status)
        return elapsed, json.loads(payload)["usage"]["completion_tokens"], None

    await asyncio.gather(*(one(connections[i % clients], i) for i in range(max(warmup_requests, clients))))
    begin = time.perf_counter()
    end = begin + seconds

    async def worker(number: int) -> None:
        index = number
        while time.perf_counter() < end:
            elapsed, count, error = await one(connections[number], index)
            index += clients
            if time.perf_counter() > end:  # answers after the window are not counted
                break
            if error is not None:
                errors[error] = errors.get(error, 0) + 1
            else:
                latencies.append(elapsed)
                tokens.append(count)

    await asyncio.gather(*(worker(n) for n in range(clients)))
    window = time.perf_counter() - begin
    for connection in connections:
        await connection.close()
    ms = np.asarray(latencies) * 1e3
    return {
        "clients": clients, "seconds": round(window, 2), "captions": len(latencies),
        "captions_per_s": len(latencies) / window if window else 0.0,
        "p50_ms": float(np.percentile(ms, 50)) if ms.size else None,
        "p90_ms": float(np.percentile(ms, 90)) if ms.size else None,
        "p99_ms": float(np.percentile(ms, 99)) if ms.size else None,
        "errors": sum(errors.values()), "error_kinds": errors,
        "tokens_per_caption": float(np.mean(tokens)) if tokens else None,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--images", type=Path, required=True, help="Folder of images to send (up to 32 used).")
    parser.add_argument("--clients", type=lambda s: [int(x) for x in s.split(",")], default=[1, 4, 16, 64])
    parser.add_argument("--seconds", type=float, default=10.0, help="Measured time per client count.")
    parser.add_argument("--max-batch", type=int, default=8)
    parser.add_argument("--batch-window-ms", type=float, default=5.0)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--precision", default="auto")
    parser.add_argument("--threads", type=int, default=None, help="Server intra-op threads (default: all cores).")
    parser.add_argument("--modes", default="batched,unbatched")
    parser.add_argument("--out", type=Path, default=None, help="Write the results as JSON here.")
    args = parser.parse_args()
    if args.seconds <= 0 or args.seconds > 600:
        raise SystemExit("--seconds must be in (0, 600]")
    bodies = _bodies(args.images, 32, args.max_tokens)
    report = {"uptime_before": _uptime(), "python": platform.python_version(), "cpus": os.cpu_count(),
              "model": str(args.model), "max_tokens": args.max_tokens, "precision": args.precision,
              "batch_window_ms": args.batch_window_ms, "rows": []}
    modes = {"batched": args.max_batch, "unbatched": 1}
    chosen = args.modes.split(",")
    with contextlib.ExitStack() as stack:
        servers = {mode: stack.enter_context(Server(args, modes[mode])) for mode in chosen}
        for clients in args.clients:  # modes interleaved per client count: the machine's load drifts
            for mode in chosen:
                server = servers[mode]
                before = _server_stats(server.base)
                row = asyncio.run(_load(server.port, bodies, clients, args.seconds, warmup_requests=8))
                row.update(mode=mode, max_batch=modes[mode], **_means(before, _server_stats(server.base)))
                report["rows"].append(row)
                print(f"{mode:9s} clients={clients:3d} {row['captions_per_s']:7.1f} captions/s  "
                      f"p50 {row['p50_ms']:7.1f}  p90 {row['p90_ms']:7.1f}  p99 {row['p99_ms']:7.1f} ms  "
                      f"errors {row['errors']}  rows/batch {row['mean_batch_rows'] or 0:.1f}", file=sys.stderr)
    report["uptime_after"] = _uptime()
    print(_table(report))
    if args.out:
        args.out.write_text(json.dumps(report, indent=2))


def _table(report: dict) -> str:
    lines = ["| mode | clients | captions/s | × 1 client | p50 ms | p90 ms | p99 ms | errors | rows/batch "
             "| queue ms | generate ms |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    single = {row["mode"]: row["captions_per_s"] for row in report["rows"] if row["clients"] == 1}
    for row in sorted(report["rows"], key=lambda r: (r["mode"], r["clients"])):
        base = single.get(row["mode"])
        ratio = f"{row['captions_per_s'] / base:.2f}" if base else "-"
        generate = sum(row[f"{stage}_ms"] or 0 for stage in ("vision", "prefill", "decode"))
        lines.append(f"| {row['mode']} | {row['clients']} | {row['captions_per_s']:.1f} | {ratio} | "
                     f"{row['p50_ms']:.1f} | {row['p90_ms']:.1f} | {row['p99_ms']:.1f} | {row['errors']} | "
                     f"{row['mean_batch_rows'] or 0:.2f} | {row['queue_ms'] or 0:.1f} | {generate:.1f} |")
    lines.append(f"\nuptime before: {report['uptime_before']}\nuptime after: {report['uptime_after']}")
    return "\n".join(lines)


if __name__ == "__main__":
    main()

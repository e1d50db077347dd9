"""Hostile clients against a real ``vledge serve`` process: what each gets back, and whether ``/health`` keeps
answering meanwhile, with the server's memory.

    python benchmarks/serve_hostile.py --model MODEL_DIR [--out serve_hostile.json]

Starts ``vledge serve`` (default limits) on a free 127.0.0.1 port, polls ``/health`` every 50 ms from a thread
(1 s client timeout) while the cases run one after another: a 12 MB question, 250,000 messages in 9 MB,
8 concurrent 49-megapixel PNGs (over the per-image limit), 8 concurrent 15-megapixel PNGs (decoded, under the
global pixel budget), 1 MiB of headers, ``seed: -1``, JSON nested 100,000 deep, ``/docs``, then one good
request. Reports each case's statuses, the /health latency (max, p50, p99, failures) and the server's RSS
(VmRSS now, VmHWM peak) from /proc. ``uptime`` is recorded before and after.
"""

from __future__ import annotations

import argparse
import base64
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

import httpx
import numpy as np


def blank_png(width: int, height: int) -> bytes:
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)

    raw = zlib.compress(bytes(height * (width + 1)), 9)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
            + chunk(b"IDAT", raw) + chunk(b"IEND", b""))


def body(png: bytes, question: str | None = None, **fields) -> dict:
    parts = [{"type": "image_url", "image_url": {"url": "data:image/png;base64," + base64.b64encode(png).decode()}}]
    if question:
        parts.append({"type": "text", "text": question})
    return {"messages": [{"role": "user", "content": parts}], "max_tokens": 8, **fields}


def memory(pid: int) -> dict[str, float]:
    values = {}
    with open(f"/proc/{pid}/status") as handle:
        for line in handle:
            if line.startswith(("VmRSS:", "VmHWM:")):
                values[line.split(":")[0]] = int(line.split()[1]) / 1024  # MiB
    return values


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True)
    parser.add_argument("--out", default="serve_hostile.json")
    args = parser.parse_args()
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    base = f"http://127.0.0.1:{port}"
    uptime_before = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    server = subprocess.Popen([sys.executable, "-m", "vledge", "serve", "--model", args.model, "--port", str(port),
                               "--threads", "1"], stderr=subprocess.PIPE, text=True)
    try:
        for _ in range(600):
            try:
                if httpx.get(f"{base}/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        idle = memory(server.pid)
        latencies: list[float] = []
        failures: list[str] = []
        done = threading.Event()

        def poll() -> None:
            with httpx.Client(timeout=1.0) as client:
                while not done.is_set():
                    started = time.perf_counter()
                    try:
                        client.get(f"{base}/health").raise_for_status()
                        latencies.append(time.perf_counter() - started)
                    except httpx.HTTPError as exc:
                        failures.append(repr(exc))
                    time.sleep(0.05)

        watcher = threading.Thread(target=poll, daemon=True)
        watcher.start()
        url = f"{base}/v1/chat/completions"
        small = blank_png(64, 64)
        cases: dict[str, list[int]] = {}

        def post(payload, **kwargs) -> int:
            return httpx.post(url, json=payload, timeout=120, **kwargs).status_code if payload is not None else \
                httpx.post(url, timeout=120, **kwargs).status_code

        cases["question_12MB"] = [post(body(small, "a" * 12_000_000))]
        cases["messages_250k_9MB"] = [post({"messages": [{"role": "system", "content": "x"}] * 250_000})]
        for name, side in (("png_49Mpx_x8", 7000), ("png_15Mpx_x8", 3900)):
            data = json.dumps(body(blank_png(side, side))).encode()
            with ThreadPoolExecutor(8) as pool:
                cases[name] = sorted(pool.map(lambda _: post(None, content=data), range(8)))
        with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
            try:
                raw.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n")
                for _ in range(128):
                    raw.sendall(b"X-Filler: " + b"a" * 8180 + b"\r\n")
                raw.sendall(b"\r\n")
                reply = raw.recv(64)
            except OSError:
                reply = b""
        cases["headers_1MiB"] = [int(reply[9:12]) if reply[9:12].isdigit() else 0]
        cases["seed_minus_1"] = [post(body(small, seed=-1, temperature=1))]
        cases["json_100k_deep"] = [post(None, content=b'{"messages": ' + b"[" * 100_000 + b"]" * 100_000 + b"}")]
        cases["docs"] = [httpx.get(f"{base}/docs").status_code, httpx.get(f"{base}/openapi.json").status_code]
        cases["good"] = [post(body(small))]
        done.set()
        watcher.join(5)
        peak = memory(server.pid)
    finally:
        server.terminate()
        server.wait(30)
    ms = np.asarray(latencies) * 1000
    result = {
        "cases": cases, "health_polls": len(latencies), "health_failures": failures,
        "health_ms": {"max": float(ms.max()), "p50": float(np.percentile(ms, 50)), "p99": float(np.percentile(ms, 99))},
        "rss_mib": {"idle": idle.get("VmRSS"), "after": peak.get("VmRSS"), "peak": peak.get("VmHWM")},
        "uptime_before": uptime_before,
        "uptime_after": subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip(),
        "cpus": os.cpu_count(),
    }
    with open(args.out, "w") as handle:
        json.dump(result, handle, indent=2)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()

"""``vledge serve``: the OpenAI-compatible HTTP server (needs the ``[serve]`` extra; no torch)."""

from __future__ import annotations

from pathlib import Path

import click

from vledge.bounds import MAX_THREADS
from vledge.cli.base import THREADS, FiniteFloat, fail_cleanly, main, parse_providers


@main.command("serve")
@click.option("--model", "model_dir", type=click.Path(path_type=Path), required=True,
              help="An exported model directory.")
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to bind; anything but loopback is reachable from other machines.")
@click.option("--port", type=click.IntRange(0, 65535), default=8000, show_default=True)
@click.option("--precision", type=click.Choice(["auto", "fp32", "fp16", "int8", "q4"]), default="auto",
              show_default=True, help="Graph variants to run.")
@click.option("--provider", default="auto", show_default=True,
              help="auto | cpu | cuda | tensorrt, or a comma-separated list in priority order.")
@click.option("--threads", type=THREADS, default=None,
              help=f"Intra-op threads, at most {MAX_THREADS} (default: all cores).")
@click.option("--max-batch", type=click.IntRange(min=1), default=8, show_default=True,
              help="Requests answered in one batched generation (1: no batching).")
@click.option("--batch-window-ms", type=FiniteFloat(min=0), default=5.0, show_default=True,
              help="How long a request waits for others to join its batch.")
@click.option("--max-queue", type=click.IntRange(min=1), default=64, show_default=True,
              help="Requests waiting for a batch; more are refused with 429.")
@click.option("--api-key", envvar="VLEDGE_API_KEY", default=None, show_envvar=True,
              help="Require 'Authorization: Bearer KEY' on /v1/ routes.")
@click.option("--max-image-bytes", type=click.IntRange(min=1), default=8 << 20, show_default=True,
              help="Largest decoded image file.")
@click.option("--max-body-bytes", type=click.IntRange(min=1024), default=16 << 20, show_default=True,
              help="Largest request body.")
@click.option("--max-new-tokens-limit", type=click.IntRange(min=1), default=64, show_default=True,
              help="Most tokens a request may ask for; also what it gets when it names no max_tokens.")
@click.option("--request-timeout", type=FiniteFloat(min=0, min_open=True), default=60.0, show_default=True,
              help="Seconds from a request's arrival to its last token; 504 after that.")
@click.option("--max-messages", type=click.IntRange(1, 10_000), default=32, show_default=True,
              help="Messages in one request.")
@click.option("--max-text-chars", type=click.IntRange(1, 1 << 20), default=16384, show_default=True,
              help="Characters of text in one request (all messages and stop strings).")
@click.option("--max-image-pixels", type=click.IntRange(1, 64_000_000), default=16_000_000, show_default=True,
              help="Width x height of one decoded image.")
@click.option("--max-images", type=click.IntRange(1, 16), default=4, show_default=True,
              help="Images (image_url parts) one request may hold, for models that take several in one prompt "
                   "(tiled models such as SmolVLM); other models take one.")
@click.option("--max-pixels-in-flight", type=click.IntRange(1, 1 << 31), default=64_000_000, show_default=True,
              help="Decoded pixels of all images being decoded at once; a request past it gets 429.")
@click.option("--max-header-bytes", type=click.IntRange(1024, 1 << 20), default=64 << 10, show_default=True,
              help="A request's line and headers together; larger closes the connection.")
@click.option("--docs/--no-docs", default=False, show_default=True,
              help="Serve /docs, /redoc and /openapi.json (behind the API key when one is set).")
@click.option("--name", "model_name", default=None, help="Model id in /v1/models (default: the folder's name).")
@fail_cleanly
def serve(model_dir, host, port, precision, provider, threads, max_batch, batch_window_ms, max_queue, api_key,
          max_image_bytes, max_body_bytes, max_new_tokens_limit, request_timeout, max_messages, max_text_chars,
          max_image_pixels, max_images, max_pixels_in_flight, max_header_bytes, docs, model_name) -> None:
    """Serve MODEL over HTTP with OpenAI's chat-completions API (image parts as data: URLs), batching
    requests that arrive together. Ctrl-C stops it after the requests in flight."""
    import logging

    try:
        from vledge.serve import ServeOptions
        from vledge.serve import serve as run_server
        from vledge.serve.server import listen
    except ImportError as exc:
        raise click.ClickException(f"vledge serve needs the [serve] extra (pip install 'vledge[serve]'): {exc}")
    import vledge.runtime

    options = ServeOptions(host=host, port=port, max_batch=max_batch, batch_window_ms=batch_window_ms,
                           max_queue=max_queue, api_key=api_key or None, max_body_bytes=max_body_bytes,
                           max_image_bytes=max_image_bytes, max_new_tokens_limit=max_new_tokens_limit,
                           request_timeout_s=request_timeout, max_messages=max_messages,
                           max_text_chars=max_text_chars, max_image_pixels=max_image_pixels, max_images=max_images,
                           max_pixels_in_flight=max_pixels_in_flight, max_header_bytes=max_header_bytes, docs=docs,
                           model_name=model_name)
    sock = listen(options)  # a busy port is reported now, before the model loads
    try:
        model = vledge.runtime.load(model_dir, precision=precision, providers=parse_providers(provider),
                                    threads=threads)
    except BaseException:
        sock.close()
        raise
    batching = f"batches of up to {max_batch}" if options.batching else "no batching"
    key = ", API key required" if options.api_key else ""
    port = sock.getsockname()[1]
    click.echo(f"serving {model_dir} on http://{host}:{port} ({batching}{key}); /health turns ready after warm-up",
               err=True)
    level = logging.getLogger("vledge").getEffectiveLevel()
    run_server(model, options, log_level="info" if level <= logging.INFO else "warning", sock=sock)

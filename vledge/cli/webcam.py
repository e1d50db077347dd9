"""``vledge webcam``: live captions over a camera, video, stream or synthetic scenes."""

from __future__ import annotations

from pathlib import Path

import click

from vledge.cli.base import THREADS, FiniteFloat, fail_cleanly, main, parse_providers


@main.command("webcam")
@click.option("--model", "model_dir", type=click.Path(path_type=Path), required=True,
              help="An exported model directory (ONNX Runtime, no torch needed).")
@click.option("--source", default="0", show_default=True,
              help="Camera index, video file, stream URL (rtsp://, http://), image folder, or 'synthetic'.")
@click.option("--question", default=None, help="Ask this about every frame instead of the caption prompt.")
@click.option("--every-ms", type=FiniteFloat(min=0), default=500, show_default=True,
              help="At most one caption per this many milliseconds of the stream.")
@click.option("--output", type=click.Path(path_type=Path), default=None,
              help="Write the annotated video here (.mp4, .avi, .mkv, .mov).")
@click.option("--log", "log_path", type=click.Path(path_type=Path), default=None,
              help="Write one JSON line per caption (timestamp, frame, caption, latency, stage timings, reused).")
@click.option("--headless", is_flag=True,
              help="No window (also chosen automatically when there is no display). Without it, a display and "
                   "an OpenCV build without GUI support (opencv-python-headless) is an error: see vledge[gui].")
@click.option("--pace", type=click.Choice(["auto", "realtime", "lockstep"]), default="auto", show_default=True,
              help="realtime drops stale frames; lockstep writes every frame and waits for each caption "
                   "(auto: lockstep for files, folders and synthetic without a window).")
@click.option("--precision", type=click.Choice(["auto", "fp32", "fp16", "int8", "q4"]), default="auto",
              show_default=True, help="Graph variants to run.")
@click.option("--provider", default="auto", show_default=True,
              help="auto | cpu | cuda | tensorrt, or a comma-separated list in priority order.")
@click.option("--threads", type=THREADS, default=None, help="Intra-op threads.")
@click.option("--max-frames", type=click.IntRange(min=1), default=None, help="Stop after this many frames.")
@click.option("--seconds", type=FiniteFloat(min=0, min_open=True), default=None,
              help="Stop after this many seconds: of wall clock for a camera or stream, of the source's own "
                   "time for a video file, image folder or synthetic scenes (the output video lasts that long).")
@click.option("--max-new-tokens", type=click.IntRange(min=1), default=None, help="Caption length limit.")
@click.option("--scene-threshold", type=FiniteFloat(min=0), default=None,
              help="Re-caption only when the mean thumbnail difference (0-255) from the last captioned frame "
                   "exceeds this [default: 8; 0 re-captions every due frame].")
@click.option("--embedding-threshold", type=FiniteFloat(min=0, max=2), default=None,
              help="Also require this cosine distance between image embeddings before re-captioning.")
@fail_cleanly
def webcam_command(model_dir, source, question, every_ms, output, log_path, headless, pace, precision, provider,
                   threads, max_frames, seconds, max_new_tokens, scene_threshold, embedding_threshold) -> None:
    """Caption a camera, video, stream or synthetic scenes live, with an overlay; q, Esc or Ctrl-C stop."""
    from vledge.runtime import load
    from vledge.webcam import DEFAULT_SCENE_THRESHOLD, DemoOptions, require_gui, run_demo

    if not headless:
        require_gui()  # before loading the model: a window was asked for that this OpenCV cannot open

    options = DemoOptions(question=question, every_ms=every_ms, output=output, log=log_path, headless=headless,
                          pace=pace, max_frames=max_frames, seconds=seconds, max_new_tokens=max_new_tokens,
                          scene_threshold=DEFAULT_SCENE_THRESHOLD if scene_threshold is None else scene_threshold,
                          embedding_threshold=embedding_threshold)
    providers = parse_providers(provider)
    runtime = load(model_dir, precision=precision, providers=providers, threads=threads)

    def show(event) -> None:
        if not event.reused:
            click.echo(f"[{event.stream_time:7.2f} s] frame {event.frame_index}: {event.caption or '(empty)'} "
                       f"({event.latency_ms:.0f} ms)")

    summary = run_demo(runtime, source, options, on_caption=show)
    click.echo(summary.describe())
    if not summary.ok:
        raise click.ClickException(summary.message)


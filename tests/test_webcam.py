"""The live captioning demo (``vledge webcam``), run headless on real video files and frame sources.

No timing asserts: the runs that check exact captions use the lockstep pace, which processes every
frame and waits for each caption, so what is captioned and what is reused does not depend on speed.
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import textwrap
from pathlib import Path

import cv2
import numpy as np
import pytest

from vledge.data.synth import Scene, SceneObject, render_scene
from vledge.errors import DisplayError, SourceError
from vledge.webcam import (
    END_OF_STREAM,
    INTERRUPTED,
    MAX_FRAMES,
    READ_ERROR,
    STALE_SOURCE,
    TIME_LIMIT,
    DemoOptions,
    FrameSource,
    LatestFrame,
    OutputError,
    OverlayState,
    SyntheticSource,
    draw_overlay,
    has_gui_support,
    open_source,
    run_demo,
    wrap_text,
)

WIDTH, HEIGHT, FPS = 160, 128, 25.0
# Runs of identical frames: scene A, B, C, then B again. A caption is made at each run's start.
RUNS = (("A", 12), ("B", 10), ("C", 10), ("B", 8))
RUN_STARTS = {0, 12, 22, 32}
N_FRAMES = sum(n for _, n in RUNS)


def _scene_image(name: str, rng_seed: int = 0) -> np.ndarray:
    scenes = {
        "A": Scene((SceneObject("circle", "red", "large", 0, 0),), background=(30, 30, 30)),
        "B": Scene((SceneObject("square", "yellow", "large", 1, 1), SceneObject("star", "white", "large", 2, 2)),
                   background=(95, 90, 100)),
        "C": Scene((SceneObject("triangle", "cyan", "large", 0, 2), SceneObject("diamond", "green", "small", 2, 0)),
                   background=(60, 20, 20)),
    }
    square = render_scene(scenes[name], HEIGHT, np.random.default_rng(rng_seed))
    image = np.zeros((HEIGHT, WIDTH, 3), np.uint8)
    image[:] = scenes[name].background
    image[:, (WIDTH - HEIGHT) // 2:(WIDTH + HEIGHT) // 2] = square
    return image


def _write_video(path: Path, frames: list[np.ndarray], fourcc: str = "mp4v", fps: float = FPS) -> Path:
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*fourcc), fps, (WIDTH, HEIGHT))
    assert writer.isOpened()
    for frame in frames:
        writer.write(frame)
    writer.release()
    return path


def _video_frames() -> list[np.ndarray]:
    frames = []
    for name, count in RUNS:
        image = _scene_image(name)
        frames += [image] * count
    return frames


def _read_video(path: Path) -> tuple[int, int, int]:
    """Frames decoded, width, height."""
    capture = cv2.VideoCapture(str(path))
    assert capture.isOpened(), f"{path} is not a readable video"
    width, height = int(capture.get(cv2.CAP_PROP_FRAME_WIDTH)), int(capture.get(cv2.CAP_PROP_FRAME_HEIGHT))
    frames = 0
    while capture.read()[0]:
        frames += 1
    capture.release()
    return frames, width, height


def _rows(path: Path) -> tuple[list[dict], dict]:
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    assert rows and rows[-1]["event"] == "end"
    assert all(row["event"] == "caption" for row in rows[:-1])
    return rows[:-1], rows[-1]


@pytest.fixture(scope="module")
def _webcam_model_dir(tiny_run, synth_data, tmp_path_factory) -> Path:
    from vledge.export import ExportOptions, export

    out = tmp_path_factory.mktemp("webcam") / "model"
    export(tiny_run.run_dir / "ckpt.pt", out, ExportOptions(quantize=("none",), data=synth_data, parity_samples=16))
    return out


@pytest.fixture(scope="module")
def runtime(_webcam_model_dir):
    from vledge.runtime import load

    return load(_webcam_model_dir, providers="cpu", threads=1)


@pytest.fixture(scope="module")
def video(tmp_path_factory) -> Path:
    return _write_video(tmp_path_factory.mktemp("video") / "scenes.mp4", _video_frames())


# --------------------------------------------------------------------------- pieces


def test_latest_frame_keeps_only_the_newest():
    slot = LatestFrame()
    for item in range(3):
        assert slot.put(item)
    assert slot.take(timeout=0) == 2
    assert slot.dropped == 2
    assert slot.take(timeout=0) is None
    slot.close()
    assert slot.finished and not slot.put(3)


def test_overlay_wraps_caption_to_the_frame():
    caption = "a large red circle at the top left and a small blue square in the center " * 3
    for line in wrap_text(caption, 150, 0.4):
        assert cv2.getTextSize(line, cv2.FONT_HERSHEY_SIMPLEX, 0.4, 1)[0][0] <= 150
    assert "".join(wrap_text("x" * 200, 60, 0.5)) == "x" * 200  # a long word is cut, not lost
    image = np.zeros((120, 160, 3), np.uint8)
    state = OverlayState(caption=caption, question="What is this?", latency_ms=12.0, checked_at=0.0,
                         timings={"preprocess_ms": 1.0, "vision_ms": 2.0, "prefill_ms": 3.0, "decode_ms": 4.0,
                                  "new_tokens": 5})
    out = draw_overlay(image, state, fps=30.0, now=1.0, truth="a red circle")
    assert out is image and out.shape == (120, 160, 3) and out.any()


def test_synthetic_source_moves_and_changes_scene():
    source = SyntheticSource(size=96, fps=10.0, scene_seconds=1.0, seed=3)
    frames, truths = [], []
    for _ in range(25):
        frames.append(source.read())
        truths.append(source.truth)
    assert frames[0].shape == (96, 96, 3) and frames[0].dtype == np.uint8
    assert all(not np.array_equal(a, b) for a, b in zip(frames, frames[1:]))
    assert len(set(truths[:10])) == 1  # one scene for a second, objects drifting
    assert len(set(truths)) >= 2  # then another
    again = SyntheticSource(size=96, fps=10.0, scene_seconds=1.0, seed=3)
    assert np.array_equal(again.read(), frames[0])  # the seed decides the stream


def test_demo_modules_do_not_import_torch():
    code = textwrap.dedent("""
        import sys
        import vledge.webcam as w
        w.SyntheticSource(size=64).read()
        import vledge.cli
        bad = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "torchvision", "PIL"))
        assert not bad, bad
    """)
    subprocess.run([sys.executable, "-c", code], check=True)


# --------------------------------------------------------------------------- sources that cannot be opened


def test_missing_or_unreadable_source_names_it(tmp_path):
    missing = tmp_path / "no-such-video.mp4"
    with pytest.raises(SourceError, match="no-such-video.mp4"):
        open_source(str(missing))
    not_video = tmp_path / "notes.mp4"
    not_video.write_text("this is not a video\n")
    with pytest.raises(SourceError, match="notes.mp4"):
        open_source(not_video)
    empty = tmp_path / "empty-folder"
    empty.mkdir()
    with pytest.raises(SourceError, match="empty-folder"):
        open_source(empty)


def test_missing_source_fails_before_any_output(runtime, tmp_path):
    out = tmp_path / "out.mp4"
    with pytest.raises(SourceError, match="gone.mp4"):
        run_demo(runtime, str(tmp_path / "gone.mp4"), DemoOptions(headless=True, output=out))
    assert not out.exists()
    with pytest.raises(OutputError, match="out.txt"):
        run_demo(runtime, "synthetic", DemoOptions(headless=True, output=tmp_path / "out.txt", max_frames=1))


# --------------------------------------------------------------------------- whole runs


def test_headless_video_captions_and_skips_unchanged_scenes(runtime, video, tmp_path):
    out, log_path = tmp_path / "annotated.mp4", tmp_path / "captions.jsonl"
    seen = []
    summary = run_demo(runtime, str(video), DemoOptions(headless=True, output=out, log=log_path, every_ms=0),
                       on_caption=seen.append)
    assert summary.reason == END_OF_STREAM and summary.ok, summary.message
    assert summary.pace == "lockstep" and not summary.window
    assert summary.frames == summary.frames_read == N_FRAMES and summary.frames_dropped == 0
    assert summary.output == out and summary.log == log_path
    assert not list(tmp_path.glob(".*partial*"))  # the partial file was renamed into place

    assert _read_video(out) == (N_FRAMES, WIDTH, HEIGHT)

    rows, end = _rows(log_path)
    assert end["reason"] == END_OF_STREAM and end["frames"] == N_FRAMES
    assert [row["frame_index"] for row in rows] == list(range(N_FRAMES))  # every frame checked (every_ms=0)
    assert len(seen) == len(rows)
    times = [row["timestamp"] for row in rows]
    assert times == sorted(times)
    stream = [row["stream_time"] for row in rows]
    assert all(b > a for a, b in zip(stream, stream[1:]))
    made = [row for row in rows if not row["reused"]]
    assert {row["frame_index"] for row in made} == RUN_STARTS  # repeated frames reuse the caption
    assert summary.captions_made == len(RUN_STARTS) and summary.captions_reused == N_FRAMES - len(RUN_STARTS)
    for row in made:
        assert isinstance(row["caption"], str) and row["finish_reason"] in ("stop", "length")
        assert {"preprocess_ms", "vision_ms", "prefill_ms", "decode_ms", "new_tokens"} <= set(row["timings"])
        assert row["timings"]["new_tokens"] >= 1
    current = None
    for row in rows:
        if row["reused"]:
            assert row["caption"] == current and row["timings"] is None and row["scene_difference"] < 8
        else:
            current = row["caption"]
    # Captions come from the model: the same picture gets the same caption (greedy decoding).
    by_start = {row["frame_index"]: row["caption"] for row in made}
    assert by_start[12] == by_start[32]


def test_embedding_check_reuses_captions_of_the_same_scene(runtime, video, tmp_path):
    log_path = tmp_path / "embedding.jsonl"
    # Pixel check off (every frame passes it): the embedding distance alone decides.
    summary = run_demo(runtime, video, DemoOptions(headless=True, log=log_path, every_ms=0, scene_threshold=0,
                                                   embedding_threshold=1e-4))
    assert summary.reason == END_OF_STREAM
    rows, end = _rows(log_path)
    assert end["captions_made"] == summary.captions_made and end["captions_reused"] == summary.captions_reused
    made = {row["frame_index"]: row for row in rows if not row["reused"]}
    assert set(made) == RUN_STARTS
    assert all(row["embedding_distance"] is not None and row["embedding_distance"] <= 1e-4
               for row in rows if row["reused"])
    # Decoding from the scene check's embedding gives the runtime's own caption of that frame.
    capture = cv2.VideoCapture(str(video))
    decoded = [capture.read()[1] for _ in range(N_FRAMES)]
    capture.release()
    for index, row in made.items():
        assert row["caption"] == runtime.caption(decoded[index]).text
        assert row["timings"]["vision_ms"] > 0 and row["timings"]["decode_ms"] >= 0


def test_realtime_pace_drops_only_stale_frames(runtime, video, tmp_path):
    out, log_path = tmp_path / "realtime.avi", tmp_path / "realtime.jsonl"
    summary = run_demo(runtime, video, DemoOptions(headless=True, pace="realtime", output=out, log=log_path,
                                                   every_ms=0, scene_threshold=0))
    assert summary.reason == END_OF_STREAM and summary.pace == "realtime"
    assert summary.frames + summary.frames_dropped == summary.frames_read == N_FRAMES
    assert _read_video(out)[0] == summary.frames
    rows, _ = _rows(log_path)
    assert rows and not any(row["reused"] for row in rows)  # threshold 0: every decision is a new caption
    indices = [row["frame_index"] for row in rows]
    assert indices == sorted(set(indices))


class _FailingCamera(FrameSource):
    """A live source whose reads start failing, as a camera does when its cable is pulled."""

    name = "test camera"
    live = True
    fps = 30.0

    def __init__(self, good: int) -> None:
        self.good = good
        self.reads = 0
        self.closed = False

    def read(self) -> np.ndarray:
        self.reads += 1
        if self.reads > self.good:
            raise OSError("device disconnected")
        return _scene_image("ABC"[(self.reads // 4) % 3], rng_seed=self.reads)

    def close(self) -> None:
        self.closed = True


class _FrozenCamera:
    """A live source that keeps returning its last buffer (duck-typed: any object with read() will do)."""

    name = "frozen camera"
    live = True

    def __init__(self) -> None:
        self.reads = 0
        self.closed = False

    def read(self) -> np.ndarray:
        self.reads += 1
        return _scene_image("A")

    def close(self) -> None:
        self.closed = True


def test_source_failing_mid_stream_ends_cleanly_with_a_readable_video(runtime, tmp_path):
    camera = _FailingCamera(good=12)
    out, log_path = tmp_path / "failing.mp4", tmp_path / "failing.jsonl"
    summary = run_demo(runtime, camera, DemoOptions(headless=True, output=out, log=log_path, read_retries=3,
                                                     retry_delay_s=0, every_ms=0))
    assert summary.reason == READ_ERROR and not summary.ok
    assert "test camera" in summary.message and "device disconnected" in summary.message
    assert camera.reads == 12 + 4 and camera.closed  # 3 retries after the first failure, then closed
    frames, width, height = _read_video(out)
    assert frames == summary.frames >= 1 and (width, height) == (WIDTH, HEIGHT)
    _, end = _rows(log_path)
    assert end["reason"] == READ_ERROR


def test_truncated_video_file_ends_with_a_clear_message(runtime, tmp_path):
    full = _write_video(tmp_path / "full.avi", _video_frames(), fourcc="MJPG")
    data = full.read_bytes()
    truncated = tmp_path / "truncated.avi"
    truncated.write_bytes(data[: len(data) // 2])
    out = tmp_path / "truncated-annotated.mp4"
    summary = run_demo(runtime, truncated, DemoOptions(headless=True, output=out, every_ms=0, read_retries=2))
    assert summary.reason == READ_ERROR, summary.message
    assert "truncated.avi" in summary.message and f"of {N_FRAMES}" in summary.message
    assert 1 <= summary.frames < N_FRAMES
    assert _read_video(out) == (summary.frames, WIDTH, HEIGHT)


def test_frozen_live_source_triggers_the_watchdog(runtime, tmp_path):
    camera = _FrozenCamera()
    log_path = tmp_path / "frozen.jsonl"
    summary = run_demo(runtime, camera, DemoOptions(headless=True, log=log_path, stale_frames=10, stale_seconds=0,
                                                     max_frames=10_000))
    assert summary.reason == STALE_SOURCE and not summary.ok
    assert "frozen camera" in summary.message and "identical frames" in summary.message
    assert camera.reads == 10 and camera.closed
    _, end = _rows(log_path)
    assert end["reason"] == STALE_SOURCE


def test_ctrl_c_stops_cleanly_with_outputs_finalised(runtime, video, tmp_path):
    out, log_path = tmp_path / "interrupted.mp4", tmp_path / "interrupted.jsonl"
    seen = []

    def on_caption(event) -> None:  # runs in the demo's thread, where Ctrl-C arrives
        seen.append(event)
        if len(seen) == 5:
            raise KeyboardInterrupt

    summary = run_demo(runtime, video, DemoOptions(headless=True, output=out, log=log_path, every_ms=0),
                       on_caption=on_caption)
    assert summary.reason == INTERRUPTED and summary.ok
    assert 1 <= summary.frames < N_FRAMES
    assert _read_video(out) == (summary.frames, WIDTH, HEIGHT)
    _, end = _rows(log_path)
    assert end["reason"] == INTERRUPTED


def test_synthetic_stream_is_captioned_per_scene(runtime, tmp_path):
    log_path = tmp_path / "synthetic.jsonl"
    source = SyntheticSource(size=128, fps=10.0, scene_seconds=1.0, seed=5)
    summary = run_demo(runtime, source, DemoOptions(headless=True, log=log_path, every_ms=200, max_frames=30,
                                                    output=tmp_path / "synthetic.mp4"))
    assert summary.reason == MAX_FRAMES and summary.frames == 30 and summary.pace == "lockstep"
    assert _read_video(tmp_path / "synthetic.mp4") == (30, 128, 128)
    rows, _ = _rows(log_path)
    assert [row["frame_index"] for row in rows] == list(range(0, 30, 2))  # every 200 ms of stream time
    truths = [row["truth"] for row in rows]
    assert len(set(truths)) == 3  # three scenes in three seconds
    for row, previous in zip(rows[1:], rows):
        if row["truth"] != previous["truth"]:
            assert not row["reused"]  # a new scene is always captioned again
    assert summary.captions_made >= 3


def test_image_folder_is_a_slide_show(runtime, tmp_path):
    folder = tmp_path / "slides"
    folder.mkdir()
    for i, name in enumerate("ABC"):
        image = _scene_image(name)
        cv2.imwrite(str(folder / f"{i}.png"), image if i != 1 else cv2.resize(image, (80, 64)))
    (folder / "notes.txt").write_text("not an image")
    out = tmp_path / "slides.mp4"
    seen = []
    summary = run_demo(runtime, str(folder), DemoOptions(headless=True, output=out), on_caption=seen.append)
    assert summary.reason == END_OF_STREAM and summary.frames == 3
    assert [event.frame_index for event in seen] == [0, 1, 2] and not any(event.reused for event in seen)
    assert _read_video(out) == (3, WIDTH, HEIGHT)  # the smaller slide is scaled to the video's size


# --------------------------------------------------------------------------- command line


def test_cli_webcam_runs_headless_on_a_video(_webcam_model_dir, video, tmp_path):
    from click.testing import CliRunner

    from vledge.cli import main

    out, log_path = tmp_path / "cli.mp4", tmp_path / "cli.jsonl"
    result = CliRunner().invoke(main, [
        "webcam", "--model", str(_webcam_model_dir), "--source", str(video), "--headless", "--every-ms", "0",
        "--output", str(out), "--log", str(log_path), "--provider", "cpu", "--threads", "1", "--max-new-tokens", "8",
    ])
    assert result.exit_code == 0, result.output
    assert "end of" in result.output and "4 captions made" in result.output
    assert _read_video(out) == (N_FRAMES, WIDTH, HEIGHT)
    rows, _ = _rows(log_path)
    assert len(rows) == N_FRAMES

    bad = CliRunner().invoke(main, ["webcam", "--model", str(_webcam_model_dir), "--source",
                                    str(tmp_path / "missing.mp4"), "--headless", "--provider", "cpu"])
    assert bad.exit_code == 1
    assert "SourceError" in bad.output and "missing.mp4" in bad.output


# --------------------------------------------------------------------------- window without GUI support

needs_headless_opencv = pytest.mark.skipif(has_gui_support(), reason="this OpenCV build has GUI support")


@needs_headless_opencv
def test_the_headless_opencv_build_is_recognised():
    with pytest.raises(cv2.error, match="not implemented"):  # what has_gui_support() predicts
        cv2.namedWindow("vledge-test")


@needs_headless_opencv
def test_a_window_on_a_display_without_opencv_gui_is_an_error_naming_the_extra(runtime, tmp_path, monkeypatch):
    from click.testing import CliRunner

    from vledge.cli import main

    monkeypatch.setenv("DISPLAY", ":99")
    out = tmp_path / "never.mp4"
    with pytest.raises(DisplayError, match=r"no GUI support.*pip install \"vledge\[gui\]\""):
        run_demo(runtime, "synthetic", DemoOptions(output=out, max_frames=1))
    assert not out.exists()  # refused before anything was opened
    result = CliRunner().invoke(main, ["webcam", "--model", str(tmp_path / "not-loaded"), "--source", "synthetic"])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert result.output.startswith("Error: DisplayError: ") and len(result.output.strip().splitlines()) == 1
    for needed in ("opencv-python-headless", 'pip install "vledge[gui]"', "pip uninstall -y opencv-python-headless",
                   "--headless"):
        assert needed in result.output, needed

    log_path = tmp_path / "headless.jsonl"  # asked for no window: runs on the same machine
    summary = run_demo(runtime, "synthetic", DemoOptions(headless=True, log=log_path, max_frames=2))
    assert summary.ok and log_path.is_file()
    monkeypatch.delenv("DISPLAY")
    monkeypatch.delenv("WAYLAND_DISPLAY", raising=False)
    summary = run_demo(runtime, "synthetic", DemoOptions(max_frames=2))  # no display: headless by itself
    assert summary.ok


def test_a_huge_image_in_a_folder_is_skipped_by_name_before_it_is_decoded(runtime, tmp_path, caplog, monkeypatch):
    import vledge.webcam.sources as sources

    folder = tmp_path / "slides"
    folder.mkdir()
    for i, name in ((0, "A"), (2, "B")):
        cv2.imwrite(str(folder / f"{i}.png"), _scene_image(name))
    cv2.imwrite(str(folder / "1-huge.png"), np.zeros((8200, 8200), np.uint8))  # 67 Mpx: over the 64 Mpx limit
    (folder / "3-truncated.png").write_bytes((folder / "0.png").read_bytes()[:200])
    decoded = []
    imdecode = sources.cv2.imdecode
    monkeypatch.setattr(sources.cv2, "imdecode", lambda data, *flags: decoded.append(len(data)) or imdecode(data, *flags))
    with caplog.at_level(logging.WARNING):
        summary = run_demo(runtime, str(folder), DemoOptions(headless=True, read_retries=3))
    assert summary.reason == END_OF_STREAM and summary.frames == 2, summary.message
    sizes = {(folder / name).stat().st_size for name in ("0.png", "2.png")}
    assert decoded and set(decoded) <= sizes  # only the two good files were decoded, never the huge or cut one
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert any("1-huge.png" in w and "8200x8200" in w for w in warnings), warnings
    assert any("3-truncated.png" in w for w in warnings), warnings


def test_seconds_on_a_generated_source_is_the_length_of_the_video(runtime, tmp_path):
    """--seconds on synthetic scenes counts their own time, so the video lasts that long at their frame rate."""
    out = tmp_path / "ten.mp4"
    source = SyntheticSource(size=96, fps=25.0, scene_seconds=1.0, seed=2)
    summary = run_demo(runtime, source, DemoOptions(headless=True, output=out, seconds=2.0))
    assert summary.reason == TIME_LIMIT and summary.frames == 50
    video = cv2.VideoCapture(str(out))
    frames, fps = int(video.get(cv2.CAP_PROP_FRAME_COUNT)), video.get(cv2.CAP_PROP_FPS)
    video.release()
    assert frames == 50 and fps == pytest.approx(25.0)

"""``vledge batch``: rows equal to ``vledge caption`` on the same files, broken images as error rows, the
local and Ray engines agreeing, ``--resume`` after a real SIGKILL, tables and lists as inputs."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from vledge.errors import ConfigError

GOOD = 57
BROKEN = ("broken-empty.jpg", "broken-text.jpg", "broken-truncated.jpg")
TOKENS = "24"


def _cli():
    from vledge.cli import main

    return main


def _read_rows(output: Path) -> list[dict]:
    """Every row of a batch output folder, read the way a user would (pyarrow's dataset reader or JSON lines)."""
    if output.suffix == ".jsonl":
        rows = []
        for part in sorted(output.glob("part-*.jsonl")):
            rows.extend(json.loads(line) for line in part.read_text().splitlines())
        return rows
    import pyarrow.parquet as pq

    return pq.read_table(output).to_pylist()


@pytest.fixture(scope="module")
def image_folder(synth_data, tmp_path_factory) -> Path:
    """57 synthetic JPEGs in two sub-folders and 3 broken files: truncated, text named .jpg, zero bytes."""
    folder = tmp_path_factory.mktemp("batch") / "photos"
    sources = sorted((synth_data / "images").rglob("*.jpg"))[:GOOD]
    for number, source in enumerate(sources):
        target = folder / f"group{number % 2}" / source.name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(source, target)
    (folder / "broken-truncated.jpg").write_bytes(sources[0].read_bytes()[:300])
    (folder / "broken-text.jpg").write_text("this is a text file, not a JPEG\n")
    (folder / "broken-empty.jpg").write_bytes(b"")
    (folder / "notes.txt").write_text("not an image: skipped by extension")
    return folder


@pytest.fixture(scope="module")
def caption_reference(tiny_model_dir, image_folder) -> dict[str, dict]:
    """What ``vledge caption --model`` says about each file (fp32, greedy), by path."""
    result = CliRunner().invoke(_cli(), ["caption", "--model", str(tiny_model_dir), str(image_folder), "--jsonl",
                                         "--precision", "fp32", "--provider", "cpu", "--threads", "1",
                                         "--max-new-tokens", TOKENS])
    assert result.exit_code == 1, result.output  # three images fail
    records = {record["image"]: record for record in map(json.loads, result.stdout.splitlines())}
    assert len(records) == GOOD + len(BROKEN)
    return records


@pytest.fixture(scope="module")
def local_rows(tiny_model_dir, image_folder, tmp_path_factory) -> list[dict]:
    output = tmp_path_factory.mktemp("local") / "captions.parquet"
    result = CliRunner().invoke(_cli(), ["batch", "--model", str(tiny_model_dir), "--input", str(image_folder),
                                         "--output", str(output), "--precision", "fp32", "--provider", "cpu",
                                         "--workers", "2", "--threads-per-worker", "1", "--part-size", "8",
                                         "--batch-size", "3", "--max-new-tokens", TOKENS])
    assert result.exit_code == 0, result.output
    assert "60 inputs" in result.stdout and "3 with errors" in result.stdout
    assert not list(output.glob(".*")), "temporary files were left behind"
    return _read_rows(output)


def _check_against_caption(rows: list[dict], reference: dict[str, dict], model_dir: Path) -> None:
    assert len(rows) == GOOD + len(BROKEN)
    assert sorted(row["index"] for row in rows) == list(range(GOOD + len(BROKEN)))
    assert sorted(row["path"] for row in rows) == sorted(reference)
    sha = hashlib.sha256((model_dir / "vledge.json").read_bytes()).hexdigest()
    captions = [row for row in rows if row["error"] is None]
    errors = [row for row in rows if row["error"] is not None]
    assert len(captions) == GOOD
    for row in captions:
        expected = reference[row["path"]]
        assert (row["text"], row["tokens"]) == (expected["text"], expected["token_ids"]), row["path"]
        assert row["prompt"] == expected["prompt"]
        assert row["finish_reason"] == expected["finish_reason"]
        assert row["model_sha256"] == sha
        stages = [row[name] for name in ("image_decode_ms", "preprocess_ms", "vision_ms", "prefill_ms", "decode_ms")]
        assert all(value >= 0 for value in stages) and row["total_ms"] == pytest.approx(sum(stages))
    assert sorted(Path(row["path"]).name for row in errors) == sorted(BROKEN)
    for row in errors:
        assert row["error"].startswith("ImageError: ") and "\n" not in row["error"]
        assert row["path"] in row["error"] or Path(row["path"]).name in row["error"]
        assert reference[row["path"]]["error"].startswith("ImageError: ")
        assert row["text"] is None and row["tokens"] is None and row["model_sha256"] == sha


def test_local_batch_gives_the_captions_of_vledge_caption(local_rows, caption_reference, tiny_model_dir):
    _check_against_caption(local_rows, caption_reference, tiny_model_dir)


@pytest.fixture(scope="module")
def local_ray():
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False)
    yield ray
    ray.shutdown()


@pytest.mark.slow
def test_ray_engine_gives_the_same_rows_as_local(local_ray, local_rows, caption_reference, tiny_model_dir,
                                                 image_folder, tmp_path):
    output = tmp_path / "ray.parquet"
    result = CliRunner().invoke(_cli(), ["batch", "--engine", "ray", "--model", str(tiny_model_dir),
                                         "--input", str(image_folder), "--output", str(output),
                                         "--precision", "fp32", "--provider", "cpu", "--workers", "2",
                                         "--threads-per-worker", "1", "--part-size", "8",
                                         "--max-new-tokens", TOKENS])
    assert result.exit_code == 0, result.output
    rows = _read_rows(output)
    _check_against_caption(rows, caption_reference, tiny_model_dir)

    def key(row):
        return row["index"], row["path"], row["text"], row["tokens"], row["error"] is None

    assert sorted(map(key, rows)) == sorted(map(key, local_rows))
    assert local_ray.is_initialized()  # a Ray instance the caller started is left running


def _children(pid: int) -> list[int]:
    found = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        text = (task / "children").read_text() if (task / "children").exists() else ""
        found.extend(int(child) for child in text.split())
    return found


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"


@pytest.mark.slow
def test_resume_after_sigkill_gives_every_input_once(tiny_model_dir, image_folder, caption_reference, tmp_path):
    """Kill a local run (a real SIGKILL) once parts are committed; --resume finishes with exactly 60 rows."""
    blocker = tmp_path / "no-torch"
    (blocker / "torch").mkdir(parents=True)
    (blocker / "torch" / "__init__.py").write_text("raise ImportError('vledge batch must not import torch')\n")
    environment = {**os.environ, "PYTHONPATH": os.pathsep.join([str(blocker), os.environ.get("PYTHONPATH", "")]),
                   "OMP_NUM_THREADS": "1"}
    output = tmp_path / "captions.jsonl"
    command = [sys.executable, "-m", "vledge", "batch", "--model", str(tiny_model_dir), "--input", str(image_folder),
               "--output", str(output), "--precision", "fp32", "--provider", "cpu", "--workers", "1",
               "--part-size", "2", "--max-new-tokens", TOKENS]
    run = subprocess.Popen(command, env=environment, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 240
    while len(list(output.glob("part-*.jsonl"))) < 3 and run.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert run.poll() is None, run.communicate()[1].decode()[-2000:]
    workers = _children(run.pid)
    os.kill(run.pid, signal.SIGKILL)
    run.communicate()
    committed = sorted(output.glob("part-*.jsonl"))
    before = {part.name: part.read_bytes() for part in committed}
    assert 3 <= len(committed) < 30, "the run must be killed part-way"
    done_before = sum(len(data.splitlines()) for data in before.values())
    # Orphaned workers notice their parent is gone and stop rather than captioning for nobody.
    deadline = time.monotonic() + 60
    while any(map(_alive, workers)) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not any(map(_alive, workers))

    again = subprocess.run(command, env=environment, capture_output=True, text=True, timeout=600)
    assert again.returncode != 0 and "--resume" in again.stderr  # an existing output needs --resume
    assert "Traceback" not in again.stderr
    resumed = subprocess.run(command + ["--resume", "--workers", "2", "--part-size", "5"], env=environment,
                             capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"{done_before} done before" in resumed.stdout
    rows = _read_rows(output)
    assert sorted(row["index"] for row in rows) == list(range(60))
    assert len({row["path"] for row in rows}) == 60
    _check_against_caption(rows, caption_reference, tiny_model_dir)
    for name, data in before.items():  # what was committed before the kill is kept as it was
        assert (output / name).read_bytes() == data
    manifest = json.loads((output / "_vledge_batch.json").read_text())
    assert manifest["complete"] is True and manifest["inputs"] == 60
    assert not list(output.glob(".*.tmp"))


def test_engine_ray_without_ray_says_how_to_install(tiny_model_dir, image_folder, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # as if the [ray] extra were not installed
    monkeypatch.setitem(sys.modules, "ray.data", None)
    output = tmp_path / "out.parquet"
    result = CliRunner().invoke(_cli(), ["batch", "--engine", "ray", "--model", str(tiny_model_dir),
                                         "--input", str(image_folder), "--output", str(output)])
    assert result.exit_code == 1
    assert "Error: ConfigError:" in result.output and "pip install 'vledge[ray]'" in result.output
    assert "Traceback" not in result.output
    assert not output.exists()


def test_tables_and_path_lists_with_prompts(tiny_model_dir, synth_data, tmp_path):
    """A CSV with a prompt column, a Parquet table of image bytes, and a text file of relative paths."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from vledge.bulk import BatchOptions, run_batch
    from vledge.runtime import GenerationOptions, load

    images = sorted((synth_data / "images").rglob("*.jpg"))[100:104]
    folder = tmp_path / "set"
    folder.mkdir()
    for image in images:
        shutil.copy(image, folder / image.name)
    questions = ["How many shapes are there?", "", "What is in this image?", "Describe the image briefly."]
    (folder / "table.csv").write_text("file,question\n" + "".join(f"{i.name},{q}\n" for i, q in zip(images, questions)))
    (folder / "list.txt").write_text("# the first two\n" + "\n".join(i.name for i in images[:2]) + "\n\n")
    pq.write_table(pa.table({"image": [i.read_bytes() for i in images] + [b"not an image"]}), folder / "bytes.parquet")

    runtime = load(tiny_model_dir, precision="fp32", providers="cpu", threads=1)
    options = GenerationOptions(max_new_tokens=12)

    def batch(spec, name, **kwargs):
        summary = run_batch(BatchOptions(model_dir=tiny_model_dir, input=str(folder / spec), output=tmp_path / name,
                                         precision="fp32", providers="cpu", workers=1, max_new_tokens=12, **kwargs))
        assert summary.inputs == summary.captioned
        return sorted(_read_rows(tmp_path / name), key=lambda row: row["index"])

    rows = batch("table.csv", "csv.jsonl", prompt_column="question", prompt="What is at the top left?")
    assert [row["path"] for row in rows] == [str(folder / i.name) for i in images]
    expected_prompts = [q or "What is at the top left?" for q in questions]
    assert [row["prompt"] for row in rows] == expected_prompts
    for row, image, prompt in zip(rows, images, expected_prompts):
        assert row["tokens"] == runtime.ask(image, prompt, options).token_ids

    rows = batch("bytes.parquet", "bytes.parquet")
    assert [row["path"] for row in rows] == [f"{folder / 'bytes.parquet'}#{n}" for n in range(5)]
    for row, image in zip(rows, images):
        assert row["error"] is None and row["tokens"] == runtime.caption(image, options).token_ids
    assert rows[4]["error"].startswith("ImageError: ") and rows[4]["text"] is None

    rows = batch("list.txt", "list.parquet")
    assert [row["path"] for row in rows] == [str(folder / i.name) for i in images[:2]]


def test_bad_options_and_mismatched_resume_are_refused(tiny_model_dir, image_folder, tmp_path):
    from vledge.bulk import BatchOptions, run_batch

    with pytest.raises(ConfigError, match="--prompt is empty"):
        BatchOptions(model_dir=tiny_model_dir, input="x", output="o", prompt=" ")
    with pytest.raises(ConfigError, match="--ray-address needs --engine ray"):
        BatchOptions(model_dir=tiny_model_dir, input="x", output="o", ray_address="auto")
    with pytest.raises(ConfigError, match="applies to a Parquet or CSV table"):
        run_batch(BatchOptions(model_dir=tiny_model_dir, input=str(image_folder), output=tmp_path / "o",
                               prompt_column="question"))
    with pytest.raises(ConfigError, match="no files match"):
        run_batch(BatchOptions(model_dir=tiny_model_dir, input=str(tmp_path / "*.png"), output=tmp_path / "o"))

    small = tmp_path / "small"
    small.mkdir()
    for image in sorted(image_folder.rglob("group0/*.jpg"))[:2]:
        shutil.copy(image, small / image.name)
    first = BatchOptions(model_dir=tiny_model_dir, input=str(small), output=tmp_path / "out.jsonl", workers=1,
                         max_new_tokens=6)
    run_batch(first)
    again = BatchOptions(model_dir=tiny_model_dir, input=str(small), output=tmp_path / "out.jsonl", workers=1,
                         max_new_tokens=6, resume=True)
    assert run_batch(again).captioned == 0  # all done: nothing is redone
    with pytest.raises(ConfigError, match="cannot resume .* prompt"):
        run_batch(BatchOptions(model_dir=tiny_model_dir, input=str(small), output=tmp_path / "out.jsonl",
                               workers=1, max_new_tokens=6, resume=True, prompt="Something else?"))
    shutil.copy(sorted(image_folder.rglob("group1/*.jpg"))[0], small / "extra.jpg")
    with pytest.raises(ConfigError, match="cannot resume .* inputs"):
        run_batch(again)
    assert len(_read_rows(tmp_path / "out.jsonl")) == 2


@pytest.mark.slow
@pytest.mark.parametrize("engine", ["local", "ray"])
def test_a_model_the_workers_cannot_load_stops_with_its_typed_error(engine, tiny_model_dir, image_folder, tmp_path,
                                                                    request):
    """A tampered graph is found by each worker's load; the run stops with ModelDirError, no traceback."""
    if engine == "ray":
        request.getfixturevalue("local_ray")
    tampered = tmp_path / "model"
    shutil.copytree(tiny_model_dir, tampered)
    graph = tampered / "onnx" / "decoder_model_merged.onnx"
    data = bytearray(graph.read_bytes())
    data[-10] ^= 0xFF
    graph.write_bytes(bytes(data))
    output = tmp_path / "out.parquet"
    result = CliRunner().invoke(_cli(), ["batch", "--engine", engine, "--model", str(tampered), "--input",
                                         str(image_folder), "--output", str(output), "--workers", "2",
                                         "--threads-per-worker", "1", "--precision", "fp32"])
    assert result.exit_code == 1, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("Error: ")]
    assert len(errors) == 1 and errors[0].startswith("Error: ModelDirError:") and "decoder_model_merged.onnx" in errors[0]
    if engine == "local":  # (Ray forwards its workers' own log lines, tracebacks included, to this process)
        assert "Traceback" not in result.output
    assert not list(output.glob("part-*"))

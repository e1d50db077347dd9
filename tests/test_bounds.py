"""Nothing unbounded: reads are capped regular files, counts have limits, templates are sandboxed with a budget,
broken numbers from a model are noticed, and every refusal is one typed error (CLI: one ``Error:`` line)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from vledge.errors import ConfigError, DataError, ImageError, ModelDirError, OutputError


def vledge_cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """The real command line in a child process (a hang fails the test through the timeout)."""
    return subprocess.run([sys.executable, "-m", "vledge", *args], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})


def one_error_line(done: subprocess.CompletedProcess, kind: str, rc: int = 1) -> str:
    assert done.returncode == rc, (done.returncode, done.stderr)
    assert "Traceback" not in done.stderr, done.stderr
    errors = [line for line in done.stderr.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and errors[0].startswith(f"Error: {kind}"), done.stderr
    return errors[0]


@pytest.fixture()
def fifo(tmp_path) -> Path:
    path = tmp_path / "pipe.png"
    os.mkfifo(path)
    return path


@pytest.fixture()
def huge(tmp_path) -> Path:
    """A 1 GB file that costs no disk (sparse)."""
    path = tmp_path / "huge.png"
    with open(path, "wb") as handle:
        handle.truncate(1 << 30)
    return path


# --------------------------------------------------------------------------- the shared reader


def test_read_capped_takes_only_regular_files_under_the_cap(tmp_path, fifo, huge):
    from vledge.reads import read_capped

    (tmp_path / "small.bin").write_bytes(b"abc")
    assert read_capped(tmp_path / "small.bin", 3) == b"abc"
    for path, words in (("/dev/zero", "character device"), (fifo, "FIFO"), (tmp_path, "directory"),
                        (huge, "over the limit"), (tmp_path / "missing", "no such file")):
        with pytest.raises(ImageError, match=words) as caught:
            read_capped(path, 1 << 20, ImageError, "image")
        assert str(path) in str(caught.value)
    with pytest.raises(DataError, match="over the limit of 2"):
        read_capped(tmp_path / "small.bin", 2)


def test_json_nested_too_deep_is_a_typed_error(tmp_path):
    from vledge.reads import MAX_JSON_DEPTH, parse_json, read_json

    with pytest.raises(DataError, match="nested"):
        parse_json("[" * 100_000 + "]" * 100_000, "x")
    with pytest.raises(DataError, match="nested more than"):
        parse_json("[" * (MAX_JSON_DEPTH + 1) + "]" * (MAX_JSON_DEPTH + 1), "x")
    assert parse_json("[" * MAX_JSON_DEPTH + "]" * MAX_JSON_DEPTH, "x") is not None
    (tmp_path / "bad.json").write_bytes(b"\xff\xfe{}")
    with pytest.raises(DataError, match="not UTF-8"):
        read_json(tmp_path / "bad.json")


# --------------------------------------------------------------------------- caption, webcam, training data


@pytest.mark.slow
def test_caption_refuses_dev_zero_a_fifo_and_a_1gb_file(tiny_model_dir, fifo, huge):
    for path, words in (("/dev/zero", "character device"), (str(fifo), "FIFO"), (str(huge), "over the limit")):
        done = vledge_cli("caption", "--model", str(tiny_model_dir), "--threads", "1", path, timeout=60)
        assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr
        assert f"{path}: error: ImageError: cannot read image {path}: " in done.stderr and words in done.stderr


@pytest.mark.slow
def test_caption_seed_threads_and_beams_are_bounded(tiny_model_dir, synth_data):
    image = str(sorted((synth_data / "images").iterdir())[0])
    model = ["caption", "--model", str(tiny_model_dir)]
    for option, value in (("--seed", "-1"), ("--threads", "1000000"), ("--num-beams", "100000")):
        done = vledge_cli(*model, option, value, image)
        assert option in one_error_line(done, "UsageError", rc=2)
    done = vledge_cli("train", "--data", "x", "--grad-accum", "1000000000")
    assert "--grad-accum" in one_error_line(done, "UsageError", rc=2)


def test_library_counts_are_bounded():
    from vledge.decoding import GenerationOptions
    from vledge.runtime.providers import SessionConfig

    with pytest.raises(ConfigError, match="num_beams"):
        GenerationOptions(num_beams=100_000)
    with pytest.raises(ConfigError, match="seed"):
        GenerationOptions(seed=-1)
    with pytest.raises(ConfigError, match="threads"):
        SessionConfig(threads=1_000_000)


def test_webcam_image_folder_skips_a_fifo_and_a_huge_file(tmp_path, synth_data):
    from vledge.errors import SourceError
    from vledge.webcam.sources import ImageFolderSource

    folder = tmp_path / "frames"
    folder.mkdir()
    shutil.copy(sorted((synth_data / "images").iterdir())[0], folder / "a.jpg")
    os.mkfifo(folder / "b.jpg")
    with open(folder / "c.jpg", "wb") as handle:
        handle.truncate(1 << 30)
    source = ImageFolderSource(folder)
    assert source.expected_frames == 2  # the FIFO is not a file: never listed, never opened
    assert source.read().shape[2] == 3
    with pytest.raises(SourceError, match="c.jpg.*over the limit"):
        source.read()
    assert source.read() is None


def test_training_annotations_that_are_a_fifo_or_too_deep_are_data_errors(tmp_path):
    from vledge.data.jsonfile import read_json as read_annotations

    os.mkfifo(tmp_path / "train.json")
    with pytest.raises(DataError, match="FIFO"):
        read_annotations(tmp_path / "train.json")


def test_a_tokenizer_config_nested_100000_deep_is_a_tokenizer_error(tiny_model_dir, tmp_path):
    from vledge.errors import TokenizerError
    from vledge.hf.tokenizer import adapt_tokenizer

    shutil.copy(tiny_model_dir / "tokenizer.json", tmp_path / "tokenizer.json")
    (tmp_path / "tokenizer_config.json").write_text('{"a": ' + "[" * 100_000 + "]" * 100_000 + "}")
    with pytest.raises(TokenizerError, match="tokenizer_config.json.*nested"):
        adapt_tokenizer(tmp_path)


# --------------------------------------------------------------------------- batch


@pytest.mark.slow
def test_batch_list_with_dev_zero_and_a_fifo_records_failed_rows_and_goes_on(tiny_model_dir, synth_data, tmp_path,
                                                                            fifo):
    from vledge.bulk import BatchOptions, run_batch

    good = sorted((synth_data / "images").iterdir())[0]
    listing = tmp_path / "inputs.txt"
    listing.write_text(f"{good}\n/dev/zero\n{fifo}\n")
    summary = run_batch(BatchOptions(model_dir=tiny_model_dir, input=str(listing), output=tmp_path / "out.jsonl",
                                     workers=1, max_new_tokens=4))
    rows = sorted((json.loads(line) for part in sorted((tmp_path / "out.jsonl").glob("part-*.jsonl"))
                   for line in part.read_text().splitlines()), key=lambda row: row["index"])
    assert [row["error"] is None for row in rows] == [True, False, False]
    assert "character device" in rows[1]["error"] and "FIFO" in rows[2]["error"]
    assert summary.captioned == 3


@pytest.mark.slow
def test_batch_non_utf8_list_and_links_out_of_the_folder_are_refused(tiny_model_dir, synth_data, tmp_path):
    listing = tmp_path / "inputs.txt"
    listing.write_bytes(b"\xff\xfe\x00a.png\n")
    done = vledge_cli("batch", "--model", str(tiny_model_dir), "--input", str(listing), "--output",
                      str(tmp_path / "o.jsonl"))
    assert "not UTF-8" in one_error_line(done, "ConfigError")

    from vledge.bulk import BatchOptions, run_batch

    folder = tmp_path / "inside"
    folder.mkdir()
    outside = sorted((synth_data / "images").iterdir())[0]
    (folder / "link.jpg").symlink_to(outside)
    options = dict(model_dir=tiny_model_dir, input=str(folder), workers=1, max_new_tokens=4)
    with pytest.raises(ConfigError, match="link.jpg.*outside it.*--follow-links"):
        run_batch(BatchOptions(output=tmp_path / "refused.jsonl", **options))
    assert not (tmp_path / "refused.jsonl").exists()
    assert run_batch(BatchOptions(output=tmp_path / "followed.jsonl", follow_links=True, **options)).captioned == 1


@pytest.mark.slow
@pytest.mark.parametrize("edit", ["out_of_range", "text", "not_a_row", "nested"])
def test_batch_resume_refuses_hand_edited_parts(tiny_model_dir, synth_data, tmp_path, edit):
    from vledge.bulk import BatchOptions, run_batch

    folder = tmp_path / "in"
    folder.mkdir()
    for image in sorted((synth_data / "images").iterdir())[:2]:
        shutil.copy(image, folder / image.name)
    options = dict(model_dir=tiny_model_dir, input=str(folder), output=tmp_path / "out.jsonl", workers=1,
                   max_new_tokens=4, part_size=1)
    run_batch(BatchOptions(**options))
    part = sorted((tmp_path / "out.jsonl").glob("part-*.jsonl"))[-1]
    row = json.loads(part.read_text())
    if edit == "out_of_range":
        row["index"] = 99
        part.write_text(json.dumps(row) + "\n")
    elif edit == "text":
        row["index"] = "1"
        part.write_text(json.dumps(row) + "\n")
    elif edit == "not_a_row":
        part.write_text(json.dumps({"index": 1}) + "\n")
    else:
        (tmp_path / "out.jsonl" / "_vledge_batch.json").write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(ConfigError, match="cannot resume|nested"):
        run_batch(BatchOptions(resume=True, **options))


def test_batch_prompt_column_must_hold_text(tmp_path, synth_data):
    pq = pytest.importorskip("pyarrow.parquet")
    import pyarrow as pa

    from vledge.bulk import list_inputs

    image = str(sorted((synth_data / "images").iterdir())[0])
    pq.write_table(pa.table({"path": [image], "question": [7]}), tmp_path / "t.parquet")
    with pytest.raises(ConfigError, match="prompt column 'question' holds int"):
        list_inputs(str(tmp_path / "t.parquet"), prompt_column="question")


def test_bench_checks_its_output_folder_before_any_work(tmp_path):
    (tmp_path / "file").write_text("x")
    done = vledge_cli("bench", "--ckpt", "missing.pt", "--model", "missing", "--out", str(tmp_path / "file"))
    assert "is a file" in one_error_line(done, "OutputError")
    from vledge.files import check_writable_folder

    with pytest.raises(OutputError):
        check_writable_folder(tmp_path / "file" / "below")


# --------------------------------------------------------------------------- chat templates


TEMPLATES = {
    "loops_1e10": "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
    "loops_1e8": "{% for i in range(10000) %}{% for j in range(10000) %}{% endfor %}{% endfor %}",
    "huge_string": "{{ 'a' * 10**9 }}",
    "long_output": "{% for i in range(10000) %}{{ 'abcdefghijklmnopqrstuvwxyz' }}{% endfor %}",
    "type_error": "{{ messages + 1 }}",
    "recursion": "{% macro f(x) %}{{ f(x) }}{% endmacro %}{{ f(1) }}",
}


@pytest.mark.parametrize("name", sorted(TEMPLATES))
def test_a_hostile_chat_template_is_a_config_error(name):
    from vledge.chat_template import render

    with pytest.raises(ConfigError, match="chat template"):
        render(TEMPLATES[name], [{"role": "user", "content": "hi"}], True, "<s>", "</s>")


# --------------------------------------------------------------------------- numbers a model gives back


def _rewrite(model_dir: Path, tmp_path: Path, graph: str, change) -> Path:
    """A copy of ``model_dir`` whose fp32 ``graph`` is changed by ``change(model)`` and re-hashed (a tampered
    directory the manifest vouches for: only the runtime's own checks can catch it)."""
    import onnx

    from vledge.manifest import MANIFEST_NAME, sha256_of

    copy = tmp_path / "model"
    shutil.copytree(model_dir, copy)
    path = copy / "onnx" / f"{graph}.onnx"
    model = onnx.load(str(path))
    change(model)
    onnx.save(model, str(path))
    manifest = json.loads((copy / MANIFEST_NAME).read_text())
    manifest["files"][f"onnx/{graph}.onnx"] = {"sha256": sha256_of(path), "size": path.stat().st_size}
    (copy / MANIFEST_NAME).write_text(json.dumps(manifest))
    return copy


def _append(model, make_nodes, symbolic: bool = False) -> None:
    """Route the graph's first output through the nodes ``make_nodes(old_name, new_name)`` gives."""
    output = model.graph.output[0]
    name = output.name
    output.name = f"{name}_before"
    for node in model.graph.node:
        node.output[:] = [f"{name}_before" if out == name else out for out in node.output]
    model.graph.node.extend(make_nodes(f"{name}_before", name))
    model.graph.output[0].name = name
    if symbolic:
        for dim in model.graph.output[0].type.tensor_type.shape.dim:
            dim.dim_param = "any"


def _times(value: float):
    from onnx import helper, numpy_helper

    def make(before, after):
        constant = numpy_helper.from_array(np.array(value, np.float32), name=f"{after}_factor")
        return [helper.make_node("Constant", [], [f"{after}_factor"], value=constant),
                helper.make_node("Mul", [before, f"{after}_factor"], [after])]
    return make


def _graph_change(kind: str):
    from onnx import TensorProto, helper

    if kind == "nan_features":
        return "vision_encoder", lambda m: _append(m, _times(float("nan")))
    if kind == "nan_logits":
        return "decoder_model_merged", lambda m: _append(m, _times(float("nan")))
    if kind == "float64_features":
        def cast(m):
            _append(m, lambda before, after: [helper.make_node("Cast", [before], [after], to=TensorProto.DOUBLE)])
            m.graph.output[0].type.tensor_type.elem_type = TensorProto.DOUBLE
        return "vision_encoder", cast
    if kind == "extra_feature":
        return "vision_encoder", lambda m: _append(m, lambda before, after: [helper.make_node(
            "Concat", [before, before], [after], axis=1)], symbolic=True)
    raise AssertionError(kind)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["nan_features", "nan_logits", "float64_features", "extra_feature"])
def test_broken_numbers_from_a_graph_are_refused_not_captioned(tiny_model_dir, synth_data, tmp_path, kind):
    import vledge.runtime
    from vledge.errors import InferenceError

    graph, change = _graph_change(kind)
    broken = _rewrite(tiny_model_dir, tmp_path, graph, change)
    image = sorted((synth_data / "images").iterdir())[0]
    expected = ModelDirError if kind == "float64_features" else InferenceError
    with pytest.raises(expected, match="NaN or infinite|features of shape|tensor\\(double\\)"):
        model = vledge.runtime.load(broken, precision="fp32", providers="cpu", threads=1)
        model.caption(image)
    done = vledge_cli("caption", "--model", str(broken), "--precision", "fp32", "--threads", "1", str(image))
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr
    assert expected.__name__ in done.stderr

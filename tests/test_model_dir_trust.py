"""A model directory is trusted only after every file ONNX Runtime would read is listed and hashed."""

from __future__ import annotations

import json
import shutil

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from vledge.errors import ModelDirError
from vledge.manifest import MANIFEST_NAME, FileEntry, sha256_of, verify_file


def _external(tensor: TensorProto, location: str, directory) -> TensorProto:
    """Move a tensor's bytes into ``directory/location`` and point the tensor at it."""
    (directory / location).parent.mkdir(parents=True, exist_ok=True)
    (directory / location).write_bytes(tensor.raw_data)
    tensor.ClearField("raw_data")
    tensor.data_location = TensorProto.EXTERNAL
    entry = tensor.external_data.add()
    entry.key, entry.value = "location", location
    return tensor


def _constant(name: str, location: str, directory) -> onnx.NodeProto:
    value = numpy_helper.from_array(np.arange(6, dtype=np.float32).reshape(2, 3), name=f"{name}_value")
    return helper.make_node("Constant", [], [name], value=_external(value, location, directory))


def _graph_with(kind: str, location: str, directory) -> onnx.ModelProto:
    """A small graph whose one external tensor sits where ``kind`` says."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])
    opset = [helper.make_opsetid("", 17)]
    if kind == "constant":
        nodes = [_constant("c", location, directory), helper.make_node("Add", ["x", "c"], ["y"])]
        return helper.make_model(helper.make_graph(nodes, "g", [x], [y]), opset_imports=opset)
    if kind == "initializer":
        weight = _external(numpy_helper.from_array(np.ones((2, 3), np.float32), name="w"), location, directory)
        graph = helper.make_graph([helper.make_node("Add", ["x", "w"], ["y"])], "g", [x], [y], initializer=[weight])
        return helper.make_model(graph, opset_imports=opset)
    if kind == "sparse_initializer":
        values = _external(numpy_helper.from_array(np.ones(2, np.float32), name="s"), location, directory)
        indices = numpy_helper.from_array(np.array([0, 4], np.int64), name="s_indices")
        sparse = helper.make_sparse_tensor(values, indices, [2, 3])
        graph = helper.make_graph([helper.make_node("Add", ["x", "s"], ["y"])], "g", [x], [y])
        graph.sparse_initializer.append(sparse)
        return helper.make_model(graph, opset_imports=opset)
    if kind in ("if_branch", "nested_if"):
        inner_out = helper.make_tensor_value_info("c", TensorProto.FLOAT, [2, 3])
        branch = helper.make_graph([_constant("c", location, directory)], "then", [], [inner_out])
        if kind == "nested_if":
            inner_if = helper.make_node("If", ["cond"], ["c"], then_branch=branch, else_branch=branch)
            branch = helper.make_graph([inner_if], "outer_then", [], [inner_out])
        cond = numpy_helper.from_array(np.array(True), name="cond")
        nodes = [helper.make_node("If", ["cond"], ["c"], then_branch=branch, else_branch=branch),
                 helper.make_node("Add", ["x", "c"], ["y"])]
        return helper.make_model(helper.make_graph(nodes, "g", [x], [y], initializer=[cond]), opset_imports=opset)
    if kind == "loop_body":
        iteration = helper.make_tensor_value_info("i", TensorProto.INT64, [])
        cond_in = helper.make_tensor_value_info("cond_in", TensorProto.BOOL, [])
        cond_out = helper.make_tensor_value_info("cond_out", TensorProto.BOOL, [])
        scan_out = helper.make_tensor_value_info("c", TensorProto.FLOAT, [2, 3])
        body = helper.make_graph([_constant("c", location, directory),
                                  helper.make_node("Identity", ["cond_in"], ["cond_out"])],
                                 "body", [iteration, cond_in], [cond_out, scan_out])
        nodes = [helper.make_node("Loop", ["trip", ""], ["stacked"], body=body),
                 helper.make_node("ReduceSum", ["stacked"], ["summed"], keepdims=0, axes=[0]),
                 helper.make_node("Add", ["x", "summed"], ["y"])]
        trip = numpy_helper.from_array(np.array(1, np.int64), name="trip")
        return helper.make_model(helper.make_graph(nodes, "g", [x], [y], initializer=[trip]), opset_imports=[
            helper.make_opsetid("", 13)])
    if kind == "function_default":  # the tensor is the default value of the function's attribute
        default = helper.make_attribute("k", _external(numpy_helper.from_array(np.ones((2, 3), np.float32), "k"),
                                                       location, directory))
        function = helper.make_function("local", "AddDefault", ["a"], ["b"], [helper.make_node("Add", ["a", "a"], ["b"])],
                                        opset, attribute_protos=[default])
        graph = helper.make_graph([helper.make_node("AddDefault", ["x"], ["y"], domain="local")], "g", [x], [y])
        return helper.make_model(graph, opset_imports=opset + [helper.make_opsetid("local", 1)], functions=[function])
    if kind == "function":
        function = helper.make_function("local", "AddConst", ["a"], ["b"],
                                        [_constant("k", location, directory), helper.make_node("Add", ["a", "k"], ["b"])],
                                        opset)
        graph = helper.make_graph([helper.make_node("AddConst", ["x"], ["y"], domain="local")], "g", [x], [y])
        return helper.make_model(graph, opset_imports=opset + [helper.make_opsetid("local", 1)], functions=[function])
    raise AssertionError(kind)


KINDS = ["constant", "initializer", "sparse_initializer", "if_branch", "nested_if", "loop_body", "function",
         "function_default"]


@pytest.mark.parametrize("kind", KINDS)
def test_every_kind_of_external_reference_must_be_listed_and_inside(kind, tmp_path):
    onnx_dir = tmp_path / "onnx"
    onnx_dir.mkdir()
    model = _graph_with(kind, "weights.data", onnx_dir)
    onnx.save(model, str(onnx_dir / "g.onnx"))
    entry = FileEntry(sha256_of(onnx_dir / "g.onnx"), (onnx_dir / "g.onnx").stat().st_size)
    verify_file(tmp_path, "onnx/g.onnx", entry, {"onnx/g.onnx", "onnx/weights.data"})
    with pytest.raises(ModelDirError, match="does not hash"):
        verify_file(tmp_path, "onnx/g.onnx", entry, {"onnx/g.onnx"})

    for location in ("../../outside.data", "/etc/passwd"):
        model = _graph_with(kind, "weights.data", onnx_dir)
        for tensor in _all_external_tensors(model):
            tensor.external_data[0].value = location
        onnx.save(model, str(onnx_dir / "bad.onnx"))
        entry = FileEntry(sha256_of(onnx_dir / "bad.onnx"), (onnx_dir / "bad.onnx").stat().st_size)
        with pytest.raises(ModelDirError, match="outside the model directory"):
            verify_file(tmp_path, "onnx/bad.onnx", entry, {"onnx/bad.onnx", "onnx/weights.data"})


def _all_external_tensors(model: onnx.ModelProto):
    """Walked with the onnx API (its own helper skips sparse initializers)."""
    found = []

    def graph(g):
        tensors = list(g.initializer) + [s.values for s in g.sparse_initializer]
        nodes(g.node, tensors)
        found.extend(t for t in tensors if t.external_data)

    def nodes(node_list, tensors):
        for node in node_list:
            for attribute in node.attribute:
                tensors.extend([attribute.t, *attribute.tensors])
                for sub in [attribute.g, *attribute.graphs]:
                    graph(sub)

    graph(model.graph)
    for function in model.functions:
        tensors = [attribute.t for attribute in function.attribute_proto]
        nodes(function.node, tensors)
        found.extend(t for t in tensors if t.external_data)
    assert found
    return found


def _rehash(model_dir, relative: str) -> None:
    manifest_path = model_dir / MANIFEST_NAME
    manifest = json.loads(manifest_path.read_text())
    path = model_dir / relative
    manifest["files"][relative] = {"sha256": sha256_of(path), "size": path.stat().st_size}
    manifest_path.write_text(json.dumps(manifest))


@pytest.mark.parametrize("verify", [True, False])
def test_an_unlisted_file_behind_a_constant_node_never_reaches_onnx_runtime(tiny_model_dir, tmp_path, verify):
    """The embedding table moved from an initializer into a Constant node whose bytes live in an unlisted file."""
    from vledge.runtime import load

    copy = tmp_path / "model"
    shutil.copytree(tiny_model_dir, copy)
    path = copy / "onnx" / "embed_tokens.onnx"
    model = onnx.load(str(path))
    table = model.graph.initializer[0]
    constant_value = TensorProto()
    constant_value.CopyFrom(table)
    model.graph.ClearField("initializer")
    model.graph.node.insert(0, helper.make_node("Constant", [], [table.name],
                                                value=_external(constant_value, "sneaky.data", copy / "onnx")))
    onnx.save(model, str(path))
    _rehash(copy, "onnx/embed_tokens.onnx")  # the attacker rewrites the manifest too; the data file stays unlisted
    with pytest.raises(ModelDirError, match="sneaky.data"):
        load(copy, precision="fp32", providers="cpu", threads=1, verify=verify)


def _edit_manifest(model_dir, change) -> None:
    manifest_path = model_dir / MANIFEST_NAME
    manifest = json.loads(manifest_path.read_text())
    change(manifest)
    manifest_path.write_text(json.dumps(manifest))


def _put(*keys_and_value):
    *keys, value = keys_and_value

    def change(manifest):
        target = manifest
        for key in keys[:-1]:
            target = target[key]
        target[keys[-1]] = value
    return change


MALFORMED = {
    "variants_a_list": _put("variants", ["onnx/vision_encoder.onnx"]),
    "variants_a_string": _put("variants", "onnx"),
    "variant_a_list": _put("variants", "vision_encoder", ["onnx/vision_encoder.onnx"]),
    "variant_path_a_number": _put("variants", "embed_tokens", "fp32", 7),
    "variant_unknown_precision": _put("variants", "embed_tokens", "fp8", "onnx/embed_tokens.onnx"),
    "variants_missing_a_graph": lambda m: m["variants"].pop("embed_tokens"),
    "files_a_list": _put("files", []),
    "file_size_text": lambda m: next(iter(m["files"].values())).__setitem__("size", "12"),
    "file_size_negative": lambda m: next(iter(m["files"].values())).__setitem__("size", -1),
    "file_sha_not_hex": lambda m: next(iter(m["files"].values())).__setitem__("sha256", "z" * 64),
    "special_token_text": _put("special_tokens", "eos", "2"),
    "special_token_missing": lambda m: m["special_tokens"].pop("image"),
    "special_token_beyond_vocab": _put("special_tokens", "eos", 10**6),
    "prefix_ids_a_string": _put("prefix_ids", "1 2 3"),
    "prefix_id_negative": _put("prefix_ids", [1, -4]),
    "tensors_a_number": _put("tensors", 3),
    "tensor_outputs_empty": _put("tensors", "decoder_model_merged", "outputs", []),
    "selected_a_list": _put("selected", ["cpu"]),
    "selected_unknown_precision": _put("selected", "cpu", "decoder_model_merged", "int3"),
    "generation_a_list": _put("generation", [32]),
    "generation_max_tokens_negative": _put("generation", "max_new_tokens", -1),
    "generation_prompt_a_number": _put("generation", "caption_prompt", 5),
    "image_tokens_text": _put("architecture", "image_tokens", "16"),
    "architecture_disagrees": _put("architecture", "vocab_size", 999),
    "model_config_heads_zero": _put("model_config", "language", "heads", 0),
    "model_config_hidden_text": _put("model_config", "language", "hidden", "32"),
    "model_config_special_token_a_number": _put("model_config", "special_tokens", {"image": 5}),
    "model_config_special_tokens_a_list": _put("model_config", "special_tokens", ["<image>"]),
    "prompt_a_list": _put("prompt", ["USER:"]),
    "prompt_field_a_number": _put("prompt", "system", 5),
    "preprocess_a_number": _put("preprocess", 3),
    "preprocess_size_text": _put("preprocess", "image_size", "32"),
    "parity_a_list": _put("parity", [1]),
    "provenance_a_string": _put("provenance", "me"),
}


@pytest.mark.parametrize("name", sorted(MALFORMED))
def test_a_malformed_manifest_is_one_typed_error_naming_the_field(tiny_model_dir, tmp_path, name):
    from vledge.runtime import load

    copy = tmp_path / "model"
    shutil.copytree(tiny_model_dir, copy)
    _edit_manifest(copy, MALFORMED[name])
    with pytest.raises(ModelDirError, match="vledge.json") as caught:
        load(copy, precision="fp32", providers="cpu", threads=1, verify=False)
    assert "Error" not in type(caught.value.__context__).__name__ or caught.value.__suppress_context__


def _set_vocab(vocab: int):
    def change(manifest):
        manifest["model_config"]["language"]["vocab_size"] = vocab
        manifest["architecture"]["vocab_size"] = vocab
    return change


def _set_hidden(hidden: int):
    def change(manifest):
        manifest["model_config"]["language"]["hidden"] = hidden
        manifest["architecture"]["hidden"] = hidden
        manifest["architecture"]["head_dim"] = hidden // manifest["model_config"]["language"]["heads"]
    return change


def _swap_graph(model_dir, component: str, replacement: str):
    def change(manifest):
        manifest["variants"][component]["fp32"] = f"onnx/{replacement}.onnx"
    return change


MISMATCHED = {
    "decoder_wider_than_manifest": (_set_vocab, "logits"),
    "hidden_narrower_than_graphs": (_set_hidden, "hidden"),
    "outputs_renamed": (lambda _: _put("tensors", "decoder_model_merged", "outputs", ["scores"]), "outputs"),
    "decoder_is_the_vision_encoder": (lambda _: lambda m: m["variants"]["decoder_model_merged"].__setitem__(
        "fp32", "onnx/vision_encoder.onnx"), "decoder_model_merged"),
    "fewer_layers_than_graph": (lambda _: _put("model_config", "language", "layers", 1), "layers"),
}


@pytest.mark.parametrize("name", sorted(MISMATCHED))
def test_graphs_that_disagree_with_the_manifest_are_refused_before_anything_runs(tiny_model_dir, tmp_path, name):
    from vledge.runtime import load

    copy = tmp_path / "model"
    shutil.copytree(tiny_model_dir, copy)
    make, words = MISMATCHED[name]
    manifest = json.loads((copy / MANIFEST_NAME).read_text())
    vocab = manifest["model_config"]["language"]["vocab_size"]
    hidden = manifest["model_config"]["language"]["hidden"]
    change = make(vocab - 5 if name.startswith("decoder_wider") else hidden // 2)
    _edit_manifest(copy, change)
    if name == "fewer_layers_than_graph":
        _edit_manifest(copy, _put("architecture", "layers", 1))
    with pytest.raises(ModelDirError, match=words):
        load(copy, precision="fp32", providers="cpu", threads=1, verify=False)


def test_a_graph_under_any_name_is_scanned_and_unlisted_files_in_reach_are_refused(tiny_model_dir, tmp_path):
    """A graph listed as ``onnx/embed_tokens.bin`` is scanned like any ``.onnx``; a stray file beside the graphs
    (which ONNX Runtime could read as external data) stops the load."""
    from vledge.manifest import read_manifest
    from vledge.runtime import load

    copy = tmp_path / "model"
    shutil.copytree(tiny_model_dir, copy)
    model = onnx.load(str(copy / "onnx" / "embed_tokens.onnx"))
    table = model.graph.initializer[0]
    _external(table, "sneaky.data", copy / "onnx")
    (copy / "onnx" / "embed_tokens.onnx").unlink()
    onnx.save(model, str(copy / "onnx" / "embed_tokens.bin"))

    def rename(manifest):
        manifest["files"].pop("onnx/embed_tokens.onnx")
        manifest["variants"]["embed_tokens"]["fp32"] = "onnx/embed_tokens.bin"
    _edit_manifest(copy, rename)
    _rehash(copy, "onnx/embed_tokens.bin")
    for verify in (True, False):
        with pytest.raises(ModelDirError, match="sneaky.data.*does not hash"):
            read_manifest(copy, verify=verify)

    clean = tmp_path / "clean"
    shutil.copytree(tiny_model_dir, clean)
    (clean / "onnx" / "notes.txt").write_text("left over")
    with pytest.raises(ModelDirError, match="onnx/notes.txt.*does not list"):
        load(clean, precision="fp32", providers="cpu", threads=1)
    (clean / "onnx" / "notes.txt").unlink()
    (clean / "onnx" / "deeper").mkdir()
    (clean / "onnx" / "deeper" / "weights.bin").write_bytes(b"0" * 16)
    with pytest.raises(ModelDirError, match="onnx/deeper/weights.bin"):
        load(clean, precision="fp32", providers="cpu", threads=1)


@pytest.mark.parametrize("what", ["deep", "fifo", "huge"])
def test_a_manifest_nested_deep_or_not_a_regular_file_is_one_typed_error(tiny_model_dir, tmp_path, what):
    import os

    from vledge.runtime import load

    copy = tmp_path / "model"
    shutil.copytree(tiny_model_dir, copy)
    manifest = copy / MANIFEST_NAME
    manifest.unlink()
    if what == "deep":
        manifest.write_text('{"format": ' + "[" * 100_000 + "]" * 100_000 + "}")
    elif what == "fifo":
        os.mkfifo(manifest)
    else:
        with open(manifest, "wb") as handle:
            handle.truncate(300 << 20)  # sparse: costs no disk
    with pytest.raises(ModelDirError, match="vledge.json"):
        load(copy, precision="fp32", providers="cpu", threads=1)

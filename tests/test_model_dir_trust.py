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
    if kind == "function":
        function = helper.make_function("local", "AddConst", ["a"], ["b"],
                                        [_constant("k", location, directory), helper.make_node("Add", ["a", "k"], ["b"])],
                                        opset)
        graph = helper.make_graph([helper.make_node("AddConst", ["x"], ["y"], domain="local")], "g", [x], [y])
        return helper.make_model(graph, opset_imports=opset + [helper.make_opsetid("local", 1)], functions=[function])
    raise AssertionError(kind)


KINDS = ["constant", "initializer", "sparse_initializer", "if_branch", "nested_if", "loop_body", "function"]


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
        tensors = []
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

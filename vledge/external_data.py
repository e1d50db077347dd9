"""Every external-data ``location`` an ONNX file names, read from the protobuf wire format.

The runtime has no onnx dependency, so this walks ModelProto by field number. ONNX Runtime
reads external data for any tensor it meets: graph initializers and sparse initializers,
tensor attributes of nodes (``Constant``'s ``value`` and friends), the subgraphs of ``If`` /
``Loop`` / ``Scan`` to any depth, model-local functions (their nodes and their attributes' default values) and training-info graphs. All of them
are visited, with an explicit stack so that a deeply nested hostile file cannot exhaust
Python's recursion limit.
"""

from __future__ import annotations

from pathlib import Path

from vledge.errors import ModelDirError

# message kind -> {field number: kind of the embedded message}; numbers from onnx.proto
MODEL, GRAPH, NODE, ATTRIBUTE, FUNCTION, TRAINING, SPARSE, TENSOR = range(8)
CHILDREN = {
    MODEL: {7: GRAPH, 20: TRAINING, 25: FUNCTION},
    GRAPH: {1: NODE, 5: TENSOR, 15: SPARSE},
    NODE: {5: ATTRIBUTE},
    ATTRIBUTE: {5: TENSOR, 6: GRAPH, 10: TENSOR, 11: GRAPH, 22: SPARSE, 23: SPARSE},
    FUNCTION: {7: NODE, 11: ATTRIBUTE},  # 11: attribute_proto, the defaults of the function's attributes
    TRAINING: {1: GRAPH, 2: GRAPH},
    SPARSE: {1: TENSOR, 2: TENSOR},
}
TENSOR_EXTERNAL_DATA = 13  # repeated StringStringEntryProto {key = 1, value = 2}
TENSOR_DATA_LOCATION = 14  # enum: 1 = EXTERNAL


def _varint(buf: memoryview, pos: int, name: str) -> tuple[int, int]:
    shift = result = 0
    while True:
        if pos >= len(buf) or shift > 63:
            raise ModelDirError(f"{name} is not a valid ONNX file (bad varint)")
        byte = buf[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, pos
        shift += 7


def _fields(buf: memoryview, name: str):
    """(field number, varint value or None, bytes or None) for each field of one message."""
    pos = 0
    while pos < len(buf):
        key, pos = _varint(buf, pos, name)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _varint(buf, pos, name)
            yield number, value, None
        elif wire == 1:
            pos += 8
        elif wire == 5:
            pos += 4
        elif wire == 2:
            length, pos = _varint(buf, pos, name)
            if pos + length > len(buf):
                raise ModelDirError(f"{name} is not a valid ONNX file (field overruns the file)")
            yield number, None, buf[pos:pos + length]
            pos += length
        else:
            raise ModelDirError(f"{name} is not a valid ONNX file (wire type {wire})")
        if pos > len(buf):
            raise ModelDirError(f"{name} is not a valid ONNX file (truncated)")


def _tensor_locations(tensor: memoryview, name: str) -> list[str]:
    locations: list[str] = []
    external = False
    for number, value, payload in _fields(tensor, name):
        if number == TENSOR_DATA_LOCATION and value == 1:
            external = True
        elif number == TENSOR_EXTERNAL_DATA and payload is not None:
            entry = {n: bytes(p) for n, _, p in _fields(payload, name) if p is not None}
            if entry.get(1) == b"location":
                try:
                    locations.append(entry.get(2, b"").decode("utf-8"))
                except UnicodeDecodeError:
                    raise ModelDirError(f"{name} names external data with a location that is not UTF-8") from None
    if external and not locations:
        raise ModelDirError(f"{name} has a tensor stored externally without a location")
    return locations


def external_data_locations(onnx_path: Path) -> list[str]:
    """The ``location`` of every externally stored tensor anywhere in the model, in file order."""
    name = onnx_path.name
    try:
        data = memoryview(onnx_path.read_bytes())
    except OSError as exc:
        raise ModelDirError(f"cannot read {onnx_path}: {exc.strerror or exc}") from None
    locations: list[str] = []
    stack: list[tuple[int, memoryview]] = [(MODEL, data)]
    while stack:
        kind, message = stack.pop()
        if kind == TENSOR:
            locations.extend(_tensor_locations(message, name))
            continue
        children = CHILDREN[kind]
        for number, _, payload in _fields(message, name):
            if payload is not None and number in children:
                stack.append((children[number], payload))
    return locations

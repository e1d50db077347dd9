"""ONNX export of trained vledge checkpoints (``vledge export``)."""

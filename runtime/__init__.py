"""Torch-free ONNX Runtime engine for exported vledge models."""

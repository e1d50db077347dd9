"""Side-by-side latency and accuracy of the PyTorch original and the exported variants (``vledge bench``)."""

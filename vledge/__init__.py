"""vledge: small vision-language models from training to the edge.

Importing ``vledge`` never imports torch; the torch parts live in
``vledge.models``, ``vledge.training`` and ``vledge.export``.
"""

__version__ = "0.1.0"

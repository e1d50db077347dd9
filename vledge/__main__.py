"""``python -m vledge`` runs the CLI (torchrun launches it this way)."""

from vledge.cli import main

main()

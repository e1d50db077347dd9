"""``python -m vledge.cli`` runs the CLI, as ``python -m vledge`` does."""

from vledge.cli import main

main()

"""The former home of ``export_llava``; it is :func:`vledge.export.folder.export_folder` under its old name."""

from vledge.export.folder import export_folder, export_llava

__all__ = ["export_folder", "export_llava"]

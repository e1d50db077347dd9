"""``vledge export HF_DIR``: a Hugging Face vision-language folder through the same graphs, variants and parity gate.

The folder's reader is chosen by its architecture (``vledge.hf.fusion_folders``: LLaVA, Idefics3 / SmolVLM). Its
tensors are read once and handed to the exporter as a checkpoint held in memory: no float32 copy of the weights
is written to disk. The manifest's provenance names the source folder and its weight files' sha256 (the model
config keeps them too).
"""

from __future__ import annotations

from pathlib import Path

from vledge.export.export import ExportOptions, ExportResult, Progress, _check_out_dir, export_checkpoint


def export_folder(hf_dir: str | Path, out_dir: str | Path, options: ExportOptions | None = None,
                  progress: Progress | None = None, context: int = 4096, backend: str = "pil",
                  on_questions=None) -> ExportResult:
    """Export the folder ``hf_dir`` (any architecture ``vledge.hf.fusion_folders`` reads) to ``out_dir``."""
    from vledge.hf.fusion_folders import folder_checkpoint

    options = options or ExportOptions()
    out_dir = Path(out_dir)
    _check_out_dir(out_dir, options)  # before reading gigabytes of weights
    say = progress or (lambda message: None)
    say(f"reading {hf_dir}")
    checkpoint = folder_checkpoint(hf_dir, context=context, backend=backend)
    source = checkpoint.model_config.language.source or {}
    origin = {"source_folder": source.get("folder"), "source_architecture": source.get("architecture"),
              "source_files_sha256": source.get("files")}
    return export_checkpoint(checkpoint, out_dir, origin, options, progress=progress, on_questions=on_questions)


export_llava = export_folder  # the name from when LLaVA was the only folder format

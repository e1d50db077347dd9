"""``vledge export HF_DIR``: a Hugging Face LLaVA folder through the same graphs, variants and parity gate.

The folder is converted to a vledge checkpoint in a temporary file next to the output (the
weights can be large), which is exported as any checkpoint and removed afterwards; the
manifest's model config keeps the source folder and its weight files' sha256.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from vledge.errors import ExportError
from vledge.export.export import ExportOptions, ExportResult, Progress, export


def export_llava(hf_dir: str | Path, out_dir: str | Path, options: ExportOptions | None = None,
                 progress: Progress | None = None, context: int = 4096, backend: str = "pil",
                 on_questions=None) -> ExportResult:
    from vledge.hf.llava import convert_llava

    options = options or ExportOptions()
    out_dir = Path(out_dir)
    if out_dir.exists() and not options.force:
        raise ExportError(f"{out_dir} already exists; pass --force to replace it")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    say = progress or (lambda message: None)
    with tempfile.TemporaryDirectory(prefix=f".{out_dir.name}.convert-", dir=out_dir.parent) as work:
        say(f"converting {hf_dir}")
        ckpt = convert_llava(hf_dir, Path(work) / "ckpt.pt", context=context, backend=backend)
        return export(ckpt, out_dir, options, progress=progress, on_questions=on_questions)

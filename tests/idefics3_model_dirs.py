"""Model directories of tiny random Idefics3 / SmolVLM folders, for the app tests (serve, batch, bench, CLI).

``make_idefics3_model_dir(folder, out)`` exports ``tests/hf_idefics3_folders`` folders with
``vledge.export.export_checkpoint`` (fp32 only, a short parity gate). Where this checkout's exporter cannot
export a tiled model yet, it writes the same fp32 directory from the exporter's own pieces (graphs, optimizer,
tokenizer, manifest) without the parity gate, so the apps can be tested on a real ONNX Runtime model meanwhile;
``EXPORTED`` says which of the two made the last directory.
"""

from __future__ import annotations

import contextlib
import math
import shutil
from pathlib import Path

EXPORTED: dict[str, bool] = {}  # out dir -> True when export_checkpoint wrote it (gate included)


def make_idefics3_model_dir(folder: Path, out: Path) -> Path:
    from vledge.export.export import ExportOptions, export_checkpoint
    from vledge.hf.fusion_folders import folder_checkpoint

    checkpoint = folder_checkpoint(folder)
    try:
        export_checkpoint(checkpoint, out, origin={}, options=ExportOptions(
            quantize=("none",), parity_samples=2, calibration_samples=1))
        EXPORTED[str(out)] = True
        return out
    except Exception:  # noqa: BLE001 - this exporter is not tiled-aware yet: assemble the fp32 directory
        shutil.rmtree(out, ignore_errors=True)
    with _traceable_pixel_shuffle():
        _assemble(checkpoint, out)
    EXPORTED[str(out)] = False
    return out


def _assemble(checkpoint, root: Path) -> None:
    from vledge.export import optimize
    from vledge.export.export import COMPONENTS, _hash_files, _manifest, _write_manifest
    from vledge.export.graphs import check_graph, export_graphs
    from vledge.manifest import TOKENIZER_NAME, variant_filename

    model = checkpoint.build_model().eval()
    tokenizer = checkpoint.tokenizer()
    (root / "onnx").mkdir(parents=True)
    raw = export_graphs(model, root / ".work" / "raw")
    variants: dict[str, dict[str, str]] = {component: {} for component in COMPONENTS}
    for component, path in raw.items():
        check_graph(path)
        optimize.optimize_component(component, path, root / variant_filename(component, "fp32"),
                                    language_kind=checkpoint.model_config.language.kind)
        variants[component]["fp32"] = variant_filename(component, "fp32")
    tokenizer.save(root / TOKENIZER_NAME)
    shutil.rmtree(root / ".work")
    manifest = _manifest(checkpoint, {}, tokenizer, model, variants, root)
    manifest.selected = {"cpu": {c: "fp32" for c in COMPONENTS}, "cuda": {c: "fp32" for c in COMPONENTS}}
    manifest.files = _hash_files(root)
    _write_manifest(root, manifest)


@contextlib.contextmanager
def _traceable_pixel_shuffle():
    """The connector's pixel shuffle with the token count read as a Python int (the tile size is fixed)."""
    import vledge.models.projector as projector

    original = projector.pixel_shuffle

    def pixel_shuffle(tokens, scale):
        batch, count, width = tokens.shape
        count = int(count)
        side = math.isqrt(count)
        x = tokens.reshape(batch, side, side // scale, width * scale).permute(0, 2, 1, 3)
        x = x.reshape(batch, side // scale, side // scale, width * scale * scale).permute(0, 2, 1, 3)
        return x.reshape(batch, count // (scale * scale), width * scale * scale)

    projector.pixel_shuffle = pixel_shuffle
    try:
        yield
    finally:
        projector.pixel_shuffle = original

"""``vledge export``: checkpoint -> verified model directory with quantized variants.

Everything is written into a hidden sibling folder and renamed into place only
after the fp32 graphs pass the parity gate, so an interrupted or failed export
leaves no directory behind, and an existing one is replaced only with ``force``.
"""

from __future__ import annotations

import datetime
import json
import logging
import math
import platform
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from vledge.checkpoint import load_checkpoint
from vledge.hashing import file_sha256
from vledge.errors import ConfigError, ExportError, VledgeError
from vledge.export.graphs import DEFAULT_OPSET, MAX_OPSET, check_graph, export_graphs, tensor_names
from vledge.export.parity import (
    FP32_ATOL,
    FP32_MIN_TOKEN_AGREEMENT,
    FP32_RTOL,
    ParitySamples,
    Reference,
    VariantParity,
    build_samples,
    fp32_failures,
    measure_runtime,
    torch_reference,
)
from vledge.export.progress import QuestionCallback, question_counter
from vledge.export.forced import ForcedSet, answer_set, read_parity_text, text_set
from vledge.export.gate import DEFAULT_MAX_MEAN_KL, DEFAULT_MIN_TOP1_AGREEMENT, GATE_METRICS, judge
from vledge.export.report import write_parity_markdown
from vledge.export.tile_batches import batch_tiles
from vledge.export.transformers_js import write_transformers_js_files
from vledge.export.tool_warnings import tool_warnings_to_debug_log
from vledge.files import atomic_directory, check_output_dir, write_json
from vledge.manifest import (
    COMPONENTS,
    MANIFEST_NAME,
    TOKENIZER_NAME,
    FileEntry,
    Manifest,
    sha256_of,
    variant_filename,
)
from vledge.prompt import CAPTION_PROMPT, prefix_ids, question_ids

log = logging.getLogger(__name__)

QUANTIZE_CHOICES = ("int8", "q4", "fp16")
CALIBRATION_METHODS = ("minmax", "entropy", "percentile")


@dataclass(frozen=True)
class ExportOptions:
    quantize: tuple[str, ...] = ("auto",)  # any of int8, q4, fp16; "auto" makes all and picks per component
    data: Path | None = None  # held-out images for calibration and parity; None: fresh built-in synthetic scenes
    calibration_method: str = "minmax"
    calibration_samples: int = 64
    parity_samples: int = 128
    max_accuracy_drop: float = 1.0  # points; for auto
    # for auto, the free-running budget: a variant must pick PyTorch's greedy tokens this often (accuracy alone
    # says nothing where the reference itself scores near zero); it decides only with gate="free-running"
    # or for a measurement without teacher-forced figures (vledge.export.gate)
    min_token_agreement: float = 0.9
    gate: str = "teacher-forced"  # which agreement decides auto: "teacher-forced" or "free-running"
    min_top1_agreement: float = DEFAULT_MIN_TOP1_AGREEMENT  # teacher-forced budgets (vledge.export.gate)
    max_mean_kl: float = DEFAULT_MAX_MEAN_KL
    parity_text: Path | None = None  # a UTF-8 text whose tokens are also teacher-forced
    parity_text_tokens: int = 1024  # at most this many tokens of it
    opset: int = DEFAULT_OPSET
    threads: int = 1  # for the latency measurements that decide auto
    force: bool = False

    def __post_init__(self) -> None:
        if not self.quantize:
            raise ConfigError(f"--quantize names no variant; give auto, none or some of {', '.join(QUANTIZE_CHOICES)}")
        if "none" in self.quantize and len(set(self.quantize)) > 1:
            raise ConfigError(f"--quantize none cannot be combined with {sorted(set(self.quantize) - {'none'})}")
        unknown = set(self.quantize) - {*QUANTIZE_CHOICES, "auto", "none"}
        if unknown:
            raise ConfigError(f"unknown --quantize value(s) {sorted(unknown)}; choose from auto, none, "
                              f"{', '.join(QUANTIZE_CHOICES)}")
        if self.calibration_method not in CALIBRATION_METHODS:
            raise ConfigError(f"unknown calibration method {self.calibration_method!r}; "
                              f"choose from {', '.join(CALIBRATION_METHODS)}")
        if self.opset < 17:
            raise ConfigError(f"opset {self.opset} is too old; vledge exports opset 17 or newer")
        if self.opset > MAX_OPSET:
            raise ConfigError(f"opset {self.opset} is newer than the exporter writes; choose 17 to {MAX_OPSET}")
        if not (math.isfinite(self.max_accuracy_drop) and self.max_accuracy_drop >= 0):
            raise ConfigError(f"max_accuracy_drop must be a finite number >= 0, got {self.max_accuracy_drop}")
        if not (math.isfinite(self.min_token_agreement) and 0 <= self.min_token_agreement <= 1):
            raise ConfigError(f"min_token_agreement must be in [0, 1], got {self.min_token_agreement}")
        if self.gate not in GATE_METRICS:
            raise ConfigError(f"unknown gate {self.gate!r}; choose from {', '.join(GATE_METRICS)}")
        if not (math.isfinite(self.min_top1_agreement) and 0 <= self.min_top1_agreement <= 1):
            raise ConfigError(f"min_top1_agreement must be in [0, 1], got {self.min_top1_agreement}")
        if not (math.isfinite(self.max_mean_kl) and self.max_mean_kl >= 0):
            raise ConfigError(f"max_mean_kl must be a finite number >= 0, got {self.max_mean_kl}")
        if isinstance(self.parity_text_tokens, bool) or not 1 <= self.parity_text_tokens <= 16384:
            raise ConfigError(f"parity_text_tokens must be 1 to 16384, got {self.parity_text_tokens}")
        if self.parity_samples < 1 or self.calibration_samples < 1:
            raise ConfigError("parity and calibration need at least one sample")

    @property
    def precisions(self) -> tuple[str, ...]:
        if "none" in self.quantize:
            return ()
        if "auto" in self.quantize:
            return QUANTIZE_CHOICES
        return tuple(p for p in QUANTIZE_CHOICES if p in self.quantize)


@dataclass
class ExportResult:
    model_dir: Path
    manifest: Manifest
    parity: dict[str, VariantParity]  # label -> measurements
    selected: dict[str, dict[str, str]]
    seconds: float
    skipped: dict[str, str] = field(default_factory=dict)  # variant label -> why it was not made or measured


Progress = Callable[[str], None]


def export(ckpt: str | Path, out_dir: str | Path | None = None, options: ExportOptions | None = None,
           progress: Progress | None = None, on_questions: QuestionCallback | None = None) -> ExportResult:
    """Export a checkpoint; see the module docstring for the guarantees."""
    options = options or ExportOptions()
    ckpt = Path(ckpt)
    out_dir = Path(out_dir) if out_dir is not None else ckpt.parent / "model"
    _check_out_dir(out_dir, options)
    say = progress or (lambda message: log.info("%s", message))
    say("loading checkpoint")
    checkpoint = load_checkpoint(ckpt)
    origin = {"checkpoint": ckpt.name, "checkpoint_sha256": file_sha256(ckpt)}
    return export_checkpoint(checkpoint, out_dir, origin, options, progress, on_questions)


def export_checkpoint(checkpoint, out_dir: str | Path, origin: dict, options: ExportOptions | None = None,
                      progress: Progress | None = None, on_questions: QuestionCallback | None = None) -> ExportResult:
    """Export a checkpoint held in memory (``vledge export HF_DIR`` builds one from the folder's tensors, so no
    float32 copy is written to disk); ``origin`` goes into the manifest's provenance."""
    options = options or ExportOptions()
    started = time.perf_counter()
    out_dir = Path(out_dir)
    _check_out_dir(out_dir, options)
    say = progress or (lambda message: log.info("%s", message))
    with atomic_directory(out_dir, tag="export-") as staging, tool_warnings_to_debug_log(say):
        result = _export_into(staging, checkpoint, origin, options, say, on_questions)
    result.model_dir = out_dir
    result.seconds = time.perf_counter() - started
    say(f"wrote {out_dir} in {result.seconds:.1f} s")
    return result


def _check_out_dir(out_dir: Path, options: ExportOptions) -> None:
    if out_dir.exists() and not options.force:
        raise ExportError(f"{out_dir} already exists; pass --force to replace it")
    if options.parity_text is not None:
        read_parity_text(options.parity_text)  # a missing or unreadable text fails before minutes of work
    check_output_dir(out_dir, "model directory")  # before minutes of export: /proc/x, a read-only mount


def _export_into(root: Path, checkpoint, origin: dict, options: ExportOptions, say: Progress,
                 on_questions: QuestionCallback | None = None) -> ExportResult:
    import torch

    from vledge.export import optimize, quantize
    from vledge.export.screening import cuda_works, reason_not_to_measure

    model = checkpoint.build_model()
    tokenizer = checkpoint.tokenizer()
    config = checkpoint.model_config
    work = root / ".work"
    onnx_dir = root / "onnx"
    onnx_dir.mkdir(parents=True)
    threads_before = torch.get_num_threads()

    say("exporting ONNX graphs (fp32)")
    raw = export_graphs(model, work / "raw", opset=options.opset)
    variants: dict[str, dict[str, str]] = {component: {} for component in COMPONENTS}
    # A tiled model's vision graph is optimised and quantized taking tiles alone; each variant that ships takes
    # transformers.js's [batch, tiles, 3, S, S] (vledge.export.tile_batches).
    tiled = model.fills_image_tokens
    sources = {component: root / variant_filename(component, "fp32") for component in COMPONENTS}
    if tiled:
        sources["vision_encoder"] = work / "vision_encoder_tiles.onnx"
    for component, path in raw.items():
        check_graph(path)
        optimize.optimize_component(component, path, sources[component], language_kind=config.language.kind)
        if tiled and component == "vision_encoder":
            batch_tiles(sources[component], root / variant_filename(component, "fp32"))
        variants[component]["fp32"] = variant_filename(component, "fp32")
    tokenizer.save(root / TOKENIZER_NAME)
    limits = _decoder_limits(root / variant_filename("decoder_model_merged", "fp32"))  # read once, not per manifest

    say("loading held-out data for calibration and parity")
    calibration, samples = _held_out_data(options, model, tokenizer, work)

    forced = _forced_sets(options, samples, tokenizer, model)
    say(f"running the PyTorch reference on {len(samples)} held-out questions "
        f"({', '.join(f'{rows.positions} teacher-forced positions of the {rows.source}' for rows in forced.values())})")
    torch.set_num_threads(max(1, options.threads))
    try:
        reference = torch_reference(model, tokenizer, samples, forced=forced,
                                    progress=question_counter(on_questions, "pytorch", len(samples)))
    finally:
        torch.set_num_threads(threads_before)

    manifest = _manifest(checkpoint, origin, tokenizer, model, variants, root, limits)
    _write_manifest(root, manifest)

    say("parity gate: fp32 graphs against PyTorch")
    parity: dict[str, VariantParity] = {}
    fp32 = _measure(root, {c: "fp32" for c in COMPONENTS}, samples, reference, options, on_questions, "fp32")
    parity["fp32"] = fp32
    problems = fp32_failures(fp32)
    if problems:
        raise ExportError("the fp32 export does not match the PyTorch model, so nothing was written: "
                          + "; ".join(problems))

    skipped: dict[str, str] = {}
    # The family says how a q4 decoder keeps its LM head (a pretrained LM's head stays 8-bit: vledge.families.llama).
    # and whether its int8 decoder is 8-bit weight-only MatMulNBits rather than dynamic MatMulInteger.
    family = config.language.family
    qoptions = quantize.QuantizeOptions(calibration_method=options.calibration_method,
                                        keep_bits=family.q4_head_bits, int8_weights=family.int8_weights)
    cuda = cuda_works() if "fp16" in options.precisions else False
    for precision in options.precisions:
        for component in COMPONENTS:
            if precision not in quantize.AVAILABLE.get(component, ()):
                continue
            label = f"{component}:{precision}"
            say(f"making {label}")
            target = root / variant_filename(component, precision)
            try:
                quantize.quantize_component(component, precision, sources[component], target,
                                            calibration=calibration if component == "vision_encoder" else None,
                                            options=qoptions, language_kind=config.language.kind)
                if tiled and component == "vision_encoder":
                    batch_tiles(target, target)
            except VledgeError as exc:
                skipped[label] = str(exc)
                log.warning("%s not made: %s", label, exc)
                target.unlink(missing_ok=True)
                continue
            variants[component][precision] = variant_filename(component, precision)
            manifest = _manifest(checkpoint, origin, tokenizer, model, variants, root, limits)
            _write_manifest(root, manifest)
            budget = options.min_top1_agreement if options.gate == "teacher-forced" else options.min_token_agreement
            why = reason_not_to_measure(root, component, precision, samples, reference, budget, options.threads, cuda)
            if why:
                skipped[label] = why
                say(f"{label}: {why}")
                continue
            say(f"measuring {label}")
            chosen = {c: "fp32" for c in COMPONENTS}
            chosen[component] = precision
            parity[label] = _measure(root, chosen, samples, reference, options, on_questions, label)

    sizes = {c: {p: (root / f).stat().st_size for p, f in v.items() if (root / f).is_file()}
             for c, v in variants.items()}
    selected = _select(parity, variants, options, sizes)
    verdicts = {label: judge(p, options).to_dict() for label, p in parity.items()
                if label not in ("fp32", "selected:cpu") and not label.endswith(":fp16")}
    if any(p != "fp32" for p in selected["cpu"].values()):
        say("measuring the selected combination")
        parity["selected:cpu"] = _measure(root, selected["cpu"], samples, reference, options, on_questions,
                                          "selected:cpu")

    shutil.rmtree(work, ignore_errors=True)
    manifest = _manifest(checkpoint, origin, tokenizer, model, variants, root, limits)
    manifest.selected = selected
    manifest.parity = {
        "reference": {"engine": "pytorch", "accuracy": reference.accuracy, "questions": len(samples)},
        "variants": {label: p.to_dict() for label, p in parity.items()},
        "not_measured": skipped,
        "tolerance": {"atol": FP32_ATOL, "rtol": FP32_RTOL, "min_token_agreement": FP32_MIN_TOKEN_AGREEMENT},
        "max_accuracy_drop": options.max_accuracy_drop,
        "min_token_agreement": options.min_token_agreement,
        "gate": {"metric": options.gate, "min_top1_agreement": options.min_top1_agreement,
                 "max_mean_kl": options.max_mean_kl, "min_token_agreement": options.min_token_agreement,
                 "max_accuracy_drop": options.max_accuracy_drop, "verdicts": verdicts},
        "teacher_forced": {name: {"source": rows.source, "positions": rows.positions}
                           for name, (rows, _) in reference.forced.items()},
        "data": str(options.data) if options.data else "built-in synthetic scenes (fresh seed)",
    }
    write_parity_markdown(root / "parity.md", manifest, parity, reference, skipped)
    write_transformers_js_files(root, manifest, tokenizer)  # where transformers.js can express the model
    manifest.files = _hash_files(root)
    _write_manifest(root, manifest)
    return ExportResult(model_dir=root, manifest=manifest, parity=parity, selected=selected, seconds=0.0,
                        skipped=skipped)


def _measure(root: Path, precisions: dict[str, str], samples: ParitySamples, reference: Reference,
             options: ExportOptions, on_questions: QuestionCallback | None = None, label: str = "") -> VariantParity:
    """Parity and latency of one combination, on this machine's CPU (fp16 only where CUDA works: screening.py)."""
    from vledge.export.parity import measure_latency
    from vledge.runtime import load

    runtime = load(root, precision=precisions, providers="cpu", threads=options.threads, verify=False)
    result = measure_runtime(runtime, samples, reference, progress=question_counter(on_questions, label, len(samples)))
    result.latency_ms = measure_latency(runtime, samples)
    return result


# Variants whose times differ by less than this are as fast as each other (timer noise on a shared CPU); the
# smaller file wins among them (an 8-bit token table against the float one, for instance).
SAME_SPEED_MS, SAME_SPEED_SHARE = 0.05, 0.05


def _select(parity: dict[str, VariantParity], variants: dict[str, dict[str, str]], options: ExportOptions,
            sizes: dict[str, dict[str, int]] | None = None) -> dict[str, dict[str, str]]:
    """Per component, the fastest CPU variant the gate passes (``vledge.export.gate``); fp16 for CUDA.

    With ``sizes`` (bytes per component and precision), variants as fast as the fastest within
    ``SAME_SPEED_MS`` / ``SAME_SPEED_SHARE`` count as equal and the smallest of them is chosen.
    """
    stage_key = {"vision_encoder": "vision_ms", "embed_tokens": "embed_ms", "decoder_model_merged": "decode_step_ms"}
    cpu: dict[str, str] = {}
    for component in COMPONENTS:
        passing = {"fp32": parity["fp32"].latency_ms.get(stage_key[component], float("inf"))}
        for precision in variants[component]:
            measured = parity.get(f"{component}:{precision}")
            if precision in ("fp32", "fp16") or measured is None:
                continue  # fp16 runs through casts on a CPU: it is for GPUs
            verdict = judge(measured, options)
            if not verdict.passed:
                log.info("auto passes over %s:%s (%s): %s", component, precision, verdict.decided_by,
                         "; ".join(verdict.reasons))
                continue
            passing[precision] = measured.latency_ms.get(stage_key[component], float("inf"))
        fastest = min(passing, key=passing.get)
        best = fastest
        if sizes is not None:
            limit = passing[fastest] + max(SAME_SPEED_MS, SAME_SPEED_SHARE * passing[fastest])
            equal = [p for p, ms in passing.items() if ms <= limit and p in sizes.get(component, {})]
            if equal:
                best = min(equal, key=lambda p: (sizes[component][p], passing[p]))
                if best != fastest:
                    log.info("auto takes %s:%s over %s (as fast within %.3f ms, a smaller file)", component, best,
                             fastest, limit - passing[fastest])
        cpu[component] = best
    cuda = {component: ("fp16" if "fp16" in variants[component] else "fp32") for component in COMPONENTS}
    return {"cpu": cpu, "cuda": cuda}


def _forced_sets(options: ExportOptions, samples: ParitySamples, tokenizer, model) -> dict[str, ForcedSet]:
    """What the gate teacher-forces: the held-out answers, and the --parity-text text when given."""
    template = model.config.prompt
    sets = {"answers": answer_set(tokenizer, template, samples.image_index, samples.prompts, samples.answers)}
    if options.parity_text is not None:
        prompt = None
        tiles = model.config.preprocess.tiles
        if samples.grids is not None:  # a tiled model: the caption prompt expanded for the first image's tiles
            from vledge.image_tiles import expand_image_ids

            prompt = expand_image_ids(tokenizer, tiles, question_ids(tokenizer, template, CAPTION_PROMPT),
                                      samples.grids[:1])
        sets["text"] = text_set(read_parity_text(options.parity_text), tokenizer, template,
                                options.parity_text_tokens, model.config.language.max_positions,
                                model.num_image_tokens, Path(options.parity_text).name, prompt=prompt)
    return sets


def _held_out_data(options: ExportOptions, model, tokenizer, work: Path) -> tuple[np.ndarray, ParitySamples]:
    """Calibration pixels [N, 3, S, S] (a tiled model's: tiles, every tile of an image, up to N) and the parity
    samples."""
    from vledge.data.images import preprocess, preprocess_tiles

    data = options.data
    if data is None:
        from vledge.data.synth import SynthOptions, generate_dataset

        data = work / "synthetic"
        size = max(48, model.config.preprocess.image_size)
        count = max(64, options.parity_samples // 2 + options.calibration_samples)
        generate_dataset(data, SynthOptions(size=count, seed=90_210, image_size=size, splits=(0.5, 0.0, 0.5)),
                         workers=1)
        log.info("no --calibration-data: using %d fresh synthetic scenes (seed 90210)", count)
    held_out = _split(data, ("test", "val"))
    calibration_records = _split(data, ("train", "val", "test"))
    spec = model.config.preprocess
    pixels: list[np.ndarray] = []  # [n, 3, S, S] each: one image, or a tiled model's tiles of one image
    for record in calibration_records:
        if sum(len(p) for p in pixels) >= options.calibration_samples:
            break
        try:
            if spec.tiles is not None:
                pixels.append(preprocess_tiles(record.image, spec).pixel_values)
            else:
                pixels.append(preprocess(record.image, spec).numpy()[None])
        except VledgeError as exc:
            log.warning("calibration skips %s", exc)
    if not pixels:
        raise ExportError(f"no readable calibration images in {data}")
    samples = build_samples(held_out, model, tokenizer, options.parity_samples)
    return np.concatenate(pixels)[:options.calibration_samples].astype(np.float32), samples


def _split(data: Path, names: Sequence[str]):
    from vledge.data.loaders import load_records
    from vledge.errors import DataError

    problems = []
    for name in names:
        try:
            records, _ = load_records(data, split=name)
        except DataError as exc:
            problems.append(str(exc))
            continue
        if records:
            return records
    raise ExportError(f"no usable {'/'.join(names)} split in {data}: {'; '.join(problems) or 'empty'}")


def _decoder_limits(decoder: Path) -> dict:
    """What the runtime must know about the decoder's operators: a GroupQueryAttention decoder extends a non-empty
    cache by several positions for one row at a time only (``vledge.export.gqa``)."""
    import onnx

    from vledge.export.gqa import CACHE_EXTEND_ROWS, OP

    if not decoder.is_file():
        return {}
    graph = onnx.load(str(decoder), load_external_data=False).graph
    return {"cache_extend_rows": CACHE_EXTEND_ROWS} if any(n.op_type == OP for n in graph.node) else {}


def _manifest(checkpoint, origin: dict, tokenizer, model, variants, root: Path, limits: dict) -> Manifest:
    import onnx
    import onnxruntime
    import torch

    import vledge
    from vledge.hf.generation_config import model_stop_ids

    config = checkpoint.model_config
    return Manifest(
        model_config=config,
        special_tokens=tokenizer.special_tokens(),
        prefix_ids=prefix_ids(tokenizer, config.prompt),
        num_image_tokens=model.num_image_tokens,
        tensors=tensor_names(model),
        variants={c: dict(v) for c, v in variants.items()},
        files=_hash_files(root),
        generation={"max_new_tokens": 32, "caption_prompt": CAPTION_PROMPT, "temperature": 0.0,
                    "eos_token_id": tokenizer.eos_id, "pad_token_id": tokenizer.pad_id,
                    "stop_token_ids": model_stop_ids(config.language.source, tokenizer.eos_id),
                    **limits},
        provenance={
            **origin,
            "checkpoint_metrics": _plain(checkpoint.metrics),
            "vledge": vledge.__version__,
            "torch": torch.__version__,
            "onnx": onnx.__version__,
            "onnxruntime": onnxruntime.__version__,
            "python": platform.python_version(),
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "exporter": "torch.onnx TorchScript exporter (dynamo=False)",
        },
    )


def _plain(value):
    """Checkpoint metrics as JSON-safe values (tensors and numpy scalars become numbers)."""
    try:
        return json.loads(json.dumps(value, default=lambda v: v.item() if hasattr(v, "item") else str(v)))
    except (TypeError, ValueError):
        return {}


def _hash_files(root: Path) -> dict[str, FileEntry]:
    files = {}
    for path in sorted(root.rglob("*")):
        relative = path.relative_to(root).as_posix()
        if path.is_dir() or relative == MANIFEST_NAME or relative.startswith(".work"):
            continue
        if path.is_symlink():
            raise ExportError(f"refusing to list a symlink in the model directory: {relative}")
        files[relative] = FileEntry(sha256=sha256_of(path), size=path.stat().st_size)
    return files


def _write_manifest(root: Path, manifest: Manifest) -> None:
    write_json(root / MANIFEST_NAME, manifest.to_dict(), indent=2)


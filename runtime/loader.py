"""Open a model directory: verify it, choose each graph's precision, start the sessions, check their IO.

Torch-free. What :func:`load` returns is a :class:`vledge.runtime.model.VisionLanguageRuntime`.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path, PurePosixPath

from vledge.errors import ConfigError, ModelDirError, ProviderError
from vledge.manifest import (
    COMPONENTS,
    MANIFEST_NAME,
    PRECISIONS,
    TOKENIZER_NAME,
    Manifest,
    read_manifest,
    resolve_inside,
)
from vledge.runtime.decoder import Graphs
from vledge.runtime.gate import gate_failure, gate_warning
from vledge.runtime.model import VisionLanguageRuntime
from vledge.runtime.providers import (
    GPU_PROVIDERS,
    HEAVY_OPS,
    SessionConfig,
    create_session,
    primary_provider,
    usable_providers,
)
from vledge.tokenizer import Tokenizer

log = logging.getLogger(__name__)


def load(
    model_dir: str | Path,
    precision: str | dict[str, str] = "auto",
    providers: str | Sequence[str] = "auto",
    threads: int | None = None,
    device_id: int = 0,
    optimization: str = "all",
    strict: bool = False,
    verify: bool = True,
    spin: bool = False,
    prefix_cache: bool = True,
    fast_binding: bool = True,
) -> VisionLanguageRuntime:
    """Open a model directory written by ``vledge export``: verify it, pick variants, start sessions.

    ``precision``: "auto" (what the exporter measured best for the active device), "fp32", "fp16",
    "int8", "q4", or a dict per graph (vision_encoder, embed_tokens, decoder_model_merged); graphs
    a precision does not apply to stay in float. ``providers``: "auto" (CUDA when it really works,
    else the CPU), "cpu", "cuda", "tensorrt", or a list in priority order; an explicit GPU request
    that cannot be met raises ProviderError. ``strict`` also fails when heavy nodes of a graph would
    run on the CPU under a GPU provider. ``threads``: intra-op threads per session (None: ONNX
    Runtime's default: physical cores); ``spin`` (off by default) lets the pool's threads busy-wait
    between ops: with it on, 2 threads made captions 4-10x slower than 1 thread on a shared 2-core
    machine, with it off 2 threads were never slower than 1 (``benchmarks/thread_defaults.py``).
    ``fast_binding`` off binds the decode loop's inputs and outputs through ONNX Runtime's public
    ``IOBinding`` API only (slower per token; on by default, it falls back by itself when it fails).
    """
    wanted = _wanted_precisions(precision)
    if isinstance(providers, (list, tuple)) and not providers:
        raise ConfigError("providers must name at least one execution provider")
    config = SessionConfig(providers=tuple(providers) if not isinstance(providers, str) else providers,
                           device_id=device_id, threads=threads, optimization=optimization, strict=strict, spin=spin)
    root = Path(model_dir)
    manifest = read_manifest(root, verify=verify)
    check_nothing_unlisted(root, manifest)
    _check_precisions_exist(manifest, wanted, root)
    tokenizer = Tokenizer.from_file(resolve_inside(root, TOKENIZER_NAME), manifest.model_config.special_tokens)
    names, gpu_fallback = usable_providers(config)  # ProviderError for an explicit GPU request that cannot work
    planned = "cuda" if names[0] in GPU_PROVIDERS else "cpu"
    sessions = {}
    precisions = {}
    for component in COMPONENTS:
        if component not in manifest.variants:
            raise ModelDirError(f"{root / 'vledge.json'} lists no {component} graph")
        chosen = _choose_precision(manifest, component, wanted.get(component, "auto"), planned)
        if chosen == "fp16" and planned == "cpu":
            log.warning("%s: fp16 on the CPU provider runs through casts and is slow; fp32 or int8 fit the CPU",
                        component)
        sessions[component] = create_session(resolve_inside(root, manifest.variants[component][chosen]), config)
        precisions[component] = chosen
    warning = gate_warning(manifest, precisions, str(root))
    if warning:
        log.warning("%s", warning)
    device = "cuda" if primary_provider(sessions["decoder_model_merged"]) in GPU_PROVIDERS else "cpu"
    language = manifest.model_config.language
    graphs = Graphs(
        vision=sessions["vision_encoder"], embed=sessions["embed_tokens"], decoder=sessions["decoder_model_merged"],
        cache=language.family.cache, layers=language.layers,
        heads=language.key_value_heads if language.has_kv_cache else 0,  # the cache's heads: kv_heads under GQA
        head_dim=language.head_dim if language.has_kv_cache else 0, hidden=language.hidden,
        device=device, device_id=device_id, vocab_size=int(language.vocab_size), fast_binding=fast_binding,
        image_tokens=int(manifest.num_image_tokens),
    )
    _check_io(graphs, manifest, root)
    graphs.token_table()  # read the token embeddings once now rather than in the first caption
    runtime = VisionLanguageRuntime(root, manifest, tokenizer, graphs, precisions, config, gpu_fallback, prefix_cache)
    if strict and device == "cuda":
        _check_placement(runtime)
    log.info("loaded %s: %s on %s", root, precisions, primary_provider(graphs.decoder))
    return runtime


def check_nothing_unlisted(root: Path, manifest: Manifest) -> None:
    """Refuse a file ONNX Runtime could reach that the manifest does not list (and so does not hash).

    The folders that hold graphs, and the folders below them, are where external data is looked up: every
    entry there (files, links, anything) must be listed in the manifest; only ``vledge.json`` itself is exempt.
    """
    listed = set(manifest.files) | {MANIFEST_NAME}
    folders = {PurePosixPath(path).parent for by_precision in manifest.variants.values()
               for path in by_precision.values()}
    for folder in sorted(folders, key=lambda f: len(f.parts)):
        base = resolve_inside(root, str(folder)) if folder.parts else root
        for current, dirs, files in os.walk(base):
            here = PurePosixPath(folder, *Path(current).relative_to(base).parts)
            for name in sorted(files) + [d for d in dirs if os.path.islink(os.path.join(current, d))]:
                relative = str(here / name) if here.parts else name
                if relative not in listed:
                    raise ModelDirError(f"model directory {root} holds {relative}, which {MANIFEST_NAME} does not "
                                        "list: a graph could read it unhashed; remove it or re-export")


def _wanted_precisions(precision: str | dict[str, str]) -> dict[str, str]:
    if isinstance(precision, dict):
        unknown = set(precision) - set(COMPONENTS)
        if unknown:
            raise ConfigError(f"precision names unknown graphs {sorted(unknown)}; graphs are {', '.join(COMPONENTS)}")
        wanted = {component: precision.get(component, "auto") for component in COMPONENTS}
    elif isinstance(precision, str):
        wanted = {component: precision.lower() for component in COMPONENTS}
    else:
        raise ConfigError(f"precision must be a string or a dict per graph, got {type(precision).__name__}")
    for value in wanted.values():
        if not isinstance(value, str) or (value != "auto" and value not in PRECISIONS):
            raise ConfigError(f"unknown precision {value!r}; choose from auto, {', '.join(PRECISIONS)}")
    return wanted


def _check_precisions_exist(manifest: Manifest, wanted: dict[str, str], root: Path) -> None:
    """A precision asked for must exist for at least one graph (else the request is surely a mistake)."""
    for precision in set(wanted.values()) - {"auto", "fp32"}:
        components = [c for c, p in wanted.items() if p == precision]
        if not any(precision in manifest.precisions(c) for c in components):
            have = sorted({p for c in COMPONENTS for p in manifest.precisions(c)}, key=PRECISIONS.index)
            raise ConfigError(f"model directory {root} has no {precision} variant of "
                              f"{' or '.join(components)}; it has {', '.join(have)} "
                              f"(export with --quantize {precision})")


def _check_io(graphs: Graphs, manifest: Manifest, root: Path) -> None:
    """The graphs must have the inputs, outputs and widths the manifest promises (see graph_io)."""
    from vledge.runtime.graph_io import check_graph_io

    check_graph_io({"vision_encoder": graphs.vision, "embed_tokens": graphs.embed,
                    "decoder_model_merged": graphs.decoder}, manifest, root)


def _check_placement(runtime: VisionLanguageRuntime) -> None:
    for component, by_provider in runtime.placement().items():
        heavy = sorted(op for op in by_provider.get("CPUExecutionProvider", {}) if op in HEAVY_OPS)
        if heavy:
            raise ProviderError(f"strict mode: {component} runs {', '.join(heavy)} nodes on the CPU under "
                                f"{runtime.graphs.decoder.get_providers()[0]}; choose another precision "
                                f"(fp16 for CUDA) or turn strict off")


def _choose_precision(manifest: Manifest, component: str, requested: str, device: str) -> str:
    available = manifest.precisions(component)
    if requested != "auto":
        if requested in available:
            return requested
        # Components a precision does not apply to (e.g. q4 convolutions) stay in float.
        fallback = "fp16" if requested == "fp16" and "fp16" in available else "fp32"
        log.debug("%s has no %s variant; using %s", component, requested, fallback)
        return fallback
    recorded = manifest.selected.get(device, {}).get(component)
    if recorded in available and not gate_failure(manifest, component, recorded):
        return recorded
    if device == "cuda" and "fp16" in available and not gate_failure(manifest, component, "fp16"):
        return "fp16"  # integer MatMuls fall back to the CPU under the CUDA provider: fp16 is the GPU's fast path
    return "fp32"

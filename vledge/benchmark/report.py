"""Benchmark output: ``bench.json``, ``bench.md`` and PNG charts."""

from __future__ import annotations

import logging
from pathlib import Path

from vledge.errors import ConfigError
from vledge.files import atomic_path, write_json, write_text

log = logging.getLogger(__name__)

MAX_RESULT_BYTES = 64 << 20  # an earlier bench.json read by --resume

STAGE_LABELS = {
    "preprocess_ms": "preprocess",
    "vision_ms": "vision",
    "prefill_ms": "prefill",
    "decode_token_ms": "decode/token",
    "caption_ms": "caption e2e",
}


def _ms(value: float) -> str:
    return f"{value:.3f}" if value < 1 else f"{value:.2f}" if value < 100 else f"{value:.0f}"


def _cuda_line(cuda: dict | None) -> str:
    if not cuda:
        return "CUDA: not probed."
    return "CUDA: usable." if cuda["usable"] else f"CUDA: not usable here ({cuda['reason']}); no CUDA engines."


def _load_line(load: dict | None) -> str:
    if not load:
        return ""
    parts = []
    if load.get("loadavg_before"):
        parts.append("load average " + " / ".join(f"{v:.1f}" for v in load["loadavg_before"]) + " before, "
                     + " / ".join(f"{v:.1f}" for v in load["loadavg_after"]) + " after (1/5/15 min)")
    if load.get("other_processes_cpu_cores") is not None:
        parts.append(f"other processes used {load['other_processes_cpu_cores']:.2f} cores on average, "
                     f"the benchmark {load['benchmark_cpu_cores']:.2f}")
    return ("Machine load during the run: " + "; ".join(parts) + ".") if parts else ""


def markdown(result: dict) -> str:
    machine = result["machine"]
    config = result["config"]
    lines = [
        "# vledge benchmark",
        "",
        f"Machine: {machine['cpu']}, {machine['logical_cores']} logical cores "
        f"({machine.get('physical_cores') or '?'} physical), flags {', '.join(machine['cpu_flags']) or 'none'}; "
        f"{machine['os']}; Python {machine['python']}; "
        + ", ".join(f"{k} {v}" for k, v in machine["versions"].items() if v) + ".",
        _cuda_line(machine.get("cuda")),
        (f"Checkpoint `{Path(config['ckpt']).name}`, model directory `{config['model_dir']}`; " if config.get("ckpt")
         else f"Model directory `{config['model_dir']}` (no PyTorch original); ")
        + f"{config['repeats']} interleaved repetitions after warm-up; decode timed over {config['decode_tokens']} "
        f"steps per repetition; captions capped at {config['caption_tokens']} new tokens; batch 1 unless stated. "
        "Every engine runs in a worker process of its own, one engine computing at a time. "
        "Times are medians in milliseconds (p90 in the JSON); ×: PyTorch median / engine median at the same "
        "thread count; warm-up: the first calls after loading (for pytorch-compile, the compilation).",
        _load_line(result.get("load")),
        "",
    ]
    if result.get("pytorch_skipped"):
        lines += [f"PyTorch side skipped: {result['pytorch_skipped']}.", ""]
    for name, reason in result.get("skipped", {}).items():
        if reason != result.get("pytorch_skipped"):
            lines += [f"Skipped {name}: {reason}.", ""]
    tiled = bool(result.get("tiled")) or any(row.get("tiles_per_image", 1.0) != 1.0 for row in result["latency"])
    if tiled:
        lines += ["The model splits each image into tiles plus a global view (only the global view when splitting "
                  "is off): the vision encoder runs on every "
                  "tile. vision: all tiles of one image; vision/tile: per tile; tiles/img: tiles per image "
                  "(mean over the timed images).", ""]
    for threads in config["threads"]:
        rows = [r for r in result["latency"] if r["threads"] == threads]
        batches = list(rows[0]["throughput"]) if rows else []
        lines += [f"## {threads} thread{'s' if threads > 1 else ''}", ""]
        header = ["engine"] + [STAGE_LABELS[s] for s in STAGE_LABELS]
        header[3:3] = ["vision/tile", "tiles/img"] if tiled else []
        header += ["caption ×", "decode ×"]
        header += [f"img/s @{b}" for b in batches] + ["load ms", "warm-up ms"]
        lines.append("| " + " | ".join(header) + " |")
        lines.append("| --- " + "| ---: " * (len(header) - 1) + "|")
        for row in rows:
            cells = [row["engine"]] + [_ms(row["stages"][s]["median"]) for s in STAGE_LABELS]
            if tiled:
                cells[3:3] = [_ms(row["stages"]["vision_tile_ms"]["median"]), f"{row['tiles_per_image']:.1f}"]
            ratios = row.get("ratio_to_pytorch") or {}
            cells += [f"{ratios[s]:.2f}×" if s in ratios else "–" for s in ("caption_ms", "decode_token_ms")]
            cells += [f"{row['throughput'][b]:.1f}" for b in batches]
            cells += [_ms(row.get("load_ms", 0.0)), _ms(row.get("warmup_ms", 0.0))]
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    reference = result["reference"]
    if reference is None:  # the exported model alone: its cold start, no parity
        lines += ["## Accuracy parity", "", "Not measured: it needs the PyTorch original (see above).", ""]
        if result.get("cold_start"):
            lines += ["| engine | load ms (cold) | first caption ms | peak RSS MB |", "| --- | ---: | ---: | ---: |"]
            for name, cold in result["cold_start"].items():
                if "error" in cold:
                    lines.append(f"| {name} | failed: {cold['error'][-120:]} | – | – |")
                    continue
                lines.append(f"| {name} | {_ms(cold['import_and_load_ms'])} | {_ms(cold['first_caption_ms'])} "
                             f"| {cold['peak_rss_mb']:.0f} |")
            lines.append("")
        lines += [f"Total benchmark time: {result['seconds']:.0f} s.", ""]
        return "\n".join(lines)
    lines += [
        "## Accuracy parity",
        "",
        f"{reference['questions']} held-out questions; PyTorch exact match {100 * reference['accuracy']['overall']:.1f}%. "
        "Drift is against the PyTorch original on the same pixels; prefill logits start from PyTorch's image "
        "embeddings.",
        "",
        "| engine | embeds max abs | logits max abs | token agreement | identical answers | accuracy | Δ points "
        "| caption agreement | size MB | load ms (cold) | peak RSS MB |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, p in result["parity"].items():
        cold = result["cold_start"].get(name, {})
        caption = p["generation"]["caption_agreement"]
        load = _ms(cold["import_and_load_ms"]) if "import_and_load_ms" in cold else "–"
        rss = f"{cold['peak_rss_mb']:.0f}" if "peak_rss_mb" in cold else "–"
        lines.append(
            f"| {name} | {p['image_embeds']['max_abs']:.2g} | {p['prefill_logits']['max_abs']:.2g} "
            f"| {100 * p['generation']['token_agreement']:.1f}% | {100 * p['generation']['sequence_match']:.1f}% "
            f"| {100 * p['accuracy']['overall']:.1f}% | {p['accuracy_delta']:+.1f} "
            f"| {'–' if caption is None else f'{100 * caption:.1f}%'} | {p['size_bytes'] / 1e6:.2f} | {load} | {rss} |"
        )
    lines += ["", f"Total benchmark time: {result['seconds']:.0f} s.", ""]
    return "\n".join(lines)


def charts(result: dict, out_dir: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    paths = []
    threads_list = result["config"]["threads"]
    fig, axes = plt.subplots(1, len(threads_list), figsize=(6 * len(threads_list), 4.5), squeeze=False)
    for ax, threads in zip(axes[0], threads_list):
        rows = [r for r in result["latency"] if r["threads"] == threads]
        stages = list(STAGE_LABELS)
        width = 0.8 / max(len(rows), 1)
        x = np.arange(len(stages))
        for i, row in enumerate(rows):
            ax.bar(x + i * width, [row["stages"][s]["median"] for s in stages], width, label=row["engine"])
        ax.set_xticks(x + width * (len(rows) - 1) / 2, [STAGE_LABELS[s] for s in stages])
        ax.set_yscale("log")
        ax.set_ylabel("median ms (log)")
        ax.set_title(f"latency by stage, {threads} thread(s)")
        ax.legend(fontsize=8)
    fig.tight_layout()
    paths.append(out_dir / "latency_by_stage.png")
    with atomic_path(paths[-1], suffix=".png") as temp:
        fig.savefig(temp, dpi=120, format="png")
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 4.5))
    first = threads_list[0]
    for row in (r for r in result["latency"] if r["threads"] == first):
        parity = result["parity"].get(row["engine"])
        if parity is None:
            continue
        ax.scatter(row["stages"]["caption_ms"]["median"], 100 * parity["accuracy"]["overall"], s=60)
        ax.annotate(row["engine"], (row["stages"]["caption_ms"]["median"], 100 * parity["accuracy"]["overall"]),
                    fontsize=8, xytext=(4, 4), textcoords="offset points")
    ax.set_xlabel(f"caption latency, median ms ({first} thread(s))")
    ax.set_ylabel("exact-match accuracy %")
    ax.set_title("accuracy vs speed")
    fig.tight_layout()
    paths.append(out_dir / "accuracy_vs_speed.png")
    with atomic_path(paths[-1], suffix=".png") as temp:
        fig.savefig(temp, dpi=120, format="png")
    plt.close(fig)
    return paths


def write_progress(result: dict, out_dir: Path) -> Path:
    """bench.json with what is measured so far (``"complete": false``), replaced atomically."""
    out_dir.mkdir(parents=True, exist_ok=True)
    write_json(out_dir / "bench.json", result, indent=2)
    return out_dir / "bench.json"


def read_previous(out_dir: Path) -> dict | None:
    """The bench.json an earlier (perhaps stopped) run left in ``out_dir``, or None when there is none."""
    import json

    path = out_dir / "bench.json"
    if not path.is_file():
        return None
    if path.stat().st_size > MAX_RESULT_BYTES:
        raise ConfigError(f"{path} is over {MAX_RESULT_BYTES >> 20} MiB; not a bench.json this version wrote")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConfigError(f"{path} cannot be resumed: not JSON ({exc})") from None


def write_outputs(result: dict, out_dir: Path) -> dict[str, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    written = {"json": out_dir / "bench.json", "markdown": out_dir / "bench.md"}
    write_json(written["json"], result, indent=2)
    write_text(written["markdown"], markdown(result))
    try:
        import matplotlib  # noqa: F401  (the [train] extra; the tables do not need it)
    except ImportError:
        log.warning("matplotlib is not installed: no charts")
        return written
    for path in charts(result, out_dir):
        written[path.stem] = path
    return written

"""``parity.md``: the parity measurements of an export, readable without tools."""

from __future__ import annotations

from pathlib import Path

from vledge.export.parity import Reference, VariantParity
from vledge.files import write_text
from vledge.manifest import Manifest


def _pct(value: float | None) -> str:
    return "–" if value is None else f"{100 * value:.1f}%"


def _num(value: float | None, digits: int = 3) -> str:
    return "–" if value is None else f"{value:.{digits}g}"


def _forced(p: VariantParity, name: str) -> tuple[str, str]:
    figures = p.teacher_forced.get(name)
    if figures is None:
        return "–", "–"
    return _pct(figures.top1_agreement), f"{figures.mean_kl:.3g}"


def _forced_sets(parity: dict[str, VariantParity]) -> list[tuple[str, str]]:
    """(name, column label) of every teacher-forced set measured, held-out answers first."""
    found: dict[str, str] = {}
    for p in parity.values():
        for name, figures in p.teacher_forced.items():
            found.setdefault(name, f"{figures.source}, {figures.positions} positions")
    return sorted(found.items())


def gate_lines(gate: dict) -> list[str]:
    """Which metric decided ``auto`` and each variant's verdict."""
    if not gate:
        return []
    lines = ["## Gate", "",
             f"`--quantize auto` decides on {gate['metric']} agreement: teacher-forced top-1 >= "
             f"{_pct(gate['min_top1_agreement'])} and mean KL <= {gate['max_mean_kl']:g} nats on every forced set, "
             f"or (free-running) greedy token agreement >= {_pct(gate['min_token_agreement'])}; exact-match accuracy "
             f"within {gate['max_accuracy_drop']:g} points either way.", ""]
    for label, verdict in gate.get("verdicts", {}).items():
        outcome = "passes" if verdict["passed"] else "fails: " + "; ".join(verdict["reasons"])
        lines.append(f"- {label}: decided by {verdict['decided_by']} agreement; {outcome}")
    return lines + [""]


def parity_table(parity: dict[str, VariantParity]) -> list[str]:
    forced = _forced_sets(parity)
    forced_header = "".join(f" teacher-forced top-1 ({label}) | mean KL nats ({label}) |" for _, label in forced)
    lines = [
        "| variant | embeds max abs | logits max abs | logits mean abs |" + forced_header + " token agreement "
        "| identical answers | first divergence (min) | accuracy | Δ points | caption agreement | vision ms "
        "| decode step ms |",
        "| --- |" + " ---: |" * (11 + 2 * len(forced)),
    ]
    for label, p in parity.items():
        forced_cells = "".join(f" {top1} | {kl} |" for name, _ in forced for top1, kl in [_forced(p, name)])
        lines.append(
            f"| {label} | {_num(p.image_embeds.max_abs)} | {_num(p.prefill_logits.max_abs)} "
            f"| {_num(p.prefill_logits.mean_abs)} |{forced_cells} {_pct(p.generation.token_agreement)} "
            f"| {_pct(p.generation.sequence_match)} | {p.generation.first_divergence_min if p.generation.first_divergence_min is not None else '–'} "
            f"| {_pct(p.accuracy.get('overall'))} | {p.accuracy_delta:+.1f} | {_pct(p.generation.caption_agreement)} "
            f"| {_num(p.latency_ms.get('vision_ms'))} | {_num(p.latency_ms.get('decode_step_ms'))} |"
        )
    return lines


def write_parity_markdown(path: Path, manifest: Manifest, parity: dict[str, VariantParity], reference: Reference,
                          skipped: dict[str, str]) -> None:
    questions = next(iter(parity.values())).questions if parity else 0
    lines = [
        "# Parity with the PyTorch model",
        "",
        f"Held-out questions: {questions} ({manifest.parity.get('data', '')}).",
        f"PyTorch accuracy (exact match): {_pct(reference.accuracy.get('overall'))}; per task: "
        + ", ".join(f"{task} {_pct(v)}" for task, v in sorted(reference.accuracy.items()) if task != "overall") + ".",
        "",
        "Image embeddings come from each variant's vision encoder; prefill logits come from each variant's "
        "decoder fed with the PyTorch image embeddings; answers are generated greedily end to end. "
        "A label `component:precision` swaps that one graph and keeps the others in fp32. Everything runs "
        "on this machine's CPU provider; latencies are medians at batch 1 with the export's thread count. "
        "fp16 graphs run on a CPU through casts: their drift is meaningful here, their speed is not "
        "(`selected.cuda` picks them for GPUs without a GPU measurement).",
        "",
        "Teacher-forced columns: PyTorch and the variant are fed the same tokens (the held-out answers, or the "
        "`--parity-text` text) and their next-token predictions are compared at every position: top-1 agreement "
        "and the mean KL divergence KL(PyTorch || variant). Token agreement is free-running: greedy answers "
        "compared token by token.",
        "",
        *parity_table(parity),
        "",
        *gate_lines(manifest.parity.get("gate", {})),
        "## Selected variants",
        "",
    ]
    for device, choice in manifest.selected.items():
        lines.append(f"- {device}: " + ", ".join(f"{component} {precision}" for component, precision in choice.items()))
    if skipped:
        lines += ["", "## Not made or not measured here", ""]
        lines += [f"- {label}: {why}" for label, why in skipped.items()]
    write_text(path, "\n".join(lines) + "\n")

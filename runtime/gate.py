"""What the export's parity gate recorded about a variant, read back when a variant is loaded. Torch-free.

The export measures every variant against PyTorch and records its verdict per variant
(``parity.gate.verdicts``: passed, the metric that decided, the reasons), which decides here: a
variant the teacher-forced gate passed loads even where its free-running agreement is low (a small
LM's long answers diverge after the first near-tie). Directories written before verdicts were
recorded are judged on the budgets they recorded (``parity.max_accuracy_drop``,
``parity.min_token_agreement``). A failed variant still loads when asked for by name, but with one
warning naming what was recorded; ``auto`` never loads it.
"""

from __future__ import annotations

from typing import Any

from vledge.manifest import Manifest


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def gate_failure(manifest: Manifest, component: str, precision: str) -> str | None:
    """Why ``component`` in ``precision`` is outside the export's budgets, or None (fp32, or not measured)."""
    if precision == "fp32":
        return None
    parity = manifest.parity if isinstance(manifest.parity, dict) else {}
    variants = parity.get("variants")
    measured = variants.get(f"{component}:{precision}") if isinstance(variants, dict) else None
    if not isinstance(measured, dict):
        return None
    gate = parity.get("gate") if isinstance(parity.get("gate"), dict) else {}
    verdicts = gate.get("verdicts") if isinstance(gate.get("verdicts"), dict) else {}
    verdict = verdicts.get(f"{component}:{precision}")
    if isinstance(verdict, dict) and isinstance(verdict.get("passed"), bool):
        if verdict["passed"]:
            return None
        reasons = [str(r) for r in verdict.get("reasons", []) if isinstance(r, str)] or ["no reason recorded"]
        return (f"{component} {precision} failed the export's parity gate ({verdict.get('decided_by', 'gate')}): "
                + " and ".join(reasons))
    problems = []
    generation = measured.get("generation") if isinstance(measured.get("generation"), dict) else {}
    agreement = _number(generation.get("token_agreement"))
    needed = _number(parity.get("min_token_agreement"))
    if agreement is not None and needed is not None and agreement < needed:
        problems.append(f"its greedy tokens agree {agreement:.1%} with PyTorch's (the gate needs {needed:.0%})")
    delta = _number(measured.get("accuracy_delta"))
    allowed = _number(parity.get("max_accuracy_drop"))
    if delta is not None and allowed is not None and delta < -allowed:
        problems.append(f"its accuracy is {delta:+.1f} points against PyTorch (the gate allows -{allowed:g})")
    if not problems:
        return None
    return f"{component} {precision} failed the export's parity gate: " + " and ".join(problems)


def gate_warning(manifest: Manifest, precisions: dict[str, str], where: str) -> str | None:
    """One line naming every loaded variant that failed the gate, or None."""
    failures = [reason for component, precision in precisions.items()
                if (reason := gate_failure(manifest, component, precision))]
    if not failures:
        return None
    return (f"{where}: " + "; ".join(failures)
            + "; its answers may differ from the model's (see parity.md; precision auto never loads it)")

"""Which quantized variants ``--quantize auto`` may choose: the budgets and the verdict per variant.

By default the decision rests on teacher-forced figures (``vledge.export.forced``): a variant must pick
PyTorch's next token at ``min_top1_agreement`` of the forced positions and keep the mean KL divergence from
PyTorch's distribution within ``max_mean_kl`` nats, on the held-out answers and on the ``--parity-text``
text when one is given. Free-running token agreement (``min_token_agreement``) decides only with
``gate="free-running"`` or where a measurement has no teacher-forced figures. The exact-match accuracy
budget applies either way.

Defaults, measured. On SmolLM2-135M-Instruct (64 tokens of real English text through the KV cache, against
the fp32 graph; ``benchmarks/weight_only_choice.py``) 8-bit weight-only MatMulNBits agreed on the next token at
94 % of positions with 0.0097 nats of mean KL, and even with float compute (``accuracy_level`` 0) only at 95 %
with 0.0043 nats: a small LM has many near-ties, and top-1 counts every one broken the other way as a miss.
Variants that change the answers scored far lower: dynamic int8 (MatMulInteger) 56 % and 0.89 nats, 4-bit
block 16 66 % and 0.73 nats. Hence top-1 >= 0.90 and mean KL <= 0.05 nats. On the tiny test model int8 and q4
measure 99.7 % and below 1e-4 nats, and the q4 decoder with its 4-bit weights scrambled 38 % and 0.10 nats.
Top-1 catches a broken variant on a peaked model; KL one that keeps the argmax but distorts the distribution
a sampler draws from.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from vledge.export.parity import VariantParity

GATE_METRICS = ("teacher-forced", "free-running")
DEFAULT_MIN_TOP1_AGREEMENT = 0.9
DEFAULT_MAX_MEAN_KL = 0.05


@dataclass
class Verdict:
    passed: bool
    decided_by: str  # "teacher-forced" or "free-running": the agreement metric the budgets were applied to
    reasons: list[str] = field(default_factory=list)  # why it failed; empty when it passed

    def to_dict(self) -> dict:
        return asdict(self)


def judge(measured: VariantParity, options) -> Verdict:
    """The gate's verdict on one measured variant under ``options`` (an ``ExportOptions``)."""
    reasons = []
    if measured.accuracy_delta < -options.max_accuracy_drop:
        reasons.append(f"exact-match accuracy {measured.accuracy_delta:+.1f} points against PyTorch, beyond "
                       f"the {options.max_accuracy_drop:g}-point budget")
    forced = {name: figures for name, figures in measured.teacher_forced.items() if figures.positions}
    if options.gate == "teacher-forced" and forced:
        for figures in forced.values():
            if figures.top1_agreement < options.min_top1_agreement:
                reasons.append(f"teacher-forced top-1 agreement {figures.top1_agreement:.1%} on the "
                               f"{figures.source} ({figures.positions} positions), below "
                               f"{options.min_top1_agreement:.1%}")
            if figures.mean_kl > options.max_mean_kl:
                reasons.append(f"mean KL divergence {figures.mean_kl:.4g} nats on the {figures.source}, above "
                               f"{options.max_mean_kl:g}")
        return Verdict(not reasons, "teacher-forced", reasons)
    agreement = measured.generation.token_agreement
    if agreement < options.min_token_agreement:
        reasons.append(f"free-running greedy tokens agree {agreement:.1%} with PyTorch, below "
                       f"{options.min_token_agreement:.1%}")
    return Verdict(not reasons, "free-running", reasons)

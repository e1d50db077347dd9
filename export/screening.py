"""Which variants the export does not measure in full, because ``--quantize auto`` could never choose them.

A full measurement greedily answers every held-out question and times each graph, the slowest part
of an export with a real LM. Two kinds of variant are spared it:

- **fp16 where no CUDA provider works.** fp16 is made for ``selected.cuda``; on the CPU it runs
  through casts and no CPU choice takes it, so a CPU-only export builds it and records it as not
  measured.
- **A quantized variant already outside the gate's budget, teacher-forced.** Fed PyTorch's own
  answers on a few questions, a variant whose next-token choice already disagrees with PyTorch's
  more often than the deciding budget allows (``--min-top1-agreement`` under the teacher-forced
  gate; ``--min-token-agreement`` under the free-running one, which it can only do worse on, since
  greedy answers are identical up to the first disagreement) is recorded as not measured instead
  of being generated in full.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from vledge.decoding import GenerationOptions
from vledge.export.parity import ParitySamples, Reference

log = logging.getLogger(__name__)

SCREEN_QUESTIONS = 16  # held-out questions fed teacher-forced before a full measurement


def cuda_works() -> bool:
    from vledge.runtime.providers import gpu_status

    return gpu_status("cuda").usable


def teacher_forced_agreement(engine, samples: ParitySamples, reference: Reference,
                             questions: int = SCREEN_QUESTIONS) -> float:
    """Share of PyTorch's answer tokens that ``engine`` picks itself when fed PyTorch's answer so far."""
    equal = total = 0
    for index in range(min(questions, len(samples))):
        expected = reference.tokens[index]
        if not expected:
            continue
        row = samples.image_index[index]
        image_embeds = samples.one_row(engine.encode_images(samples.pixels_of(row)))
        steps, options = engine.prefill(image_embeds, [samples.prompts[index]],
                                        GenerationOptions(max_new_tokens=len(expected)))
        logits = steps.first_logits
        for position, token in enumerate(expected[:options.max_new_tokens]):
            equal += int(np.argmax(logits[0]) == token)
            total += 1
            if position + 1 < len(expected):
                logits = steps.step(np.asarray([token], dtype=np.int64))
    return equal / total if total else 1.0


def reason_not_to_measure(root: Path, component: str, precision: str, samples: ParitySamples,
                          reference: Reference, min_agreement: float, threads: int,
                          cuda: bool | None = None) -> str | None:
    """Why ``component`` in ``precision`` (the other graphs fp32) is not worth a full measurement, or None."""
    if precision == "fp16":
        if cuda if cuda is not None else cuda_works():
            return None
        return ("built for CUDA (selected.cuda); not measured: no CUDA provider works on the exporting machine, and "
                "fp16 on the CPU runs through casts that no CPU choice uses")
    if precision == "fp32":
        return None
    from vledge.runtime import load

    precisions = {"vision_encoder": "fp32", "embed_tokens": "fp32", "decoder_model_merged": "fp32",
                  component: precision}
    runtime = load(root, precision=precisions, providers="cpu", threads=threads, verify=False)
    agreement = teacher_forced_agreement(runtime, samples, reference)
    if agreement >= min_agreement:
        return None
    questions = min(SCREEN_QUESTIONS, len(samples))
    return (f"not generated in full: fed PyTorch's answers to {questions} held-out questions, it picks PyTorch's "
            f"next token {agreement:.1%} of the time, below the gate's {min_agreement:.0%}; "
            "auto cannot choose it")

"""The parity gate: each exported variant against the PyTorch model, stage by stage, on held-out data.

Stages: image embeddings (vision encoder + projector), prefill logits with the
PyTorch image embeddings fed to the exported decoder (so decoder drift is seen on
its own), then greedy generation end to end: token agreement, the first divergence,
exact-match accuracy per task and caption agreement; and teacher-forced next-token
agreement and KL divergence (``vledge.export.forced``) over the held-out answers and
an optional real text.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field

import numpy as np

from vledge.data.records import Record
from vledge.decoding import GenerationOptions
from vledge.evaluation import CAPTION_TASKS, LONG_ANSWER_TASKS, questions_of
from vledge.export.forced import ForcedSet, TeacherForced, forced_log_probs, images_of, tile_spans
from vledge.generation import Engine, generate
from vledge.metrics import AccuracyByTask, exact_match
from vledge.models.generate import TorchEngine
from vledge.models.vlm import VisionLanguageModel
from vledge.prompt import question_ids
from vledge.tokenizer import Tokenizer

log = logging.getLogger(__name__)

# fp32 tolerance, as np.allclose: |ort - torch| <= atol + rtol * |torch|
FP32_ATOL = 1e-4
FP32_RTOL = 1e-4
FP32_MIN_TOKEN_AGREEMENT = 0.99


@dataclass
class ParitySamples:
    """Held-out questions with their preprocessed images (the PyTorch pipeline's pixels, shared by both sides).

    A tiled model (Idefics3 / SmolVLM) cuts each image into several tiles: ``pixel_values`` then holds every
    image's tiles one image after the other, ``grids`` each image's (rows, cols), and each prompt is already
    expanded to one image token per visual token (``vledge.image_tiles.tiled_question``).
    """

    pixel_values: np.ndarray  # [images, 3, S, S]; a tiled model: [tiles, 3, S, S]
    image_index: list[int]  # question -> image (a row of pixel_values, or a tiled model's image of grids)
    prompts: list[list[int]]
    tasks: list[str]
    answers: list[str]
    grids: list[tuple[int, int]] | None = None  # a tiled model: each image's (rows, cols); None otherwise

    def __len__(self) -> int:
        return len(self.prompts)

    @property
    def spans(self) -> list[tuple[int, int]] | None:
        """A tiled model's (first tile, tile count) of each image; None for one [3, S, S] image per question."""
        return tile_spans(self.grids)

    def images_of(self, image_embeds: np.ndarray, images: Sequence[int]):
        """What an engine's ``prefill`` takes for questions about ``images`` (``vledge.export.forced.images_of``)."""
        return images_of(image_embeds, images, self.spans)

    def pixels_of(self, image: int) -> np.ndarray:
        """One image's pixels [1, 3, S, S], or a tiled model's tiles of it [tiles, 3, S, S]."""
        start, count = self.spans[image] if self.grids is not None else (image, 1)
        return self.pixel_values[start:start + count]

    def one_row(self, image_embeds: np.ndarray):
        """The embeddings of :meth:`pixels_of` as ``prefill`` takes them for one question."""
        return image_embeds if self.grids is None else [image_embeds]


def build_samples(records: Sequence[Record], model: VisionLanguageModel, tokenizer: Tokenizer,
                  limit: int) -> ParitySamples:
    from vledge.data.images import preprocess, preprocess_tiles
    from vledge.errors import ImageError
    from vledge.image_tiles import tiled_question

    spec = model.config.preprocess
    tiled = spec.tiles is not None
    pixels: list[np.ndarray] = []
    tiled_images: list = []  # a tiled model's Idefics3Images, one per image
    rows: dict[str, int] = {}
    samples = ParitySamples(np.zeros(0), [], [], [], [], grids=[] if tiled else None)
    for record, turn_index in questions_of(records):
        if len(samples) >= limit:
            break
        key = str(record.image)
        if key not in rows:
            try:
                if tiled:
                    image = preprocess_tiles(record.image, spec)
                    tiled_images.append(image)
                    pixels.append(image.pixel_values)
                    samples.grids.append((image.rows, image.cols))
                else:
                    pixels.append(preprocess(record.image, spec).numpy()[None])
            except ImageError as exc:
                log.warning("parity skips %s", exc)
                continue
            rows[key] = len(pixels) - 1
        turn = record.turns[turn_index]
        samples.image_index.append(rows[key])
        if tiled:
            samples.prompts.append(tiled_question(tokenizer, model.config.prompt, spec.tiles, turn.question,
                                                  [tiled_images[rows[key]]]))
        else:
            samples.prompts.append(question_ids(tokenizer, model.config.prompt, turn.question))
        samples.tasks.append(turn.task)
        samples.answers.append(turn.answer)
    if not pixels:
        from vledge.errors import ExportError

        raise ExportError("no readable held-out images for the parity check")
    samples.pixel_values = np.concatenate(pixels).astype(np.float32)
    return samples


def max_new_tokens_for(task: str) -> int:
    return 96 if task in LONG_ANSWER_TASKS else 48


def task_batches(samples: ParitySamples, batch_size: int) -> list[list[int]]:
    """Question indices grouped by task (equal answer lengths decode together), in batches."""
    by_task: dict[str, list[int]] = defaultdict(list)
    for index, task in enumerate(samples.tasks):
        by_task[task].append(index)
    return [indices[i:i + batch_size] for _, indices in sorted(by_task.items())
            for i in range(0, len(indices), batch_size)]


@dataclass
class Reference:
    """What the PyTorch model produces; every variant is compared with it."""

    image_embeds: np.ndarray  # [images, tokens, hidden]; a tiled model: [tiles, tokens, hidden]
    prefill_logits: np.ndarray  # [questions, vocab]
    tokens: list[list[int]]
    texts: list[str]
    accuracy: dict[str, float]
    # name ("answers", "text") -> the forced rows and PyTorch's log-probabilities at each of their positions
    forced: dict[str, tuple[ForcedSet, list[np.ndarray]]] = field(default_factory=dict)


def _accuracy(texts: Sequence[str], samples: ParitySamples) -> dict[str, float]:
    scores = AccuracyByTask()
    for text, task, answer in zip(texts, samples.tasks, samples.answers):
        scores.add(task, exact_match(text, answer))
    result = {task: scores.accuracy(task) for task in scores.tasks}
    result["overall"] = scores.accuracy()
    return result


def _encode_all(engine: Engine, pixel_values: np.ndarray) -> np.ndarray:
    return np.concatenate([engine.encode_images(pixel_values[i:i + 64]) for i in range(0, len(pixel_values), 64)])


def _answer_all(engine: Engine, samples: ParitySamples, image_embeds: np.ndarray, prefill_embeds: np.ndarray,
                batch_size: int, progress: Callable[[int], None] | None = None,
                ) -> tuple[np.ndarray, list[list[int]], list[str]]:
    """Prefill logits (from ``prefill_embeds``) and greedy answers (from ``image_embeds``) of every question."""
    logits: np.ndarray | None = None
    tokens: list[list[int]] = [[] for _ in range(len(samples))]
    texts: list[str] = [""] * len(samples)
    for batch in task_batches(samples, batch_size):
        rows = [samples.image_index[i] for i in batch]
        prompts = [samples.prompts[i] for i in batch]
        options = GenerationOptions(max_new_tokens=max_new_tokens_for(samples.tasks[batch[0]]))
        first = engine.prefill(samples.images_of(prefill_embeds, rows), prompts, options)[0].first_logits
        if logits is None:
            logits = np.zeros((len(samples), first.shape[-1]), dtype=np.float32)
        logits[batch] = first
        for index, result in zip(batch, generate(engine, samples.images_of(image_embeds, rows), prompts, options)):
            tokens[index], texts[index] = list(result.token_ids), result.text
        if progress is not None:
            progress(len(batch))
    return logits, tokens, texts


def torch_reference(model: VisionLanguageModel, tokenizer: Tokenizer, samples: ParitySamples,
                    batch_size: int = 32, forced: dict[str, ForcedSet] | None = None,
                    progress: Callable[[int], None] | None = None) -> Reference:
    """PyTorch's answers and, for each set in ``forced``, its teacher-forced log-probabilities."""
    engine = TorchEngine(model.eval(), tokenizer)
    image_embeds = _encode_all(engine, samples.pixel_values)
    logits, tokens, texts = _answer_all(engine, samples, image_embeds, image_embeds, batch_size, progress)
    runs = {name: (rows, forced_log_probs(engine, image_embeds, rows, samples.spans))
            for name, rows in (forced or {}).items()}
    return Reference(image_embeds, logits, tokens, texts, _accuracy(texts, samples), runs)


@dataclass
class Drift:
    max_abs: float
    mean_abs: float
    max_ref: float  # largest |reference| value, for scale
    within_fp32_tolerance: bool

    @classmethod
    def between(cls, ours: np.ndarray, reference: np.ndarray) -> "Drift":
        diff = np.abs(ours.astype(np.float64) - reference.astype(np.float64))
        allowed = FP32_ATOL + FP32_RTOL * np.abs(reference)
        return cls(float(diff.max()), float(diff.mean()), float(np.abs(reference).max()), bool((diff <= allowed).all()))


@dataclass
class Agreement:
    token_agreement: float  # position-wise equal tokens / reference-or-variant length, over all questions
    sequence_match: float  # share of questions answered with identical tokens
    first_divergence_mean: float | None  # mean index of the first differing token among differing answers
    first_divergence_min: int | None
    caption_agreement: float | None  # share of caption answers with identical text

    @classmethod
    def between(cls, ours: Sequence[Sequence[int]], reference: Sequence[Sequence[int]], ours_text: Sequence[str],
                reference_text: Sequence[str], tasks: Sequence[str]) -> "Agreement":
        equal = total = 0
        divergences = []
        for a, b in zip(ours, reference):
            length = max(len(a), len(b))
            same = sum(1 for x, y in zip(a, b) if x == y)
            equal += same
            total += length
            if list(a) != list(b):
                divergences.append(next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b))))
        captions = [(x, y) for x, y, t in zip(ours_text, reference_text, tasks) if t in CAPTION_TASKS]
        return cls(
            token_agreement=equal / total if total else 1.0,
            sequence_match=1 - len(divergences) / max(len(ours), 1),
            first_divergence_mean=float(np.mean(divergences)) if divergences else None,
            first_divergence_min=min(divergences) if divergences else None,
            caption_agreement=(sum(x == y for x, y in captions) / len(captions)) if captions else None,
        )


@dataclass
class VariantParity:
    precisions: dict[str, str]
    image_embeds: Drift
    prefill_logits: Drift
    generation: Agreement
    accuracy: dict[str, float]
    accuracy_delta: float  # overall, in points (percent), variant minus PyTorch
    questions: int
    latency_ms: dict[str, float] = field(default_factory=dict)
    # "answers" (held-out answers) and "text" (--parity-text): teacher-forced agreement with PyTorch
    teacher_forced: dict[str, TeacherForced] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


def measure_engine(engine: Engine, samples: ParitySamples, reference: Reference,
                   precisions: dict[str, str] | None = None, batch_size: int = 32,
                   progress: Callable[[int], None] | None = None) -> VariantParity:
    """Compare one engine with the PyTorch reference on the same pixels and prompts.

    The prefill logits are computed from the reference's image embeddings, so the decoder's drift is seen on
    its own; the answers and the teacher-forced predictions come from the engine's own embeddings, end to end.
    """
    embeds = _encode_all(engine, samples.pixel_values)
    logits, tokens, texts = _answer_all(engine, samples, embeds, reference.image_embeds, batch_size, progress)
    accuracy = _accuracy(texts, samples)
    forced = {name: TeacherForced.between(rows.source, forced_log_probs(engine, embeds, rows, samples.spans),
                                          ref_log_probs)
              for name, (rows, ref_log_probs) in reference.forced.items()}
    return VariantParity(
        precisions=dict(precisions or {}),
        image_embeds=Drift.between(embeds, reference.image_embeds),
        prefill_logits=Drift.between(logits, reference.prefill_logits),
        generation=Agreement.between(tokens, reference.tokens, texts, reference.texts, samples.tasks),
        accuracy=accuracy,
        accuracy_delta=100.0 * (accuracy["overall"] - reference.accuracy["overall"]),
        questions=len(samples),
        teacher_forced=forced,
    )


def measure_runtime(runtime, samples: ParitySamples, reference: Reference, batch_size: int = 32,
                    progress: Callable[[int], None] | None = None) -> VariantParity:
    return measure_engine(runtime, samples, reference, precisions=runtime.precisions, batch_size=batch_size,
                          progress=progress)


def fp32_failures(parity: VariantParity) -> list[str]:
    """Why an fp32 export is not faithful, or nothing."""
    problems = []
    for stage in ("image_embeds", "prefill_logits"):
        drift: Drift = getattr(parity, stage)
        if not drift.within_fp32_tolerance:
            problems.append(f"{stage} differ by up to {drift.max_abs:.3g} (mean {drift.mean_abs:.3g}), beyond "
                            f"atol {FP32_ATOL:g} + rtol {FP32_RTOL:g}")
    if parity.generation.token_agreement < FP32_MIN_TOKEN_AGREEMENT:
        problems.append(f"greedy tokens agree only {parity.generation.token_agreement:.1%} "
                        f"(first divergence at token {parity.generation.first_divergence_min})")
    return problems


def measure_latency(runtime, samples: ParitySamples, repeats: int = 15, decode_steps: int = 16) -> dict[str, float]:
    """Median milliseconds of each graph on one held-out sample (batch 1), to rank variants for ``auto``.

    The decode step is timed at the sample's real prompt length, feeding the greedy token each time
    (a stop token does not end the loop: the cost of a step does not depend on the token).
    """
    import time

    pixels = samples.pixels_of(samples.image_index[0])  # a tiled model: every tile of the image
    prompt = [samples.prompts[0]]
    graphs = runtime.graphs

    def median_ms(call) -> float:
        call()  # warm-up
        times = []
        for _ in range(repeats):
            tick = time.perf_counter()
            call()
            times.append((time.perf_counter() - tick) * 1e3)
        return float(np.median(times))

    embeds = samples.one_row(graphs.encode_images(pixels))
    result = {
        "vision_ms": median_ms(lambda: graphs.encode_images(pixels)),
        "embed_ms": median_ms(lambda: graphs.embed_ids(np.asarray([prompt[0]], dtype=np.int64))),
        "prefill_ms": median_ms(lambda: runtime.prefill_logits(embeds, prompt)),
    }
    steps, _ = runtime.prefill(embeds, prompt, GenerationOptions(max_new_tokens=decode_steps))
    token = np.argmax(steps.first_logits, axis=-1)
    steps.step(token)  # warm-up
    times = []
    for _ in range(decode_steps):
        tick = time.perf_counter()
        logits = steps.step(token)
        times.append((time.perf_counter() - tick) * 1e3)
        token = np.argmax(logits, axis=-1)
    result["decode_step_ms"] = float(np.median(times))
    return result

"""Built-in synthetic visual-instruction data: drawn scenes with exact answers.

Every scene is a ``grid`` x ``grid`` board of simple coloured shapes (one per
cell) on a plain, slightly noisy background, sometimes with a short word in an
empty cell. Because we draw the picture ourselves, every answer (counts,
colours, shapes, positions, relations, the word) is known exactly, so a small
model's mistakes are its own and exact-match accuracy is a fair measure.

Torch-free: numpy + OpenCV only. Modules: ``options`` (``SynthOptions``), ``scenes``
(the vocabulary, a random scene and drawing it), ``conversations`` (its captions and
question-answer turns) and ``dataset`` (writing images and LLaVA JSON splits).
"""

from vledge.data.synth.conversations import (
    QUESTION_TASKS,
    caption,
    describe,
    list_by_shape,
    relation_holds,
    scene_conversation,
)
from vledge.data.synth.dataset import GENERATOR, GENERATOR_VERSION, SynthSummary, generate_dataset
from vledge.data.synth.options import IMAGE_FORMATS, SPLITS, SynthOptions
from vledge.data.synth.scenes import (
    COLORS,
    JITTER,
    MIN_CELL_PX,
    PLURALS,
    RELATIONS,
    SHAPES,
    SIZES,
    WORDS,
    Scene,
    SceneObject,
    cell_center,
    position_name,
    position_names,
    random_scene,
    render_scene,
)

__all__ = [
    "COLORS", "GENERATOR", "GENERATOR_VERSION", "IMAGE_FORMATS", "JITTER", "MIN_CELL_PX", "PLURALS",
    "QUESTION_TASKS", "RELATIONS", "SHAPES", "SIZES", "SPLITS", "WORDS", "Scene", "SceneObject",
    "SynthOptions", "SynthSummary", "caption", "cell_center", "describe", "generate_dataset",
    "list_by_shape", "position_name", "position_names", "random_scene", "relation_holds",
    "render_scene", "scene_conversation",
]

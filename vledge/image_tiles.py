"""Tiled images in the prompt (Idefics3 / SmolVLM): the text one image token expands to, and the expanded ids.

Torch-free; shared by training, the exporter's parity checks and the runtime, so all three build the same ids.
A tiled model's prompt holds one image token per visual token: each image's single image token becomes, per
tile, a marker and ``tokens_per_tile`` image tokens, then the global view (:func:`image_prompt`); the visual
tokens of its tiles fill those image tokens in order (``VisionLanguageModel.merge``, the runtime's prefill).
"""

from __future__ import annotations

from collections.abc import Sequence

from vledge.config import ImageTiles
from vledge.errors import ConfigError, DataError

IMAGE_TOKEN = "<image>"


def image_prompt(rows: int, cols: int, image_seq_len: int, *, fake_image_token: str = "<fake_token_around_image>",
                 image_token: str = IMAGE_TOKEN, global_image_token: str = "<global-img>") -> str:
    """The text one image token expands to (``Idefics3Processor``'s ``_prompt_split_image`` / ``_prompt_single_image``).

    ``rows`` = ``cols`` = 0 for an image that was not split (only the global view).
    """
    for name, value in (("rows", rows), ("cols", cols), ("image_seq_len", image_seq_len)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ConfigError(f"{name} must be a non-negative integer, got {value!r}")
    if image_seq_len < 1 or (rows == 0) != (cols == 0):
        raise ConfigError(f"need image_seq_len >= 1 and rows, cols both 0 or both positive, got "
                          f"image_seq_len={image_seq_len}, rows={rows}, cols={cols}")
    single = fake_image_token + global_image_token + image_token * image_seq_len + fake_image_token
    if rows == 0:
        return single
    lines = ["".join(f"{fake_image_token}<row_{r + 1}_col_{c + 1}>" + image_token * image_seq_len
                     for c in range(cols)) + "\n" for r in range(rows)]
    return "".join(lines) + "\n" + single


def expand_prompt(text: str, grids: Sequence[tuple[int, int]], image_seq_len: int, *,
                  fake_image_token: str = "<fake_token_around_image>", image_token: str = IMAGE_TOKEN,
                  global_image_token: str = "<global-img>") -> str:
    """``text`` with its n-th ``image_token`` replaced by the expansion of the n-th image's (rows, cols)."""
    pieces = text.split(image_token)
    if len(pieces) - 1 != len(grids):
        raise DataError(f"the prompt has {len(pieces) - 1} {image_token} tokens but {len(grids)} images were given")
    out = [pieces[0]]
    for (rows, cols), piece in zip(grids, pieces[1:]):
        out.append(image_prompt(rows, cols, image_seq_len, fake_image_token=fake_image_token,
                                image_token=image_token, global_image_token=global_image_token))
        out.append(piece)
    return "".join(out)


def expand_image_ids(tokenizer, tiles: ImageTiles, ids: Sequence[int], grids: Sequence[tuple[int, int]]) -> list[int]:
    """``ids`` with the n-th image token replaced by the ids of the n-th image's expansion.

    The expansion is tokenized whole; it starts and ends with a special token, so its ids are those of the
    whole prompt tokenized at once (what the Hugging Face processor does).
    """
    image_id = tokenizer.image_id
    count = sum(1 for token in ids if token == image_id)
    if count != len(grids):
        raise DataError(f"the prompt holds {count} image tokens for {len(grids)} images")
    image_text = tokenizer.backend.id_to_token(image_id)
    out: list[int] = []
    grid_iter = iter(grids)
    for token in ids:
        if token != image_id:
            out.append(token)
            continue
        rows, cols = next(grid_iter)
        expansion = tokenizer.encode(image_prompt(rows, cols, tiles.tokens_per_tile, fake_image_token=tiles.fake_token,
                                                  image_token=image_text, global_image_token=tiles.global_token))
        if sum(1 for t in expansion if t == image_id) != tiles.tokens_per_tile * (rows * cols + 1):
            raise ConfigError(f"the tokenizer does not keep {image_text}, {tiles.fake_token} or the row/column markers "
                              "as single tokens")
        out.extend(expansion)
    return out


def tiles_per_row(grids_per_row: Sequence[Sequence[tuple[int, int]]]) -> list[int]:
    """Tiles each row's images make (rows * cols + 1 per image: the tiles and the global view)."""
    return [sum(rows * cols + 1 for rows, cols in grids) for grids in grids_per_row]


def tiled_question(tokenizer, template, tiles: ImageTiles, question: str, images: Sequence) -> list[int]:
    """The ids asking ``question`` about ``images`` (each with ``rows`` and ``cols``, as ``Idefics3Images``)."""
    from vledge.prompt import question_ids

    base = question_ids(tokenizer, template, question, images=len(images))
    return expand_image_ids(tokenizer, tiles, base, [(image.rows, image.cols) for image in images])

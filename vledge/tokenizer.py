"""Byte-level BPE tokenizer (Hugging Face ``tokenizers``) trained on a dataset's own text.

Byte-level pieces make every string round-trip exactly, so no text is ever lost to
``<unk>``; the special tokens are fixed by name so the model directory and the
runtime can find them.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Sequence
from pathlib import Path

from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from vledge.errors import TokenizerError
from vledge.files import write_text

log = logging.getLogger(__name__)

PAD, BOS, EOS, UNK, IMAGE = "<pad>", "<s>", "</s>", "<unk>", "<image>"
SPECIAL_TOKENS = (PAD, BOS, EOS, UNK, IMAGE)


class Tokenizer:
    """A thin owner of a ``tokenizers.Tokenizer`` with vledge's special tokens resolved to ids."""

    def __init__(self, backend: HFTokenizer) -> None:
        self.backend = backend
        ids = {}
        for token in SPECIAL_TOKENS:
            token_id = backend.token_to_id(token)
            if token_id is None:
                raise TokenizerError(f"tokenizer lacks the special token {token!r}")
            ids[token] = token_id
        self.pad_id, self.bos_id, self.eos_id = ids[PAD], ids[BOS], ids[EOS]
        self.unk_id, self.image_id = ids[UNK], ids[IMAGE]

    # ------------------------------------------------------------------ construction

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int = 1024) -> "Tokenizer":
        minimum = len(pre_tokenizers.ByteLevel.alphabet()) + len(SPECIAL_TOKENS)
        if vocab_size < minimum:
            raise TokenizerError(f"vocab_size must be at least {minimum} for a byte-level BPE, got {vocab_size}")
        backend = HFTokenizer(models.BPE(unk_token=UNK))
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        backend.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=list(SPECIAL_TOKENS),
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        backend.train_from_iterator(texts, trainer=trainer)
        log.info("trained a byte-level BPE tokenizer with %d tokens", backend.get_vocab_size())
        return cls(backend)

    @classmethod
    def from_json(cls, text: str) -> "Tokenizer":
        try:
            backend = HFTokenizer.from_str(text)
        except Exception as exc:  # tokenizers raises a bare Exception on malformed JSON
            raise TokenizerError(f"not a valid tokenizer.json: {exc}") from None
        return cls(backend)

    @classmethod
    def from_file(cls, path: str | Path) -> "Tokenizer":
        path = Path(path)
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as exc:
            raise TokenizerError(f"cannot read tokenizer file {path}: {exc.strerror or exc}") from None
        return cls.from_json(text)

    def to_json(self) -> str:
        return self.backend.to_str()

    def save(self, path: str | Path) -> None:
        write_text(path, self.to_json())

    # ------------------------------------------------------------------ use

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size()

    def encode(self, text: str) -> list[int]:
        """Ids of ``text`` alone: no special tokens are added, so pieces concatenate predictably."""
        return self.backend.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def special_tokens(self) -> dict[str, int]:
        return {"pad": self.pad_id, "bos": self.bos_id, "eos": self.eos_id, "unk": self.unk_id, "image": self.image_id}

    def __repr__(self) -> str:
        return f"Tokenizer(vocab_size={self.vocab_size}, special={json.dumps(self.special_tokens())})"

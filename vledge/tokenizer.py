"""Byte-level BPE tokenizer (Hugging Face ``tokenizers``) trained on a dataset's own text.

Byte-level pieces make every string round-trip exactly, so no text is ever lost to
``<unk>``; the special tokens are fixed by name so the model directory and the
runtime can find them.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from vledge.errors import TokenizerError
from vledge.files import write_text
from vledge.reads import MAX_JSON_BYTES, read_text

log = logging.getLogger(__name__)

PAD, BOS, EOS, UNK, IMAGE = "<pad>", "<s>", "</s>", "<unk>", "<image>"
SPECIAL_TOKENS = (PAD, BOS, EOS, UNK, IMAGE)
# Role -> token text of vledge's own tokenizers; a pretrained LM's tokenizer brings its own mapping.
DEFAULT_ROLES = {"pad": PAD, "bos": BOS, "eos": EOS, "unk": UNK, "image": IMAGE}
REQUIRED_ROLES = ("pad", "eos", "image")


class Tokenizer:
    """A thin owner of a ``tokenizers.Tokenizer`` with its special tokens resolved to ids.

    ``roles`` maps "pad", "bos", "eos", "unk", "image" to token texts (vledge's own names when
    None); "bos" and "unk" may be absent (no token goes before a prompt; no unknown token).
    """

    def __init__(self, backend: HFTokenizer, roles: Mapping[str, str] | None = None) -> None:
        self.backend = backend
        self.roles = dict(DEFAULT_ROLES if roles is None else roles)
        missing = [role for role in REQUIRED_ROLES if role not in self.roles]
        if missing:
            raise TokenizerError(f"the special token roles lack {missing}")
        ids: dict[str, int | None] = {}
        for role, token in self.roles.items():
            token_id = backend.token_to_id(token)
            if token_id is None:
                raise TokenizerError(f"tokenizer lacks the special token {token!r} ({role})")
            ids[role] = token_id
        self.pad_id, self.eos_id, self.image_id = ids["pad"], ids["eos"], ids["image"]
        self.bos_id, self.unk_id = ids.get("bos"), ids.get("unk")

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
    def from_json(cls, text: str, roles: Mapping[str, str] | None = None) -> "Tokenizer":
        try:
            backend = HFTokenizer.from_str(text)
        except Exception as exc:  # tokenizers raises a bare Exception on malformed JSON
            raise TokenizerError(f"not a valid tokenizer.json: {exc}") from None
        return cls(backend, roles)

    @classmethod
    def from_file(cls, path: str | Path, roles: Mapping[str, str] | None = None) -> "Tokenizer":
        text = read_text(Path(path), MAX_JSON_BYTES, TokenizerError, "tokenizer file")  # regular, size-capped
        return cls.from_json(text, roles)

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
        if not isinstance(text, str):
            raise TokenizerError(f"can only encode text, got {type(text).__name__}")
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:  # a lone surrogate: bytes of a command-line argument that were not UTF-8
            raise TokenizerError(f"'{text.encode('utf-8', 'backslashreplace').decode()}' is not valid text "
                                 "(not UTF-8); the tokenizer takes Unicode text only") from None
        return self.backend.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def special_tokens(self) -> dict[str, int]:
        """Role -> id of every special token this tokenizer has (no "bos"/"unk" where it has none)."""
        ids = {"pad": self.pad_id, "bos": self.bos_id, "eos": self.eos_id, "unk": self.unk_id, "image": self.image_id}
        return {role: token_id for role, token_id in ids.items() if token_id is not None}

    def __repr__(self) -> str:
        return f"Tokenizer(vocab_size={self.vocab_size}, special={json.dumps(self.special_tokens())})"

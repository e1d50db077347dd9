"""A pretrained LM's own tokenizer, adapted to vledge: ``<image>`` and (if absent) a pad token added.

The roles (pad, bos, eos, unk, image) come from ``tokenizer_config.json`` /
``special_tokens_map.json``; the prompt pieces from its chat template where it has one, in which
case the template's end-of-turn token is the eos the runtime stops on. Torch-free.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tokenizers import AddedToken
from tokenizers import Tokenizer as HFTokenizer

from vledge.chat_template import chat_pieces
from vledge.config import PromptTemplate
from vledge.errors import ConfigError, TokenizerError
from vledge.reads import read_json
from vledge.tokenizer import IMAGE, PAD, Tokenizer

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class AdaptedTokenizer:
    tokenizer: Tokenizer
    roles: dict[str, str]
    prompt: PromptTemplate
    added_ids: tuple[int, ...]  # ids of the tokens vledge added (<image>, maybe a pad token)
    chat_template: bool  # the prompt pieces come from the LM's chat template


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    data = read_json(path, error=TokenizerError, what="tokenizer file")  # capped, depth-limited, typed
    return data if isinstance(data, dict) else {}


def _token_text(value: Any) -> str | None:
    """A special token as tokenizer_config.json writes it: a string or {"content": ...}."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) and value else None


def _chat_template(folder: Path, config: dict[str, Any]) -> str | None:
    template = config.get("chat_template")
    if isinstance(template, list):  # [{"name": "default", "template": ...}, ...]
        named = {entry.get("name"): entry.get("template") for entry in template if isinstance(entry, dict)}
        template = named.get("default")
    if not template and (folder / "chat_template.jinja").is_file():
        template = (folder / "chat_template.jinja").read_text(encoding="utf-8")
    if not template:
        template = _read_json(folder / "chat_template.json").get("chat_template")
    return template if isinstance(template, str) and template else None


def adapt_tokenizer(folder: Path, use_chat_template: bool = True) -> AdaptedTokenizer:
    """``use_chat_template`` False: the folder's template is not this module's to read (a LLaVA processor's)."""
    path = folder / "tokenizer.json"
    if not path.is_file():
        raise TokenizerError(
            f"{folder} has no tokenizer.json (a fast tokenizer); if it has only a sentencepiece tokenizer.model, "
            "save a fast one once: `transformers.AutoTokenizer.from_pretrained(DIR).save_pretrained(DIR)`"
        )
    try:
        backend = HFTokenizer.from_file(str(path))
    except Exception as exc:  # tokenizers raises a bare Exception on malformed files
        raise TokenizerError(f"{path} is not a valid tokenizer.json: {exc}") from None
    config = {**_read_json(folder / "special_tokens_map.json"), **_read_json(folder / "tokenizer_config.json")}
    named = {role: _token_text(config.get(f"{role}_token")) for role in ("pad", "bos", "eos", "unk")}
    named = {role: text for role, text in named.items() if text and backend.token_to_id(text) is not None}
    before = backend.get_vocab_size()
    added = [text for text in (IMAGE, None if "pad" in named else PAD) if text and backend.token_to_id(text) is None]
    if added:
        backend.add_special_tokens([AddedToken(text, special=True, normalized=False) for text in added])
    added_ids = tuple(backend.token_to_id(text) for text in added)
    roles = {"image": IMAGE, "pad": named.get("pad", PAD)}
    if "unk" in named:
        roles["unk"] = named["unk"]
    prompt, eos, uses_bos, from_template = PromptTemplate(), named.get("eos"), None, False
    template = _chat_template(folder, config) if use_chat_template else None
    if template is not None:
        specials = [token.content for token in backend.get_added_tokens_decoder().values() if token.special]
        try:
            pieces = chat_pieces(template, named.get("bos", ""), named.get("eos", ""), specials)
            prompt, eos, uses_bos, from_template = pieces.prompt, pieces.eos_token, pieces.uses_bos, True
        except ConfigError as exc:
            log.warning("%s: %s; using vledge's plain prompt instead", folder, exc)
    if eos is None:
        raise TokenizerError(f"{folder}: the tokenizer names no eos_token (tokenizer_config.json), so generation "
                             "could never stop")
    roles["eos"] = eos
    if "bos" in named:
        if uses_bos is None:  # no template: do what the tokenizer's own post-processor does
            probe = backend.encode("a", add_special_tokens=True).ids
            uses_bos = bool(probe) and probe[0] == backend.token_to_id(named["bos"])
        if uses_bos:
            roles["bos"] = named["bos"]
    log.info("tokenizer of %s: %d tokens (+%d added), roles %s, prompt from %s", folder, before, len(added),
             roles, "its chat template" if from_template else "vledge's default")
    return AdaptedTokenizer(tokenizer=Tokenizer(backend, roles), roles=roles, prompt=prompt, added_ids=added_ids,
                            chat_template=from_template)

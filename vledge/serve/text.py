"""Streaming text: the pieces a stream may show before the answer is final."""

from __future__ import annotations

from collections.abc import Sequence

from vledge.generation import cut_at_stop, partial_stop


class StreamText:
    """Turns a row's tokens into text pieces that, joined, equal its final answer.

    Whitespace at the end, half a UTF-8 character and anything that may be the start of a stop string are
    held back until the text goes on; :meth:`finish` gives the rest of the final answer.
    """

    def __init__(self, tokenizer, stops: Sequence[str]) -> None:
        self.tokenizer = tokenizer
        self.stops = tuple(stops)
        self.tokens: list[int] = []
        self.emitted = ""

    def add(self, token: int) -> str:
        self.tokens.append(token)
        text = self.tokenizer.decode(self.tokens)
        if text.endswith("\ufffd"):
            return ""
        text, _ = cut_at_stop(text, self.stops)
        visible = text.lstrip().rstrip()
        visible = visible[: len(visible) - partial_stop(visible, self.stops)]
        if len(visible) > len(self.emitted) and visible.startswith(self.emitted):
            piece, self.emitted = visible[len(self.emitted):], visible
            return piece
        return ""

    def finish(self, final_text: str) -> str:
        """What is left of ``final_text`` after the pieces already shown (it always starts with them)."""
        if final_text.startswith(self.emitted):
            piece, self.emitted = final_text[len(self.emitted):], final_text
            return piece
        return ""

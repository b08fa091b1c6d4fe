"""Multi-turn chat that never re-reads its history: the state after each turn is kept.

Turn N feeds only its own new text (the user's message and the reply prefix), then the
reply is generated from the kept state. The session's ``history`` lists every token it
has fed since it started (or was reset), so ``model(history)`` gives the session's state.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from dataclasses import dataclass

from ..errors import RwkvpyError
from ..models.state import RecurrentState, load_state_and_metadata
from ..tokenizers.base import Tokenizer
from .loop import Generation
from .sampling import SamplingParams, make_generator

SEPARATOR = "\n\n"


@dataclass(frozen=True)
class ChatFormat:
    """How a conversation is written: each part ends with the separator ``\\n\\n``, so replies
    stop at ``\\n\\n`` and user messages have blank lines collapsed (as ChatRWKV does)."""

    name: str
    system: str  # with {system}
    user: str  # with {message}
    assistant: str  # the prefix the model continues


FORMATS = {
    "world": ChatFormat("world", "System: {system}\n\n", "User: {message}\n\n", "Assistant:"),
    "raven": ChatFormat("raven", "{system}\n\n", "Bob: {message}\n\n", "Alice:"),
    "alpaca": ChatFormat("alpaca", "{system}\n\n", "### Instruction:\n{message}\n\n", "### Response:\n"),
    # RWKV-7 G1 (RWKV-LM's RWKV7-G1x-templates.txt): World's turns; the reply may open with a
    # thinking block ("<think" lets the model think, "<think></think" skips it, fast and good)
    "g1": ChatFormat("g1", "System: {system}\n\n", "User: {message}\n\n", "Assistant:"),
    "g1-think": ChatFormat("g1-think", "System: {system}\n\n", "User: {message}\n\n", "Assistant: <think"),
    "g1-nothink": ChatFormat("g1-nothink", "System: {system}\n\n", "User: {message}\n\n",
                             "Assistant: <think></think"),
}


def clean_message(text: str) -> str:
    """Strip, and collapse blank lines: a blank line would end the turn."""
    return re.sub(r"\n\s*\n+", "\n", text.strip().replace("\r\n", "\n"))


class ChatSession:
    def __init__(self, model, tokenizer: Tokenizer, format: str = "world", system: str | None = None,
                 params: SamplingParams | None = None, initial_state: RecurrentState | None = None):
        if format not in FORMATS:
            raise RwkvpyError(f"unknown chat format {format!r}; choose one of {', '.join(FORMATS)}")
        self.model, self.tokenizer, self.format, self.system = model, tokenizer, FORMATS[format], system
        base = params or SamplingParams(temperature=1.0, top_p=0.3, presence_penalty=0.4,
                                        frequency_penalty=0.4, penalty_decay=0.996, max_new_tokens=500)
        stops = tuple(dict.fromkeys((*base.stop_strings, SEPARATOR)))
        self.params = SamplingParams(**{**base.__dict__, "stop_strings": stops})
        self.generator = make_generator(self.params.seed)
        self.initial_state = initial_state  # where a conversation starts (a state-tuned state, say)
        self.reset()

    def reset(self) -> None:
        self.state: RecurrentState | None = self.initial_state
        self.transcript = ""  # all text the state has read
        self.history: list[int] = []  # all tokens fed in this session
        self._last_turn: tuple[RecurrentState | None, str, int, str] | None = None

    def _turn_text(self, message: str) -> str:
        text = ""
        if not self.transcript and self.system:
            text += self.format.system.format(system=clean_message(self.system))
        elif self.transcript and not self.transcript.endswith(SEPARATOR):
            text += SEPARATOR  # the last reply was cut short: close it
        return text + self.format.user.format(message=clean_message(message)) + self.format.assistant

    def send(self, message: str) -> Iterator[str]:
        """Stream the reply to ``message``. The turn is kept even if the stream is left early."""
        turn = self._turn_text(message)
        self._last_turn = (self.state, self.transcript, len(self.history), turn)
        return self._reply(turn)

    def regenerate(self) -> Iterator[str]:
        """Go back to the state before the last reply and answer the same message again."""
        if self._last_turn is None:
            raise RwkvpyError("nothing to regenerate")
        self.state, self.transcript, n, turn = self._last_turn
        del self.history[n:]
        return self._reply(turn)

    def say(self, message: str) -> str:
        return "".join(self.send(message))

    def _reply(self, turn: str) -> Iterator[str]:
        prompt = self.tokenizer.encode(turn)
        gen = Generation(self.model, self.tokenizer, prompt, self.params, self.state,
                         generator=self.generator)
        try:
            yield from gen
        finally:
            if gen.state is not self.state:  # the prompt was read: keep what was fed
                self.state = gen.state
                self.history += prompt + gen.tokens
                self.transcript += turn + self.tokenizer.decode(gen.tokens)

    def save(self, path: str | os.PathLike) -> None:
        if self.state is None:
            raise RwkvpyError("nothing to save yet: the conversation is empty")
        self.state.save(path, text=self.transcript)

    def load(self, path: str | os.PathLike) -> None:
        state, meta = load_state_and_metadata(path, self.model)
        if state.batch_size != 1:
            raise RwkvpyError(f"{path}: holds {state.batch_size} streams; a chat needs one")
        self.reset()
        self.state = state
        self.transcript = meta.get("text", "")

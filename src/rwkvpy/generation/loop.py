"""Text in, text out: prefill with the parallel form, decode with the recurrent step.

    gen = rwkvpy.generate(model, tokenizer, "ROMEO:", max_new_tokens=100, temperature=0.8)
    for piece in gen:            # pieces are valid UTF-8 text, streamed as they complete
        print(piece, end="")
    gen.state                    # has read the prompt and gen.tokens: continue from it

Invariant: ``gen.state`` equals the state after feeding ``prompt + gen.tokens`` in one go.
A stop *token* ends generation without being fed (it is in ``gen.stop_token``); a token
that completes a stop *string* is fed, and the stop string is not emitted.
"""

from __future__ import annotations

import codecs
from collections.abc import Iterator

import torch

from ..errors import RwkvpyError
from ..models.state import RecurrentState
from ..tokenizers.base import Tokenizer
from .sampling import Penalties, SamplingParams, apply_penalties, ban_tokens, make_generator, sample

PREFILL_CHUNK = 512  # tokens per parallel-form call: bounds memory for any prompt length


@torch.no_grad()
def prefill(model, tokens: list[int], state: RecurrentState | None = None, chunk: int = PREFILL_CHUNK):
    """Feed tokens (one sequence) in chunks; returns (logits of the last token (V,), state)."""
    if not tokens:
        raise RwkvpyError("the prompt is empty: there is nothing to continue from")
    logits = None
    for start in range(0, len(tokens), chunk):
        ids = torch.tensor([tokens[start : start + chunk]], device=model.device)
        logits, state = model(ids, state, last_only=True)
    return logits[0, -1], state


class StopStringFilter:
    """Streams text while holding back any tail that could be the start of a stop string."""

    def __init__(self, stops: tuple[str, ...]):
        self.stops = stops
        self.held = ""

    def push(self, text: str) -> tuple[str, bool]:
        """(text safe to emit, whether a stop string was found)."""
        text = self.held + text
        self.held = ""
        hits = [i for i in (text.find(s) for s in self.stops) if i >= 0]
        if hits:
            return text[: min(hits)], True
        keep = 0
        for s in self.stops:
            for n in range(min(len(s) - 1, len(text)), keep, -1):
                if text.endswith(s[:n]):
                    keep = n
                    break
        if keep:
            text, self.held = text[:-keep], text[-keep:]
        return text, False

    def flush(self) -> str:
        text, self.held = self.held, ""
        return text


class Generation:
    """An iterator of text pieces; afterwards holds ``tokens``, ``text``, ``state``,
    ``finish_reason`` ('stop_token', 'stop_string' or 'length') and ``stop_token``."""

    def __init__(self, model, tokenizer: Tokenizer, prompt: str | list[int], params: SamplingParams,
                 state: RecurrentState | None = None, generator: torch.Generator | None = None,
                 prefill_chunk: int = PREFILL_CHUNK):
        self.model, self.tokenizer, self.params = model, tokenizer, params
        self.prefill_chunk = prefill_chunk
        self.generator = generator if generator is not None else make_generator(params.seed)
        self.prompt_tokens = tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
        self.state = state
        self.tokens: list[int] = []
        self.text = ""
        self.finish_reason: str | None = None
        self.stop_token: int | None = None
        self._started = False

    def __iter__(self) -> Iterator[str]:
        if self._started:
            raise RwkvpyError("a Generation can be iterated only once")
        self._started = True
        return self._run()

    def run(self) -> str:
        """Generate to the end without streaming; returns the text."""
        for _ in self:
            pass
        return self.text

    def _emit(self, piece: str) -> str:
        self.text += piece
        return piece

    @torch.no_grad()
    def _run(self) -> Iterator[str]:
        p, model, tok = self.params, self.model, self.tokenizer
        logits, self.state = prefill(model, self.prompt_tokens, self.state, self.prefill_chunk)
        penalties = Penalties.empty(logits.shape[-1])
        utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        stops = StopStringFilter(p.stop_strings)
        stop_tokens = set(p.stop_tokens)
        self.finish_reason = "length"
        penalised = p.presence_penalty != 0 or p.frequency_penalty != 0  # else skip O(V) work per token
        for _ in range(p.max_new_tokens):
            scores = ban_tokens(logits, p.banned_tokens)
            scores = apply_penalties(scores, penalties, p.presence_penalty, p.frequency_penalty)
            token = int(sample(scores, p, self.generator))
            if token in stop_tokens:
                self.finish_reason, self.stop_token = "stop_token", token
                break
            self.tokens.append(token)
            if penalised:
                penalties.add(token, p.penalty_decay)
            step_logits, self.state = model.step(torch.tensor([token], device=model.device), self.state)
            logits = step_logits[0]
            piece, stopped = stops.push(utf8.decode(tok.decode_bytes([token])))
            if piece:
                yield self._emit(piece)
            if stopped:
                self.finish_reason = "stop_string"
                return
        tail = stops.push(utf8.decode(b"", final=True))[0] + stops.flush()
        if tail:
            yield self._emit(tail)


def generate(model, tokenizer: Tokenizer, prompt: str | list[int], *, state: RecurrentState | None = None,
             params: SamplingParams | None = None, prefill_chunk: int = PREFILL_CHUNK,
             **sampling) -> Generation:
    """Start a generation; iterate it for text pieces. ``sampling`` fields as in SamplingParams."""
    if params is None:
        params = SamplingParams(**sampling)
    elif sampling:
        raise RwkvpyError("pass either params or sampling keywords, not both")
    return Generation(model, tokenizer, prompt, params, state, prefill_chunk=prefill_chunk)

"""Talking to a checkpoint: chat templates, streamed text, and the ``latentlm chat`` loop.

A tokenizer with a chat template (a Hugging Face one whose tokenizer_config.json or
chat_template.jinja has it, e.g. SmolLM2-Instruct's) turns the conversation into the prompt the
model was tuned on; the template is rendered with jinja2 the way ``transformers``'
``apply_chat_template`` renders it (sandboxed environment, ``trim_blocks`` and ``lstrip_blocks``,
``loopcontrols``, ``raise_exception``, ``strftime_now``, a ``tojson`` that keeps non-ASCII, the
special tokens as variables), and its special-token strings are encoded as the tokens. A
tokenizer without a template gets plain continuation: each message is a prompt of its own.

Replies are streamed (:class:`TextStream` prints text as soon as it is complete UTF-8) and end at
the tokenizer's end-of-sequence token or the document separator
(:func:`latentlm.interop.generation_stop_ids`).
"""

from __future__ import annotations

import functools
import json
import time
from collections.abc import Callable, Iterable
from datetime import datetime
from typing import Any

from latentlm.data.tokenizers import Tokenizer
from latentlm.errors import LatentLMError
from latentlm.generate import generate
from latentlm.methods.base import Method

Write = Callable[[str], Any]


@functools.lru_cache(maxsize=8)
def _compiled(template: str) -> Any:
    try:
        import jinja2
        from jinja2.ext import loopcontrols
        from jinja2.sandbox import ImmutableSandboxedEnvironment
    except ImportError:
        raise LatentLMError("this tokenizer's chat template needs jinja2; install it with `pip install jinja2`, "
                            "or pass --no-template for plain continuation") from None

    def raise_exception(message: str) -> None:
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x: Any, ensure_ascii: bool = False, indent: Any = None, separators: Any = None,
               sort_keys: bool = False) -> str:  # jinja's own escapes HTML characters
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        return env.from_string(template)
    except jinja2.exceptions.TemplateError as e:
        raise LatentLMError(f"the tokenizer's chat template does not compile ({e}); pass --no-template") from None


def render_chat(template: str, messages: list[dict[str, str]], special_tokens: dict[str, str] | None = None,
                add_generation_prompt: bool = True) -> str:
    """The text ``template`` makes of ``messages`` (``[{"role": ..., "content": ...}]``), ending with
    the assistant's turn opener when ``add_generation_prompt``."""
    import jinja2

    try:
        return _compiled(template).render(messages=messages, tools=None, documents=None,
                                          add_generation_prompt=add_generation_prompt, **(special_tokens or {}))
    except jinja2.exceptions.TemplateError as e:
        raise LatentLMError(f"the tokenizer's chat template failed on this conversation ({e}); pass "
                            "--no-template for plain continuation") from None


class TextStream:
    """Incremental decoding: :meth:`push` returns the text that ``ids`` so far add, holding back a
    trailing incomplete UTF-8 character (U+FFFD) until the token that completes it arrives;
    stop ids end the stream and are never shown. All pushes plus :meth:`finish` equal
    ``tokenizer.decode`` of the kept ids."""

    def __init__(self, tokenizer: Tokenizer, stop_ids: Iterable[int] = ()):
        self.tokenizer, self.stop_ids = tokenizer, set(stop_ids)
        self.ids: list[int] = []
        self.stopped = False
        self._shown = ""

    def push(self, ids: Iterable[int]) -> str:
        for i in ids:
            if self.stopped or i in self.stop_ids:
                self.stopped = True
                break
            self.ids.append(int(i))
        text = self.tokenizer.decode(self.ids)
        ready = text.rstrip("\ufffd")
        if not ready.startswith(self._shown) or len(ready) == len(self._shown):
            return ""
        new, self._shown = ready[len(self._shown):], ready
        return new

    def finish(self) -> str:
        text = self.tokenizer.decode(self.ids)
        rest = text[len(self._shown):] if text.startswith(self._shown) else ""
        self._shown = text
        return rest


def rate_line(tokens: int, seconds: float) -> str:
    """``[N tokens, S s, R tokens/s]``: new tokens over the wall time of the call (prefill included)."""
    return f"[{tokens} tokens, {seconds:.2f} s, {tokens / max(seconds, 1e-9):.1f} tokens/s]"


def stream_reply(method: Method, tokenizer: Tokenizer, prompt: list[int], write: Write, *, stop_ids: list[int],
                 stop: bool = True, **sampling: Any) -> tuple[list[int], float]:
    """Generate from one prompt, writing the text as it is sampled; ``(new ids, seconds)``."""
    stream = TextStream(tokenizer, stop_ids if stop else ())
    start = time.perf_counter()
    [out] = generate(method, [prompt], eot_id=stop_ids, stop_at_eot=stop, on_token=lambda ids: write(stream.push(ids)),
                     **sampling)
    seconds = time.perf_counter() - start
    write(stream.finish())
    return out, seconds


class ChatSession:
    """A conversation with a checkpoint: the history (with the tokenizer's template) or, without
    a template, plain continuation of each message alone."""

    def __init__(self, method: Method, tokenizer: Tokenizer, stop_ids: list[int], *, system: str | None = None,
                 use_template: bool = True, max_new_tokens: int = 256, **sampling: Any):
        self.method, self.tokenizer, self.stop_ids = method, tokenizer, stop_ids
        self.template = tokenizer.chat_template if use_template else None
        if system and self.template is None:
            raise LatentLMError("--system needs a tokenizer with a chat template; this one continues plain text")
        self.system, self.max_new_tokens, self.sampling = system, max_new_tokens, sampling
        self.history: list[dict[str, str]] = []
        self.block_size = method.model.cfg.block_size

    def reset(self) -> None:
        self.history = []

    def _encode(self, history: list[dict[str, str]]) -> list[int]:
        messages = ([{"role": "system", "content": self.system}] if self.system else []) + history
        return self.tokenizer.encode_special(render_chat(self.template, messages, self.tokenizer.special_tokens))

    def prompt(self, text: str) -> tuple[list[int], int]:
        """``(prompt ids, new-token budget)`` for the next reply to ``text``. The oldest turns are
        dropped while the prompt leaves no room below ``block_size``; the budget is
        ``max_new_tokens`` capped by what the window has left."""
        if self.template is None:
            ids = self.tokenizer.encode(text) or [self.tokenizer.eot_id]
            history: list[dict[str, str]] = []
        else:
            history = [*self.history, {"role": "user", "content": text}]
            ids = self._encode(history)
            while len(ids) >= self.block_size and len(history) > 1:
                history = history[2:]  # the oldest exchange (the history alternates user, assistant)
                ids = self._encode(history)
        room = self.block_size - len(ids)
        if room < 1:
            raise LatentLMError(f"the message is {len(ids)} tokens, the model's window {self.block_size}; "
                                "send a shorter message")
        return ids, min(self.max_new_tokens, room)

    def reply(self, text: str, write: Write) -> tuple[str, int, float]:
        """Answer ``text``, streaming into ``write``; ``(reply text, new tokens, seconds)``."""
        ids, budget = self.prompt(text)
        out, seconds = stream_reply(self.method, self.tokenizer, ids, write, stop_ids=self.stop_ids,
                                    max_new_tokens=budget, **self.sampling)
        answer = self.tokenizer.decode(out)
        if self.template is not None:
            self.history = [*self.history, {"role": "user", "content": text}, {"role": "assistant", "content": answer}]
            while len(self.history) > 2 and len(self._encode(self.history)) >= self.block_size:
                self.history = self.history[2:]
        return answer, len(out), seconds


def run_chat(session: ChatSession, lines: Iterable[str], write: Write, report: Write) -> int:
    """Answer each line of ``lines`` (``/reset`` forgets the conversation, ``/exit`` ends it);
    the replies stream into ``write``, a tokens/s line per reply into ``report``. Returns the
    number of replies."""
    replies = 0
    for line in lines:
        text = line.rstrip("\n")
        if not text.strip():
            continue
        if text.strip() in ("/exit", "/quit"):
            break
        if text.strip() == "/reset":
            session.reset()
            report("[conversation cleared]\n")
            continue
        _, n, seconds = session.reply(text, write)
        write("\n")
        report(rate_line(n, seconds) + "\n")
        replies += 1
    return replies

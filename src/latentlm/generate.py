"""Sampling from a trained method: the one generation loop every method shares.

Methods differ only in how a chunk of tokens advances the KV cache (:meth:`Method.step`);
this loop owns everything else: left-padding a batch of prompts, per-row position ids, one
prefill call, then one cached step per new token, sampling, and stopping at end-of-text.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch

from latentlm.errors import LatentLMError
from latentlm.methods.base import Method
from latentlm.settings import check_seed

MAX_SEQUENCE = 2**31 - 1  # prompt + new tokens: more than any KV cache (or attention kernel) can index


def check_sampling(temperature: float, top_k: int | None, top_p: float | None) -> None:
    """Raise :class:`LatentLMError` for sampling settings that mean nothing (NaN, negative, empty)."""
    if not (temperature >= 0 and math.isfinite(temperature)):
        raise LatentLMError(f"temperature={temperature} must be a finite number >= 0 (0 means greedy)")
    if top_k is not None and top_k < 1:
        raise LatentLMError(f"top_k={top_k} must be at least 1, or unset to keep every token")
    if top_p is not None and not 0 < top_p <= 1:
        raise LatentLMError(f"top_p={top_p} must be in (0, 1], or unset to disable nucleus sampling")


def sample_next(logits: torch.Tensor, *, temperature: float, top_k: int | None, top_p: float | None,
                generator: torch.Generator | None) -> torch.Tensor:
    """Pick one token per row from next-token ``logits`` [B, V]; returns a LongTensor [B].

    ``temperature`` 0 is greedy (argmax). Otherwise the logits are divided by the
    temperature, cut to the ``top_k`` most likely tokens, then to the nucleus: the smallest
    set of most likely tokens whose probability reaches ``top_p`` (never empty).
    """
    check_sampling(temperature, top_k, top_p)
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k is None and top_p is None:
        return torch.multinomial(logits.softmax(-1), 1, generator=generator).squeeze(-1)
    # Work on the candidates sorted by logit (descending); map the choice back at the end.
    if top_k is not None and top_k < logits.shape[-1]:
        values, order = logits.topk(top_k, dim=-1)
    else:
        values, order = logits.sort(dim=-1, descending=True)
    if top_p is not None:
        probs = values.softmax(-1)
        # Drop a token when the more likely ones before it already reach top_p.
        values = values.masked_fill(probs.cumsum(-1) - probs >= top_p, float("-inf"))
    choice = torch.multinomial(values.softmax(-1), 1, generator=generator)
    return order.gather(-1, choice).squeeze(-1)


def _check_request(method: Method, prompts: list[list[int]], max_new_tokens: int) -> None:
    """Raise :class:`LatentLMError` for requests the model cannot serve."""
    if not prompts:
        raise LatentLMError("no prompts given; pass at least one prompt")
    if any(len(p) == 0 for p in prompts):
        raise LatentLMError("a prompt is empty; every prompt needs at least one token "
                            "(start it with the end-of-text token for unconditional samples)")
    if max_new_tokens < 1:
        raise LatentLMError(f"--max-new-tokens={max_new_tokens} must be at least 1")
    cfg = method.model.cfg
    lo, hi = min(min(p) for p in prompts), max(max(p) for p in prompts)
    if lo < 0 or hi >= cfg.vocab_size:
        raise LatentLMError(f"prompt token ids span [{lo}, {hi}] but the model's vocabulary is "
                            f"[0, {cfg.vocab_size}); encode prompts with the model's tokenizer")
    longest = max(len(p) for p in prompts)
    if longest + max_new_tokens > MAX_SEQUENCE:
        raise LatentLMError(f"prompt of {longest} tokens + {max_new_tokens} new tokens is more than a KV cache can "
                            f"hold ({MAX_SEQUENCE} tokens); lower --max-new-tokens")
    if cfg.pos == "learned" and longest + max_new_tokens > cfg.block_size:
        raise LatentLMError(f"prompt of {longest} tokens + {max_new_tokens} new tokens exceeds the "
                            f"model's block_size={cfg.block_size} (learned positions); shorten the "
                            "prompt or lower --max-new-tokens")


def _compiled_decode(method: Method, batch: int, n_tokens: int, compile: bool | dict, device: torch.device):
    """A static cache for ``batch`` x ``n_tokens`` and the compiled step, kept on the method and reused
    (emptied in place) while the shape and options stay the same: the same buffers and the same graph
    (a CUDA graph replays fixed addresses)."""
    options = dict(compile) if isinstance(compile, dict) else \
        ({"mode": "reduce-overhead"} if device.type == "cuda" else {})
    key = (batch, n_tokens, repr(sorted(options.items())))
    kept = method.__dict__.get("_compiled_decode")
    if kept is not None and kept[0] == key:
        return kept[1].reset(), kept[2]
    cache = method.new_cache(batch, n_tokens).make_static()
    step = torch.compile(method.step, dynamic=False, **options)
    method.__dict__["_compiled_decode"] = (key, cache, step)
    return cache, step


@torch.inference_mode()
def generate(method: Method, prompts: list[list[int]], *, max_new_tokens: int, temperature: float = 1.0,
             top_k: int | None = None, top_p: float | None = None, eot_id: int | Sequence[int] | None = None,
             stop_at_eot: bool = True, seed: int | None = None,
             on_token: Callable[[list[int]], None] | None = None,
             compile: bool | dict = False) -> list[list[int]]:
    """Continue each prompt by up to ``max_new_tokens`` tokens; return only the new tokens.

    Prompts of unequal length are left-padded into one batch: pads are marked invalid (never
    attended to) and position ids count real tokens only, so every row gives the same tokens
    as it would alone. With ``stop_at_eot`` and an ``eot_id`` (one id, or several: e.g. the
    tokenizer's end-of-sequence token and the document separator), a row ends at its first
    such token (not included in the output) and the loop ends once all rows have; finished
    rows are still fed but their samples are discarded. ``seed`` makes sampling reproducible on
    a given device. ``on_token``, for streaming, gets each step's sampled ids (one per row) as
    they are drawn.

    ``compile`` (True, or a dict of ``torch.compile`` options) runs the decode steps compiled, over a
    static-shape cache (:meth:`~latentlm.model.transformer.KVCache.make_static`), so one graph serves
    every step (CUDA: ``mode="reduce-overhead"`` by default, i.e. CUDA graphs); the prefill runs
    eagerly. Same tokens as without it.
    """
    _check_request(method, prompts, max_new_tokens)
    check_sampling(temperature, top_k, top_p)  # before the prefill, not at the first sample
    if seed is not None:
        check_seed(seed, "seed")
    device = next(method.parameters()).device
    batch, width = len(prompts), max(len(p) for p in prompts)
    lengths = torch.tensor([len(p) for p in prompts], device=device)
    idx = torch.tensor([[0] * (width - len(p)) + list(p) for p in prompts], device=device)
    slot = torch.arange(width, device=device)[None] - (width - lengths)[:, None]  # <0 on pads
    valid, positions = slot >= 0, slot.clamp(min=0)
    # The last sampled token is never fed back, so the cache needs one slot less.
    decode = method.step
    if compile:
        cache, decode = _compiled_decode(method, batch, width + max_new_tokens - 1, compile, device)
    else:
        cache = method.new_cache(batch, width + max_new_tokens - 1)
    cache.padded = any(len(p) != width for p in prompts)
    generator = None if seed is None else torch.Generator(device=device).manual_seed(seed)
    stops = [] if eot_id is None else [eot_id] if isinstance(eot_id, int) else list(eot_id)
    stop = stop_at_eot and bool(stops)
    stop_ids = torch.tensor(stops, dtype=torch.long, device=device)
    done = torch.zeros(batch, dtype=torch.bool, device=device)
    step_valid = torch.ones(batch, 1, dtype=torch.bool, device=device)

    was_training = method.training
    method.eval()
    try:
        logits = method.step(idx, positions, valid, cache)[:, -1]
        new: list[torch.Tensor] = []
        for i in range(max_new_tokens):
            if i:
                logits = decode(new[-1][:, None], (lengths + i - 1)[:, None], step_valid, cache)[:, -1]
            new.append(sample_next(logits, temperature=temperature, top_k=top_k, top_p=top_p,
                                   generator=generator))
            if on_token is not None:
                on_token(new[-1].tolist())
            if stop:
                done |= torch.isin(new[-1], stop_ids)
                if done.all():
                    break
    finally:
        method.train(was_training)

    rows = torch.stack(new, dim=1).tolist()
    return [_cut(row, stops) if stop else row for row in rows]


def _cut(row: list[int], stops: list[int]) -> list[int]:
    """``row`` up to (without) its first stop id."""
    ends = [row.index(s) for s in stops if s in row]
    return row[:min(ends)] if ends else row

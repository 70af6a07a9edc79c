"""Zero-shot evaluation: scoring (context, continuation) requests with any method's own forward.

Every request is scored by the method's own ``eval_logits`` (what ``nll=True`` scores), so each method is evaluated the way it
computes next-token probabilities (CoCoMix with its concept slots, PonderLM-2 with its latent
thoughts in the current evaluation mode, ...). A request is a prefix (:func:`resolve_prefix`: by
default what lm-evaluation-harness's ``hf`` model puts first for this tokenizer; ``eos`` puts
the document-start token of the training shards), the context, then the continuation; its
log-likelihood is the sum over the continuation's tokens. Requests are batched with right
padding: attention is causal, so padding after a row's last token cannot change the scores
before it. Methods that can
evaluate through a KV cache (``Method.cached_eval``) run each distinct context once and its
continuations through copies of its cache, forming logits only where tokens are scored
(:func:`score_tokens`); the scores are the same.

Metrics follow lm-evaluation-harness (definitions in docs/EVAL.md): acc and acc_norm (log-
likelihood divided by the answer's length in characters) with the sample standard error of
the mean for multiple choice; LAMBADA's acc (every continuation token is the argmax) and
perplexity exp(-mean log-likelihood), with a delta-method standard error.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from latentlm.errors import LatentLMError
from latentlm.eval.perplexity import TextTokenizer
from latentlm.eval.tasks import TASKS, Example, check_tasks, load_task
from latentlm.methods.base import Method, token_nll, unwrap

__all__ = ["PREFIXES", "TASKS", "encode_requests", "evaluate_tasks", "format_table", "lambada_metrics",
           "multiple_choice_metrics", "resolve_max_len", "resolve_prefix", "score_requests", "score_tokens", "start_id"]

PAD_ID = 0  # any real id: right padding is never seen by earlier positions and never scored
PREFIXES = ("auto", "eos", "bos", "none")


def resolve_prefix(tokenizer: TextTokenizer, prefix: str = "auto") -> tuple[str, list[int]]:
    """The tokens put before every request's context, as ``(name, ids)``.

    ``eos``: the end-of-text token, which starts every document of the training shards; ``bos``:
    the tokenizer's beginning-of-sequence token (ours declare end-of-text as BOS); ``none``:
    nothing, so the context's first token is only conditioned on; ``auto``: what
    lm-evaluation-harness's ``hf`` model does with the tokenizer's Hugging Face form, i.e. the
    tokens that tokenizer adds before a text (``bos`` for Llama-style tokenizers, ``none`` for
    GPT-2, SmolLM2 and latentlm's gpt2 / bpe / byte tokenizers). With any choice an empty context
    becomes the BOS token (end-of-text without one), as in the harness.
    """
    if prefix not in PREFIXES:
        raise LatentLMError(f"prefix {prefix!r} is not one of {', '.join(PREFIXES)}")
    bos = getattr(tokenizer, "bos_id", tokenizer.eot_id)
    if prefix == "eos":
        return "eos", [tokenizer.eot_id]
    if prefix == "bos":
        if bos is None:
            raise LatentLMError("the tokenizer defines no beginning-of-sequence token; use prefix eos, none or auto")
        return "bos", [bos]
    ids = list(getattr(tokenizer, "default_prefix", list)()) if prefix == "auto" else []
    return ("none" if not ids else "bos" if ids == [bos] else f"ids {ids}"), ids


def start_id(tokenizer: TextTokenizer) -> int:
    """The context of a request whose context is empty: BOS, else end-of-text (lm-eval's prefix token)."""
    bos = getattr(tokenizer, "bos_id", None)
    return tokenizer.eot_id if bos is None else bos


def resolve_max_len(method: Method, max_len: int | None = None) -> int:
    """Most tokens one scored sequence may feed the model: by default the training window
    (``cfg.seq_len`` tokens). Slots that methods add per token (thoughts, pauses, concepts)
    share their token's position id, so the limit counts tokens, not cache slots; learned
    position tables cap it at ``block_size``."""
    m = unwrap(method)
    cfg = m.model.cfg
    n = m.cfg.seq_len if max_len is None else max_len
    if n < 1:
        raise LatentLMError(f"max_len={n} must be at least 1 token")
    if cfg.pos == "learned" and n > cfg.block_size:
        raise LatentLMError(f"max_len={n} exceeds the model's block_size={cfg.block_size} (learned positions); "
                            "lower --seq-len")
    return n


def _encode(tokenizer: TextTokenizer, context: str, continuation: str,
            prefix: Sequence[int]) -> tuple[list[int], list[int]]:
    """Token ids of prefix + context (the start token if both are empty) and of the continuation.
    Trailing whitespace of the context moves to the continuation, so a word's leading space is
    tokenized with the word."""
    stripped = context.rstrip()
    continuation = context[len(stripped):] + continuation
    cont = tokenizer.encode(continuation)
    if not cont:
        raise LatentLMError(f"continuation {continuation!r} encodes to no tokens; nothing to score")
    return list(prefix) + tokenizer.encode(stripped) or [start_id(tokenizer)], cont


@torch.inference_mode()
def score_requests(method: Method, tokenizer: TextTokenizer, requests: Sequence[tuple[str, str]], *,
                   batch_size: int = 16, max_len: int | None = None, greedy: bool = False,
                   progress: bool = False, desc: str = "requests",
                   prefix: Sequence[int] | None = None) -> list[tuple[float, bool]]:
    """``(log-likelihood, is_greedy)`` of each (context, continuation) request, in order.

    ``prefix``: token ids put before every context (default: end-of-text, the document start of
    the training shards; :func:`resolve_prefix` gives the named choices).

    Sequences longer than ``max_len + 1`` tokens (see :func:`resolve_max_len`) lose context
    from the left; a continuation longer than ``max_len`` keeps only its last ``max_len``
    tokens scored. ``is_greedy`` (computed only with ``greedy``, else False) says whether
    every scored token was the model's argmax.

    Methods that can evaluate through a KV cache (:attr:`Method.cached_eval`) run each distinct
    context once and all its continuations after it, batched through a copy of its cache, and
    form logits only at the scored tokens (:func:`score_tokens`); the others score each whole
    sequence, longest first. Both give the same values (tested).
    """
    if batch_size < 1:
        raise LatentLMError(f"batch_size={batch_size} must be at least 1")
    m = unwrap(method)
    max_len = resolve_max_len(m, max_len)
    vocab = m.model.cfg.vocab_size
    if getattr(tokenizer, "vocab_size", 0) > vocab:
        raise LatentLMError(f"the tokenizer has {tokenizer.vocab_size} ids but the model's vocabulary has {vocab}; "
                            "use the tokenizer the model was trained with")
    seqs, n_scored = encode_requests(tokenizer, requests, max_len, prefix)
    return score_tokens(method, seqs, n_scored, batch_size=batch_size, greedy=greedy, progress=progress, desc=desc)


def encode_requests(tokenizer: TextTokenizer, requests: Sequence[tuple[str, str]], max_len: int,
                    prefix: Sequence[int] | None = None) -> tuple[list[list[int]], list[int]]:
    """The token sequences :func:`score_requests` scores (prefix, default EOT, + context +
    continuation, cut to the last ``max_len + 1`` tokens) and how many of their last tokens are scored."""
    seqs, n_scored = [], []
    for context, continuation in requests:
        ctx, cont = _encode(tokenizer, context, continuation, [tokenizer.eot_id] if prefix is None else prefix)
        seqs.append((ctx + cont)[-(max_len + 1):])
        n_scored.append(min(len(cont), max_len))
    return seqs, n_scored


@torch.inference_mode()
def score_tokens(method: Method, seqs: Sequence[Sequence[int]], n_scored: Sequence[int], *, batch_size: int = 16,
                 greedy: bool = False, progress: bool = False, desc: str = "requests",
                 shared_context: bool | None = None) -> list[tuple[float, bool]]:
    """``(log-likelihood, is_greedy)`` of the last ``n_scored[i]`` tokens of each token sequence
    ``seqs[i]`` given the tokens before them (at least one), in order. ``shared_context`` (default:
    where the method can, :attr:`Method.cached_eval`) runs each distinct context once, its
    continuations through a copy of its KV cache (and the prefix neighbouring contexts share once,
    where that runs fewer tokens); otherwise every sequence runs whole."""
    if batch_size < 1:
        raise LatentLMError(f"batch_size={batch_size} must be at least 1")
    m = unwrap(method)
    for s, n in zip(seqs, n_scored, strict=True):
        if not 1 <= n < len(s):
            raise LatentLMError(f"cannot score the last {n} of {len(s)} tokens: at least one token must precede them")
    shared = m.cached_eval if shared_context is None else shared_context
    if shared and not m.cached_eval:
        raise LatentLMError(f"method {m.name!r} cannot evaluate through a KV cache; score with shared_context=False")
    results: list[tuple[float, bool]] = [(0.0, False)] * len(seqs)
    was_training = method.training
    method.eval()
    m.pop_eval_metrics()  # statistics of these calls (e.g. Jacobi residuals) are not kept
    try:
        with tqdm(total=len(seqs), disable=not progress, desc=desc, unit="req") as bar:
            if shared:
                batches = [([i for _, members in groups for i in members], groups)
                           for groups in _shared_batches(seqs, n_scored, batch_size)]
            else:
                batches = [(rows, rows) for rows in _whole_batches(seqs, batch_size)]
            for rows, batch in batches:
                scores = (_score_shared if shared else _score_whole)(m, seqs, n_scored, batch, greedy)
                for i, score in zip(rows, scores):
                    results[i] = score
                bar.update(len(rows))
    finally:
        m.pop_eval_metrics()
        method.train(was_training)
    return results


def _whole_batches(seqs: Sequence[Sequence[int]], batch_size: int) -> list[list[int]]:
    order = sorted(range(len(seqs)), key=lambda i: -len(seqs[i]))
    return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]


def _score_whole(m: Method, seqs, n_scored, rows: list[int], greedy: bool) -> list[tuple[float, bool]]:
    """One right-padded batch of whole sequences through ``eval_logits`` (any method)."""
    device = next(m.parameters()).device
    width = max(len(seqs[i]) for i in rows) - 1
    lengths = torch.tensor([len(seqs[i]) - 1 for i in rows], device=device)
    counts = torch.tensor([n_scored[i] for i in rows], device=device)
    ids = torch.tensor([list(seqs[i]) + [PAD_ID] * (width + 1 - len(seqs[i])) for i in rows], device=device)
    x, y = ids[:, :-1], ids[:, 1:]
    logits = m.eval_logits(x)  # what ``nll=True`` scores, so greedy matching reads the same logits
    nll = token_nll(logits, y)
    col = torch.arange(width, device=device)[None]
    scored = (col < lengths[:, None]) & (col >= (lengths - counts)[:, None])
    logprob = -torch.where(scored, nll.double(), 0.0).sum(1)
    if greedy:
        is_greedy = ((logits.argmax(-1) == y) | ~scored).all(1)
    else:
        is_greedy = torch.zeros(len(rows), dtype=torch.bool, device=device)
    return list(zip(logprob.tolist(), is_greedy.tolist()))


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def _prefix_groups(seqs: Sequence[Sequence[int]], n_scored: Sequence[int],
                   batch_size: int) -> list[tuple[int, list[int]]]:
    """Requests grouped by a shared prefix, as ``(prefix length P, members)``, in input order: first
    the requests with the same context (the tokens before the scored ones, P = its length), then
    neighbouring groups whose contexts share a prefix when running it once costs fewer tokens than
    running each context (e.g. WinoGrande's two fillings of one sentence: the words before the
    blank). P never reaches into a member's scored tokens; a group has at most ``batch_size`` members."""
    by_context: dict[tuple[int, ...], list[int]] = {}
    for i, (s, n) in enumerate(zip(seqs, n_scored)):
        by_context.setdefault(tuple(s[:len(s) - n]), []).append(i)
    groups: list[tuple[int, list[int]]] = []
    for ctx, members in by_context.items():
        if groups:
            p, last = groups[-1]
            shared = min(p, _common_prefix(seqs[last[0]][:p], ctx))
            # Tokens run: each group's prefix once, each member its own tokens after the prefix.
            apart = p + len(ctx)
            together = shared + len(last) * (p - shared) + len(members) * (len(ctx) - shared)
            if shared >= 1 and together < apart and len(last) + len(members) <= batch_size:
                groups[-1] = (shared, last + members)
                continue
        groups.append((len(ctx), members))
    return groups


def _shared_batches(seqs: Sequence[Sequence[int]], n_scored: Sequence[int],
                    batch_size: int) -> list[list[tuple[int, list[int]]]]:
    """Prefix groups (:func:`_prefix_groups`) packed into batches of at most ``batch_size`` requests (a
    larger group is a batch of its own). Groups are ordered by prefix length, by the longest member's
    tokens after it or by both summed, whichever pads least (tokens run: each batch's prefixes padded to
    its longest, its remainders to theirs): long contexts (HellaSwag) favour the first, long answers
    (PIQA) the second."""
    items = [(p, max(len(seqs[i]) - p for i in members), (p, members))
             for p, members in _prefix_groups(seqs, n_scored, batch_size)]

    def pack(order) -> tuple[int, list[list[tuple[int, list[int]]]]]:
        batches: list[list[tuple[int, int, tuple[int, list[int]]]]] = []
        for item in order:
            if batches and sum(len(g[2][1]) for g in batches[-1]) + len(item[2][1]) <= batch_size:
                batches[-1].append(item)
            else:
                batches.append([item])
        cost = sum(len(b) * max(g[0] for g in b) + sum(len(g[2][1]) for g in b) * max(g[1] for g in b)
                   for b in batches)
        return cost, [[g[2] for g in b] for b in batches]

    orders = (sorted(items, key=lambda g: (-g[0], -g[1])), sorted(items, key=lambda g: (-g[1], -g[0])),
              sorted(items, key=lambda g: (-g[0] - g[1], -g[0])))
    return min((pack(o) for o in orders), key=lambda cb: cb[0])[1]


# Scored positions whose logits are formed at once: bounds the [n, V] float32 block of a batch.
SCORE_CHUNK = 1024


def _score_shared(m: Method, seqs, n_scored, groups: list[tuple[int, list[int]]],
                  greedy: bool) -> list[tuple[float, bool]]:
    """One batch through the cache: the batch's distinct prefixes (a group's first P tokens) in one
    right-padded pass, then every request's tokens after its prefix (but its last token) in one pass
    over copies of its prefix's cache rows; logits only at the scored positions (each token is
    predicted by the slot before it: the prefix's last slot, then the request's own)."""
    device = next(m.parameters()).device
    model = m.model
    rows = [i for _, members in groups for i in members]
    n_pre = [p for p, _ in groups]
    group_of = [g for g, (_, members) in enumerate(groups) for _ in members]
    width = max(n_pre)
    tails = [list(seqs[i][n_pre[g]:]) for i, g in zip(rows, group_of)]  # the tokens each slot after P-1 predicts
    feed = max(len(t) for t in tails) - 1  # the last token is predicted, never fed

    ids = torch.tensor([list(seqs[members[0]][:p]) + [PAD_ID] * (width - p) for p, members in groups], device=device)
    col = torch.arange(width, device=device)[None]
    valid = col < torch.tensor(n_pre, device=device)[:, None]
    cache = m.new_cache(len(groups), width)
    cache.padded = len(set(n_pre)) > 1
    h_pre = m.eval_hidden(ids, col.expand(len(groups), -1), valid, cache)
    group = torch.tensor(group_of, device=device)
    last = torch.tensor(n_pre, device=device)[group] - 1
    # Slot k of a row (0: its prefix's last slot, k >= 1: its k-th token after the prefix) predicts tails[row][k].
    hidden = [h_pre[group, last]]
    owner = [torch.arange(len(rows), device=device)]
    slot = [torch.zeros(len(rows), dtype=torch.long, device=device)]
    if feed > 0:
        tail_cache = cache.select_rows(group, m.cache_slots(width + feed))
        del cache
        tail_ids = torch.tensor([t[:-1] + [PAD_ID] * (feed + 1 - len(t)) for t in tails], device=device)
        j = torch.arange(feed, device=device)[None]
        tail_valid = j < torch.tensor([len(t) - 1 for t in tails], device=device)[:, None]
        pos = torch.where(tail_valid, last[:, None] + 1 + j, last[:, None] + 1)  # padding: any position in range
        h_tail = m.eval_hidden(tail_ids, pos, tail_valid, tail_cache)
        hidden.append(h_tail[tail_valid])  # row-major: each row's fed tokens in order
        owner.append(torch.arange(len(rows), device=device)[:, None].expand(-1, feed)[tail_valid])
        slot.append((j + 1).expand(len(rows), -1)[tail_valid])
    h, who, k = torch.cat(hidden), torch.cat(owner), torch.cat(slot)
    padded = torch.tensor([t + [PAD_ID] * (feed + 1 - len(t)) for t in tails], device=device)
    # Each row scores only its last n_scored slots (the ones before predict the rest of its context).
    firsts = torch.tensor([len(t) - n_scored[i] for t, i in zip(tails, rows)], device=device)
    keep = k >= firsts[who]
    h, who, target = h[keep], who[keep], padded[who[keep], k[keep]]
    logprob = torch.zeros(len(rows), dtype=torch.float64, device=device)
    hits = torch.ones(len(rows), dtype=torch.bool, device=device)
    for start in range(0, h.shape[0], SCORE_CHUNK):
        part = slice(start, start + SCORE_CHUNK)
        logits = model.head(h[part])
        lp = -token_nll(logits[None], target[part][None])[0]
        logprob.index_add_(0, who[part], lp.double())
        if greedy:
            miss = logits.argmax(-1) != target[part]
            hits.index_fill_(0, who[part][miss], False)
    is_greedy = hits if greedy else torch.zeros_like(hits)
    return list(zip(logprob.tolist(), is_greedy.tolist()))


def _mean_stderr(values: np.ndarray) -> tuple[float, float]:
    """Mean and its sample standard error (ddof 1; NaN with fewer than 2 values)."""
    mean = float(values.mean())
    stderr = float(values.std(ddof=1) / math.sqrt(len(values))) if len(values) > 1 else float("nan")
    return mean, stderr


def multiple_choice_metrics(examples: Sequence[Example], logprobs: Sequence[Sequence[float]]) -> dict[str, float]:
    """acc / acc_norm and their standard errors from each example's per-choice log-likelihoods.

    The prediction is the first choice with the highest log-likelihood (acc) or the highest
    log-likelihood per character of the answer text (acc_norm; empty answers count as 1)."""
    correct, correct_norm = [], []
    for ex, lls in zip(examples, logprobs, strict=True):
        lls = np.asarray(lls, dtype=np.float64)
        correct.append(float(np.argmax(lls) == ex.gold))
        correct_norm.append(float(np.argmax(lls / np.maximum(ex.lengths, 1)) == ex.gold))
    acc, acc_se = _mean_stderr(np.array(correct))
    acc_norm, acc_norm_se = _mean_stderr(np.array(correct_norm))
    return {"acc": acc, "acc_stderr": acc_se, "acc_norm": acc_norm, "acc_norm_stderr": acc_norm_se,
            "n": len(correct)}


def lambada_metrics(scores: Sequence[tuple[float, bool]]) -> dict[str, float]:
    """Last-word accuracy (greedy) and perplexity exp(-mean log-likelihood) over passages; the
    perplexity's standard error is the delta method's ppl x stderr(mean log-likelihood)."""
    lls = np.array([lp for lp, _ in scores], dtype=np.float64)
    acc, acc_se = _mean_stderr(np.array([float(g) for _, g in scores]))
    mean_ll, ll_se = _mean_stderr(lls)
    ppl = math.exp(-mean_ll)
    return {"acc": acc, "acc_stderr": acc_se, "ppl": ppl, "ppl_stderr": ppl * ll_se, "n": len(lls)}


def evaluate_tasks(method: Method, tokenizer: TextTokenizer, tasks: list[str], *, limit: int | None = None,
                   batch_size: int = 16, max_len: int | None = None, progress: bool = True,
                   prefix: str = "auto") -> dict[str, dict[str, float]]:
    """Zero-shot metrics of ``method`` on each task of ``tasks`` (names from :data:`TASKS`),
    using the first ``limit`` examples of each, every request after ``prefix``
    (:func:`resolve_prefix`). Multiple choice: acc, acc_stderr, acc_norm, acc_norm_stderr, n;
    lambada: acc, acc_stderr, ppl, ppl_stderr, n."""
    check_tasks(list(tasks))
    prefix_ids = resolve_prefix(tokenizer, prefix)[1]
    max_len = resolve_max_len(method, max_len)
    if batch_size < 1:
        raise LatentLMError(f"batch_size={batch_size} must be at least 1")
    results = {}
    for name in tasks:
        examples = load_task(name, limit)
        requests = [r for ex in examples for r in ex.requests]
        scores = score_requests(method, tokenizer, requests, batch_size=batch_size, max_len=max_len,
                                greedy=name == "lambada", progress=progress, desc=name, prefix=prefix_ids)
        if name == "lambada":
            results[name] = lambada_metrics(scores)
            continue
        logprobs, i = [], 0
        for ex in examples:
            logprobs.append([lp for lp, _ in scores[i:i + len(ex.requests)]])
            i += len(ex.requests)
        results[name] = multiple_choice_metrics(examples, logprobs)
    return results


def format_table(results: dict[str, dict[str, float]]) -> str:
    """A plain-text table: one row per task, metric ± standard error."""

    def cell(r: dict[str, float], key: str, spec: str) -> str:
        if key not in r:
            return ""
        return f"{r[key]:{spec}} ± {r.get(key + '_stderr', float('nan')):{spec}}"

    head = f"{'task':<14} {'n':>6}  {'acc':<17} {'acc_norm':<17} ppl"
    lines = [head, "-" * (len(head) + 16)]
    for name, r in results.items():
        lines.append(f"{name:<14} {int(r['n']):>6}  {cell(r, 'acc', '.4f'):<17} {cell(r, 'acc_norm', '.4f'):<17} "
                     f"{cell(r, 'ppl', '.5g')}".rstrip())
    return "\n".join(lines)

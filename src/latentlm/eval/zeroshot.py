"""Zero-shot evaluation: scoring (context, continuation) requests with any method's own forward.

Every request is scored by the method's own ``eval_logits`` (what ``nll=True`` scores), so each method is evaluated the way it
computes next-token probabilities (CoCoMix with its concept slots, PonderLM-2 with its latent
thoughts in the current evaluation mode, ...). A request is a prefix (:func:`resolve_prefix`: by
default what lm-evaluation-harness's ``hf`` model puts first for this tokenizer; ``eos`` puts
the document-start token of the training shards), the context, then the continuation; its
log-likelihood is the sum over the continuation's tokens. Requests are batched with right
padding: attention is causal, so padding after a row's last token cannot change the scores
before it.

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

__all__ = ["PREFIXES", "TASKS", "evaluate_tasks", "format_table", "lambada_metrics", "multiple_choice_metrics",
           "resolve_max_len", "resolve_prefix", "score_requests", "start_id"]

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
    every scored token was the model's argmax. Longest requests are batched first.
    """
    if batch_size < 1:
        raise LatentLMError(f"batch_size={batch_size} must be at least 1")
    m = unwrap(method)
    max_len = resolve_max_len(m, max_len)
    vocab = m.model.cfg.vocab_size
    if getattr(tokenizer, "vocab_size", 0) > vocab:
        raise LatentLMError(f"the tokenizer has {tokenizer.vocab_size} ids but the model's vocabulary has {vocab}; "
                            "use the tokenizer the model was trained with")
    seqs, n_scored = [], []
    for context, continuation in requests:
        ctx, cont = _encode(tokenizer, context, continuation, [tokenizer.eot_id] if prefix is None else prefix)
        seqs.append((ctx + cont)[-(max_len + 1):])
        n_scored.append(min(len(cont), max_len))
    order = sorted(range(len(seqs)), key=lambda i: -len(seqs[i]))
    device = next(m.parameters()).device
    results: list[tuple[float, bool]] = [(0.0, False)] * len(seqs)
    was_training = method.training
    method.eval()
    m.pop_eval_metrics()  # statistics of these calls (e.g. Jacobi residuals) are not kept
    try:
        with tqdm(total=len(seqs), disable=not progress, desc=desc, unit="req") as bar:
            for start in range(0, len(order), batch_size):
                rows = order[start:start + batch_size]
                width = len(seqs[rows[0]]) - 1
                lengths = torch.tensor([len(seqs[i]) - 1 for i in rows], device=device)
                counts = torch.tensor([n_scored[i] for i in rows], device=device)
                ids = torch.tensor([seqs[i] + [PAD_ID] * (width + 1 - len(seqs[i])) for i in rows], device=device)
                x, y = ids[:, :-1], ids[:, 1:]
                logits = m.eval_logits(x)  # what ``nll=True`` scores, so greedy matching reads the same logits
                nll = token_nll(logits, y)
                col = torch.arange(width, device=device)[None]
                scored = (col < lengths[:, None]) & (col >= (lengths - counts)[:, None])
                logprob = -torch.where(scored, nll.double(), 0.0).sum(1)
                if greedy:
                    hits = logits[..., :vocab].argmax(-1) == y
                    is_greedy = (hits | ~scored).all(1)
                else:
                    is_greedy = torch.zeros(len(rows), dtype=torch.bool, device=device)
                for i, lp, g in zip(rows, logprob.tolist(), is_greedy.tolist()):
                    results[i] = (lp, g)
                bar.update(len(rows))
    finally:
        m.pop_eval_metrics()
        method.train(was_training)
    return results


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

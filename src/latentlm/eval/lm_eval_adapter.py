"""A latentlm checkpoint as an EleutherAI lm-evaluation-harness model (optional extra ``lm-eval``).

Registered as ``latentlm``, so the harness's own tasks can run on any method::

    lm_eval --model latentlm --model_args checkpoint=runs/demo/runs/ntp --tasks hellaswag --include_path ...

or from Python: ``lm_eval.simple_evaluate(model=LatentLMEvalModel(method=m, tokenizer=t), tasks=[...])``.
Requests go through the same code as ``latentlm eval --tasks``: log-likelihoods through
:func:`~latentlm.eval.zeroshot.score_requests` (each method's own forward, EOT as document
start), rolling log-likelihoods through :func:`~latentlm.eval.perplexity.evaluate_tokens`
(non-overlapping windows), and generation through :func:`~latentlm.generate.generate`.
Only this module imports ``lm_eval``.
"""

from __future__ import annotations

import json
from typing import Any

from latentlm.errors import LatentLMError

try:
    from lm_eval.api.model import LM
    from lm_eval.api.registry import register_model
except ImportError:
    raise LatentLMError("the lm-evaluation-harness adapter needs lm-eval; run `pip install 'latentlm[lm-eval]'`") from None

from tqdm.auto import tqdm

from latentlm.eval.perplexity import evaluate_tokens
from latentlm.eval.zeroshot import resolve_max_len, score_requests
from latentlm.generate import generate
from latentlm.loading import checkpoint_tokenizer, load_method
from latentlm.methods.base import Method


@register_model("latentlm")
class LatentLMEvalModel(LM):
    """Either ``checkpoint`` (a run or checkpoint directory, loaded on ``device``) or an in-memory
    ``method`` with its ``tokenizer``. ``max_len`` is the scoring window in tokens (default: the
    training window); ``max_gen_toks`` the default generation length."""

    def __init__(self, checkpoint: str | None = None, *, method: Method | None = None, tokenizer: Any = None,
                 device: str = "cpu", batch_size: int | str = 16, max_len: int | None = None,
                 max_gen_toks: int = 256, **harness_options: Any):
        super().__init__()
        if (checkpoint is None) == (method is None):
            raise LatentLMError("pass either checkpoint=PATH or method= and tokenizer=")
        if checkpoint is not None:
            method, _, manifest = load_method(checkpoint, device)
            tokenizer = checkpoint_tokenizer(checkpoint, manifest)
        elif tokenizer is None:
            raise LatentLMError("an in-memory method needs its tokenizer= too")
        if not str(batch_size).isdigit() or int(batch_size) < 1:
            raise LatentLMError(f"batch_size={batch_size!r} must be a positive integer ('auto' is not supported)")
        # harness_options: what the harness passes every model (max_batch_size, ...); batches here have a fixed size.
        self.method, self.tokenizer = method, tokenizer
        self.batch_size = int(batch_size)
        self.max_len = resolve_max_len(method, None if max_len is None else int(max_len))
        self.max_gen_toks = int(max_gen_toks)

    def loglikelihood(self, requests: list, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        """(log P(continuation | context), continuation is greedy) per ``(context, continuation)``."""
        return score_requests(self.method, self.tokenizer, [r.args for r in requests], batch_size=self.batch_size,
                              max_len=self.max_len, greedy=True, progress=not disable_tqdm, desc="loglikelihood")

    def loglikelihood_rolling(self, requests: list, disable_tqdm: bool = False) -> list[float]:
        """Total log-likelihood of each whole string after EOT, in windows of ``max_len`` tokens."""
        out = []
        for req in tqdm(requests, disable=disable_tqdm, desc="loglikelihood_rolling"):
            ids = [self.tokenizer.eot_id] + self.tokenizer.encode(req.args[0])
            if len(ids) < 2:
                out.append(0.0)  # the empty string: probability 1
                continue
            r = evaluate_tokens(self.method, ids, seq_len=self.max_len, batch_size=self.batch_size)
            out.append(-r["loss"] * r["tokens"])
        return out

    def generate_until(self, requests: list, disable_tqdm: bool = False) -> list[str]:
        """Greedy (or, with ``do_sample``, sampled) continuations cut before the first stop string.
        Consecutive requests with equal generation options share a batch."""
        out: list[str] = []
        with tqdm(total=len(requests), disable=disable_tqdm, desc="generate_until") as bar:
            i = 0
            while i < len(requests):
                options = requests[i].args[1]
                j = i + 1
                while j < len(requests) and j - i < self.batch_size and \
                        json.dumps(requests[j].args[1], sort_keys=True, default=str) == \
                        json.dumps(options, sort_keys=True, default=str):
                    j += 1
                out.extend(self._generate([r.args[0] for r in requests[i:j]], dict(options)))
                bar.update(j - i)
                i = j
        return out

    def _generate(self, contexts: list[str], options: dict[str, Any]) -> list[str]:
        until = options.get("until") or []
        until = [until] if isinstance(until, str) else list(until)
        max_new = max(1, min(int(options.get("max_gen_toks", self.max_gen_toks)), self.max_len - 1))
        temperature = float(options.get("temperature", 1.0)) if options.get("do_sample") else 0.0
        prompts = [([self.tokenizer.eot_id] + self.tokenizer.encode(c))[-(self.max_len - max_new):] for c in contexts]
        texts = []
        for ids in generate(self.method, prompts, max_new_tokens=max_new, temperature=temperature,
                            eot_id=self.tokenizer.eot_id, seed=0):
            text = self.tokenizer.decode(ids)
            cut = min((text.index(s) for s in until if s and s in text), default=len(text))
            texts.append(text[:cut])
        return texts
